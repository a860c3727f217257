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

from .errors import UserError

ROPE_STYLES = ("interleaved", "rotate_half")
ROUTER_SCORE_FUNCTIONS = ("sigmoid", "softmax")
ATTENTION_BACKENDS = ("auto", "sdpa", "flex", "varlen")


class ConfigError(UserError):
    """A configuration value breaks a rule; the message names the field and the rule."""


def _require_positive_int(config: "ModelConfig", name: str) -> None:
    value = getattr(config, name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


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
    # --- Mixture of experts (DeepSeek-V3 style), megatron-core's names. None = dense model.
    num_moe_experts: int | None = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int | None = None
    # Width of the always-on shared expert(s); None means no shared expert.
    moe_shared_expert_intermediate_size: int | None = None
    # Leading dense blocks before the MoE blocks (DeepSeek-V3: 3; HF's first_k_dense_replace).
    moe_first_dense_layers: int = 0
    moe_router_score_function: str = "softmax"
    # Aux-loss-free balancing: a per-expert bias that shifts selection only (not the weights).
    moe_router_enable_expert_bias: bool = False
    moe_router_bias_update_rate: float = 1e-3
    # Group-limited routing: experts split in num_groups, tokens pick group_topk groups first.
    moe_router_num_groups: int | None = None
    moe_router_group_topk: int | None = None
    moe_router_topk_scaling_factor: float | None = None
    # Sequence-wise auxiliary balance loss weight (0 disables it).
    moe_aux_loss_coeff: float = 0.0
    # --- Multi-latent attention; q_lora_rank None means a full-rank q projection.
    multi_latent_attention: bool = False
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_head_dim: int = 128
    qk_pos_emb_head_dim: int = 64
    v_head_dim: int = 128
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
        if self.num_moe_experts is not None:
            self._validate_moe()
        if self.multi_latent_attention:
            self._validate_mla()

    def _validate_moe(self) -> None:
        for name in ("num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size"):
            _require_positive_int(self, name)
        if self.moe_shared_expert_intermediate_size is not None:
            _require_positive_int(self, "moe_shared_expert_intermediate_size")
        if self.moe_router_topk > self.num_moe_experts:
            raise ConfigError(f"moe_router_topk={self.moe_router_topk} exceeds num_moe_experts="
                              f"{self.num_moe_experts}")
        if not 0 <= self.moe_first_dense_layers <= self.num_layers:
            raise ConfigError(f"moe_first_dense_layers must be in [0, num_layers={self.num_layers}], "
                              f"got {self.moe_first_dense_layers!r}")
        if self.moe_router_score_function not in ROUTER_SCORE_FUNCTIONS:
            raise ConfigError(f"moe_router_score_function must be one of {ROUTER_SCORE_FUNCTIONS}, "
                              f"got {self.moe_router_score_function!r}")
        if (self.moe_router_num_groups is None) != (self.moe_router_group_topk is None):
            raise ConfigError("moe_router_num_groups and moe_router_group_topk must be set together")
        if self.moe_router_num_groups is not None:
            _require_positive_int(self, "moe_router_num_groups")
            _require_positive_int(self, "moe_router_group_topk")
            if self.num_moe_experts % self.moe_router_num_groups:
                raise ConfigError(f"num_moe_experts={self.num_moe_experts} must be divisible by "
                                  f"moe_router_num_groups={self.moe_router_num_groups}")
            if self.moe_router_group_topk > self.moe_router_num_groups:
                raise ConfigError(f"moe_router_group_topk={self.moe_router_group_topk} exceeds "
                                  f"moe_router_num_groups={self.moe_router_num_groups}")
            per_group = self.num_moe_experts // self.moe_router_num_groups
            if self.moe_router_topk > self.moe_router_group_topk * per_group:
                raise ConfigError(f"moe_router_topk={self.moe_router_topk} exceeds the experts in "
                                  f"moe_router_group_topk={self.moe_router_group_topk} groups")
        if self.moe_router_topk_scaling_factor is not None and not self.moe_router_topk_scaling_factor > 0:
            raise ConfigError("moe_router_topk_scaling_factor must be > 0, got "
                              f"{self.moe_router_topk_scaling_factor!r}")
        if not self.moe_router_bias_update_rate >= 0:
            raise ConfigError("moe_router_bias_update_rate must be >= 0, got "
                              f"{self.moe_router_bias_update_rate!r}")
        if not self.moe_aux_loss_coeff >= 0:
            raise ConfigError(f"moe_aux_loss_coeff must be >= 0, got {self.moe_aux_loss_coeff!r}")

    def _validate_mla(self) -> None:
        for name in ("kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"):
            _require_positive_int(self, name)
        if self.q_lora_rank is not None:
            _require_positive_int(self, "q_lora_rank")
        if self.qk_pos_emb_head_dim % 2:
            raise ConfigError(f"qk_pos_emb_head_dim={self.qk_pos_emb_head_dim} must be even "
                              "(RoPE rotates pairs)")

    @property
    def is_moe(self) -> bool:
        return self.num_moe_experts is not None

    def is_moe_layer(self, index: int) -> bool:
        """Whether block ``index`` (0-based) carries the MoE MLP rather than the dense one."""
        return self.is_moe and index >= self.moe_first_dense_layers

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def rope_dim(self) -> int:
        """Dimensions RoPE rotates per head: MLA's decoupled qk_pos_emb_head_dim, else head_dim."""
        return self.qk_pos_emb_head_dim if self.multi_latent_attention else self.kv_channels

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
        return from_known_fields(cls, values, "ModelConfig")


def from_known_fields(cls, values: dict[str, Any], label: str):
    """``cls(**values)`` after rejecting keys that are not fields of the dataclass ``cls`` (the one
    shared check of every component config's ``from_dict``; ct_stages.config builds whole runs)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown {label} field(s): {', '.join(unknown)}")
    return cls(**values)
