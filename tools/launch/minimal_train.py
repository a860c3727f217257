"""The smallest training loop over a ct_parallel engine: what the trainer does, in one screen.

    torchrun --nproc-per-node 2 tools/launch/minimal_train.py configs/distributed/megatron_tp2.yaml
(On a CPU-only machine, megatron layouts need the test shim: put
packages/ct-parallel/tests/megatron_cpu_run.py before this script's path.)
"""

import sys
import tempfile

import torch
import torch.nn.functional as F
import yaml

from ct_model import build_model, presets
from ct_model.init import SeededInit
from ct_parallel import DistributedConfig, build_engine, init_distributed


def main(config_path: str, steps: int = 2) -> None:
    dcfg = DistributedConfig.from_dict(yaml.safe_load(open(config_path)))
    info = init_distributed(dcfg)  # the data loader shards by info.dp_rank / info.dp_size
    # Built on meta: each rank materialises only what it holds, the same weights at any layout.
    model = build_model(presets.get("mobilellm_tiny", vocab_size=512, hidden_size=128), device="meta")
    engine = build_engine(model, dcfg, weights=SeededInit(model, seed=0), device=info.device)
    engine.setup_optimizer(lambda named: torch.optim.AdamW([p for _, p in named], lr=1e-3))
    g = torch.Generator().manual_seed(1000 + info.dp_rank)

    def loss_fn(mb, logits):  # SUM of token losses; the engine normalises over the global batch
        return F.cross_entropy(logits.flatten(0, 1).float(), mb["labels"].flatten(), ignore_index=-100,
                               reduction="sum")

    for step in range(steps):
        mbs = []
        for _ in range(2):
            ids = torch.randint(0, 512, (2, 65), generator=g)
            mbs.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:],
                        "position_ids": torch.arange(64).expand(2, 64), "document_ids": torch.zeros(2, 64, dtype=torch.long)})
        result = engine.forward_backward(mbs, loss_fn)
        norm = engine.clip_grad_norm(1.0)
        engine.optimizer_step()
        engine.zero_grad()
        if info.is_main:
            print(f"step {step} loss {result.loss:.4f} grad_norm {norm:.3f} tokens {result.tokens}", flush=True)
    ckpt = tempfile.mkdtemp(prefix="ct_ckpt_") if info.is_main else None
    obj = [ckpt]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(obj, src=0)
    engine.save_checkpoint(obj[0])
    engine.load_checkpoint(obj[0])
    # One full tensor at a time on rank 0 (every rank iterates: the gathers are collective);
    # ct_model.hf.write_hf(items, config, dir) writes them as HF safetensors shards.
    count = sum(1 for _ in engine.full_state_items())
    if info.is_main:
        print(f"checkpoint {obj[0]}; streamed {count} tensors", flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
