"""ct-train end to end on tiny settings: training, exports, resume after SIGKILL, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from cli_support import ROOT, TINY, ct, events, train_losses

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
    for key in ("lr", "grad_norm", "tokens_per_s", "mfu", "memory_gib"):
        assert all(r[key] == r[key] for r in records)  # present and not NaN
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


def _launch(run, sample_dir, steps):
    args = [sys.executable, "-m", "ct_cli.train", "--phase", "pretrain_phase1", f"run_dir={run}",
            f"sample_data.dir={sample_dir}", *TINY, f"trainer.max_steps={steps}"]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_resume_after_sigkill_is_bitwise_identical(tmp_path, sample_dir):
    steps = 8
    reference = tmp_path / "reference"
    ct("train", "--phase", "pretrain_phase1", f"run_dir={reference}", f"sample_data.dir={sample_dir}",
       *TINY, f"trainer.max_steps={steps}")
    expected = train_losses(reference)

    killed = tmp_path / "killed"
    proc = _launch(killed, sample_dir, steps)
    deadline = time.time() + 300
    while time.time() < deadline and max(train_losses(killed) or {0: 0}) < 5:
        if proc.poll() is not None:
            pytest.fail(f"run ended before it could be killed: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up: mid-step or mid-checkpoint
    proc.wait()
    killed_at = max(train_losses(killed))
    assert killed_at < steps

    ct("train", "--phase", "pretrain_phase1", f"run_dir={killed}", f"sample_data.dir={sample_dir}",
       *TINY, f"trainer.max_steps={steps}")
    resumed = [e for e in events(killed) if e["event"] == "resume"]
    assert resumed and resumed[0]["step"] <= killed_at
    assert train_losses(killed) == expected  # every step, bit for bit


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
        (["--phase", "pretrain_phase1", "precision=fp8"], "precision.dtype=fp8 with distributed.engine=native"),
        (["--phase", "pretrain_phase1", "precision=bf16", "precision.param_dtype=float16"], "precision.param_dtype"),
    ],
)
def test_user_errors_exit_2_with_a_message_and_no_traceback(args, message):
    result = ct("train", *args, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_print_config_and_list_phases():
    phases = ct("train", "--list-phases").stdout.split()
    assert phases == sorted(["pretrain_phase1", "pretrain_phase2", "midtrain_phase1", "midtrain_phase2",
                             "posttrain_general", "posttrain_reasoning"])
    import yaml

    cfg = yaml.safe_load(ct("train", "--phase", "posttrain_reasoning", "--print-config", "size=recipe").stdout)
    assert cfg["optimizer"]["lr"] == 8.0e-5 and cfg["rope_theta_scale"] == 8.0
    assert cfg["trainer"]["global_batch_size"] == 1024 and cfg["seq_len"] == 32768
    cpu = yaml.safe_load(ct("train", "--phase", "posttrain_reasoning", "--print-config").stdout)
    assert cpu["seq_len"] == 256 and cpu["model"]["preset"] == "mobilellm_tiny"
