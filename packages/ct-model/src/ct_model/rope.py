"""Rotary position embeddings in both layouts, computed from explicit position ids.

No buffers: the inverse frequencies are recomputed per call (head_dim/2 values), so a model built on
the meta device and materialised later never carries stale RoPE tables.
"""

from __future__ import annotations

import torch


def rope_angles(position_ids: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [B, T, head_dim/2] in float32 for integer ``position_ids`` [B, T]."""
    exponent = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (base**exponent)
    angles = position_ids.to(torch.float32)[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """Rotate ``x`` [B, heads, T, head_dim] by angles [B, T, head_dim/2]."""
    cos = cos[:, None]
    sin = sin[:, None]
    xf = x.float()
    if style == "interleaved":
        even, odd = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
    else:
        half = x.shape[-1] // 2
        first, second = xf[..., :half], xf[..., half:]
        out = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
    return out.to(x.dtype)
