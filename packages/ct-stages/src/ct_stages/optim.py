"""Optimizers with parameter groups, and learning-rate schedules."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .muon import ADJUST_LR, MuonWithAdamW

OPTIMIZERS = ("adamw", "adam", "sgd", "muon")
SCHEDULES = ("linear", "cosine", "wsd", "constant")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 4e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    momentum: float = 0.9  # sgd only
    # Norm weights never decay; embeddings decay unless this is False.
    decay_embeddings: bool = True
    clip_grad: float | None = 1.0
    # muon only: the blocks' matrices. lr / weight_decay above stay AdamW's (embeddings, lm_head,
    # norms, routers); null here means the same value, which match_rms_adamw scaling makes sensible.
    muon_lr: float | None = None
    muon_weight_decay: float | None = None
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5
    muon_adjust_lr: str = "match_rms_adamw"

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer.name must be one of {OPTIMIZERS}, got {self.name!r}")
        if not self.lr > 0:
            raise ValueError(f"optimizer.lr must be > 0, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ValueError(f"optimizer.weight_decay must be >= 0, got {self.weight_decay!r}")
        numbers = all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in self.betas)
        if len(self.betas) != 2 or not numbers or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optimizer.betas must be two numbers in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", tuple(self.betas))
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"optimizer.clip_grad must be > 0 or null, got {self.clip_grad!r}")
        self._check_muon()

    def _check_muon(self) -> None:
        if self.muon_lr is not None and not self.muon_lr > 0:
            raise ValueError(f"optimizer.muon_lr must be > 0 or null, got {self.muon_lr!r}")
        if self.muon_weight_decay is not None and not self.muon_weight_decay >= 0:
            raise ValueError(f"optimizer.muon_weight_decay must be >= 0 or null, got {self.muon_weight_decay!r}")
        if isinstance(self.muon_momentum, bool) or not 0 <= self.muon_momentum < 1:
            raise ValueError(f"optimizer.muon_momentum must be in [0, 1), got {self.muon_momentum!r}")
        if not isinstance(self.muon_nesterov, bool):
            raise ValueError(f"optimizer.muon_nesterov must be true or false, got {self.muon_nesterov!r}")
        if isinstance(self.muon_ns_steps, bool) or not isinstance(self.muon_ns_steps, int) \
                or not 1 <= self.muon_ns_steps <= 20:
            raise ValueError(f"optimizer.muon_ns_steps must be an integer in [1, 20], got {self.muon_ns_steps!r}")
        if self.muon_adjust_lr not in ADJUST_LR:
            raise ValueError(f"optimizer.muon_adjust_lr must be one of {ADJUST_LR}, got {self.muon_adjust_lr!r}")


def parameter_groups(named_params, config: OptimizerConfig) -> list[dict]:
    """Two groups: decayed matrices, and undecayed norms (and embeddings when configured)."""
    decay, no_decay = [], []
    for name, param in named_params:
        if not param.requires_grad:
            continue
        is_norm = param.ndim < 2 or "norm" in name
        is_embedding = "embed" in name
        if is_norm or (is_embedding and not config.decay_embeddings):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def is_muon_matrix(name: str, param: torch.Tensor) -> bool:
    """A weight matrix inside a block (2-D, or 3-D MoE experts): not a norm, bias, router
    (``mlp.gate.weight``), embedding or output layer, which stay with AdamW."""
    router = name.endswith(".gate.weight")
    return name.startswith("layers.") and param.ndim >= 2 and "norm" not in name and not router


def muon_groups(named_params, config: OptimizerConfig) -> list[dict]:
    """AdamW's two groups without the block matrices, plus Muon's: whole matrices, and fused
    gate/up expert tensors (``split=2``: gate and up are orthogonalised apart)."""
    named = [(n, p) for n, p in named_params if p.requires_grad]
    matrices = [(n, p) for n, p in named if is_muon_matrix(n, p)]
    rest = [(n, p) for n, p in named if not is_muon_matrix(n, p)]
    lr = config.lr if config.muon_lr is None else config.muon_lr
    wd = config.weight_decay if config.muon_weight_decay is None else config.muon_weight_decay
    fused = [p for n, p in matrices if n.endswith("gate_up_proj")]
    whole = [p for n, p in matrices if not n.endswith("gate_up_proj")]
    muon = [{"params": ps, "lr": lr, "weight_decay": wd, "muon": True, "split": split}
            for ps, split in ((whole, 1), (fused, 2)) if ps]
    return parameter_groups(rest, config) + muon


def build_muon(named_params, config: OptimizerConfig) -> MuonWithAdamW:
    return MuonWithAdamW(muon_groups(named_params, config), lr=config.lr, betas=config.betas, eps=config.eps,
                         momentum=config.muon_momentum, nesterov=config.muon_nesterov,
                         ns_steps=config.muon_ns_steps, adjust_lr=config.muon_adjust_lr)


def adam_kernel(groups: list[dict]) -> dict:
    """Keyword arguments choosing Adam(W)'s implementation for these parameter groups.

    All on CUDA: ``fused=True``, one kernel per step for every tensor (torch's default there is
    the foreach path, a dozen multi-tensor kernels per step with an intermediate per tensor).
    It takes FSDP2's DTensor parameters (torch registers _fused_adamw_ with DTensor sharding rules;
    ``DTensor.device`` is the local shards' CUDA device) and the fp32 main copies megatron's
    optimizer wrappers swap in (plain CUDA tensors). Anything else, CPU included: nothing, torch's
    own default, so CPU runs step exactly as before."""
    params = [p for group in groups for p in group["params"]]
    if params and all(p.device.type == "cuda" and torch.is_floating_point(p) for p in params):
        return {"fused": True}
    return {}


def _keep_kernel(kernel: dict):
    """A load_state_dict post-hook: torch's load copies the saved groups' flags (fused, foreach)
    over the current ones, so a checkpoint written on another device would pick this run's
    kernel. Put this device's choice back, with ``step`` where that kernel keeps it (fused: a
    float32 tensor on the parameter's device)."""

    def hook(optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            group["fused"], group["foreach"] = kernel.get("fused"), None
            for p in group["params"]:
                state = optimizer.state.get(p, {})
                if kernel.get("fused") and torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].to(dtype=torch.float32, device=p.device)

    return hook


def build_optimizer(named_params, config: OptimizerConfig) -> torch.optim.Optimizer:
    if config.name == "muon":
        return build_muon(named_params, config)
    groups = parameter_groups(named_params, config)
    if config.name == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    kernel = adam_kernel(groups)
    # adam: weight decay is L2 on the gradient; groups still exempt norms.
    cls = torch.optim.AdamW if config.name == "adamw" else torch.optim.Adam
    optimizer = cls(groups, lr=config.lr, betas=config.betas, eps=config.eps, **kernel)
    optimizer.register_load_state_dict_post_hook(_keep_kernel(kernel))
    return optimizer


@dataclass(frozen=True)
class ScheduleConfig:
    name: str = "linear"
    # Either a step count or a fraction of max_steps (the SFT recipe states warmup as a ratio).
    warmup_steps: int = 0
    warmup_ratio: float | None = None
    # Decay ends at min_lr_ratio * peak (the paper's pretraining: 0.1; SFT: 0).
    min_lr_ratio: float = 0.1
    # Warmup-stable-decay: fraction of max_steps spent in the final decay, or (decay_steps, which
    # wins) a step count: a decay branched from a stable-stage checkpoint names its length in steps.
    decay_ratio: float = 0.2
    decay_steps: int | None = None
    # Shape of the decay: linear, cosine, or 1-sqrt (Hägele et al. 2024: loss falls faster early).
    decay_shape: str = "linear"

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"schedule.name must be one of {SCHEDULES}, got {self.name!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"schedule.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.decay_ratio <= 1:
            raise ValueError(f"schedule.decay_ratio must be in (0, 1], got {self.decay_ratio}")
        if self.decay_steps is not None and (isinstance(self.decay_steps, bool) or not isinstance(self.decay_steps, int)
                                             or self.decay_steps < 1):
            raise ValueError(f"schedule.decay_steps must be an integer >= 1 or null, got {self.decay_steps!r}")
        if self.decay_shape not in DECAY_SHAPES:
            raise ValueError(f"schedule.decay_shape must be one of {DECAY_SHAPES}, got {self.decay_shape!r}")


def lr_factor(step: int, max_steps: int, config: ScheduleConfig) -> float:
    """Multiplier of the peak LR used for optimizer step ``step`` (0-based)."""
    warmup = config.warmup_steps
    if config.warmup_ratio is not None:
        warmup = int(round(config.warmup_ratio * max_steps))
    if step < warmup:
        return (step + 1) / warmup
    if config.name == "constant":
        return 1.0
    floor = config.min_lr_ratio
    span = max(max_steps - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    if config.name == "linear":
        return 1.0 - (1.0 - floor) * progress
    if config.name == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return wsd_factor(step, max_steps, config)


def wsd_factor(step: int, max_steps: int, config: ScheduleConfig) -> float:
    """Warmup-stable-decay after warmup: 1.0 until the last decay steps, then down to the floor.
    A pure function of the step, so a resume (or a branch that changes max_steps) recomputes it."""
    decay = config.decay_steps if config.decay_steps is not None else int(round(config.decay_ratio * max_steps))
    decay_start = max_steps - min(decay, max_steps)
    if step < decay_start:
        return 1.0
    t = min((step - decay_start) / max(max_steps - decay_start, 1), 1.0)
    shape = {"linear": t, "cosine": 0.5 * (1.0 - math.cos(math.pi * t)), "1-sqrt": math.sqrt(t)}
    return 1.0 - (1.0 - config.min_lr_ratio) * shape[config.decay_shape]


def build_scheduler(optimizer, max_steps: int, config: ScheduleConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, max_steps, config))
