"""configs/ agrees with the code it describes."""

from pathlib import Path

import pytest
import yaml

from ct_model import ModelConfig, presets

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", presets.names())
def test_model_yaml_equals_preset(name):
    values = yaml.safe_load((ROOT / "configs" / "model" / f"{name}.yaml").read_text())
    assert values.pop("preset") == name
    # A model YAML is `preset: NAME` plus overrides (the DeepSeek-V3 files are the preset alone).
    assert ModelConfig.from_dict({**presets.get(name).to_dict(), **values}) == presets.get(name)


def test_every_model_yaml_is_a_preset():
    assert {p.stem for p in (ROOT / "configs" / "model").glob("*.yaml")} == set(presets.names())
