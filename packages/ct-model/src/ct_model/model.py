"""The decoder: embeddings, a stack of pre-norm blocks, final RMSNorm, (tied) output layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import DecoderBlock, KVCache, RMSNorm
from .attention import build_mask_info
from .rope import rope_angles


class Decoder(nn.Module):
    """MobileLLM / Llama decoder. Knows nothing of parallelism or precision."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderBlock(config) for _ in range(config.num_layers))
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
    ) -> torch.Tensor:
        """Logits [B, T, vocab] for ``input_ids`` [B, T].

        ``position_ids`` restart at each packed document; ``document_ids`` restrict attention to
        the token's own document. Without document ids attention is plain causal.
        """
        return self.logits(self.hidden_states(input_ids, position_ids, document_ids))

    def hidden_states(self, input_ids, position_ids=None, document_ids=None, attention_mask=None,
                      caches: list[KVCache] | None = None) -> torch.Tensor:
        """Final-normed hidden states [B, T, hidden] (what chunked losses consume)."""
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        mask = attention_mask
        if mask is None:
            # Built once per microbatch and shared by every layer (flex block mask, cu_seqlens).
            mask = build_mask_info(document_ids, self.config.attention_backend)
        rope = rope_angles(position_ids, self.config.kv_channels, self.config.rotary_base)
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
    def init_weights(self, generator: torch.Generator | None = None) -> "Decoder":
        """Materialise every parameter: normal(0, init_method_std) for matrices, ones for norms."""
        std = self.config.init_method_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std, generator=generator)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        return self


def build_model(config: ModelConfig, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None, seed: int | None = None) -> Decoder:
    """Build a Decoder. On ``meta`` nothing is allocated (call ``to_empty`` + ``init_weights``)."""
    with torch.device(device):
        model = Decoder(config)
    if torch.device(device).type != "meta":
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        model.init_weights(generator)
    if dtype is not None:
        model.to(dtype)
    return model


def count_parameters(model_or_config: nn.Module | ModelConfig) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    if isinstance(model_or_config, ModelConfig):
        return _count_from_config(model_or_config)
    seen: set[int] = set()
    total = 0
    for p in model_or_config.parameters():  # parameters() already de-duplicates shared tensors
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def block_matmul_parameters(c: ModelConfig) -> int:
    """Weights of one block's matrices (q, k, v, o and the SwiGLU MLP), norms excluded."""
    attention = c.hidden_size * c.kv_channels * (2 * c.num_attention_heads + 2 * c.num_query_groups)
    return attention + 3 * c.hidden_size * c.ffn_hidden_size


def _count_from_config(c: ModelConfig) -> int:
    h = c.hidden_size
    block = block_matmul_parameters(c) + 2 * h
    embeddings = c.vocab_size * h * (1 if c.share_embeddings_and_output_weights else 2)
    return embeddings + c.num_layers * block + h
