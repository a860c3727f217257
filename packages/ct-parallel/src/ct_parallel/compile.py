"""Per-block ``torch.compile`` of a ct-model Decoder, applied from outside the model.

Each block of ``model.layers`` is compiled in place with ``nn.Module.compile`` (it sets the
module's compiled call; the module object, its class and its parameter names stay the same, so
``state_dict`` keys, DCP checkpoints and the HF export are unchanged; wrapping in
``torch.compile(module)`` would add an ``_orig_mod.`` level). Per block rather than the whole
model: every block has the same code and shapes, so one graph compiles once and is reused, and
FSDP2's per-block hooks stay outside the graph boundaries. Order in the engine: activation
checkpointing (the compiled region then contains the checkpoint, which dynamo traces as a
higher-order op, selective policies included), compile, then the DDP/FSDP2 wrap.

``enabled``: true, false, or null (the default): off, except FP8 on CUDA with a native engine,
where ``resolve_compile`` turns it on at setup (and logs it): torchao's Float8Linear casts and
scales in separate eager kernels that only inductor fuses into the GEMM's neighbours, so FP8
without compile is slower than bf16 (torchao's own measurements). An explicit false keeps eager
FP8 (debugging) with a warning. Off otherwise: a cold compile takes minutes on CPU.
``fullgraph=True`` makes a graph break an error rather than a silent slowdown.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
from ct_model.config import from_known_fields
from torch import nn

from ct_precision import PrecisionConfig

MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class CompileConfig:
    # null: off, but on for FP8 on CUDA with a native engine (resolve_compile).
    enabled: bool | None = None
    fullgraph: bool = True
    backend: str = "inductor"
    # torch.compile's mode (null: its default).
    mode: str | None = None

    def __post_init__(self) -> None:
        if self.enabled is not None and not isinstance(self.enabled, bool):
            raise ValueError(f"compile.enabled must be true or false (or null: on only for fp8 on CUDA), "
                             f"got {self.enabled!r}")
        if not isinstance(self.fullgraph, bool):
            raise ValueError(f"compile.fullgraph must be true or false, got {self.fullgraph!r}")
        if not isinstance(self.backend, str) or not self.backend:
            raise ValueError(f"compile.backend must be a backend name (inductor, aot_eager, eager), "
                             f"got {self.backend!r}")
        if self.mode not in MODES:
            raise ValueError(f"compile.mode must be null or one of {MODES[1:]}, got {self.mode!r}")

    def options(self) -> dict[str, Any]:
        """Keyword arguments of torch.compile."""
        out: dict[str, Any] = {"fullgraph": self.fullgraph, "backend": self.backend}
        if self.mode is not None:
            out["mode"] = self.mode
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "CompileConfig":
        return from_known_fields(cls, values, "compile config")


def resolve_compile(config: CompileConfig, precision: PrecisionConfig, device: torch.device,
                    engine_compiles: bool = True) -> tuple[CompileConfig, tuple[int, str] | None]:
    """``config`` with ``enabled`` decided for this run, and a (log level, line) to report, or None.

    FP8 on CUDA on an engine that compiles blocks (the native ones; megatron runs FP8 in
    Transformer Engine's fused layers and refuses per-block compile) needs compile to pay: null
    turns it on, an explicit false is kept with a warning. Elsewhere null means off."""
    fp8_on_cuda = precision.fp8 and device.type == "cuda" and engine_compiles
    if config.enabled is None:
        if fp8_on_cuda:
            return dataclasses.replace(config, enabled=True), (
                logging.INFO, "compile.enabled=true (precision=fp8 on cuda: FP8 linears are slower than bf16 "
                              "without compile, which fuses their casts; compile.enabled=false keeps eager)")
        return dataclasses.replace(config, enabled=False), None
    if fp8_on_cuda and not config.enabled:
        return config, (logging.WARNING, "compile.enabled=false with precision=fp8 on cuda: eager FP8 linears "
                                         "run slower than bf16 (unfused casts); remove compile.enabled=false "
                                         "or set it true for FP8's speed-up")
    return config, None


def apply_compile(model: nn.Module, config: CompileConfig) -> nn.Module:
    """Compile every block of ``model.layers`` in place (after activation checkpointing, before
    FSDP2). Returns ``model``."""
    if not config.enabled:
        return model
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"compile needs a model with a `layers` ModuleList (a ct-model Decoder), "
                        f"got {type(model).__name__}")
    for block in layers:
        block.compile(**config.options())
    return model
