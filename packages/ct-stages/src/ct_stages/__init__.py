"""ct_stages: the trainer loop, optimizers, schedules, checkpoints, metrics, the three stages.

``run_phase(cfg)`` runs one phase from a resolved config (what ``ct-train`` composes).
"""

from .checkpoint import CheckpointManager
from .optim import OptimizerConfig, ScheduleConfig, build_optimizer, build_scheduler, lr_factor
from .stages import (DistillConfig, LossConfig, Stage, StageConfig, cross_entropy_sum, make_ce_loss,
                     make_kd_loss)
from .trainer import Preempted, Trainer, TrainerConfig, TrainingStopped

__all__ = [
    "CheckpointManager", "DistillConfig", "LossConfig", "OptimizerConfig", "ScheduleConfig", "Stage", "StageConfig",
    "Preempted", "Trainer", "TrainerConfig", "TrainingStopped", "build_optimizer", "build_scheduler",
    "cross_entropy_sum", "lr_factor", "make_ce_loss", "make_kd_loss",
]
