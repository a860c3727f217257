"""Decoder building blocks: RMSNorm, GQA attention with RoPE and QK-norm, SwiGLU MLP (the block that
assembles them, with MLA and MoE, is model.DecoderBlock)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MaskInfo, attend
from .config import ModelConfig
from .rope import apply_rope


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class KVCache:
    """Keys and values of one layer, grown along the sequence axis during generation."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat((self.k, k), dim=2)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=2)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.n_heads = config.num_attention_heads
        self.n_groups = config.num_query_groups
        self.head_dim = config.kv_channels
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.n_groups * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.n_groups * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: MaskInfo | torch.Tensor | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q = apply_rope(q, cos, sin, self.config.rope_style)
        k = apply_rope(k, cos, sin, self.config.rope_style)
        if self.config.qk_layernorm:
            # Parameter-free RMS over head_dim after RoPE, as Llama-4 / MobileLLM-R1 do.
            q = F.rms_norm(q, (self.head_dim,), eps=self.config.layernorm_epsilon)
            k = F.rms_norm(k, (self.head_dim,), eps=self.config.layernorm_epsilon)
        if cache is not None:
            k, v = cache.append(k, v)
        out = attend(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, f = config.hidden_size, config.ffn_hidden_size
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
