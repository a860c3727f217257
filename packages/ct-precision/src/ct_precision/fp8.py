"""FP8 training on the native engines: torchao's Float8Linear swapped in from outside the model.

``convert_to_fp8(model, precision)`` replaces the block stack's nn.Linear layers that pass the
precision's layer rules with torchao ``Float8Linear`` (an nn.Linear subclass: same parameter
names, plain fp32/bf16 ``nn.Parameter`` weights; the FP8 casts happen inside forward/backward), so
checkpoints, resume and the HF export see exactly the keys and tensors of an unconverted model.
Apply it before the DDP/FSDP2 wrap.

Recipes (torchao's names): ``tensorwise`` (one dynamic scale per tensor; e4m3 for input and weight,
e5m2 for grad_output) and ``rowwise`` (one scale per row, e4m3 throughout, power-of-2 scales) run
on CUDA with compute capability >= 8.9 and, emulated, on CPU (FP8 casts are real, the GEMM runs in
high precision: numerics only, slow). ``mxfp8`` (32-element blocks, e8m0 scales) needs capability
>= 10.0 (Blackwell) and has no CPU path.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import torch
from torch import nn

from .policy import PrecisionConfig

log = logging.getLogger("ct_precision")

# Output projection: FP8 logits hurt the loss, so it stays high precision whatever its shape.
HIGH_PRECISION_NAMES = ("lm_head",)
FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper: float8 tensor cores
MXFP8_MIN_CAPABILITY = (10, 0)  # Blackwell
_warned_cpu = False


def fp8_module_filter(precision: PrecisionConfig) -> Callable[[nn.Module, str], bool]:
    """torchao's module_filter_fn: True for a layer to convert (``fqn`` is its dotted name)."""

    def convert(module: nn.Module, fqn: str) -> bool:
        if fqn.split(".")[-1] in HIGH_PRECISION_NAMES:
            return False
        return not precision.keeps_high_precision(module)

    return convert


def fp8_layer_names(model: nn.Module, precision: PrecisionConfig) -> list[str]:
    """The dotted names of the layers ``convert_to_fp8`` converts (for logs and tests)."""
    keep = fp8_module_filter(precision)
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and keep(module, name)]


def check_fp8_device(precision: PrecisionConfig, device: torch.device) -> None:
    """Raise ValueError naming the recipe and the device when this recipe cannot run there."""
    recipe = precision.fp8_recipe
    if device.type == "cpu":
        if recipe == "mxfp8":
            raise ValueError(f"precision.fp8_recipe={recipe} has no CPU path (device cpu); use "
                             "tensorwise or rowwise on CPU (emulated), mxfp8 needs a Blackwell GPU")
        return
    if device.type != "cuda":
        raise ValueError(f"precision.fp8_recipe={recipe}: FP8 runs on cuda or cpu, not device {device.type}")
    capability = torch.cuda.get_device_capability(device)
    need = MXFP8_MIN_CAPABILITY if recipe == "mxfp8" else FP8_MIN_CAPABILITY
    if capability < need:
        raise ValueError(f"precision.fp8_recipe={recipe} needs CUDA compute capability >= "
                         f"{need[0]}.{need[1]}; device {device} has {capability[0]}.{capability[1]}")


def float8_linear_config(precision: PrecisionConfig, device: torch.device):
    """torchao's Float8LinearConfig for the recipe; emulated GEMMs on CPU."""
    from torchao.float8 import Float8LinearConfig

    config = Float8LinearConfig.from_recipe_name(precision.fp8_recipe)
    # FP8 all-gather would put float8 tensor subclasses into FSDP2's sharded parameters (and so
    # into DCP checkpoints); the default (False) keeps weights plain. Emulation on CPU: no
    # float8 GEMM kernels there; the casts (the numerics) are the same.
    return dataclasses.replace(config, enable_fsdp_float8_all_gather=False, emulate=device.type == "cpu")


def convert_to_fp8(model: nn.Module, precision: PrecisionConfig, device: torch.device | None = None) -> nn.Module:
    """Swap the model's eligible nn.Linear layers for torchao Float8Linear, in place; returns it.

    ``device``: where the model will run (default: where its parameters are; a model still on
    ``meta`` must say)."""
    global _warned_cpu
    if not precision.fp8:
        raise ValueError(f"convert_to_fp8 needs precision.dtype=fp8, got {precision.dtype!r}")
    device = device if device is not None else next(model.parameters()).device
    if device.type == "meta":
        raise ValueError("convert_to_fp8: the model is on meta; pass the device it will run on")
    check_fp8_device(precision, device)
    if device.type == "cpu" and not _warned_cpu:
        log.warning("FP8 on CPU is emulated (slow); numerics only")
        _warned_cpu = True
    if precision.fp8_recipe == "mxfp8":
        return _convert_to_mxfp8(model, precision)
    from torchao.float8 import convert_to_float8_training

    return convert_to_float8_training(model, module_filter_fn=fp8_module_filter(precision),
                                      config=float8_linear_config(precision, device))


def _convert_to_mxfp8(model: nn.Module, precision: PrecisionConfig) -> nn.Module:
    """Blackwell only (check_fp8_device). torchao's MXFP8 training wraps each converted weight in
    a tensor subclass; not verified on hardware by this project yet (no Blackwell machine)."""
    from torchao.prototype.moe_training.config import MXFP8TrainingOpConfig, MXFP8TrainingRecipe
    from torchao.quantization import quantize_

    config = MXFP8TrainingOpConfig.from_recipe(MXFP8TrainingRecipe.MXFP8_RCEIL)
    keep = fp8_module_filter(precision)
    quantize_(model, config, filter_fn=lambda module, fqn: isinstance(module, nn.Linear) and keep(module, fqn))
    return model
