"""Run under torchrun (2 processes, gloo): for DDP and FSDP2 and every stage loss, one training
step with chunk_tokens=0 and chunk_tokens>0; losses and full gradients compared with each other
and with the single-process full-logits reference (computed in every process).

    torchrun --nproc-per-node 2 dist_loss_chunking_checks.py OUT_JSON
"""

from __future__ import annotations

import json
import sys

import torch.distributed as dist

import loss_chunking_lib as lib
from ct_parallel import DistributedConfig, build_engine, init_distributed


def main():
    out_path = sys.argv[1]
    teacher = lib.build_teacher()
    results = {}
    for strategy in ("ddp", "fsdp2"):
        dcfg = DistributedConfig(engine="native", strategy=strategy)
        info = init_distributed(dcfg)
        for variant in lib.VARIANTS:
            mbs = lib.microbatches(variant)
            ref_loss, ref_grads = lib.reference_step(variant, mbs, teacher)
            per = len(mbs) // info.dp_size
            shard = mbs[info.dp_rank * per:(info.dp_rank + 1) * per]
            got = {}
            for chunk in (0, lib.CHUNK):
                model = lib.build_student()
                engine = build_engine(model, dcfg)
                got[chunk] = lib.engine_step(engine, model, lib.build_stage(variant, chunk, teacher), shard)
            (loss0, grads0), (loss_c, grads_c) = got[0], got[lib.CHUNK]
            results[f"{strategy}/{variant}"] = {
                "chunked_vs_unchunked_loss": abs(loss_c - loss0) / abs(loss0),
                "chunked_vs_unchunked_grad": lib.worst_grad(grads_c, grads0),
                "unchunked_vs_reference_loss": abs(loss0 - ref_loss) / abs(ref_loss),
                "unchunked_vs_reference_grad": lib.worst_grad(grads0, ref_grads),
            }
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
