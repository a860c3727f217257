"""Multi-head latent attention (DeepSeek-V2/V3, paper sec. 2.1.1).

Queries come from a low-rank latent (``q_lora_rank``; a full-rank ``q_proj`` when it is None);
keys and values from one shared latent of ``kv_lora_rank`` dims. Each head's query/key is
``qk_head_dim`` position-free dims (from the latents) followed by ``qk_pos_emb_head_dim`` RoPE
dims; the key's RoPE part is one vector shared by all heads (decoupled RoPE, computed straight
from the hidden state). Values have ``v_head_dim`` dims. Parameter names are transformers'
(``DeepseekV3Attention``), so HF import/export is a copy.

Softmax scale: (qk_head_dim + qk_pos_emb_head_dim) ** -0.5, SDPA's default for that query width,
as transformers uses without rope scaling (yarn's mscale is not supported: the config has no
rope-scaling fields, and HF import refuses scaled RoPE).

The KV cache holds the normed kv latent and the rotated shared RoPE key (what MLA was designed to
cache, and what transformers caches); per-head keys and values are re-expanded every step.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import MaskInfo, attend
from .config import ModelConfig
from .layers import KVCache, RMSNorm
from .rope import apply_rope

# DeepSeek's reference code and transformers build the latent norms with RMSNorm's default eps
# (1e-6), not the config's rms_norm_eps; parity needs the same.
LATENT_NORM_EPS = 1e-6


class MLAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        h, heads = config.hidden_size, config.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = (config.qk_head_dim, config.qk_pos_emb_head_dim,
                                                    config.v_head_dim)
        self.kv_rank = config.kv_lora_rank
        q_out = heads * (self.nope_dim + self.rope_dim)
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(h, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, config.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(config.q_lora_rank, q_out, bias=False)
        # One projection gives the kv latent and the shared RoPE key ("with MQA": one key head).
        self.kv_a_proj_with_mqa = nn.Linear(h, self.kv_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_rank, heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(heads * self.v_dim, h, bias=False)

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.q_lora_rank is None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: MaskInfo | torch.Tensor | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        cos, sin = rope
        style = self.config.rope_style
        q = self._queries(x).view(b, t, -1, self.nope_dim + self.rope_dim).transpose(1, 2)
        q_nope, q_rot = q.split((self.nope_dim, self.rope_dim), dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split((self.kv_rank, self.rope_dim), dim=-1)
        # Single-head 4D views [B, 1, T, d], so the generation cache stores them like k and v.
        latent = self.kv_a_layernorm(latent)[:, None]
        k_rot = apply_rope(k_rot[:, None], cos, sin, style)
        q = torch.cat((q_nope, apply_rope(q_rot, cos, sin, style)), dim=-1)
        if cache is not None:
            latent, k_rot = cache.append(latent, k_rot)
        k, v = self._expand(latent, k_rot)
        out = attend(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def _expand(self, latent: torch.Tensor, k_rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys [B, H, Tk, nope + rope] and values [B, H, Tk, v] from the latents."""
        b, _, tk, _ = latent.shape
        kv = self.kv_b_proj(latent[:, 0]).view(b, tk, -1, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split((self.nope_dim, self.v_dim), dim=-1)
        k = torch.cat((k_nope, k_rot.expand(-1, k_nope.shape[1], -1, -1)), dim=-1)
        return k, v
