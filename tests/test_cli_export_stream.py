"""ct-export streams a checkpoint into sharded safetensors (--max-shard-size): a native FSDP2 (DCP)
checkpoint read one tensor at a time, never as a whole model; a megatron EP2 checkpoint under
torchrun in its own layout, each rank holding its share. Both exports load in transformers with
ct-model's logits and read back bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHIM_RUNNER = ROOT / "packages" / "ct-parallel" / "tests" / "megatron_cpu_run.py"


def torchrun(*args: str, shim: bool = False, timeout: int = 480) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += [str(SHIM_RUNNER)] if shim else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd + list(args), env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode:
        raise AssertionError(f"{args[:2]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


def check_export(out: Path, run_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from ct_model import model_from_state
    from ct_model.hf import load_hf

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards == sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert (out / "config.json").is_file()
    want = torch.load(run_dir / "state.pt")
    again, config = load_hf(out)
    for name, tensor in want.items():
        assert torch.equal(again.state_dict()[name], tensor), name
    ours, _, _ = model_from_state(config, want)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours.eval()(ids) - theirs(input_ids=ids).logits).abs().max().item() <= 1e-4


@pytest.mark.dist
@pytest.mark.slow
def test_native_fsdp2_checkpoint_exports_one_tensor_at_a_time(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    from ct_cli.export import main

    run = tmp_path / "run"
    torchrun(str(HERE / "dist_export_ckpt.py"), str(run), "native", "moe", "strategy=fsdp2")
    reads: list[list[str]] = []  # the tensors each DCP read fills
    real_load = dcp.load

    def load(state_dict, **kwargs):
        reads.append([f"{k}.{n}" for k, part in state_dict.items() for n in part])
        return real_load(state_dict, **kwargs)

    monkeypatch.setattr(dcp, "load", load)
    out = tmp_path / "hf"
    assert main([str(run), str(out), "--max-shard-size", "60KB"]) == 0
    want = torch.load(run / "state.pt")
    # One tensor per read, each once: the process never held the model whole.
    assert all(len(r) == 1 for r in reads) and sorted(r[0] for r in reads) == sorted(f"model.{k}" for k in want)
    check_export(out, run)


@pytest.mark.dist
@pytest.mark.slow
def test_megatron_ep2_checkpoint_exports_under_torchrun_in_its_layout(tmp_path):
    run, out = tmp_path / "run", tmp_path / "hf"
    torchrun(str(HERE / "dist_export_ckpt.py"), str(run), "megatron", "moe", "expert_model_parallel_size=2", shim=True)
    torchrun("ct_cli.export", str(run), str(out), "--max-shard-size", "60KB", shim=True)
    check_export(out, run)
