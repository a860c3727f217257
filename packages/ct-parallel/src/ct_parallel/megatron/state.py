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
    _check_expert_layout(config, dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    vpp = config.virtual_pipeline_model_parallel_size if config.pipeline_schedule == "interleaved" else None
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=config.tensor_model_parallel_size,
        pipeline_model_parallel_size=config.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp,
        # Experts split over EP ranks carved out of the data-parallel ranks (megatron requires
        # world / (PP x expert TP) divisible by EP; it raises otherwise, checked first below).
        expert_model_parallel_size=config.expert_model_parallel_size,
        expert_tensor_parallel_size=config.expert_tensor_parallel_size,
        distributed_timeout_minutes=max(1, round(config.timeout_minutes)),
    )
    # Megatron's RNG tracker (dropout inside TP regions) must exist even with dropout off.
    model_parallel_cuda_manual_seed(seed)
    return (parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank(),
            parallel_state.get_data_parallel_rank())


def _check_expert_layout(config: DistributedConfig, world: int) -> None:
    ep = config.expert_model_parallel_size
    etp = config.expert_tensor_parallel_size or config.tensor_model_parallel_size
    ranks_per_stage = world // config.pipeline_model_parallel_size
    if ranks_per_stage % (ep * etp):
        raise ValueError(f"distributed.expert_model_parallel_size={ep} x expert tensor parallel size {etp} does not "
                         f"divide the {ranks_per_stage} ranks of a pipeline stage (world {world} / "
                         f"pipeline_model_parallel_size={config.pipeline_model_parallel_size})")


def destroy_megatron_parallel() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
