"""Process-group set-up from torchrun's environment, and the rank facts the rest of a run needs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import DistributedConfig


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits. The data loader must shard by ``dp_rank`` / ``dp_size``:
    tensor- and pipeline-parallel ranks of one model replica read the same batches."""

    rank: int
    world_size: int
    local_rank: int
    dp_rank: int
    dp_size: int
    tp_rank: int = 0
    pp_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _backend(config: DistributedConfig) -> str:
    if config.backend != "auto":
        return config.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(config: DistributedConfig) -> DistInfo:
    """Initialise torch.distributed from torchrun's env vars (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT); for the megatron engine also megatron's model-parallel groups.

    A single process without torchrun variables (and engine native/single) stays uninitialised.
    Calling it again when the process group already exists reuses it.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    needs_group = world_size > 1 or config.engine == "megatron" or config.strategy != "single"
    if needs_group and not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        if "MASTER_ADDR" not in os.environ and world_size == 1:
            # One process without torchrun (a notebook, ct-export): a private single-rank group whose
            # store lives in this process. A TCP store would need a free port, and one picked in
            # advance can be taken by another process before the store binds it (EADDRINUSE seen).
            kwargs["store"] = dist.HashStore()
        dist.init_process_group(backend=_backend(config), rank=rank, world_size=world_size,
                                timeout=timedelta(minutes=config.timeout_minutes), **kwargs)
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    dp_size = config.data_parallel_size(world_size)
    if config.engine == "megatron":
        from .megatron.state import initialize_megatron_parallel

        tp_rank, pp_rank, dp_rank = initialize_megatron_parallel(config)
        return DistInfo(rank, world_size, local_rank, dp_rank, dp_size, tp_rank, pp_rank, device)
    if config.strategy == "single" and world_size > 1:
        raise ValueError(f"distributed.strategy=single launched with {world_size} processes; use ddp or fsdp2")
    return DistInfo(rank, world_size, local_rank, rank, world_size, 0, 0, device)


# Set by the test-only megatron CPU shim (packages/ct-parallel/tests): megatron then runs on CPU.
MEGATRON_CPU_SHIM_ENV = "CT_MEGATRON_CPU_SHIM"


def megatron_can_run() -> bool:
    """megatron-core calls CUDA unconditionally: it runs with CUDA, or under the test-only shim."""
    return torch.cuda.is_available() or bool(os.environ.get(MEGATRON_CPU_SHIM_ENV))


# -- the rank helpers every package shares (one copy, here) ---------------------------------------


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def global_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def main_first(is_main: bool, fn):
    """Run ``fn`` on the main rank, then on the others (which then find its cached output)."""
    result = fn() if is_main else None
    barrier()
    return result if is_main else fn()


def shutdown_distributed(config: DistributedConfig) -> None:
    """Tear down what ``init_distributed`` built (megatron's groups, then the process group), so a
    process can run another phase or exit without leaked groups."""
    if config.engine == "megatron":
        from .megatron.state import destroy_megatron_parallel

        destroy_megatron_parallel()
    if is_distributed():
        dist.destroy_process_group()
