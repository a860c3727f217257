"""ModelConfig: one validated description of a decoder, in megatron-core's vocabulary.

Field names follow ``megatron.core.transformer.TransformerConfig`` (num_layers, hidden_size,
num_attention_heads, num_query_groups, ffn_hidden_size, kv_channels, layernorm_epsilon,
init_method_std, rotary_base, ...) so the mapping to Megatron is a single function and a reader
from Megatron feels at home. Fields Megatron keeps outside TransformerConfig (vocab_size,
max_position_embeddings, share_embeddings_and_output_weights) use GPTModel's argument names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

ROPE_STYLES = ("interleaved", "rotate_half")
ATTENTION_BACKENDS = ("auto", "sdpa", "flex", "varlen")


class ConfigError(ValueError):
    """A configuration value breaks a rule; the message names the field and the rule."""


@dataclass(frozen=True)
class ModelConfig:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    vocab_size: int
    # GQA: number of key/value heads. None means multi-head attention (one group per head).
    num_query_groups: int | None = None
    # Per-head dimension. None means hidden_size // num_attention_heads.
    kv_channels: int | None = None
    max_position_embeddings: int = 2048
    rotary_base: float = 10_000.0
    # "interleaved": adjacent pairs rotate together (MobileLLM-R1, Llama-4, Meta's original Llama).
    # "rotate_half": element i pairs with i + head_dim/2 (HF Llama, megatron's default).
    rope_style: str = "rotate_half"
    layernorm_epsilon: float = 1e-5
    # Parameter-free RMS normalisation of q and k over head_dim, applied after RoPE (Llama-4 style).
    # Note: megatron's qk_layernorm has learnable weights and runs before RoPE; the engine bridge
    # maps this field explicitly rather than assuming the two agree.
    qk_layernorm: bool = False
    share_embeddings_and_output_weights: bool = True
    init_method_std: float = 0.02
    # MobileLLM "immediate block-wise sharing": every block runs twice in a row (depth x2, no extra
    # parameters).
    layer_sharing: bool = False
    # Packed-document attention: auto | sdpa | flex | varlen (see ct_model.attention).
    attention_backend: str = "auto"
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        if self.num_query_groups is None:
            object.__setattr__(self, "num_query_groups", self.num_attention_heads)
        if self.kv_channels is None:
            if self.num_attention_heads > 0 and self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; set kv_channels explicitly"
                )
            object.__setattr__(
                self, "kv_channels", self.hidden_size // max(self.num_attention_heads, 1)
            )
        self._validate()

    def _validate(self) -> None:
        positive = (
            "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
            "ffn_hidden_size", "vocab_size", "kv_channels", "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} must be divisible by "
                f"num_query_groups={self.num_query_groups} (each KV group serves whole query heads)"
            )
        if self.kv_channels % 2:
            raise ConfigError(f"kv_channels={self.kv_channels} must be even (RoPE rotates pairs)")
        if self.rope_style not in ROPE_STYLES:
            raise ConfigError(f"rope_style must be one of {ROPE_STYLES}, got {self.rope_style!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(
                f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}"
            )
        if not self.rotary_base > 0:
            raise ConfigError(f"rotary_base must be > 0, got {self.rotary_base!r}")
        if not self.layernorm_epsilon > 0:
            raise ConfigError(f"layernorm_epsilon must be > 0, got {self.layernorm_epsilon!r}")
        if not self.init_method_std > 0:
            raise ConfigError(f"init_method_std must be > 0, got {self.init_method_std!r}")

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def effective_depth(self) -> int:
        """Blocks run per forward (twice num_layers with immediate layer sharing)."""
        return self.num_layers * (2 if self.layer_sharing else 1)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed, validated again."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s): {', '.join(unknown)}")
        return cls(**values)
