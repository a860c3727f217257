"""Attention masks for packed batches: one mask function, used for every backend.

A token may attend to a key when the key is not after it and both lie in the same document.
On CPU the mask is materialised as a dense boolean [B, 1, Tq, Tk] for SDPA (flex_attention has no
CPU backward); the same predicate can feed flex_attention's block mask on GPU.
"""

from __future__ import annotations

import torch


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Dense boolean mask [B, 1, T, T]: True where query i may attend to key j."""
    t = document_ids.shape[-1]
    idx = torch.arange(t, device=document_ids.device)
    causal = idx[None, :, None] >= idx[None, None, :]
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]
    return (causal & same_doc)[:, None]


def padded_causal_mask(key_valid: torch.Tensor, query_len: int) -> torch.Tensor:
    """Mask [B, 1, Tq, Tk] for the last ``query_len`` queries over keys, hiding invalid (pad) keys.

    Used by generation with left-padded prompts: queries are the last positions of the key axis.
    """
    tk = key_valid.shape[-1]
    q_pos = torch.arange(tk - query_len, tk, device=key_valid.device)
    k_pos = torch.arange(tk, device=key_valid.device)
    causal = q_pos[:, None] >= k_pos[None, :]
    return (causal[None] & key_valid[:, None, :])[:, None]
