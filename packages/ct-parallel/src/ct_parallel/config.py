"""DistributedConfig: the parallel layout of a run (mirrors configs/distributed/*.yaml).

The data-parallel size is not a field: it is what is left of the world after tensor and pipeline
parallelism (world_size / (tensor * pipeline)), computed at launch by ``init_distributed``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ct_model.config import from_known_fields

ENGINES = ("native", "megatron")
NATIVE_STRATEGIES = ("single", "ddp", "fsdp2")
PIPELINE_SCHEDULES = ("1f1b", "interleaved")
TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")


@dataclass(frozen=True)
class DistributedConfig:
    engine: str = "native"
    # native engine only: single process, DDP, or FSDP2 (per-block fully_shard).
    strategy: str = "single"
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # Model chunks per pipeline rank (interleaved 1F1B); None for plain 1F1B.
    virtual_pipeline_model_parallel_size: int | None = None
    # "1f1b" or "interleaved" (the latter needs virtual_pipeline_model_parallel_size >= 2).
    pipeline_schedule: str = "1f1b"
    sequence_parallel: bool = False
    # MoE: routed experts split over this many ranks (megatron's expert_model_parallel_size).
    # The megatron engine runs it (alltoall token dispatcher); the native engine refuses EP > 1.
    expert_model_parallel_size: int = 1
    # MoE: tensor parallelism inside each expert; None means tensor_model_parallel_size, as in megatron.
    expert_tensor_parallel_size: int | None = None
    # Uneven pipeline split (megatron TransformerConfig's names): layers on the first and the last
    # stage; the rest divide evenly over the middle stages. None: an even split of num_layers.
    num_layers_in_first_pipeline_stage: int | None = None
    num_layers_in_last_pipeline_stage: int | None = None
    # megatron engine: shard optimizer state over data-parallel ranks (ZeRO-1).
    use_distributed_optimizer: bool = False
    # megatron engine: overlap the data-parallel gradient reduction with the backward pass.
    overlap_grad_reduce: bool = False
    # megatron engine: "transformer_engine" (GPU: fused kernels, THD packed attention, FP8),
    # "local" (megatron-core's plain modules: a dense T x T document mask, O(T^2) attention memory;
    # explicit opt-in on a GPU), or "auto" (Transformer Engine on CUDA, where it refuses to run if
    # TE is missing rather than fall back to local silently; local without CUDA, i.e. the CPU shim).
    transformer_impl: str = "auto"
    # FSDP2: free the gathered parameters after forward (ZeRO-3) or keep them to backward (ZeRO-2).
    fsdp_reshard_after_forward: bool = True
    # "auto": nccl when CUDA is available, else gloo.
    backend: str = "auto"
    # Collective timeout: a rank stuck this long in a collective (a dead or hung peer) raises
    # instead of hanging the job for ever (torch's default is 10 min for nccl, 30 for gloo).
    timeout_minutes: float = 10.0

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"distributed.engine must be one of {ENGINES}, got {self.engine!r}")
        if self.engine == "native" and self.strategy not in NATIVE_STRATEGIES:
            raise ValueError(f"distributed.strategy must be one of {NATIVE_STRATEGIES}, got {self.strategy!r}")
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"distributed.{name} must be an integer >= 1, got {value!r}")
        for name in ("expert_tensor_parallel_size", "num_layers_in_first_pipeline_stage",
                     "num_layers_in_last_pipeline_stage"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"distributed.{name} must be null or an integer >= 1, got {value!r}")
        if self.engine == "native" and (self.tensor_model_parallel_size > 1 or self.pipeline_model_parallel_size > 1):
            raise ValueError("distributed.tensor/pipeline_model_parallel_size > 1 needs distributed.engine=megatron")
        if self.engine == "native" and (self.expert_model_parallel_size > 1 or self.expert_tensor_parallel_size not in (None, 1)):
            raise ValueError("distributed.expert_model_parallel_size/expert_tensor_parallel_size need "
                             "distributed.engine=megatron")
        if (self.expert_model_parallel_size > 1 and self.tensor_model_parallel_size > 1
                and not self.sequence_parallel):
            # megatron-core: "When using expert parallelism and tensor parallelism for training,
            # sequence parallelism must be used" (ModelParallelConfig).
            raise ValueError("distributed.expert_model_parallel_size > 1 with tensor_model_parallel_size > 1 "
                             "needs distributed.sequence_parallel=true (megatron's rule)")
        uneven = (self.num_layers_in_first_pipeline_stage, self.num_layers_in_last_pipeline_stage)
        if any(v is not None for v in uneven) and self.pipeline_model_parallel_size < 2:
            raise ValueError("distributed.num_layers_in_first/last_pipeline_stage need "
                             "pipeline_model_parallel_size >= 2")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError("distributed.sequence_parallel needs tensor_model_parallel_size > 1")
        if self.pipeline_schedule not in PIPELINE_SCHEDULES:
            raise ValueError(f"distributed.pipeline_schedule must be one of {PIPELINE_SCHEDULES}, "
                             f"got {self.pipeline_schedule!r}")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and (not isinstance(vpp, int) or isinstance(vpp, bool) or vpp < 1):
            raise ValueError(f"distributed.virtual_pipeline_model_parallel_size must be null or an integer >= 1, got {vpp!r}")
        if self.pipeline_schedule == "interleaved":
            if self.pipeline_model_parallel_size < 2 or vpp is None or vpp < 2:
                raise ValueError("distributed.pipeline_schedule=interleaved needs pipeline_model_parallel_size >= 2 "
                                 "and virtual_pipeline_model_parallel_size >= 2")
        elif vpp not in (None, 1):
            raise ValueError("distributed.virtual_pipeline_model_parallel_size > 1 needs pipeline_schedule=interleaved")
        if self.engine == "native" and (self.use_distributed_optimizer or self.overlap_grad_reduce):
            raise ValueError("distributed.use_distributed_optimizer/overlap_grad_reduce are megatron engine options "
                             "(FSDP2 already shards optimizer state)")
        if self.transformer_impl not in TRANSFORMER_IMPLS:
            raise ValueError(f"distributed.transformer_impl must be one of {TRANSFORMER_IMPLS}, got {self.transformer_impl!r}")
        if not isinstance(self.timeout_minutes, (int, float)) or not self.timeout_minutes > 0:
            raise ValueError(f"distributed.timeout_minutes must be > 0, got {self.timeout_minutes!r}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"distributed.backend must be auto, gloo or nccl, got {self.backend!r}")

    def engine_support_errors(self) -> list[str]:
        """What this layout asks of the engines that they cannot do yet (empty: it can run).

        Kept apart from validation: ct-plan describes such layouts (DeepSeek-V3's EP 64), while
        ct-train and build_engine refuse them with this message before any work."""
        errors = []
        # expert_model_parallel_size > 1: the megatron engine runs it (the native engine refuses it
        # in __post_init__, naming the key).
        if self.expert_tensor_parallel_size not in (None, self.tensor_model_parallel_size):
            errors.append(f"distributed.expert_tensor_parallel_size={self.expert_tensor_parallel_size}: the "
                          "engines do not run an expert TP different from tensor_model_parallel_size yet; use null")
        for name in ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage"):
            if getattr(self, name) is not None:
                errors.append(f"distributed.{name}={getattr(self, name)}: the megatron engine splits layers "
                              "evenly over pipeline stages for now; use null")
        return errors

    @property
    def model_parallel_size(self) -> int:
        """Ranks that hold one copy of the model (tensor x pipeline)."""
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        if world_size % self.model_parallel_size:
            raise ValueError(f"world size {world_size} is not divisible by tensor_model_parallel_size x "
                             f"pipeline_model_parallel_size = {self.model_parallel_size}")
        return world_size // self.model_parallel_size

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DistributedConfig":
        return from_known_fields(cls, values, "distributed config")
