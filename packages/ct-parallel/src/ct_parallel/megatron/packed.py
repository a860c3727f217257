"""Packed documents as megatron's THD format: ``PackedSeqParams`` from a microbatch's document ids.

THD ("total tokens, heads, dim") attention takes every document of a microbatch as one variable-
length sequence, delimited by cumulative lengths (``cu_seqlens``), instead of a dense [B, 1, T, T]
mask: no T x T tensor exists and Transformer Engine runs its flash/cuDNN kernels. megatron's THD
path has batch size 1 (attention squeezes dim 1: megatron/core/transformer/attention.py, "if
packed_seq_params ... qkv_format == 'thd': query = query.squeeze(1)"), so a microbatch [B, T] is
flattened to one row [1, B * T] and its logits unflattened to [B, T, V] for the loss.

Segments are maximal runs of equal document id within a row, and every row starts a new one, so a
document never reaches across rows (the dense mask's rows are independent too). ct_data's loader
gives padding its own document id (-1) after the row's documents: a padding run is one more
segment, attending only to itself, exactly as under the dense mask (its labels are -100). A
document id that owns no token (ids 0, 2 with 1 absent) produces no segment: cu_seqlens never
holds an empty sequence.
"""

from __future__ import annotations

import torch
from megatron.core.packed_seq_params import PackedSeqParams


def segment_starts(document_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                   shape: tuple[int, int] | None = None) -> torch.Tensor:
    """Boolean [B, T]: True where a THD segment starts (column 0 of every row, and each change of
    document id). Without document ids, a position id of 0 starts a document (torchtitan's rule);
    without either, each row is one document."""
    if document_ids is not None:
        starts = torch.ones_like(document_ids, dtype=torch.bool)
        starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
        return starts
    if position_ids is not None:
        starts = position_ids == 0
        starts[:, 0] = True  # a document continued from the previous sequence starts here too
        return starts
    if shape is None:
        raise ValueError("segment_starts needs document_ids, position_ids or a shape")
    starts = torch.zeros(shape, dtype=torch.bool)
    starts[:, 0] = True
    return starts


def cu_seqlens_from_starts(starts: torch.Tensor) -> torch.Tensor:
    """int32 [num_segments + 1]: offsets of the segments in the flattened [B * T] row, then B * T."""
    flat = starts.reshape(-1)
    offsets = torch.nonzero(flat, as_tuple=False).reshape(-1)
    end = torch.tensor([flat.numel()], device=flat.device)
    return torch.cat((offsets, end)).to(torch.int32)


def packed_seq_params(mb: dict[str, torch.Tensor]) -> PackedSeqParams:
    """megatron's THD parameters for microbatch ``mb`` (keys ``input_ids`` and, when present,
    ``document_ids`` / ``position_ids``, all [B, T]); queries and keys share the segments (self-attention).

    The *_padded variants stay None: every segment holds exactly its tokens (padding is a segment
    of its own, not slack inside one), and TE uses cu_seqlens where the padded ones are None."""
    ids = mb["input_ids"]
    starts = segment_starts(mb.get("document_ids"), mb.get("position_ids"), tuple(ids.shape)).to(ids.device)
    cu = cu_seqlens_from_starts(starts)
    # A Python int: TE sizes its kernels from it (a tensor would force a device sync per layer).
    max_len = int((cu[1:] - cu[:-1]).max().item())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=max_len, max_seqlen_kv=max_len)


def flatten_rows(t: torch.Tensor) -> torch.Tensor:
    """[B, T, ...] -> [1, B * T, ...] (THD's single packed row)."""
    return t.reshape(1, t.shape[0] * t.shape[1], *t.shape[2:])


def unflatten_rows(t: torch.Tensor, batch_size: int) -> torch.Tensor:
    """[1, B * T, ...] -> [B, T, ...], the inverse of ``flatten_rows``."""
    if t.shape[0] != 1 or t.shape[1] % batch_size:
        raise ValueError(f"cannot unflatten a tensor of shape {tuple(t.shape)} into {batch_size} rows")
    return t.reshape(batch_size, t.shape[1] // batch_size, *t.shape[2:])
