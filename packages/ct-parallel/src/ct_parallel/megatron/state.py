"""megatron-core's model-parallel process groups, created from a DistributedConfig."""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from ..config import DistributedConfig


def initialize_megatron_parallel(config: DistributedConfig, seed: int = 1234) -> tuple[int, int, int]:
    """(Re)create megatron's TP/PP/DP groups on the initialised default group; returns
    (tp_rank, pp_rank, dp_rank). Safe to call again with another layout (tests do)."""
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed must be initialised first (ct_parallel.init_distributed)")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    vpp = config.virtual_pipeline_model_parallel_size if config.pipeline_schedule == "interleaved" else None
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=config.tensor_model_parallel_size,
        pipeline_model_parallel_size=config.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp,
        distributed_timeout_minutes=max(1, round(config.timeout_minutes)),
    )
    # Megatron's RNG tracker (dropout inside TP regions) must exist even with dropout off.
    model_parallel_cuda_manual_seed(seed)
    return (parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank(),
            parallel_state.get_data_parallel_rank())


def destroy_megatron_parallel() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
