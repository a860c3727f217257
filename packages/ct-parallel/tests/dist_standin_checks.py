"""Run under torchrun (2 processes, gloo) through megatron_cpu_run.py: one training step and one
evaluation of every engine with the batch in host memory and the model on the (stand-in) device
(standin, a ct-model test helper): DDP, FSDP2, megatron TP2 and PP2. A microbatch tensor that
never reaches the device fails the op that meets it, as it would on CUDA. The losses equal the single-process
reference, so the moves changed no number.

    torchrun --nproc-per-node 2 megatron_cpu_run.py dist_standin_checks.py OUT_JSON [layout ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "ct-model" / "tests"))

import parallel_testlib as lib  # noqa: E402
from ct_model import build_model  # noqa: E402
from ct_parallel import DistributedConfig, build_engine, init_distributed  # noqa: E402
from standin import StandInDevice, to_host  # noqa: E402

LAYOUTS = {
    "ddp": dict(engine="native", strategy="ddp"),
    "fsdp2": dict(engine="native", strategy="fsdp2"),
    "megatron_tp2": dict(engine="megatron", tensor_model_parallel_size=2),
    "megatron_pp2": dict(engine="megatron", pipeline_model_parallel_size=2),
}
STEPS = 2


def check(name: str, config, batch, losses_ref) -> dict:
    dcfg = DistributedConfig(**LAYOUTS[name])
    info = init_distributed(dcfg)
    engine = build_engine(build_model(config, seed=0), dcfg)  # built outside: its tensors are on the device
    engine.setup_optimizer(lib.build_optimizer)
    shard = lib.shard_for_dp(batch, info.dp_rank, info.dp_size)
    losses = []
    with StandInDevice() as device:
        for _ in range(STEPS):
            losses.append(engine.forward_backward(to_host(shard), lib.loss_fn).loss)
            engine.clip_grad_norm(1e9)
            engine.optimizer_step()
            engine.zero_grad()
        evaluated = engine.forward_only(to_host(shard), lib.loss_fn).loss
    return {"loss": lib.compare_losses(f"{name} loss", losses, losses_ref[:STEPS]),
            "eval_loss": evaluated, "moved": device.moved}


def main():
    out_path, *names = sys.argv[1:]
    config = lib.tiny_config()
    batch = lib.global_batch(config)
    losses_ref, _, _ = lib.reference(config, batch, steps=STEPS + 1)
    results = {name: check(name, config, batch, losses_ref) for name in names or LAYOUTS}
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
