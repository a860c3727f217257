"""From per-source rho to mixture weights: the sign convention and what to do with negative rho.

rho_g = (1/N_g) sum_{x in g} I_joint(x) * len(x), positive = helpful. Two rules, chosen by the user:

- ``clip`` (default): w_g ~ max(rho_g, floor * max_h rho_h); a harmful or useless source keeps a
  small share (``floor``, default 1% of the best source's rho) rather than vanishing. All rho <= 0
  is an error (nothing helps: the probes or checkpoints are wrong, or use ``softmax``).
- ``softmax``: w_g ~ exp(rho_g / (temperature * max_h |rho_h|)); scale-free, never zero.

Which sources were clipped is returned and written into the report: never silent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import DatamixError

RULES = ("clip", "softmax")


@dataclass(frozen=True)
class WeightRule:
    negative: str = "clip"
    floor: float = 0.01
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.negative not in RULES:
            raise DatamixError(f"field 'negative' must be one of {RULES}, got {self.negative!r}")
        if not (0.0 <= self.floor < 1.0):
            raise DatamixError(f"field 'floor' must be in [0, 1), got {self.floor!r}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise DatamixError(f"field 'temperature' must be > 0, got {self.temperature!r}")

    def apply(self, rho: dict[str, float]) -> tuple[dict[str, float], list[str]]:
        """Normalised weights {source: w} and the sources whose rho was raised to the floor."""
        if self.negative == "softmax":
            scale = self.temperature * max(abs(r) for r in rho.values()) or 1.0
            top = max(rho.values())
            e = {g: math.exp((r - top) / scale) for g, r in rho.items()}
            total = sum(e.values())
            return {g: x / total for g, x in e.items()}, []
        best = max(rho.values())
        if best <= 0:
            raise DatamixError(f"no source has positive influence (rho: {rho}); check the probes and checkpoints, "
                               f"or use --negative softmax")
        low = self.floor * best
        raised = [g for g, r in rho.items() if r < low]
        kept = {g: max(r, low) for g, r in rho.items()}
        total = sum(kept.values())
        return {g: x / total for g, x in kept.items()}, raised
