"""The decoder: embeddings, a stack of pre-norm blocks, final RMSNorm, (tied) output layer."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .batch import ModelOutput
from .config import ModelConfig
from .layers import Attention, KVCache, RMSNorm, SwiGLU
from .attention import build_mask_info
from .mla import MLAttention
from .moe import MoE, reset_router_load
from .param_count import count_from_config
from .rope import rope_angles


class DecoderBlock(nn.Module):
    """Pre-norm block. ``index`` (0-based) decides the MLP: DeepSeek-V3 keeps its first
    ``moe_first_dense_layers`` blocks dense; attention is MLA when ``multi_latent_attention``.
    Here beside the Decoder, above layers/mla/moe, so that none of those imports another back."""

    def __init__(self, config: ModelConfig, index: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.self_attn = MLAttention(config) if config.multi_latent_attention else Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.mlp = MoE(config) if config.is_moe_layer(index) else SwiGLU(config)

    def forward(self, x, rope, mask, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """MobileLLM / Llama / DeepSeek-V3 (MLA + MoE) decoder. Knows nothing of parallelism or
    precision."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderBlock(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.lm_head = (
            None
            if config.share_embeddings_and_output_weights
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )

    @property
    def output_weight(self) -> torch.Tensor:
        """The [vocab, hidden] matrix that maps final hidden states to logits."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        head: Callable[[ModelOutput], Any] | None = None,
    ) -> Any:
        """Logits [B, T, vocab] for ``input_ids`` [B, T]; or ``head(ModelOutput(hidden, W))``.

        ``position_ids`` restart at each packed document; ``document_ids`` restrict attention to
        the token's own document. Without document ids attention is plain causal.

        ``head`` replaces the output layer by any function of the final hidden states and the
        output weight (a chunked loss, say). It runs inside this forward on purpose: a wrapper
        such as FSDP2 only holds the weights unsharded while the wrapped module's forward runs.
        """
        hidden = self.hidden_states(input_ids, position_ids, document_ids)
        if head is not None:
            return head(ModelOutput(hidden, self.output_weight))
        return self.logits(hidden)

    def hidden_states(self, input_ids, position_ids=None, document_ids=None, attention_mask=None,
                      caches: list[KVCache] | None = None) -> torch.Tensor:
        """Final-normed hidden states [B, T, hidden] (what chunked losses consume)."""
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        mask = attention_mask
        if mask is None:
            # Built once per microbatch and shared by every layer (flex block mask, cu_seqlens).
            mask = build_mask_info(document_ids, self.config.attention_backend)
        rope = rope_angles(position_ids, self.config.rope_dim, self.config.rotary_base)
        x = self.embed_tokens(input_ids)
        repeats = 2 if self.config.layer_sharing else 1
        for i, block in enumerate(self.layers):
            for r in range(repeats):
                cache = None if caches is None else caches[i * repeats + r]
                x = block(x, rope, mask, cache)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.output_weight)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> "Decoder":
        """Fill every parameter and buffer with its initial value (ct_model.init): normal(0,
        init_method_std) for matrices (expert tensors and the router included), ones for norms,
        zeros for the routers' bias and load counters. The values depend on ``seed`` and each
        parameter's name only, so any layout that builds this model gets the same weights.
        ``seed=None`` draws one from torch's global generator."""
        from .init import SeededInit

        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        source = SeededInit(self, seed)
        for name, tensor in [*self.named_parameters(), *self.named_buffers()]:
            tensor.copy_(source.full(name))
        return self


def build_model(config: ModelConfig, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None, seed: int | None = None) -> Decoder:
    """Build a Decoder. On ``meta`` nothing is allocated (a parallelize step materialises it, or
    call ``to_empty`` + ``init_weights``)."""
    with torch.device(device):
        model = Decoder(config)
    if torch.device(device).type != "meta":
        model.init_weights(seed)
    if dtype is not None:
        model.to(dtype)
    return model


def model_from_state(config: ModelConfig, state: dict[str, torch.Tensor], device: str | torch.device = "cpu",
                     strict: bool = True) -> tuple[Decoder, list[str], list[str]]:
    """A Decoder holding ``state``: built on meta (nothing initialised twice), then filled.

    Returns (model, missing keys, unexpected keys); with ``strict`` a mismatch raises."""
    model = build_model(config, device="meta")
    model.to_empty(device=device)
    missing, unexpected = model.load_state_dict(state, strict=strict)
    reset_router_load(model)  # not in the state dict: to_empty left it uninitialised
    return model, list(missing), list(unexpected)


def count_parameters(model_or_config: nn.Module | ModelConfig) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    if isinstance(model_or_config, ModelConfig):
        return count_from_config(model_or_config)
    seen: set[int] = set()
    total = 0
    for p in model_or_config.parameters():  # parameters() already de-duplicates shared tensors
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
