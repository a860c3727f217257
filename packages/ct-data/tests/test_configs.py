"""configs/data: the recipe's mixtures (weights from the reference) and the sample mixes."""

import pytest

from ct_data import DataConfigError, load_data_config
from ctdata_helpers import REPO

CONFIGS = REPO / "configs" / "data"
pytestmark = pytest.mark.skipif(not CONFIGS.is_dir(), reason=f"{CONFIGS} not found (ct-data installed alone)")

# Hand-copied from reference/mobilellm-r1.md, sections 2-4.
RECIPE = {
    "pretrain_phase1": {"starcoder": 10.66, "open_web_math": 6.93, "fineweb_edu": 63.75, "wikipedia": 5.03,
                        "arxiv": 6.36, "stackexchange": 5.03, "algebraic_stack": 2.25},
    "pretrain_phase2": {"starcoder": 0.52, "open_web_math": 23.33, "fineweb_edu": 54.83, "wikipedia": 0.14,
                        "arxiv": 1.32, "stackexchange": 0.86, "algebraic_stack": 1.26, "nemotron_science": 0.03,
                        "nemotron_code": 0.72, "nemotron_math": 3.01, "cosmopedia": 2.70, "finemath": 8.01,
                        "pes2o": 0.08},
    "midtrain_phase1": {"dclm_baseline": 37.03, "flan": 4.10, "pes2o": 11.41, "wikipedia": 2.66,
                        "stackexchange": 2.12, "dolmino_math": 11.63, "nemotron_code": 20.69,
                        "nemotron_cc_math": 3.45, "starcoder": 6.90},
    "midtrain_phase2": {"dclm_baseline": 6.51, "flan": 0.72, "pes2o": 2.01, "wikipedia": 0.47,
                        "stackexchange": 2.00, "dolmino_math": 29.10, "nemotron_code": 29.10,
                        "nemotron_cc_math": 19.40, "starcoder": 9.70, "benchmark_train": 0.97},
    "sft_general": {"tulu3_sft": 1.0},
    "sft_reasoning": {"open_math_reasoning": 3.2, "open_science_reasoning": 0.8, "open_code_reasoning": 2.2},
}
SAMPLE = ["sample_pretrain", "sample_pretrain_phase2", "sample_midtrain", "sample_midtrain_phase2",
          "sample_sft_general", "sample_sft_reasoning"]


@pytest.mark.parametrize("name", sorted(RECIPE))
def test_recipe_mixtures(name):
    mix = load_data_config(CONFIGS / f"{name}.yaml")
    assert {s.name: s.weight for s in mix.sources} == RECIPE[name]
    assert mix.kind == ("sft" if name.startswith("sft") else "pretrain")
    assert mix.tokenizer == "meta-llama/Llama-3.2-1B"
    if name.startswith("pretrain"):
        assert mix.loader_options["packing"] == "per_source" and mix.loader_options["add_eos"] is False


def test_non_commercial_source_left_out():
    import yaml

    raw = yaml.safe_load((CONFIGS / "pretrain_phase2.yaml").read_text())
    assert [x["name"] for x in raw["left_out"]] == ["natural_reasoning"]
    assert "natural_reasoning" not in {s["name"] for s in raw["sources"]}


# The embedded run's context: reasoning solutions with column work (sample version 2) pass 128 tokens.
SEQ = 256


@pytest.mark.parametrize("name", SAMPLE)
def test_sample_mixtures_build_loaders(name, sample_dir, tokenizer):
    mix = load_data_config(CONFIGS / f"{name}.yaml", sample_dir=sample_dir)
    loader = mix.build_loader(tokenizer, SEQ, 4, 0, rank=1, world_size=2)
    b = next(loader)
    assert b["input_ids"].shape == (2, SEQ) and (b["labels"] != -100).any()


def test_sample_dir_required():
    with pytest.raises(DataConfigError, match=r"source 'prose'.*needs sample_dir"):
        load_data_config(CONFIGS / "sample_pretrain.yaml")


def test_bad_config_keys(tmp_path):
    with pytest.raises(DataConfigError, match=r"unknown loader option\(s\) \['pack'\]"):
        load_data_config({"kind": "pretrain", "loader": {"pack": 1}, "sources": [{"name": "a", "path": "x"}]})
    with pytest.raises(DataConfigError, match=r"loader option 'micro_batch_size' was removed.*trainer.micro_batch_size"):
        load_data_config({"kind": "sft", "loader": {"micro_batch_size": 2}, "sources": [{"name": "a", "path": "x"}]})
    with pytest.raises(DataConfigError, match="field 'kind'"):
        load_data_config({"kind": "rl", "sources": []})
