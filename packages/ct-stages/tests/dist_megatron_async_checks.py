"""Run under torchrun (2 processes, gloo) through ct-parallel's megatron_cpu_run.py: an async
checkpoint of the megatron engine (TP=2) through the CheckpointManager.

    torchrun --nproc-per-node 2 megatron_cpu_run.py dist_megatron_async_checks.py OUT_DIR

One training step, then an async save whose writer thread is held until the loop has taken the
next step (so the write starts after the weights and the optimizer state have changed); the
checkpoint must hold the state at save time: a fresh engine loaded from it computes the next step's
loss exactly as the original engine did (that loss was computed from the save-time state).
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist

import parallel_testlib as lib
from ct_model import build_model
from ct_parallel import DistributedConfig, build_engine, init_distributed
from ct_parallel.megatron import write_queue
from ct_stages import CheckpointManager
from ct_stages import checkpoint as ckpt

RELEASE = threading.Event()
HASHED: list[str] = []
_sha256 = ckpt._sha256


def _recording_sha256(path):
    HASHED.append(str(path))
    return _sha256(path)

_write = write_queue.AsyncSave._write


def _held_write(self, args):
    RELEASE.wait(timeout=300)
    _write(self, args)


def step(engine, batch) -> float:
    loss = engine.forward_backward(batch, lib.loss_fn).loss
    engine.clip_grad_norm(None)
    engine.optimizer_step()
    engine.zero_grad()
    return loss


def main():
    out = Path(sys.argv[1])
    dcfg = DistributedConfig(engine="megatron", tensor_model_parallel_size=2)
    info = init_distributed(dcfg)
    config = lib.tiny_config()
    batches = [lib.global_batch(config, seed=s) for s in range(2)]
    engine = build_engine(build_model(config, seed=0), dcfg)
    engine.setup_optimizer(lib.build_optimizer)
    step(engine, batches[0])
    # A snapshot: replicated tensors (the norms) come back as the live parameters themselves.
    at_save = {k: v.clone() for k, v in (engine.full_model_state_dict() or {}).items()}  # collective

    write_queue.AsyncSave._write = _held_write
    ckpt._sha256 = _recording_sha256
    manager = CheckpointManager(out / "checkpoints", metadata={"engine": "megatron", "layout": {"tp": 2}})
    final = manager.save(1, engine, {"step": 1}, asynchronous=True)
    record = {"rank": info.rank, "polled_while_held": manager.poll() is None and manager.latest() is None}
    loss_after_save = step(engine, batches[1])  # changes weights and optimizer state in place
    RELEASE.set()
    record["waited"] = str(manager.wait())
    record["final"] = str(final)
    record["hashed_at_save"] = sorted(HASHED)
    dist.barrier()

    fresh = build_engine(build_model(config, seed=1), dcfg)
    fresh.setup_optimizer(lib.build_optimizer)
    manager.load(manager.latest_verified(), fresh)
    loaded = fresh.full_model_state_dict()
    if info.rank == 0:
        record["weights_equal_at_save"] = all(torch.equal(loaded[k], at_save[k]) for k in at_save)
    record["loss_after_save"] = loss_after_save
    record["loss_after_load"] = step(fresh, batches[1])
    (out / f"rank{info.rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
