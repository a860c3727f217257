"""Run through the megatron CPU shim (packages/ct-parallel/tests/megatron_cpu_run.py): the megatron
engine with nvidia-modelopt's KD backend against ct-distill's loss on a single-process ct-model
student and teacher (same weights, same batches; fp32).

    python megatron_cpu_run.py tests/modelopt_kd_checks.py OUT_JSON                 # 1 process, TP=1
    torchrun --nproc-per-node 2 megatron_cpu_run.py tests/modelopt_kd_checks.py OUT_JSON dp2 tp2 tp2_sp

TP = 1 uses modelopt's LogitsDistillationLoss, TP = 2 its Megatron LogitsKLLoss on vocabulary slices.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "packages" / "ct-parallel" / "tests"))

import parallel_testlib as lib  # noqa: E402
from ct_distill import kd_loss_sum  # noqa: E402
from ct_model import build_model  # noqa: E402
from ct_parallel import DistributedConfig, build_engine, init_distributed  # noqa: E402
from ct_distill import ModeloptDistillationLoss  # noqa: E402

STEPS = 3
CASES = {"T1": (1.0, 0.0, "forward_kl"), "T2_ce0.5": (2.0, 0.5, "forward_kl"),
         "reverse_T2": (2.0, 0.0, "reverse_kl")}  # temperature, ce_weight, kind
LAYOUTS = {"tp1": dict(), "dp2": dict(), "tp2": dict(tensor_model_parallel_size=2),
           "tp2_sp": dict(tensor_model_parallel_size=2, sequence_parallel=True)}


def reference(student, teacher, batch, temperature, ce_weight, kind):
    """ct-distill's loss of ``kind`` (autograd path) on ct-model logits: losses per AdamW step,
    step-0 gradients, weights after the steps."""
    opt = lib.build_optimizer(list(student.named_parameters()))
    tokens = sum(int((mb["labels"] != -100).sum()) for mb in batch)
    losses, grads = [], None
    for step in range(STEPS):
        total = 0.0
        for mb in batch:
            args = (mb["input_ids"], mb["position_ids"], mb["document_ids"])
            with torch.no_grad():
                t = teacher(*args)
            loss, _ = kd_loss_sum(student(*args), t, mb["labels"], kind, temperature,
                                  ce_weight=ce_weight, fused=False)
            (loss / tokens).backward()
            total += loss.item()
        losses.append(total / tokens)
        if step == 0:
            grads = {k: p.grad.detach().clone() for k, p in student.named_parameters()}
        opt.step()
        opt.zero_grad()
    return losses, grads, {k: v.detach().clone() for k, v in student.state_dict().items()}


def main():
    out_path, *layouts = sys.argv[1:]
    t0 = time.perf_counter()
    import modelopt.torch.distill  # timed here; the engine imports it lazily

    results = {"import_seconds": time.perf_counter() - t0}
    config = lib.tiny_config()
    # Another shape, same vocabulary; a larger init makes its logits far from uniform (KL of order 1,
    # not 1e-2), so the comparison is not lost in fp32 rounding of a near-zero divergence.
    teacher_config = lib.tiny_config(num_layers=2, hidden_size=96, ffn_hidden_size=192, init_method_std=0.2)
    batch = lib.global_batch(config)
    for layout in layouts or ["tp1"]:
        dcfg = DistributedConfig(engine="megatron", **LAYOUTS[layout])
        info = init_distributed(dcfg)
        check_cases(layout, dcfg, config, teacher_config, batch, results, info)
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(results, indent=1))
    dist.barrier()


def check_cases(layout, dcfg, config, teacher_config, batch, results, info):
    for case, (temperature, ce_weight, kind) in CASES.items():
        name = f"{layout}_{case}"
        teacher = build_model(teacher_config, seed=1).eval()
        ref = reference(build_model(config, seed=0), teacher, batch, temperature, ce_weight, kind)
        loss_fn = ModeloptDistillationLoss(teacher, kind, temperature, ce_weight)
        engine = build_engine(build_model(config, seed=0), dcfg, loss=loss_fn)
        import modelopt.torch.distill as mtd  # imported (and timed) in main

        assert isinstance(engine.kd_model, mtd.DistillationModel), type(engine.kd_model).__mro__
        # the exported student has exactly ct-model's keys: the teacher stays out of it
        exported = engine.full_model_state_dict()  # rank 0 only
        assert exported is None or set(exported) == set(build_model(config, seed=0).state_dict())
        losses, grads, params = lib.run_engine(engine, lib.shard_for_dp(batch, info.dp_rank, info.dp_size), steps=STEPS, grads_fn=engine.full_grad_state_dict,
                                               loss=loss_fn)
        results[name] = {"losses": losses, "reference": ref[0],
                         "loss": lib.compare_losses(f"{name} loss", losses, ref[0]),
                         "grad": lib.compare(f"{name} grads", grads, ref[1]),
                         "param": lib.compare(f"{name} params", params, ref[2], tol=lib.PARAM_TOL)}
        # The evaluation CE (no engine teacher) runs the student alone and equals ct-model's CE.
        shared = [params]
        dist.broadcast_object_list(shared, src=0)  # the weights are exported on rank 0
        student = build_model(config, seed=0)
        student.load_state_dict(shared[0])
        want = sum(lib.loss_fn(mb, student(mb["input_ids"], mb["position_ids"], mb["document_ids"])).item()
                   for mb in batch) / sum(int((mb["labels"] != -100).sum()) for mb in batch)
        got = engine.forward_only(batch, lib.loss_fn).loss
        results[name]["eval_ce"] = abs(got - want) / want
        assert results[name]["eval_ce"] < lib.TOL, (got, want)


if __name__ == "__main__":
    main()
