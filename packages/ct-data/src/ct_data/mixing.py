"""Weighted choice of the next source, in realised tokens, with a seeded counter-based RNG.

Each pick takes the source with the smallest ``(tokens_taken + jitter * u) / weight``, where ``u`` is
a uniform draw from a hash of (seed, row, pick counter, source). Without jitter this is stride
scheduling (as Megatron's blended datasets do): each source's share of tokens stays within about
one document of its weight at every point. The jitter (default: one sequence length of tokens)
randomises the interleaving while keeping that bound within ``jitter + one document``. The RNG
state is a single counter, so saving and resuming are exact and cheap.
"""

from __future__ import annotations

from collections.abc import Sequence

_MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform(*keys: int) -> float:
    """A uniform float in [0, 1) determined by the integer keys."""
    h = 0x5851F42D4C957F2D
    for k in keys:
        h = splitmix64(h ^ (k & _MASK64))
    return (h >> 11) * (1.0 / (1 << 53))


class Mixer:
    def __init__(self, weights: Sequence[float], *, seed: int, row: int, jitter: float):
        total = float(sum(weights))
        if total <= 0:
            raise ValueError("mixer weights are all zero")
        self.weights = [w / total for w in weights]
        self.seed, self.row, self.jitter = seed, row, float(jitter)
        self.taken = [0] * len(weights)
        self.counter = 0
        self.active = [w > 0 for w in weights]

    def any_active(self) -> bool:
        return any(self.active)

    def pick(self) -> int:
        best, best_score = -1, float("inf")
        c = self.counter
        self.counter += 1
        for s, (w, on) in enumerate(zip(self.weights, self.active)):
            if not on:
                continue
            score = (self.taken[s] + self.jitter * uniform(self.seed, self.row, c, s)) / w
            if score < best_score:
                best, best_score = s, score
        if best < 0:
            raise RuntimeError("no active source left to pick from")
        return best

    def add(self, s: int, ntok: int) -> None:
        self.taken[s] += ntok

    def deactivate(self, s: int) -> None:
        self.active[s] = False

    def state(self) -> dict:
        return {"taken": list(self.taken), "counter": self.counter, "active": list(self.active)}

    def load(self, st: dict) -> None:
        if len(st["taken"]) != len(self.taken):
            raise ValueError("mixer state has a different number of sources")
        self.taken = [int(x) for x in st["taken"]]
        self.counter = int(st["counter"])
        self.active = [bool(a) and w > 0 for a, w in zip(st["active"], self.weights)]
