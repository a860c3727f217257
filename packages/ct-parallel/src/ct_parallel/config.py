"""DistributedConfig: the parallel layout of a run (mirrors configs/distributed/*.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

ENGINES = ("native", "megatron")
NATIVE_STRATEGIES = ("single", "ddp", "fsdp2")


@dataclass(frozen=True)
class DistributedConfig:
    engine: str = "native"
    # native engine only: single process, DDP, or FSDP2 (per-block fully_shard).
    strategy: str = "single"
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    # "auto": nccl when CUDA is available, else gloo.
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"distributed.engine must be one of {ENGINES}, got {self.engine!r}")
        if self.engine == "native" and self.strategy not in NATIVE_STRATEGIES:
            raise ValueError(f"distributed.strategy must be one of {NATIVE_STRATEGIES}, got {self.strategy!r}")
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"distributed.{name} must be an integer >= 1, got {value!r}")
        if self.engine == "native" and (self.tensor_model_parallel_size > 1 or self.pipeline_model_parallel_size > 1):
            raise ValueError("distributed.tensor/pipeline_model_parallel_size > 1 needs distributed.engine=megatron")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError("distributed.sequence_parallel needs tensor_model_parallel_size > 1")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"distributed.backend must be auto, gloo or nccl, got {self.backend!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DistributedConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown distributed config field(s): {', '.join(unknown)}")
        return cls(**values)
