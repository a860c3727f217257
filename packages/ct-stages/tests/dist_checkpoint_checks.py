"""Run under torchrun (2 processes, gloo, DDP): the checkpoint manager's parallel manifest and
verification. Each rank records which files it hashed; the test compares that, and meta.json's
manifest, against independent references.

    torchrun --standalone --nproc-per-node 2 dist_checkpoint_checks.py OUT_DIR

Steps: a synchronous save (step 1), an async save (step 2), latest_verified; then a flipped byte in
a data file of step 2 that rank 1 checked (so rank 0 can learn of it only from rank 1), and
latest_verified again on both ranks.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import ct_model
from ct_parallel import DistributedConfig, build_engine, init_distributed
from ct_stages import CheckpointManager
from ct_stages import checkpoint as ckpt

HASHED: list[str] = []
_sha256 = ckpt._sha256


def _recording_sha256(path: Path) -> str:
    HASHED.append(str(path))
    return _sha256(path)


def _phase(name: str, record: dict) -> None:
    record[name] = sorted(HASHED)
    HASHED.clear()


def main():
    out = Path(sys.argv[1])
    info = init_distributed(DistributedConfig(engine="native", strategy="ddp"))
    model = ct_model.build_model(ct_model.presets.get("mobilellm_tiny", num_layers=1, vocab_size=32), seed=0)
    engine = build_engine(model, DistributedConfig(engine="native", strategy="ddp"))
    engine.setup_optimizer(lambda named: torch.optim.AdamW([p for _, p in named], lr=1e-3))
    ckpt._sha256 = _recording_sha256
    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("ct_stages").addHandler(handler)

    manager = CheckpointManager(out / "checkpoints", keep_last=3)
    record: dict = {"rank": info.rank}
    manager.save(1, engine, {"step": 1, "rank": info.rank})
    _phase("save_sync", record)
    manager.save(2, engine, {"step": 2, "rank": info.rank}, asynchronous=True)
    manager.wait()
    _phase("save_async", record)
    dist.barrier()
    record["verified_intact"] = manager.latest_verified().name
    _phase("verify_intact", record)
    dist.barrier()
    box = [[n for n in record["verify_intact"] if n.endswith(".distcp")] if info.rank == 1 else None]
    dist.broadcast_object_list(box, src=1)
    victim = Path(box[0][0])
    record["victim"] = str(victim)
    if info.rank == 0:
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    dist.barrier()
    record["verified_damaged"] = manager.latest_verified().name
    _phase("verify_damaged", record)
    record["warnings"] = warnings
    (out / f"rank{info.rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
