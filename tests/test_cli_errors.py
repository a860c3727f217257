"""Bad input through ct-train and ct-export: exit status 2, one line naming the key or path, no
traceback, and nothing trained. Run in process (``main(argv)``): an exception that is not a user
error propagates and fails the test, which is what a traceback would be."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest

from cli_support import TINY, events
from ct_cli import export as export_cli
from ct_cli import train as train_cli


def train(capsys, *args: str) -> tuple[int, str]:
    code = train_cli.main(["--phase", "pretrain_phase1", *args])
    err = capsys.readouterr().err
    return code, err


CONFIG_ERRORS = [
    (["trainer.max_steps=0"], "trainer.max_steps"),
    (["trainer.global_batch_size=10"], "trainer.global_batch_size=10"),
    (["trainer.max_steps=many"], "trainer.max_steps must be an integer"),
    (["optimizer.lr=-1"], "optimizer.lr"),
    (["optimizer.betas=[0.9]"], "optimizer.betas"),
    (["schedule.name=exponential"], "schedule.name"),
    (["schedule.warmup_ratio=1.5"], "schedule.warmup_ratio"),
    (["model.num_attention_heads=3"], "num_attention_heads=3"),
    (["model=gpt5"], "model"),
    (["model.preset=gpt5"], "unknown model preset 'gpt5'"),
    (["stage.kind=rl"], "stage.kind"),
    (["stage.distill.teacher=cached"], "stage.distill.top_k"),
    (["distributed.strategy=zero"], "distributed.strategy"),
    (["distributed.backend=mpi"], "distributed.backend"),
    (["distributed.tensor_model_parallel_size=2"], "distributed.tensor/pipeline_model_parallel_size"),
    (["precision.dtype=fp4"], "precision.dtype"),
    (["activation_checkpointing.mode=partial"], "activation_checkpointing.mode must be one of"),
    (["activation_checkpointing.every_n_blocks=0"], "activation_checkpointing.every_n_blocks"),
    (["compile.enabled=maybe"], "compile.enabled must be true or false"),
    (["compile.bogus=1"], "compile.bogus"),
    (["logging.peak_flops=-1"], "logging.peak_flops"),
    (["logging.progress=maybe"], "logging.progress must be true or false"),
    (["tokenizer.vocab_size=12"], "tokenizer.vocab_size"),
    (["sample_data.scale=0"], "sample_data.scale"),
    (["eval.reasoning.max_new_tokens=0"], "eval.reasoning.max_new_tokens"),
    (["seq_len=1"], "seq_len"),
    (["trainer.bogus=1"], "trainer.bogus"),
    (["+trainer.bogus=1"], "trainer: unknown key(s) bogus"),
    (["data.loader.packing=zigzag"], "packing"),
    (["--print-config", "optimizer=lion"], "optimizer"),
]


@pytest.mark.parametrize("args, needle", CONFIG_ERRORS, ids=[a[0] for a, _ in CONFIG_ERRORS])
def test_bad_config_values_exit_2_naming_the_key(capsys, tmp_path, args, needle):
    code, err = train(capsys, f"run_dir={tmp_path / 'run'}", *args)
    assert code == 2, err
    assert needle in err and err.startswith("error: ") and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_phase(capsys):
    assert train_cli.main(["--phase", "pretrain_phase9"]) == 2
    assert "unknown phase 'pretrain_phase9'" in capsys.readouterr().err


@pytest.mark.parametrize("args, needle", [
    (["distributed=megatron_tp2"], "needs CUDA"),
    (["distributed=megatron_pp2"], "distributed=single, ddp or fsdp2"),
    # A layout ct-plan plans but no engine runs yet: refused naming the key, on any machine.
    (["distributed=deepseek_v3_671b"], "distributed.num_layers_in_first_pipeline_stage=3: the megatron engine"),
    (["distributed=fsdp2", "precision=fp8", "precision.fp8_recipe=mxfp8"],
     "precision.dtype=fp8 with distributed.engine=native"),
])
def test_layouts_this_machine_cannot_run_are_refused(capsys, monkeypatch, tmp_path, args, needle):
    monkeypatch.delenv("CT_MEGATRON_CPU_SHIM", raising=False)
    code, err = train(capsys, f"run_dir={tmp_path / 'run'}", *args)
    assert code == 2 and needle in err, err


def test_bad_paths_exit_2_naming_the_path(capsys, tmp_path, sample_dir):
    base = [f"run_dir={tmp_path / 'run'}", f"sample_data.dir={sample_dir}", *TINY]
    cases = [
        (["tokenizer.path=/nonexistent/tokenizer"], "tokenizer.path=/nonexistent/tokenizer"),
        (["init_from=/nonexistent/hf"], "init_from=/nonexistent/hf"),
        (["data.sources.0.path=/nonexistent/web.jsonl"], "/nonexistent/web.jsonl"),
        (["model.vocab_size=4096"], "model.vocab_size is 4096"),
    ]
    for args, needle in cases:
        code, err = train(capsys, *base, *args)
        assert code == 2 and needle in err and "Traceback" not in err, (args, err)
    midtrain = train_cli.main(["--phase", "midtrain_phase1", *base, "stage.distill.teacher_path=/nope/teacher",
                               "init_from=null"])
    assert midtrain == 2 and "stage.distill.teacher_path=/nope/teacher" in capsys.readouterr().err


def test_a_broken_local_data_file_is_named_before_step_one(capsys, tmp_path, sample_dir):
    broken = tmp_path / "broken.jsonl"
    lines = [json.dumps({"text": f"line {i} " * 20}) for i in range(50)]
    broken.write_text("\n".join(lines[:30] + ['{"text": "cut short'] + lines[30:]) + "\n")
    run = tmp_path / "run"
    code, err = train(capsys, f"run_dir={run}", f"sample_data.dir={sample_dir}", *TINY,
                      f"data.sources.0.path={broken}")
    assert code == 2 and f"{broken}:31" in err, err
    assert not (run / "metrics.jsonl").exists() or "train" not in (run / "metrics.jsonl").read_text()


def test_damaged_checkpoints_exit_2_naming_the_file(capsys, tmp_path, sample_dir):
    run = tmp_path / "run"
    args = [f"run_dir={run}", f"sample_data.dir={sample_dir}", *TINY, "trainer.max_steps=2"]
    assert train(capsys, *args)[0] == 0
    ckpt = run / "checkpoints" / "step_00000002"
    shard = next((ckpt / "engine").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated: the manifest no longer verifies
    code, err = train(capsys, *args, "trainer.max_steps=4")
    assert code == 2 and "no checkpoint verifies" in err and str(shard) in err, err
    assert export_cli.main([str(run), str(tmp_path / "out")]) == 2
    assert str(shard) in capsys.readouterr().err
    (ckpt / "meta.json").write_text("{not json")
    code, err = train(capsys, *args, "trainer.max_steps=4")
    assert code == 2 and "meta.json" in err, err
    assert export_cli.main([str(ckpt), str(tmp_path / "out")]) == 2
    assert "meta.json" in capsys.readouterr().err


# -- a run_dir protects the run it holds -------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory, sample_dir):
    """A TINY run of 2 steps, finished (checkpoint, hf/, summary.json). Tests copy it, never write it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    args = [f"run_dir={run}", f"sample_data.dir={sample_dir}", *TINY, "trainer.max_steps=2"]
    assert train_cli.main(["--phase", "pretrain_phase1", *args]) == 0
    return run, args


def copy_of(finished, tmp_path) -> tuple[Path, list[str]]:
    run, args = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy, [a if not a.startswith("run_dir=") else f"run_dir={copy}" for a in args]


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``root``: size, mtime and content hash (a rewrite with equal bytes shows too)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_finished_run_rerun_says_so_and_changes_nothing(capsys, caplog, tmp_path, finished):
    run, args = copy_of(finished, tmp_path)
    before = snapshot(run)
    caplog.set_level(logging.INFO, logger="ct_stages")
    code, err = train(capsys, *args)
    assert code == 0, err
    assert "finished at step 2" in caplog.text
    assert snapshot(run) == before


@pytest.mark.parametrize("steps", [2, 4], ids=["finished", "unfinished"])
@pytest.mark.parametrize("change, needles", [
    (["model.num_layers=2"], ["model.num_layers: saved", "now 2"]),
    (["model=deepseek_v3_tiny"], ["model.", "saved"]),
    (["trainer.global_batch_size=8"], ["trainer.global_batch_size: saved 4, now 8", "trainer.global_batch_size=4"]),
    (["seq_len=32"], ["seq_len: saved 64, now 32"]),
], ids=["num_layers", "preset", "global_batch", "seq_len"])
def test_a_rerun_with_another_configuration_is_refused_before_writing(capsys, tmp_path, finished, steps, change,
                                                                      needles):
    run, args = copy_of(finished, tmp_path)
    before = snapshot(run)
    code, err = train(capsys, *args, f"trainer.max_steps={steps}", *change)
    assert code == 2, err
    assert all(n in err for n in needles) and "new run_dir" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert snapshot(run) == before
