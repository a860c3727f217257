"""RunConfig: the one typed configuration of a run, built once from the composed config.

Every section is a validated dataclass; its defaults live in the dataclass and nowhere else. The
Hydra tree (configs/) starts from ``RunConfig.defaults()`` (ct-cli registers it as the schema at
the head of config.yaml's defaults list), so YAML files state only what differs from a default,
``--print-config`` shows every key, and a key that is not a field fails at composition. Built
from a plain dict by ``build_section`` (one generic function): unknown keys are rejected naming the
section and its known keys, values are type-checked against the annotations, then each
dataclass validates itself.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import ct_model
from ct_model import UserError
from ct_parallel import ActivationCheckpointConfig, CompileConfig, DistributedConfig, resolve_compile
from ct_precision import AUTO, PrecisionConfig

from .optim import OptimizerConfig, ScheduleConfig
from .stages import LossConfig, StageConfig
from .trainer import TrainerConfig


class ConfigKeyError(UserError):
    """A configuration section holds a key that is not one of its fields, or a value of the wrong type."""


# ------------------------------------------------------------------------------------ sections


@dataclass(frozen=True)
class PhaseConfig:
    name: str = "train"
    # CPU-sized steps/batch/context of the phase; configs/size/cpu.yaml interpolates them.
    cpu: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenizerConfig:
    # null: the tokenizer saved with init_from, else a byte-level BPE trained on the sample data
    # (cached beside it). Real runs: a local directory (or hub name) of the LLaMA-3.2 tokenizer.
    path: str | None = None
    vocab_size: int = 8192
    # The embedded BPE splits numbers into single digits (Llama-1/2 style) rather than LLaMA-3's
    # 3-digit groups: the tiny model then learns the sample arithmetic within the CPU budget.
    split_digits: bool = True

    def __post_init__(self) -> None:
        if self.vocab_size < 256 + 8:
            raise ValueError(f"tokenizer.vocab_size must be >= 264 (bytes + specials), got {self.vocab_size}")


@dataclass(frozen=True)
class SampleDataConfig:
    # Where the embedded sample corpus is built (`{sample_dir}` in data source paths); null: none.
    dir: str | None = None
    seed: int = 0
    scale: float = 1.0  # size multiplier of the generated corpus (tests use less)

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ValueError(f"sample_data.scale must be > 0, got {self.scale}")


@dataclass(frozen=True)
class WandbConfig:
    enabled: bool = False
    mode: str = "offline"
    project: str = "cheapertraining"
    name: str | None = None


@dataclass(frozen=True)
class LoggingConfig:
    progress: bool = True
    # Peak FLOP/s per device for MFU (null: the GPU's data-sheet bf16 peak, or a measured CPU peak).
    peak_flops: float | None = None
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        if self.peak_flops is not None and not self.peak_flops > 0:
            raise ValueError(f"logging.peak_flops must be > 0 or null, got {self.peak_flops}")


@dataclass(frozen=True)
class ReasoningEvalConfig:
    max_problems: int = 200
    max_new_tokens: int = 96

    def __post_init__(self) -> None:
        for name in ("max_problems", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.reasoning.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class EvalConfig:
    """What ct-recipe evaluates at the end (ct-eval takes the same as flags)."""

    reasoning: ReasoningEvalConfig = field(default_factory=ReasoningEvalConfig)


def _model_section_fields() -> list[tuple[str, Any, Any]]:
    hints = typing.get_type_hints(ct_model.ModelConfig)
    out = [("preset", str | None, field(default=None))]
    for f in fields(ct_model.ModelConfig):
        if f.name != "name":
            out.append((f.name, hints[f.name] | None, field(default=None)))
    return out


def _resolve_model(self) -> ct_model.ModelConfig:
    """The preset's ModelConfig with every non-null field of this section applied over it."""
    overrides = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "preset"}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if self.preset is None:
        required = [f.name for f in fields(ct_model.ModelConfig)
                    if f.default is dataclasses.MISSING and f.name not in overrides]
        if required:
            raise ct_model.ConfigError(f"model.preset is null, so model.{', model.'.join(required)} must be set "
                                       f"(or name a preset: {', '.join(ct_model.presets.names())})")
        return ct_model.ModelConfig.from_dict(overrides)
    return ct_model.presets.get(self.preset, **overrides)


# `model:` is a preset name plus overrides: every ModelConfig field, null meaning "the preset's".
ModelSection = dataclasses.make_dataclass(
    "ModelSection", _model_section_fields(), frozen=True, namespace={"resolve": _resolve_model},
)
ModelSection.__doc__ = "model: a ct_model preset name plus field overrides (null = the preset's value)."


@dataclass(frozen=True)
class RunConfig:
    model: ModelSection = field(default_factory=lambda: ModelSection(preset="mobilellm_tiny"))
    # A ct-data mixture config (sources, weights, packing); validated by ct_data.load_data_config.
    data: dict[str, Any] = field(default_factory=dict)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    sample_data: SampleDataConfig = field(default_factory=SampleDataConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # auto: bf16 on CUDA, fp32 on CPU, resolved once at setup (resolved_for); precision=fp32|bf16|fp8
    # (configs/precision/) is kept as chosen.
    precision: PrecisionConfig = field(default_factory=lambda: PrecisionConfig(dtype=AUTO))
    activation_checkpointing: ActivationCheckpointConfig = field(default_factory=ActivationCheckpointConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    phase: PhaseConfig = field(default_factory=PhaseConfig)
    # Everything a run writes goes under run_dir; running again with the same run_dir resumes.
    run_dir: str = "runs/train"
    # HF checkpoint directory the phase starts from (null: fresh init from `model`).
    init_from: str | None = None
    seq_len: int = 2048
    # Multiplier applied to the starting model's RoPE theta (the reasoning SFT phase uses 8).
    rope_theta_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ConfigKeyError(f"seq_len must be >= 2, got {self.seq_len}")
        if not self.rope_theta_scale > 0:
            raise ConfigKeyError(f"rope_theta_scale must be > 0, got {self.rope_theta_scale}")
        if self.init_from is None:
            try:
                self.model.resolve()  # fail now, not after the data is built
            except (TypeError, ValueError) as err:
                raise ConfigKeyError(f"model: {err}") from err

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "RunConfig":
        return build_section(cls, values, "")

    def resolved_for(self, device) -> tuple["RunConfig", list[tuple[int, str]]]:
        """This configuration with its device-dependent defaults decided for ``device`` (a
        torch.device): precision.dtype=auto (bf16 on CUDA, fp32 elsewhere) and compile.enabled=null
        (on for fp8 on CUDA with the native engine); plus the (log level, line)s that say what was
        chosen and why. Explicit values are kept; setup calls this once, after the device is known."""
        precision, why = self.precision.resolve(device)
        notes = [(logging.INFO, why)]
        compiled, note = resolve_compile(self.compile, precision, device,
                                         engine_compiles=self.distributed.engine == "native")
        if note is not None:
            notes.append(note)
        return dataclasses.replace(self, precision=precision, compile=compiled), notes

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every key with its default (the schema config.yaml composes onto)."""
        return to_plain(cls())

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir)

    @property
    def init_path(self) -> Path | None:
        # Lexical normalisation: "run/../prev/hf" must work before "run" exists.
        return Path(os.path.normpath(self.init_from)) if self.init_from else None


# ------------------------------------------------------------------------------------ building


def to_plain(value: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists (what YAML and JSON hold)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in fields(value) if f.init}
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def _label(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


def build_section(cls, values: Mapping[str, Any] | None, section: str):
    """Build dataclass ``cls`` from ``values`` (nested sections recursively), naming ``section``
    in every error: unknown keys (with the known ones), wrong types, and the dataclass's own checks."""
    if isinstance(values, cls):
        return values
    values = {} if values is None else values
    if not isinstance(values, Mapping):
        raise ConfigKeyError(f"{section or 'config'}: expected a mapping of keys, got {values!r}")
    known = {f.name: f for f in fields(cls) if f.init}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigKeyError(f"{section or 'config'}: unknown key(s) {', '.join(map(str, unknown))}; "
                             f"known keys: {', '.join(sorted(known))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        label = _label(section, key)
        sub = hints[key] if dataclasses.is_dataclass(hints[key]) else None
        if sub is not None and (value is None or isinstance(value, Mapping)):
            kwargs[key] = build_section(sub, value, label)
        else:
            kwargs[key] = check_type(hints[key], value, label)
    try:
        return cls(**kwargs)
    except ConfigKeyError:
        raise
    except (TypeError, ValueError) as err:
        message = str(err)
        prefix = section.split(".")[0]
        raise ConfigKeyError(message if not section or message.startswith(prefix) else f"{section}: {message}") from err


_SCALARS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def check_type(hint: Any, value: Any, label: str) -> Any:
    """``value`` checked against a simple annotation (int/float/bool/str, X | None, tuple, list,
    dict); ints are accepted where floats are expected. Other annotations pass through."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        rest = [o for o in options if o is not type(None)]
        if len(rest) == 1:
            return check_type(rest[0], value, label)
        return value
    if hint in _SCALARS:
        ok = isinstance(value, hint) and not (hint is int and isinstance(value, bool))
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not ok:
            raise ConfigKeyError(f"{label} must be {_SCALARS[hint]}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigKeyError(f"{label} must be a list, got {value!r}")
        return tuple(value) if origin is tuple else list(value)
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigKeyError(f"{label} must be a mapping, got {value!r}")
        return dict(value)
    return value
