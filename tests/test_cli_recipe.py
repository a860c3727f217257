"""ct-recipe across all phases on tiny settings, the midtrain teachers, ct-eval, multi-process runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_support import ROOT, TINY, ct, train_losses

SHARED_GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
PHASES = ["pretrain_phase1", "pretrain_phase2", "midtrain_phase1", "midtrain_phase2", "posttrain_general",
          "posttrain_reasoning"]


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory, sample_dir):
    root = tmp_path_factory.mktemp("recipe")
    result = ct("recipe", f"run_dir={root}", f"sample_data.dir={sample_dir}", *TINY, "trainer.max_steps=3",
                "seq_len=256", "eval.reasoning.max_problems=8", "eval.reasoning.max_new_tokens=24",
                "--teacher-model", "num_layers=6,ffn_hidden_size=512")
    return root, result


@pytest.fixture(scope="module")
def recipe_root(recipe_run) -> Path:
    return recipe_run[0]


@pytest.mark.slow
def test_recipe_chains_every_phase(recipe_root):
    summary = json.loads((recipe_root / "recipe_summary.json").read_text())
    # The teacher trains just before mid-training (the default one starts from pretrain_phase2).
    assert list(summary["phases"]) == [*PHASES[:2], "teacher", *PHASES[2:]]
    for previous, phase in zip(PHASES, PHASES[1:]):
        config = json.loads((recipe_root / phase / "config.json").read_text())
        assert Path(config["init_from"]).resolve() == (recipe_root / previous / "hf").resolve()
        assert (recipe_root / phase / "hf" / "model.safetensors").is_file()
    # posttrain_reasoning scales RoPE theta by 8 over the model it starts from.
    base = json.loads((recipe_root / "posttrain_general" / "hf" / "config.json").read_text())
    final = json.loads((recipe_root / "posttrain_reasoning" / "hf" / "config.json").read_text())
    assert final["rope_theta"] == 8 * base["rope_theta"]


@pytest.mark.slow
def test_midtrain_distils_from_the_larger_embedded_teacher(recipe_root):
    teacher = json.loads((recipe_root / "teacher" / "hf" / "config.json").read_text())
    student = json.loads((recipe_root / "pretrain_phase2" / "hf" / "config.json").read_text())
    # --teacher-model's fields over the student's shape, the rest (width, vocabulary) shared.
    assert (teacher["num_hidden_layers"], student["num_hidden_layers"]) == (6, 4)
    assert teacher["vocab_size"] == student["vocab_size"] and teacher["hidden_size"] == student["hidden_size"]
    # Another shape cannot start from the student's weights: pretrained from scratch.
    assert json.loads((recipe_root / "teacher" / "config.json").read_text())["init_from"] is None
    for phase in ("midtrain_phase1", "midtrain_phase2"):
        config = json.loads((recipe_root / phase / "config.json").read_text())
        assert Path(config["stage"]["distill"]["teacher_path"]) == recipe_root / "teacher" / "hf"


@pytest.mark.slow
def test_recipe_reports_accuracy_and_wall_time_per_phase(recipe_run):
    root, result = recipe_run
    summary = json.loads((root / "recipe_summary.json").read_text())
    accuracy = summary["reasoning_accuracy"]
    assert list(accuracy) == ["pretrain", "midtrain", "general_sft", "reasoning_sft"]
    for part, phase in zip(accuracy, ["pretrain_phase2", "midtrain_phase2", "posttrain_general", "posttrain_reasoning"]):
        assert accuracy[part]["problems"] == 8 and 0 <= accuracy[part]["correct"] <= 8
        assert Path(accuracy[part]["hf_dir"]) == root / phase / "hf"
    walls = [r["wall_s"] for r in summary["phases"].values()]
    assert all(w > 0 for w in walls) and summary["wall_s"]["eval"] > 0
    assert summary["wall_s"]["total_measured"] == pytest.approx(sum(walls) + summary["wall_s"]["eval"], abs=0.2)
    table = result.stdout[result.stdout.index("phase  "):]
    for phase in ["teacher", *PHASES]:
        assert phase in table
    assert f"({accuracy['reasoning_sft']['correct']}/8)" in table and "total measured wall time" in table


@pytest.mark.slow
def test_recipe_resumes_as_a_whole_and_reuses_the_teacher(recipe_root, sample_dir):
    done = ["teacher", *PHASES]
    before = {p: (recipe_root / p / "hf" / "model.safetensors").stat().st_mtime_ns for p in done}
    walls = json.loads((recipe_root / "recipe_timings.json").read_text())
    result = ct("recipe", f"run_dir={recipe_root}", f"sample_data.dir={sample_dir}", *TINY,
                "trainer.max_steps=3", "seq_len=256", "--skip-eval", "--teacher-model", "num_layers=6,ffn_hidden_size=512")
    assert "teacher: already done" in result.stderr and "=== teacher ===" not in result.stderr
    assert before == {p: (recipe_root / p / "hf" / "model.safetensors").stat().st_mtime_ns for p in done}
    # The skipped phases keep the wall times measured when they ran.
    summary = json.loads((recipe_root / "recipe_summary.json").read_text())
    assert {p: r["wall_s"] for p, r in summary["phases"].items()} == {p: walls[p] for p in done}


def test_default_teacher_continues_the_student_on_the_midtraining_mixture(tmp_path):
    """Composition only: the default teacher is the student's pretrain_phase2 export trained further."""
    from ct_cli.common import config_dir, run_config
    from ct_cli.recipe import DEFAULT_TEACHER, phase_order, phase_overrides, teacher_plan

    overrides = [f"sample_data.dir={tmp_path / 'sample_data'}"]
    plan = teacher_plan(tmp_path, PHASES, overrides, DEFAULT_TEACHER)
    assert phase_order(PHASES, plan) == [*PHASES[:2], "teacher", *PHASES[2:]]
    teacher = run_config("teacher", phase_overrides(tmp_path, "teacher", overrides, plan), config_dir(None))
    midtrain = run_config("midtrain_phase1", phase_overrides(tmp_path, "midtrain_phase1", overrides, plan),
                          config_dir(None))
    assert teacher.init_path == midtrain.init_path == tmp_path / "pretrain_phase2" / "hf"
    assert teacher.stage.kind == "pretrain" and teacher.data == midtrain.data  # the phase-1 mid-training mixture
    assert Path(midtrain.stage.distill.teacher_path) == tmp_path / "teacher" / "hf"
    # A user's teacher_path means no teacher run at all.
    user = teacher_plan(tmp_path, PHASES, [*overrides, "stage.distill.teacher_path=/m"], DEFAULT_TEACHER)
    assert phase_order(PHASES, user) == PHASES


def test_recipe_refuses_a_teacher_without_its_start_export(tmp_path):
    result = ct("recipe", f"run_dir={tmp_path}", "--phases", "midtrain_phase1", check=False)
    assert result.returncode == 2
    assert "teacher: init_from=" in result.stderr and "pretrain_phase2" in result.stderr
    assert not (tmp_path / "teacher").exists() and not (tmp_path / "midtrain_phase1").exists()


def test_recipe_refuses_a_missing_teacher_before_training(tmp_path):
    result = ct("recipe", f"run_dir={tmp_path}", f"stage.distill.teacher_path={tmp_path / 'nope'}", check=False)
    assert result.returncode == 2
    assert f"stage.distill.teacher_path={tmp_path / 'nope'}" in result.stderr and "midtrain_phase1" in result.stderr
    assert not (tmp_path / "pretrain_phase1").exists() and not (tmp_path / "teacher").exists()


@pytest.mark.slow
def test_cached_teacher_gives_the_online_teacher_losses(recipe_root, sample_dir, tmp_path):
    common = ["--phase", "midtrain_phase1", f"init_from={recipe_root / 'pretrain_phase2' / 'hf'}",
              f"sample_data.dir={sample_dir}", *TINY, "trainer.max_steps=4", "seq_len=128", "stage.distill.top_k=16",
              "stage.distill.temperature=2.0"]
    ct("train", *common, f"run_dir={tmp_path / 'online'}", "stage.distill.teacher=online")
    ct("train", *common, f"run_dir={tmp_path / 'cached'}", "stage.distill.teacher=cached")
    online, cached = train_losses(tmp_path / "online"), train_losses(tmp_path / "cached")
    assert sorted(online) == sorted(cached) == [1, 2, 3, 4]
    # The cache stores log-probs in fp16: equal up to that rounding.
    assert all(abs(online[s] - cached[s]) < 2e-3 for s in online)
    assert (tmp_path / "cached" / "teacher_cache" / "index.json").is_file()


@pytest.mark.slow
def test_ct_eval_on_the_sample_split_and_on_gsm8k(recipe_root, sample_dir):
    model = recipe_root / "posttrain_reasoning" / "hf"
    out = json.loads(ct("eval", str(model), "--sample-dir", str(sample_dir), "--sample-scale", "0.1",
                        "--max-problems", "6", "--max-new-tokens", "16", "--json").stdout)
    assert out["problems"] == 6 and 0 <= out["accuracy"] <= 1 and out["perplexity"] > 1
    if not SHARED_GSM8K.is_file():
        pytest.skip(f"GSM8K not found at {SHARED_GSM8K} (../shared is absent)")
    out = json.loads(ct("eval", str(model), "--problems", str(SHARED_GSM8K), "--max-problems", "4",
                        "--max-new-tokens", "8", "--json").stdout)
    assert out["problems"] == 4 and out["samples"][0]["answer"].isdigit()  # "#### 18" reduced to "18"


def test_ct_eval_bad_input_exits_2(tmp_path):
    result = ct("eval", str(tmp_path), check=False)
    assert result.returncode == 2 and "config.json" in result.stderr
