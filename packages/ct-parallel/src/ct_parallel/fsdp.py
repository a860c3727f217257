"""FSDP2: per-block ``fully_shard`` of a ct-model Decoder, then the root (embeddings, final norm).

Tied embeddings stay tied: ``embed_tokens.weight`` is the only output matrix (the Decoder has no
``lm_head`` when tied) and it is sharded once, by the root. Mixed precision is optional: with
``param_dtype=None`` parameters compute in their own dtype (fp32 on CPU, where bf16 is ~4x slower).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from ct_model.dtypes import dtypes
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from .native import NativeEngine

_DTYPES = dtypes("float32", "bfloat16", "float16")


class FSDP2Engine(NativeEngine):
    """NativeEngine whose model is FSDP2-sharded; gradients sync only on the last microbatch."""

    def _no_sync(self, last: bool):
        self.wrapped.set_requires_gradient_sync(last)
        return contextlib.nullcontext()


def shard_fsdp2(model: nn.Module, device: torch.device, *, param_dtype: str | None = None,
                reduce_dtype: str = "float32", reshard_after_forward: bool = True):
    """``fully_shard`` every block, then the root, on a 1-D data-parallel mesh of ``device``'s
    type; returns the mesh. Works on a ``meta`` model (shards are materialised afterwards)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("strategy 'fsdp2' needs torch.distributed initialised (call init_distributed)")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("dp",))
    policy = MixedPrecisionPolicy(
        param_dtype=_DTYPES[param_dtype] if param_dtype else None,
        reduce_dtype=_DTYPES[reduce_dtype] if param_dtype else None,
    )
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    # The root keeps embeddings + final norm; no point resharding what backward needs first.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    return mesh
