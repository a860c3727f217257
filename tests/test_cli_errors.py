"""Bad input through ct-train and ct-export: exit status 2, one line naming the key or path, no
traceback, and nothing trained. Run in process (``main(argv)``): an exception that is not a user
error propagates and fails the test, which is what a traceback would be."""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
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
    (["optimizer.betas=[0.9,high]"], "optimizer.betas"),
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
    (["model=deepseek_v3_tiny"], ["model.preset: saved 'mobilellm_tiny', now 'deepseek_v3_tiny'",
                                  "saved values (model.preset=mobilellm_tiny)"]),
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


def test_resumed_metrics_hold_one_row_per_step(capsys, tmp_path, finished):
    run, args = copy_of(finished, tmp_path)
    # A run killed after logging steps 3 and 4 but before their checkpoint: a resume trains them again.
    with (run / "metrics.jsonl").open("a") as f:
        for step in (3, 4):
            f.write(json.dumps({"event": "train", "step": step, "loss": 99.0}) + "\n")
    code, err = train(capsys, *args, "trainer.max_steps=4")
    assert code == 0, err
    steps = [e["step"] for e in events(run) if e["event"] == "train"]
    assert steps == [1, 2, 3, 4] and all(e.get("loss") != 99.0 for e in events(run))


def test_a_run_dir_in_use_is_refused_naming_the_holder_until_it_dies(capsys, tmp_path, finished):
    run, args = copy_of(finished, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(run)
        code, err = train(capsys, *args, "trainer.max_steps=3")
        assert code == 2 and f"pid {holder.pid} on host {socket.gethostname()}" in err, err
        assert "in use by another run" in err and len(err.strip().splitlines()) == 1
        assert snapshot(run) == before
    finally:
        holder.kill()  # as a crash: no release; the kernel drops the flock, the file stays
        holder.wait()
    assert (run / ".lock").is_file()
    code, err = train(capsys, *args, "trainer.max_steps=3")
    assert code == 0, err
    assert not (run / ".lock").exists()


HOLD_LOCK = """
import sys, time
from pathlib import Path
from ct_stages.rundir import RunDirLock
RunDirLock(Path(sys.argv[1])).acquire()
print("held", flush=True)
time.sleep(600)
"""


# -- everyday mistakes: exit 2, one line naming the cause, nothing changed on disk -----------------


def read_only(monkeypatch, root: Path) -> None:
    """Writes under ``root`` fail as on a read-only mount (EROFS). Tests may run as root, for whom
    chmod does not stop a write, so the file system calls are intercepted instead."""
    def guard(path) -> None:
        if str(Path(os.fspath(path)).absolute()).startswith(str(root)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

    real_open, real_mkdir, real_io_open = os.open, os.mkdir, io.open

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            guard(path)
        return real_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        guard(path)
        return real_mkdir(path, *args, **kwargs)

    def io_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
            guard(file)
        return real_io_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(io, "open", io_open)
    monkeypatch.setattr(builtins, "open", io_open)


def test_a_new_run_on_a_read_only_file_system(capsys, monkeypatch, tmp_path, sample_dir):
    read_only(monkeypatch, tmp_path / "ro")
    code, err = train(capsys, f"run_dir={tmp_path / 'ro' / 'run'}", f"sample_data.dir={sample_dir}", *TINY)
    assert code == 2 and "Read-only file system" in err and f"run_dir={tmp_path / 'ro' / 'run'}" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "ro").exists()


def test_a_finished_run_on_a_read_only_file_system(capsys, monkeypatch, tmp_path, finished):
    run, args = copy_of(finished, tmp_path)
    before = snapshot(run)
    read_only(monkeypatch, run)
    assert train(capsys, *args)[0] == 0  # finished: nothing to write, so nothing fails
    code, err = train(capsys, *args, "trainer.max_steps=3")  # more steps: they would need writing
    assert code == 2 and "Read-only file system" in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(run) == before


def full_disk(monkeypatch, root: Path, after_step: int) -> None:
    """Every write under ``root`` fails with ENOSPC once the trainer has logged ``after_step``."""
    from ct_stages.metrics import MetricsLog

    real_write, real_io_open = MetricsLog.write, io.open
    state = {"full": False}

    def write(self, record):
        real_write(self, record)
        state["full"] = state["full"] or (record.get("event") == "train" and record["step"] >= after_step)

    def io_open(file, mode="r", *args, **kwargs):
        inside = isinstance(file, (str, os.PathLike)) and str(Path(os.fspath(file)).absolute()).startswith(str(root))
        if state["full"] and inside and any(c in mode for c in "wax+"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(file))
        return real_io_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(MetricsLog, "write", write)
    monkeypatch.setattr(io, "open", io_open)
    monkeypatch.setattr(builtins, "open", io_open)


@pytest.mark.parametrize("where", ["engine_write", "every_write"])
def test_disk_full_while_saving_a_checkpoint(capsys, monkeypatch, tmp_path, finished, where):
    """The checkpoint's own write fails (the engine's), or the disk is full for every write
    (the metrics row after the step too); either way one line, and step 2 still verifies."""
    import torch.distributed.checkpoint.filesystem as dcp_fs
    from ct_stages import CheckpointManager

    run, args = copy_of(finished, tmp_path)
    if where == "engine_write":
        def no_space(*a, **k):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(dcp_fs, "_write_item", no_space)
    else:
        full_disk(monkeypatch, run, after_step=3)
    code, err = train(capsys, *args, "trainer.max_steps=4")
    assert code == 2 and "No space left on device" in err and str(run) in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert CheckpointManager(run / "checkpoints").latest_verified().name == "step_00000002"
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_nproc_per_node_with_distributed_single(capsys, monkeypatch, tmp_path):
    code, err = train(capsys, f"run_dir={tmp_path / 'run'}", "--nproc-per-node", "2", "distributed=single")
    assert code == 2 and "distributed.strategy=single" in err and "ddp" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
    from ct_cli import recipe as pipeline_cli

    assert pipeline_cli.main(["--nproc-per-node", "2", f"run_dir={tmp_path / 'run'}"]) == 2
    assert "distributed.strategy=single" in capsys.readouterr().err and not (tmp_path / "run").exists()
    monkeypatch.setenv("WORLD_SIZE", "2")  # as in each rank of a torchrun launch
    code, err = train(capsys, f"run_dir={tmp_path / 'run'}", "distributed=single")
    assert code == 2 and "distributed.strategy=single" in err and not (tmp_path / "run").exists(), err


def test_run_dir_is_a_file(capsys, tmp_path, sample_dir):
    path = tmp_path / "notes.txt"
    path.write_text("mine\n")
    code, err = train(capsys, f"run_dir={path}", f"sample_data.dir={sample_dir}", *TINY)
    assert code == 2 and f"run_dir={path} is a file" in err and len(err.strip().splitlines()) == 1, err
    assert path.read_text() == "mine\n"


def test_data_sources_that_are_not_sources(capsys, tmp_path, sample_dir):
    code, err = train(capsys, f"run_dir={tmp_path / 'run'}", f"sample_data.dir={sample_dir}", *TINY,
                      "data.sources=[1,2]")
    assert code == 2 and "data.sources" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_empty_jsonl_is_named(capsys, tmp_path, sample_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    code, err = train(capsys, f"run_dir={tmp_path / 'run'}", f"sample_data.dir={sample_dir}", *TINY,
                      "data.sources=[{name: mine, path: " + str(empty) + "}]")
    assert code == 2 and f"{empty} is empty (0 bytes)" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_data_yaml_with_a_tab_is_named(capsys, tmp_path, sample_dir):
    configs = tmp_path / "configs"
    shutil.copytree(Path(__file__).resolve().parents[1] / "configs", configs)
    (configs / "data" / "mine.yaml").write_text("sources:\n\t- name: web\n    path: web.jsonl\n")
    code, err = train(capsys, "--config-dir", str(configs), f"run_dir={tmp_path / 'run'}", "data=mine")
    assert code == 2 and "mine.yaml" in err and "tab" in err and len(err.strip().splitlines()) == 1, err


def test_latin1_documents_are_skipped_and_counted(capsys, tmp_path, sample_dir):
    mixed = tmp_path / "mixed.jsonl"
    good = [json.dumps({"text": f"document {i} " * 30}).encode() for i in range(40)]
    latin1 = [('{"text": "caf\u00e9 cr\u00e8me ' + "word " * 30 + '"}').encode("latin-1") for _ in range(3)]
    mixed.write_bytes(b"\n".join(good[:2] + latin1 + good[2:]) + b"\n")
    run = tmp_path / "run"
    code, err = train(capsys, f"run_dir={run}", f"sample_data.dir={sample_dir}", *TINY, "trainer.max_steps=2",
                      "data.sources=[{name: mixed, path: " + str(mixed) + "}]")
    assert code == 0, err
    skipped = json.loads((run / "summary.json").read_text())["data"]["sources"]["mixed"]["skipped"]
    assert skipped.get("undecodable") == 3, skipped


def test_seq_len_beyond_the_models_positions_warns(capsys, caplog, tmp_path, sample_dir):
    caplog.set_level(logging.WARNING, logger="ct_stages")
    code, err = train(capsys, f"run_dir={tmp_path / 'run'}", f"sample_data.dir={sample_dir}", *TINY,
                      "trainer.max_steps=1", "model.max_position_embeddings=32")
    assert code == 0, err
    assert "seq_len=64 exceeds the model's max_position_embeddings=32" in caplog.text


def test_a_tokenizer_much_smaller_than_the_embedding_warns(capsys, caplog, tmp_path, sample_dir):
    caplog.set_level(logging.WARNING, logger="ct_stages")
    code, err = train(capsys, f"run_dir={tmp_path / 'run'}", f"sample_data.dir={sample_dir}", *TINY,
                      "trainer.max_steps=1", "model.vocab_size=32768")
    assert code == 0, err
    assert "the tokenizer has 8192 tokens but model.vocab_size is 32768" in caplog.text
