"""ct_stages: the trainer loop, optimizers, schedules, checkpoints, metrics, the three stages' losses.

``run_phase(cfg)`` runs one phase from a resolved config (what ``ct-train`` composes).
"""

from .checkpoint import CheckpointManager
from .optim import OptimizerConfig, ScheduleConfig, build_optimizer, build_scheduler, lr_factor
from .objective import Objective
from .stages import DistillConfig, LossConfig, StageConfig, build_loss
from .trainer import Preempted, Trainer, TrainerConfig, TrainingStopped

__all__ = [
    "CheckpointManager", "DistillConfig", "LossConfig", "OptimizerConfig", "Objective", "ScheduleConfig", "StageConfig",
    "Preempted", "Trainer", "TrainerConfig", "TrainingStopped", "build_optimizer", "build_scheduler",
    "build_loss", "lr_factor",
]
