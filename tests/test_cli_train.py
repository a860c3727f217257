"""ct-train end to end on tiny settings: training, exports, resume after SIGKILL, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from cli_support import ROOT, TINY, ct, events, train_losses, wait_for_step

transformers = pytest.importorskip("transformers")


def test_pretrain_phase_trains_exports_and_plots(tmp_path, sample_dir):
    run = tmp_path / "run"
    ct("train", "--phase", "pretrain_phase1", f"run_dir={run}", f"sample_data.dir={sample_dir}", *TINY,
       "trainer.eval_every=3", "trainer.eval_batches=2")
    losses = train_losses(run)
    assert sorted(losses) == list(range(1, 7))
    evals = [e for e in events(run) if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [3, 6]
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"] and evals[0]["eval_tokens"] > 0
    assert losses[6] < losses[1] - 0.5  # from ~ln(8192) = 9.0 the loss falls quickly
    records = [e for e in events(run) if e["event"] == "train"]
    for key in ("lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_device", "memory_gib"):
        assert all(r[key] == r[key] for r in records)  # present and not NaN
    assert all(r["mfu"] is None and r["mfu_note"] or 0 < r["mfu"] <= 1 for r in records)
    assert (run / "loss_curve.png").stat().st_size > 1000
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6
    # The export loads in transformers with the logits of our own loader.
    import ct_model

    ours, _ = ct_model.hf.load_hf(run / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(run / "hf").eval()
    ids = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        assert (ours(ids) - theirs(input_ids=ids).logits).abs().max() < 1e-4
    # ct-export of the newest checkpoint gives the same weights as the phase's own export.
    out = tmp_path / "exported"
    ct("export", str(run), str(out))
    again, _ = ct_model.hf.load_hf(out)
    for (name, p), q in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name
    assert (out / "tokenizer.json").is_file()


def _launch(run, sample_dir, steps, *extra):
    args = [sys.executable, "-m", "ct_cli.train", "--phase", "pretrain_phase1", f"run_dir={run}",
            f"sample_data.dir={sample_dir}", *TINY, f"trainer.max_steps={steps}", *extra]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_resume_after_sigkill_is_bitwise_identical(tmp_path, sample_dir, reference_losses):
    steps = 8
    expected = reference_losses

    # The killed run writes its checkpoints in the background: a kill mid-write must not leave a
    # checkpoint that counts, and the resume must still be bit for bit.
    killed = tmp_path / "killed"
    proc = _launch(killed, sample_dir, steps, "trainer.async_checkpoint=true")
    wait_for_step(proc, killed, 5)
    os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up: mid-step or mid-checkpoint
    proc.wait()
    killed_at = max(train_losses(killed))
    assert killed_at < steps

    ct("train", "--phase", "pretrain_phase1", f"run_dir={killed}", f"sample_data.dir={sample_dir}",
       *TINY, f"trainer.max_steps={steps}", "trainer.async_checkpoint=true")
    resumed = [e for e in events(killed) if e["event"] == "resume"]
    assert resumed and resumed[0]["step"] <= killed_at
    assert train_losses(killed) == expected  # every step, bit for bit
    # One row per step: the steps logged after the checkpoint and trained again are logged once.
    assert [e["step"] for e in events(killed) if e["event"] == "train"] == list(range(1, steps + 1))
    # Every async checkpoint of the finished run was reported complete, after it was started.
    records = events(killed)[[e["event"] for e in events(killed)].index("resume"):]
    started = [e["step"] for e in records if e["event"] == "checkpoint"]
    completed = [e["step"] for e in records if e["event"] == "checkpoint_complete"]
    assert started == completed and started[-1] == steps
    assert all(e["async"] for e in records if e["event"] == "checkpoint")


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_checkpoints_exits_128_plus_it_and_resumes_exactly(tmp_path, sample_dir, reference_losses,
                                                                         signum, status):
    steps = 8
    expected = reference_losses  # checkpointed every 2 steps: saving changes no number

    run = tmp_path / "preempted"
    proc = _launch(run, sample_dir, steps, "trainer.checkpoint_every=100")
    wait_for_step(proc, run, 2)
    proc.send_signal(signum)  # SIGINT: what a Ctrl-C in the terminal sends
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err[-2000:]
    stopped = [e for e in events(run) if e["event"] == "preempted"]
    assert stopped and f"preempted: stopped by {signal.Signals(signum).name}" in err and "Traceback" not in err
    saved = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert saved == [f"step_{stopped[0]['step']:08d}"] and stopped[0]["step"] < steps  # no periodic ones
    ct("train", "--phase", "pretrain_phase1", f"run_dir={run}", f"sample_data.dir={sample_dir}", *TINY,
       f"trainer.max_steps={steps}", "trainer.checkpoint_every=100")
    assert train_losses(run) == expected  # every step, bit for bit
    assert [e["step"] for e in events(run) if e["event"] == "train"] == list(range(1, steps + 1))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--phase", "pretrain_phase9"], "unknown phase 'pretrain_phase9'"),
        (["--phase", "pretrain_phase1", "trainer.max_stepz=3"], "max_stepz"),
        (["--phase", "pretrain_phase1", "model=mobilellm_2b"], "mobilellm_2b"),
        (["--phase", "pretrain_phase1", "trainer.global_batch_size=5"], "trainer.global_batch_size"),
        (["--phase", "pretrain_phase1", "optimizer.lr=-1"], "optimizer.lr"),
        (["--phase", "pretrain_phase2", "run_dir=/nonexistent/run"], "init_from"),
        (["--phase", "pretrain_phase1", "seq_len=1"], "seq_len"),
        (["--phase", "pretrain_phase1", "precision=fp8", "precision.fp8_recipe=mxfp8"],
         "precision.dtype=fp8 with distributed.engine=native"),
        (["--phase", "pretrain_phase1", "precision=bf16", "precision.param_dtype=float16"], "precision.param_dtype"),
    ],
)
def test_user_errors_exit_2_with_a_message_and_no_traceback(args, message, capsys):
    # In process (main with argv): a fresh interpreter per case costs ~12 s of imports; the
    # process-level exit status is tested once below.
    from ct_cli import train as train_cli

    status = train_cli.main(args)
    err = capsys.readouterr().err
    assert status == 2, err[-2000:]
    assert message in err
    assert "Traceback" not in err


def test_a_user_error_ends_the_process_with_status_2_and_no_traceback():
    result = ct("train", "--phase", "pretrain_phase1", "trainer.max_stepz=3", check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "max_stepz" in result.stderr and "Traceback" not in result.stderr


def test_print_config_and_list_phases(capsys):
    import yaml

    from ct_cli import train as train_cli

    def stdout(*args):  # in process: the printed text is the CLI's, without an interpreter per call
        assert train_cli.main(list(args)) == 0
        return capsys.readouterr().out

    phases = stdout("--list-phases").split()
    assert phases == sorted(["pretrain_phase1", "pretrain_phase2", "midtrain_phase1", "midtrain_phase2",
                             "posttrain_general", "posttrain_reasoning", "teacher"])
    cfg = yaml.safe_load(stdout("--phase", "posttrain_reasoning", "--print-config", "size=recipe"))
    assert cfg["optimizer"]["lr"] == 8.0e-5 and cfg["rope_theta_scale"] == 8.0
    assert cfg["trainer"]["global_batch_size"] == 1024 and cfg["seq_len"] == 32768
    cpu = yaml.safe_load(stdout("--phase", "posttrain_reasoning", "--print-config"))
    assert cpu["seq_len"] == 256 and cpu["model"]["from"] == cpu["init_from"]  # the model section is unused
    fresh = yaml.safe_load(stdout("--phase", "pretrain_phase1", "--print-config", "optimizer=sgd"))
    assert fresh["model"]["preset"] == "mobilellm_tiny" and fresh["model"]["num_layers"] == 4
    assert fresh["optimizer"]["name"] == "sgd"  # the chosen group wins over the phase


def test_a_chosen_optimizer_is_the_one_that_trains(tmp_path, sample_dir):
    run = tmp_path / "sgd"
    ct("train", "--phase", "pretrain_phase1", "optimizer=sgd", "optimizer.lr=0.05", f"run_dir={run}",
       f"sample_data.dir={sample_dir}", *TINY, "trainer.max_steps=2")
    assert json.loads((run / "summary.json").read_text())["optimizer"] == "SGD"
    start = next(e for e in events(run) if e["event"] == "start")
    assert start["optimizer"] == "SGD"


def test_a_run_destroys_the_process_group_it_created(tmp_path, sample_dir):
    import torch.distributed as dist

    from ct_cli.common import config_dir, run_config
    from ct_stages.run import run_phase

    run = run_config("pretrain_phase1", [f"run_dir={tmp_path / 'run'}", f"sample_data.dir={sample_dir}", *TINY,
                                         "trainer.max_steps=1", "distributed=ddp"], config_dir())
    result = run_phase(run)  # one process, DDP: init_distributed makes a private group
    assert result.steps == 1 and not dist.is_initialized()
    assert run_phase(run).steps == 1 and not dist.is_initialized()  # and a second phase in-process works


@pytest.mark.slow
def test_activation_checkpointing_override_trains_the_same_losses(tmp_path, sample_dir):
    """`activation_checkpointing.mode=...` reaches the engine and changes memory, not numbers."""
    from ct_cli.common import config_dir, run_config
    from ct_stages.run import run_phase

    losses = {}
    for mode in ("none", "selective", "full"):
        run = run_config("pretrain_phase1", [f"run_dir={tmp_path / mode}", f"sample_data.dir={sample_dir}", *TINY,
                                             "trainer.max_steps=2", f"activation_checkpointing.mode={mode}"],
                         config_dir())
        assert run.activation_checkpointing.mode == mode
        run_phase(run)
        losses[mode] = train_losses(tmp_path / mode)
    assert len(losses["none"]) == 2
    for mode in ("selective", "full"):
        assert losses[mode].keys() == losses["none"].keys()
        for step, want in losses["none"].items():
            assert losses[mode][step] == pytest.approx(want, rel=1e-6), (mode, step)
