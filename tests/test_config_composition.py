"""A chosen group option always wins over a phase's defaults, for every phase; and the typed
RunConfig rejects what it does not know. The reference is the group's own YAML file, read here."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ct_cli.common import compose, phases
from ct_stages.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
GROUPS = ("optimizer", "precision", "distributed", "model")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def group_values(group: str, option: str) -> dict:
    return yaml.safe_load((CONFIGS / group / f"{option}.yaml").read_text()) or {}


@pytest.mark.parametrize("phase", phases(CONFIGS))
@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_wins_over_every_phase(phase, group):
    for option in options(group):
        composed = compose(phase, [f"{group}={option}"], CONFIGS)
        expected = group_values(group, option)
        assert expected, f"{group}/{option}.yaml is empty"
        for key, value in expected.items():
            got = composed[group][key]
            assert got == value, f"{phase} with {group}={option}: {group}.{key} is {got!r}, the group says {value!r}"
        RunConfig.from_dict(composed)  # and the composition is a valid run configuration


def test_phase_files_set_no_key_that_a_group_owns():
    owned = {group: set().union(*(group_values(group, o) for o in options(group))) for group in GROUPS}
    for path in (CONFIGS / "phase").glob("*.yaml"):
        values = yaml.safe_load(path.read_text())
        for group, keys in owned.items():
            clash = keys & set(values.get(group) or {})
            assert not clash, f"{path.name} sets {group}.{sorted(clash)}, which the {group} group owns"


def test_a_key_override_wins_over_the_group_and_the_phase():
    composed = compose("posttrain_general", ["optimizer=sgd", "optimizer.lr=0.5", "optimizer.momentum=0.5"], CONFIGS)
    assert composed["optimizer"] == {**composed["optimizer"], "name": "sgd", "lr": 0.5, "momentum": 0.5}


def test_checkpointing_and_compile_are_command_line_keys():
    from ct_parallel import ActivationCheckpointConfig, CompileConfig

    default = RunConfig.from_dict(compose("pretrain_phase1", [], CONFIGS))
    assert (default.activation_checkpointing, default.compile) == (ActivationCheckpointConfig(), CompileConfig())
    run = RunConfig.from_dict(compose("pretrain_phase1", [
        "activation_checkpointing.mode=full", "activation_checkpointing.every_n_blocks=2",
        "compile.enabled=true", "compile.backend=aot_eager"], CONFIGS))
    assert run.activation_checkpointing == ActivationCheckpointConfig(mode="full", every_n_blocks=2)
    assert run.compile == CompileConfig(enabled=True, backend="aot_eager")


def test_model_yamls_name_a_preset_and_resolve_through_ct_model():
    import ct_model

    for option in options("model"):
        values = group_values("model", option)
        assert set(values) == {"preset"}, f"model/{option}.yaml should name a preset only, not copy its fields"
        run = RunConfig.from_dict(compose("pretrain_phase1", [f"model={option}"], CONFIGS))
        assert run.model.resolve() == ct_model.presets.get(values["preset"])
    run = RunConfig.from_dict(compose("pretrain_phase1", ["model=mobilellm_140m", "model.num_layers=3"], CONFIGS))
    assert run.model.resolve() == ct_model.presets.get("mobilellm_140m", num_layers=3)


def test_defaults_live_in_the_dataclasses():
    """config.yaml restates no default: every value it sets differs from RunConfig's."""
    root = yaml.safe_load((CONFIGS / "config.yaml").read_text())
    defaults = RunConfig.defaults()

    def restated(values, base, prefix=""):
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                yield from restated(value, base[key], f"{prefix}{key}.")
            elif key in base and base[key] == value:
                yield prefix + key

    assert not list(restated({k: v for k, v in root.items() if k != "defaults"}, defaults))


@pytest.mark.parametrize("values, message", [
    ({"trainer": {"max_stepz": 3}}, "trainer: unknown key(s) max_stepz; known keys: async_checkpoint, checkpoint_every"),
    ({"trainer": {"max_steps": "ten"}}, "trainer.max_steps must be an integer, got 'ten'"),
    ({"optimizer": {"lr": "fast"}}, "optimizer.lr must be a number"),
    ({"optimizer": {"name": "lion"}}, "optimizer.name must be one of"),
    ({"stage": {"distill": {"kindd": "x"}}}, "stage.distill: unknown key(s) kindd"),
    ({"model": {"preset": "gpt5"}}, "unknown model preset 'gpt5'"),
    ({"model": {"num_layers": 2}}, "model.preset is null, so model.hidden_size"),
    ({"model": {"preset": "mobilellm_tiny", "num_attention_heads": 3}}, "num_attention_heads=3"),
    ({"distributed": {"strategy": "zero3"}}, "distributed.strategy must be one of"),
    ({"precision": {"dtype": "fp4"}}, "precision.dtype must be one of"),
    ({"activation_checkpointing": {"mode": "some"}}, "activation_checkpointing.mode must be one of"),
    ({"activation_checkpointing": {"every_n_blocks": 0}}, "activation_checkpointing.every_n_blocks must be"),
    ({"compile": {"enabled": "yes"}}, "compile.enabled must be true or false"),
    ({"compile": {"fullgrph": True}}, "compile: unknown key(s) fullgrph"),
    ({"schedule": {"name": "exp"}}, "schedule.name must be one of"),
    ({"logging": {"wandb": {"enabled": "yes"}}}, "logging.wandb.enabled must be true or false"),
    ({"tokenizer": {"vocab_size": 10}}, "tokenizer.vocab_size must be >= 264"),
    ({"sample_data": {"scale": 0}}, "sample_data.scale must be > 0"),
    ({"eval": {"reasoning": {"max_problems": 0}}}, "eval.reasoning.max_problems must be >= 1"),
    ({"seq_len": 1}, "seq_len must be >= 2"),
    ({"bogus": 1}, "config: unknown key(s) bogus"),
])
def test_bad_values_name_their_key(values, message):
    from ct_model import UserError

    with pytest.raises(UserError) as err:
        RunConfig.from_dict(values)
    assert message in str(err.value)


def test_every_preset_has_a_model_yaml():
    import ct_model

    assert set(options("model")) == set(ct_model.presets.names())
