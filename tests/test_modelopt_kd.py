"""nvidia-modelopt as the megatron engine's KD backend (stage.distill.backend=modelopt): refused
where it cannot run (exit 2 naming both keys); its loss equals ct-distill's forward KL on the same
batches (engine level, fp32); ct-train mid-trains with it, with the losses of backend=ct."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from cli_support import ROOT, TINY, ct, train_losses
from ct_cli import train as train_cli

SHIM_RUNNER = ROOT / "packages" / "ct-parallel" / "tests" / "megatron_cpu_run.py"
needs_modelopt = pytest.mark.skipif(importlib.util.find_spec("modelopt") is None,
                                    reason="nvidia-modelopt is not installed (the ct-parallel[modelopt] extra)")


@pytest.mark.parametrize("args, needles", [
    ([], ["stage.distill.backend=modelopt", "distributed.engine=native"]),
    (["stage.distill.teacher=cached", "stage.distill.top_k=4"],
     ["stage.distill.backend=modelopt", "stage.distill.teacher=cached"]),
    (["stage.distill.kind=jsd"], ["stage.distill.backend=modelopt", "stage.distill.kind=jsd"]),
    (["stage.distill.kind=reverse_kl", "distributed=megatron_pp2"],
     ["stage.distill.backend=modelopt", "distributed.pipeline_model_parallel_size=1"]),
    (["stage.distill.top_k=8"], ["stage.distill.backend=modelopt", "stage.distill.top_k=8"]),
    (["stage.distill.backend=nemo"], ["stage.distill.backend must be one of"]),
    (["distributed=megatron_pp2"], ["stage.distill.backend=modelopt", "distributed.pipeline_model_parallel_size=1"]),
])
def test_what_modelopt_cannot_run_is_refused_naming_both_keys(capsys, monkeypatch, tmp_path, args, needles):
    monkeypatch.setattr("ct_stages.run.megatron_can_run", lambda: True)  # as on a CUDA machine
    backend = [] if any(a.startswith("stage.distill.backend=") for a in args) else ["stage.distill.backend=modelopt"]
    code = train_cli.main(["--phase", "midtrain_phase1", f"run_dir={tmp_path / 'run'}", *backend, *args])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert all(n in err for n in needles), err


def test_modelopt_is_not_imported_by_the_default_backend():
    probe = ("import sys, ct_stages.stages as s, ct_parallel\n"
             "s.build_loss(s.StageConfig(kind='midtrain'))\n"
             "assert not [m for m in sys.modules if m.startswith('modelopt')]\n")
    subprocess.run([sys.executable, "-c", probe], check=True, cwd=ROOT)


@needs_modelopt
@pytest.mark.dist
@pytest.mark.slow
def test_modelopt_loss_equals_ct_distill_forward_kl(tmp_path):
    """Megatron engine (2 gloo processes, CPU shim) with the student converted by mtd.convert around
    a teacher of another shape, at DP=2 (modelopt's LogitsDistillationLoss), TP=2 and TP=2+SP (its
    Megatron LogitsKLLoss on vocabulary slices): loss at 3 AdamW steps, step-0 gradients and
    weights after 3 steps equal ct-distill's kd_loss_sum (autograd path) on single-process
    ct-model logits: forward KL at T=1 and at T=2 with ce_weight=0.5, reverse KL at T=2
    (LogitsKLLoss(reverse=True) at every TP) (fp32, 1e-5 relative);
    the evaluation CE runs the student alone and equals ct-model's."""
    out = tmp_path / "modelopt.json"
    here = ROOT / "packages" / "ct-parallel" / "tests"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(29400 + os.getpid() % 1000 + 7), str(SHIM_RUNNER),
           str(ROOT / "tests" / "modelopt_kd_checks.py"), str(out), "dp2", "tp2", "tp2_sp"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = json.loads(out.read_text())
    cases = [f"{layout}_{case}" for layout in ("dp2", "tp2", "tp2_sp") for case in ("T1", "T2_ce0.5", "reverse_T2")]
    assert set(cases) <= set(results), sorted(results)
    for case in cases:
        r = results[case]
        assert r["loss"] <= 1e-5 and r["grad"] <= 1e-5 and r["param"] <= 3e-5 and r["eval_ce"] <= 1e-5, (case, r)
    print("modelopt import seconds:", results["import_seconds"])


@needs_modelopt
@pytest.mark.slow
def test_ct_train_midtrains_with_the_modelopt_backend(tmp_path, sample_dir, reference_run):
    """ct-train midtrain_phase1 on the megatron engine (TP=1, CPU shim) with backend=modelopt:
    the loss falls, and every step's loss equals the same run with backend=ct (1e-5)."""
    runner = [sys.executable, str(SHIM_RUNNER)]
    common = ["--phase", "midtrain_phase1", "distributed=megatron_tp2", "distributed.tensor_model_parallel_size=1",
              f"init_from={reference_run / 'hf'}", f"sample_data.dir={sample_dir}", *TINY,
              "trainer.max_steps=4", "trainer.checkpoint_every=2"]
    losses = {}
    for backend in ("modelopt", "ct"):
        run = tmp_path / backend
        ct("train", *common, f"run_dir={run}", f"stage.distill.backend={backend}", module_runner=runner)
        losses[backend] = train_losses(run)
    assert (tmp_path / "modelopt" / "hf" / "model.safetensors").is_file()
    got, want = losses["modelopt"], losses["ct"]
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    assert all(abs(got[s] - want[s]) <= 1e-5 * abs(want[s]) for s in want), (got, want)
    assert got[4] < got[1], got


def test_the_stage_and_the_engine_agree_on_the_kinds_modelopt_computes():
    from ct_parallel.megatron.modelopt_kd import KINDS
    from ct_stages.stages import MODELOPT_KINDS

    assert MODELOPT_KINDS == KINDS
