"""Everyday mistakes with ct-eval, ct-export and init_from: exit status 2, one line naming the
cause (and the way out), no traceback, nothing written. In process (``main(argv)``): an exception
that is not a user error propagates and fails the test, as a traceback would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_support import TINY
from ct_cli import eval as eval_cli
from ct_cli import export as export_cli
from ct_cli import train as train_cli


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and mtime: 'nothing changed on disk' is this staying equal."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """An HF export with a tokenizer, as ct-eval reads it."""
    import ct_data
    import ct_model

    out = tmp_path_factory.mktemp("hf")
    tokenizer = ct_data.train_tokenizer(["Question: what is 1 plus 1? Answer: 2"] * 30, 300, min_frequency=1)
    config = ct_model.presets.get("mobilellm_tiny", num_layers=1, hidden_size=32, num_attention_heads=2,
                                  num_query_groups=1, ffn_hidden_size=64, vocab_size=len(tokenizer))
    ct_model.hf.save_hf(ct_model.build_model(config, seed=0), out)
    tokenizer.save(str(out))
    return out


# ---------------------------------------------------------------------------------------- ct-eval


def test_eval_problems_without_the_fields_names_file_line_fields_and_the_mapping_options(
        capsys, tmp_path, tiny_hf):
    problems = tmp_path / "problems.jsonl"
    problems.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n\n"
                        + json.dumps({"prompt": "2+2?", "solution": "4"}) + "\n")
    line = one_line_error(capsys, eval_cli.main([str(tiny_hf), "--problems", str(problems)]))
    assert f"{problems}:3" in line and "'question'" in line and "['prompt', 'solution']" in line
    assert "--question-field" in line and "--answer-field" in line


def test_eval_mapped_fields_are_read(capsys, tmp_path, tiny_hf):
    """The options the message names are the way out."""
    problems = tmp_path / "problems.jsonl"
    problems.write_text(json.dumps({"prompt": "2+2?", "solution": "4"}) + "\n")
    assert eval_cli.main([str(tiny_hf), "--problems", str(problems), "--question-field", "prompt",
                          "--answer-field", "solution", "--max-new-tokens", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["problems"] == 1 and result["samples"][0]["answer"] == "4"


@pytest.mark.parametrize("content, needle", [("not json\n", ":1: not JSON"), ("[1, 2]\n", ":1: a JSON list")])
def test_eval_problems_that_are_not_json_objects(capsys, tmp_path, tiny_hf, content, needle):
    problems = tmp_path / "problems.jsonl"
    problems.write_text(content)
    assert needle in one_line_error(capsys, eval_cli.main([str(tiny_hf), "--problems", str(problems)]))


@pytest.mark.parametrize("flag", [["--max-problems", "0"], ["--max-problems", "-3"],
                                  ["--lm-eval", "gsm8k", "--limit", "0"]])
def test_eval_nothing_to_evaluate_is_refused(capsys, tiny_hf, flag):
    before = snapshot(tiny_hf)
    line = one_line_error(capsys, eval_cli.main([str(tiny_hf), *flag]))
    assert flag[-2] in line and "at least 1" in line
    assert snapshot(tiny_hf) == before


def test_eval_of_a_run_directory_points_at_its_hf(capsys, reference_run):
    before = snapshot(reference_run)
    line = one_line_error(capsys, eval_cli.main([str(reference_run)]))
    assert "training run directory" in line and str(reference_run / "hf") in line
    line = one_line_error(capsys, eval_cli.main([str(reference_run), "--lm-eval", "gsm8k"]))
    assert "training run directory" in line
    assert snapshot(reference_run) == before


def test_eval_of_a_run_directory_without_an_export_says_how_to_make_one(capsys, tmp_path, reference_run):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "model_config.json"):
        (run / name).write_text((reference_run / name).read_text())
    line = one_line_error(capsys, eval_cli.main([str(run)]))
    assert "training run directory" in line and "ct-export" in line


def test_eval_seeds_must_be_four_integers(capsys, tiny_hf):
    line = one_line_error(capsys, eval_cli.main([str(tiny_hf), "--lm-eval", "x", "--lm-eval-seeds", "1,2"]))
    assert "--lm-eval-seeds" in line and "0,1234,1234,1234" in line


# -------------------------------------------------------------------------------------- init_from


def test_init_from_a_run_directory_points_at_its_hf(capsys, tmp_path, reference_run):
    before = snapshot(reference_run)
    run = tmp_path / "new"
    code = train_cli.main(["--phase", "pretrain_phase2", f"run_dir={run}", f"init_from={reference_run}", *TINY,
                           "trainer.max_steps=1"])
    line = one_line_error(capsys, code)
    assert f"init_from={reference_run}" in line and "training run directory" in line
    assert str(reference_run / "hf") in line
    assert not run.exists() and snapshot(reference_run) == before


# -------------------------------------------------------------------------------------- ct-export


def test_export_into_a_non_empty_directory_needs_force(capsys, tmp_path, reference_run):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}\n')
    before = snapshot(out)
    line = one_line_error(capsys, export_cli.main([str(reference_run), str(out)]))
    assert str(out) in line and "not empty" in line and "--force" in line
    assert snapshot(out) == before and json.loads((out / "config.json").read_text()) == {"mine": True}
    assert export_cli.main([str(reference_run), str(out), "--force"]) == 0
    capsys.readouterr()
    meta = json.loads((out / "config.json").read_text())
    assert "model_type" in meta and "eos_token_id" in meta
    assert (out / "generation_config.json").is_file()


def test_export_into_an_empty_or_new_directory(capsys, tmp_path, reference_run):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_cli.main([str(reference_run), str(empty)]) == 0
    assert export_cli.main([str(reference_run), str(tmp_path / "new" / "dir")]) == 0
    capsys.readouterr()
    assert (empty / "model.safetensors").is_file() and (tmp_path / "new" / "dir" / "config.json").is_file()


@pytest.mark.parametrize("where", [".", "checkpoints", "checkpoints/step_00000008"])
@pytest.mark.parametrize("force", [False, True])
def test_export_into_the_run_directory_is_refused_even_with_force(capsys, reference_run, where, force):
    before = snapshot(reference_run)
    target = reference_run / where
    line = one_line_error(capsys, export_cli.main([str(reference_run), str(target), *(["--force"] if force else [])]))
    assert "run directory" in line and "export into a directory of its own" in line
    assert snapshot(reference_run) == before


def test_export_onto_a_file_is_refused(capsys, tmp_path, reference_run):
    target = tmp_path / "file"
    target.write_text("x")
    line = one_line_error(capsys, export_cli.main([str(reference_run), str(target), "--force"]))
    assert "not a directory" in line and target.read_text() == "x"


def test_the_runs_own_export_names_its_special_tokens(reference_run):
    import ct_data

    tokenizer = ct_data.load_tokenizer(str(reference_run / "hf"))
    meta = json.loads((reference_run / "hf" / "config.json").read_text())
    generation = json.loads((reference_run / "hf" / "generation_config.json").read_text())
    assert meta["bos_token_id"] == generation["bos_token_id"] == tokenizer.bos_id
    assert meta["eos_token_id"] == generation["eos_token_id"] == sorted(tokenizer.stop_ids)
    assert {tokenizer.eos_id, tokenizer.eot_id} <= set(generation["eos_token_id"])
