"""ct_model: torch-only model code for CheaperTraining.

Public API: ModelConfig, presets.get/names, build_model, count_parameters, hf.load_hf/save_hf,
generate. Importing this package imports torch and safetensors only.
"""

from . import hf, presets
from .config import ConfigError, ModelConfig
from .errors import UserError
from .generation import generate
from .model import Decoder, build_model, count_parameters, model_from_state
from .param_count import count_active_parameters

__all__ = [
    "ConfigError", "Decoder", "ModelConfig", "UserError", "build_model", "count_active_parameters",
    "count_parameters", "generate", "hf", "model_from_state", "presets",
]
