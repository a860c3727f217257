"""Run under torchrun (2 processes, gloo): ct-distill's KD losses on vocabulary-split student
logits (ct_parallel.vocab.vocab_shard over the world group) against kd_loss_sum on the full
logits, loss and gradient, for every kind and teacher form.

    torchrun --nproc-per-node 2 dist_vocab_parallel_kd.py OUT_JSON
"""

from __future__ import annotations

import itertools
import json
import sys

import torch
import torch.distributed as dist

from ct_distill import TopK, kd_loss_sum, kd_loss_sum_on_shards
from ct_parallel.vocab import vocab_shard

VOCAB, ROWS, K = 24, 10, 5


def _case(kind, teacher_form, top_k, ce_weight, temperature):
    g = torch.Generator().manual_seed(0)  # the same full tensors on both ranks
    student = torch.randn(2, ROWS // 2, VOCAB, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(2, ROWS // 2, VOCAB, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, VOCAB, (2, ROWS // 2), generator=g)
    labels[0, 1] = labels[1, 3] = -100
    if teacher_form == "cached":
        values, ids = torch.topk(torch.log_softmax(teacher, -1), K, dim=-1)
        teacher = TopK(ids, values)
    options = dict(kind=kind, temperature=temperature, top_k=top_k, ce_weight=ce_weight, beta=0.3)

    full = student.clone().requires_grad_(True)
    want, _ = kd_loss_sum(full, teacher, labels, fused=False, **options)
    want.backward()

    rank, world = dist.get_rank(), dist.get_world_size()
    width = VOCAB // world
    start = rank * width
    local = student[..., start:start + width].clone().requires_grad_(True)
    got = kd_loss_sum_on_shards(local, teacher, labels, vocab_shard(None, start, start + width), **options)
    got.backward()
    grad = local.grad.clone()
    grads = [torch.empty_like(grad) for _ in range(world)]
    dist.all_gather(grads, grad)
    loss_rel = abs(got.item() - want.item()) / abs(want.item())
    grad_rel = ((torch.cat(grads, -1) - full.grad).norm() / full.grad.norm()).item()
    return {"loss": loss_rel, "grad": grad_rel}


def main():
    dist.init_process_group("gloo")
    results = {}
    # teacher forms: full logits, the top-k of full logits, a cached top-k
    for kind, form, ce in itertools.product(("forward_kl", "reverse_kl", "jsd"), ("logits", "topk", "cached"),
                                            (0.0, 0.5)):
        top_k = K if form == "topk" else None
        teacher_form = "cached" if form == "cached" else "logits"
        results[f"{kind}-{form}-ce{ce}"] = _case(kind, teacher_form, top_k, ce, temperature=2.0)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
