"""Influence weights on the embedded data with a briefly trained model: the ranking the method
exists for (random tokens < math for a math probe; code > prose for a code probe)."""

from __future__ import annotations

import pytest

from ct_data import SourceConfig, load_data_config
from ct_datamix import WeightRule, build_sample_probes, influence_weights

ROOT = __import__("pathlib").Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def probes(sample_dir, tmp_path_factory):
    paths = build_sample_probes(sample_dir, tmp_path_factory.mktemp("probes"), n=16)
    return {c: SourceConfig(c, p) for c, p in paths.items()}


def test_probes_are_held_out(sample_dir, probes):
    import json

    train_math = {json.loads(x)["text"] for x in (sample_dir / "math" / "train.jsonl").read_text().splitlines()}
    probe_math = [json.loads(x)["text"] for x in open(probes["math"].path)]
    assert probe_math and not set(probe_math) & train_math


@pytest.mark.slow
def test_random_tokens_below_math_for_math_probe_and_code_above_prose_for_code_probe(
        sample_dir, tokenizer, trained_export, random_tokens_source, probes):
    mix = load_data_config(ROOT / "configs" / "data" / "sample_midtrain.yaml", sample_dir=sample_dir)
    mix.sources.append(SourceConfig("random", str(random_tokens_source)))
    res = influence_weights(mix, {"math": probes["math"]}, [str(trained_export)], tokenizer, samples_per_source=12,
                            probe_samples=12, max_tokens=128, rule=WeightRule("softmax"), progress=False)
    assert res.weights["random"] < res.weights["math"], res.rho
    assert res.rho["random"] < res.rho["math"]
    res = influence_weights(mix, {"code": probes["code"]}, [str(trained_export)], tokenizer, samples_per_source=12,
                            probe_samples=12, max_tokens=128, progress=False)
    assert res.rho["code"] > res.rho["prose"], res.rho
    assert res.weights["code"] > res.weights["prose"]
