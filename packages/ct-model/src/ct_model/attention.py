"""Attention over packed documents: one entry point, ``attend(q, k, v, mask_info)``, several backends.

The mask object (``MaskInfo``) is built once per microbatch from ``document_ids`` and handed to
every layer, so the flex block mask or the varlen ``cu_seqlens`` are computed once, not per layer.
Every backend applies the same predicate (``document_causal``): a query may see a key that is not
after it and lies in the same document.

Backends (``ModelConfig.attention_backend``):
  sdpa    dense boolean [B, 1, T, T] mask into SDPA (the CPU path; flex has no CPU backward)
  flex    flex_attention with a block mask (no T x T tensor; fast only when compiled, on GPU)
  varlen  cu_seqlens over the flattened tokens: torch.nn.attention.varlen on CUDA; on CPU a loop
          over the documents, each one causal SDPA (the CPU flash kernel, with backward), so
          long packed rows train on CPU without a T x T tensor
  auto    plain causal SDPA (flash) when every row holds one document; otherwise flex on CUDA;
          on CPU the dense mask up to DENSE_MASK_MAX_TOKENS per row, varlen beyond
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .masking import document_causal_mask

from .config import ATTENTION_BACKENDS

# Auto on CPU: up to this row length the dense mask (16 MiB of bools per row at 4,096) is cheaper
# than a Python loop over documents; beyond it the mask grows as T^2 (1 GiB per row at 32,768).
DENSE_MASK_MAX_TOKENS = 4096


def document_causal(document_ids: torch.Tensor):
    """The mask predicate in flex_attention's signature (b, h, q_idx, kv_idx) -> bool."""

    def predicate(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (document_ids[b, q_idx] == document_ids[b, kv_idx])

    return predicate


def cu_seqlens_from_document_ids(document_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative document lengths over the flattened [B*T] tokens (int32) and the longest document.

    A document starts at every row start and wherever the id changes along a row (packing keeps a
    document's tokens contiguous), so equal ids in two rows are still two sequences.
    """
    b, t = document_ids.shape
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    idx = torch.nonzero(starts.reshape(-1)).reshape(-1)
    total = torch.tensor([b * t], device=document_ids.device)
    cu = torch.cat([idx, total]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


@dataclass
class MaskInfo:
    """What ``attend`` needs for one microbatch; build it with ``build_mask_info``."""

    backend: str  # resolved: "causal", "sdpa", "flex" or "varlen"
    dense: torch.Tensor | None = None
    block_mask: object | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    # CPU varlen: (start, end) of every document over the flattened tokens, read once per microbatch.
    segments: tuple[tuple[int, int], ...] = ()


def _resolve(backend: str, document_ids: torch.Tensor | None) -> str:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if bool((document_ids == document_ids[:, :1]).all()):
        return "causal"  # one document per row: the flash kernel with is_causal, no mask at all
    if document_ids.is_cuda:
        return "flex"
    return "sdpa" if document_ids.shape[1] <= DENSE_MASK_MAX_TOKENS else "varlen"


def build_mask_info(document_ids: torch.Tensor | None, backend: str = "auto") -> MaskInfo:
    """The per-microbatch mask object for ``document_ids`` [B, T] (None: plain causal)."""
    if document_ids is None:
        return MaskInfo("causal")
    resolved = _resolve(backend, document_ids)
    if resolved == "sdpa":
        return MaskInfo("sdpa", dense=document_causal_mask(document_ids))
    if resolved == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        b, t = document_ids.shape
        block = create_block_mask(document_causal(document_ids), b, None, t, t,
                                  device=document_ids.device)
        return MaskInfo("flex", block_mask=block)
    if resolved == "varlen":
        cu, longest = cu_seqlens_from_document_ids(document_ids)
        bounds = cu.tolist()
        return MaskInfo("varlen", cu_seqlens=cu, max_seqlen=longest,
                        segments=tuple(zip(bounds[:-1], bounds[1:])))
    return MaskInfo("causal")


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           mask_info: MaskInfo | torch.Tensor | None) -> torch.Tensor:
    """Attention of q [B, H, T, D] over k [B, G, Tk, D], v [B, G, Tk, Dv] (GQA when G < H)
    -> [B, H, T, Dv]. The softmax scale is D ** -0.5 (SDPA's default).

    ``mask_info`` may also be a dense boolean mask tensor (generation with padded prompts) or
    None (plain causal).
    """
    # Tensor parallelism may shard heads, so read the local head counts from the tensors.
    gqa = q.shape[1] != k.shape[1]
    if isinstance(mask_info, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask_info, enable_gqa=gqa)
    if mask_info is None or mask_info.backend == "causal":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if mask_info.backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask_info.dense, enable_gqa=gqa)
    if mask_info.backend == "flex":
        return _flex(q.is_cuda)(q, k, v, block_mask=mask_info.block_mask, enable_gqa=gqa)
    return _varlen(q, k, v, mask_info, gqa)


_COMPILED_FLEX = None


def _flex(on_cuda: bool):
    # Uncompiled flex materialises the full score matrix; only the compiled kernel avoids it.
    # On CPU (tests, forward only) the eager version is used: compiling costs minutes there.
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if not on_cuda:
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention)
    return _COMPILED_FLEX


def _varlen(q, k, v, info: MaskInfo, gqa: bool) -> torch.Tensor:
    b, h, t, _ = q.shape
    # Each tensor keeps its own last dim: MLA's values are narrower than its queries and keys.
    flat = lambda x: x.transpose(1, 2).reshape(b * t, x.shape[1], x.shape[-1])  # noqa: E731
    if not q.is_cuda:
        out = _per_document(flat(q), flat(k), flat(v), info.segments)
    else:
        from torch.nn.attention.varlen import varlen_attn

        out = varlen_attn(flat(q), flat(k), flat(v), info.cu_seqlens, info.cu_seqlens,
                          info.max_seqlen, info.max_seqlen, window_size=(-1, 0), enable_gqa=gqa)
    return out.reshape(b, t, h, -1).transpose(1, 2)


def _per_document(q, k, v, segments) -> torch.Tensor:
    """Varlen attention on CPU: q [N, H, D], k/v [N, G, D] over the flattened tokens -> [N, H, Dv],
    each document attending causally to itself only."""
    heads = q.shape[1]
    if k.shape[1] != heads:
        # CPU SDPA's flash kernel is ~15x slower with enable_gqa at long lengths (measured at 8k
        # tokens); repeating the KV heads costs O(T) memory and keeps the fast kernel.
        k = k.repeat_interleave(heads // k.shape[1], dim=1)
        v = v.repeat_interleave(heads // v.shape[1], dim=1)
    outs = []
    for start, end in segments:
        doc = lambda x: x[start:end].transpose(0, 1).unsqueeze(0)  # noqa: E731  [1, H, L, D]
        out = F.scaled_dot_product_attention(doc(q), doc(k), doc(v), is_causal=True)
        outs.append(out.squeeze(0).transpose(0, 1))
    return torch.cat(outs)
