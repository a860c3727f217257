"""Per-block ``torch.compile`` of a ct-model Decoder, applied from outside the model.

Each block of ``model.layers`` is compiled in place with ``nn.Module.compile`` (it sets the
module's compiled call; the module object, its class and its parameter names stay the same, so
``state_dict`` keys, DCP checkpoints and the HF export are unchanged; wrapping in
``torch.compile(module)`` would add an ``_orig_mod.`` level). Per block rather than the whole
model: every block has the same code and shapes, so one graph compiles once and is reused, and
FSDP2's per-block hooks stay outside the graph boundaries. Order in the engine: activation
checkpointing (the compiled region then contains the checkpoint, which dynamo traces as a
higher-order op, selective policies included), compile, then the DDP/FSDP2 wrap.

Off by default: a cold compile takes minutes on CPU. ``fullgraph=True`` makes a graph break an
error rather than a silent slowdown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ct_model.config import from_known_fields
from torch import nn

MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class CompileConfig:
    enabled: bool = False
    fullgraph: bool = True
    backend: str = "inductor"
    # torch.compile's mode (null: its default).
    mode: str | None = None

    def __post_init__(self) -> None:
        for name in ("enabled", "fullgraph"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"compile.{name} must be true or false, got {getattr(self, name)!r}")
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
