"""ct-plan: per-GPU memory of the run ct-train would start, and whether it fits an 80 GB card.

    ct-plan model=deepseek_v3_671b distributed=deepseek_v3_671b --world-size 2048
    ct-plan model=mobilellm_950m distributed=megatron_dp_distopt --world-size 8 seq_len=2048 \\
        trainer.micro_batch_size=4 activation_checkpointing.mode=selective
    ct-plan model=deepseek_v3_671b distributed=deepseek_v3_671b --min-gpus
    ct-plan --phase pretrain_phase1 size=recipe model=mobilellm_950m distributed=fsdp2 precision=bf16 \\
        --world-size 8

The overrides are ct-train's, composed exactly as ct-train composes them (configs/, Hydra, the
typed RunConfig; ``--phase`` as ct-train's, default pretrain_phase1), and the plan is of that run:
its model, layout, micro-batch, seq_len, global batch (microbatches per step), precision (auto
resolved for ``--device``; fp8 plans as bf16), activation checkpointing, loss chunking, attention
backend and, for mid-training with an online teacher, the teacher's weights and targets on every
GPU. Two defaults differ from ct-train's, because a plan is for the recipe's GPUs: ``size=recipe``
unless a ``size=`` is given, and ``--device cuda`` (``--device cpu`` plans a CPU run). Layouts the
engines refuse for now (DistributedConfig.engine_support_errors: DeepSeek-V3's uneven pipeline
split) are planned: ct-plan never builds an engine. The arithmetic is ct_parallel.plan (formulas
and sources in docs/ct-parallel.md, "Planning a layout: ct-plan"). Bad input exits 2 with one line
naming the key, as ct-train's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ct_model.dtypes import DTYPES
from ct_model.errors import UserError

from .common import EXIT_USER_ERROR, UserFacingError, config_dir

DEFAULT_PHASE = "pretrain_phase1"  # ct-train's default
PLAN_SIZE = "size=recipe"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ct-plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="ct-train's overrides: model=NAME distributed=NAME precision=NAME "
                   "size=recipe|cpu model.FIELD=V distributed.FIELD=V trainer.micro_batch_size=N seq_len=N ...")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--world-size", type=int, help="GPUs in all (default: the smallest the layout allows)")
    size.add_argument("--dp", type=int, help="data-parallel size instead of --world-size (world = TP x PP x DP)")
    p.add_argument("--num-microbatches", type=int,
                   help="microbatches per step per replica (default: the run's global batch / (DP x micro-batch))")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="card memory in 10^9 bytes (default 80)")
    p.add_argument("--min-gpus", action="store_true",
                   help="also search DP (TP, PP, EP, expert-TP as given) for the smallest world size that fits")
    p.add_argument("--phase", default=DEFAULT_PHASE, help="the ct-train phase (default: %(default)s)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="where the run would train: precision=auto, attention kernels, the optimizer kernel "
                        "and megatron's spec follow it (default: cuda)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--config-dir", help="configs/ directory (default: this checkout's)")
    return p.parse_intermixed_args(argv)  # key=value overrides may follow the flags


def plan_overrides(overrides: list[str]) -> list[str]:
    """ct-train's overrides, with size=recipe first unless they choose a size (Hydra refuses a
    group chosen twice, and the user's choice wins)."""
    chosen = any(o.split("=", 1)[0].lstrip("+~") == "size" for o in overrides)
    return list(overrides) if chosen else [PLAN_SIZE, *overrides]


def composed_run(args: argparse.Namespace, directory: Path):
    """The RunConfig ct-train composes from these overrides, with its device-dependent defaults
    decided for ``--device`` (precision.dtype=auto: bf16 on cuda, fp32 on cpu), as ct-train's
    setup decides them. No engine-support check: ct-plan is arithmetic."""
    import torch

    from .common import run_config

    run = run_config(args.phase, plan_overrides(args.overrides), directory)
    return run.resolved_for(torch.device(args.device))[0]


def world_size(args: argparse.Namespace, dist) -> int:
    from ct_parallel.plan import data_parallel_step

    mp = dist.tensor_model_parallel_size * dist.pipeline_model_parallel_size
    if args.world_size is not None:
        return args.world_size
    if args.dp is not None:
        if args.dp < 1:
            raise UserFacingError(f"--dp must be >= 1, got {args.dp}")
        return mp * args.dp
    return mp * data_parallel_step(dist)


# ------------------------------------------------------------------------------- the run's model


def phase_model(run):
    """The model the run trains, as ct-train resolves it (``ct_stages.run.phase_model_config``:
    init_from's config.json, else the model section): a phase planned before the one it starts
    from has run has no init_from yet, and is planned from the model section (the same shape)."""
    from ct_stages.run import phase_model_config

    path = run.init_path
    return phase_model_config(run, path if path is not None and (path / "config.json").is_file() else None)


def teacher_extras(run, student, dp: int) -> dict[str, float]:
    """What an online KD teacher adds to every GPU (stage.kind=midtrain, backend ct): its weights
    (whole on every rank), the targets it annotates for all of the rank's rows of a step before
    the engine runs (final hidden states, or top-k ids + log-probs), and the chunked KD loss's
    teacher logits and gradient for one chunk. A cached teacher is gone before training."""
    d = run.stage.distill
    if run.stage.kind != "midtrain" or d.backend != "ct":
        return {}
    import ct_model

    path = Path(os.path.normpath(d.teacher_path)) if d.teacher_path else None
    if path is None or path == run.init_path:
        teacher, dtype, name = student, d.teacher_dtype or "fp32", "self-distillation"  # ct exports fp32
    elif (path / "config.json").is_file():
        meta = json.loads((path / "config.json").read_text())
        teacher, name = ct_model.hf.read_hf_config(path)[0], path.name
        dtype = d.teacher_dtype or meta.get("torch_dtype") or (meta.get("text_config") or {}).get("torch_dtype") or "fp32"
    else:
        raise UserFacingError(f"stage.distill.teacher_path={d.teacher_path}: no config.json there to size the "
                              "teacher (its weights and targets are on every GPU); point it at the teacher's "
                              "HF directory")
    size = DTYPES[str(dtype)].itemsize if str(dtype) in DTYPES else 4
    rows = run.trainer.global_batch_size // dp
    chunk = run.loss.chunk_tokens
    extras = {}
    if d.teacher == "online":
        extras[f"teacher weights ({name}, {ct_model.count_parameters(teacher) / 1e9:.2f} B x {size} bytes)"] = (
            ct_model.count_parameters(teacher) * size)
    if d.top_k is not None:
        per_token, what = d.top_k * (8 + 4), f"top-{d.top_k} ids and log-probs"
    elif chunk > 0:
        per_token, what = teacher.hidden_size * size, "final hidden states"
    else:
        per_token, what = teacher.vocab_size * size, "full logits"
    extras[f"teacher targets, {what}, for the rank's {rows} rows of a step"] = rows * run.seq_len * per_token
    if d.top_k is None and chunk > 0:
        extras["KD loss: one chunk's teacher logits and gradient (fp32)"] = chunk * teacher.vocab_size * 8
    return extras


def workload(run, dist, world: int, args: argparse.Namespace, strict: bool):
    """The Workload of ``run`` at ``world`` GPUs: its micro-batch, seq_len, precision (fp8's
    linears keep bf16 inputs for backward: planned as bf16), checkpointing, loss chunks (the
    native engines'; megatron makes a microbatch's logits at once) and microbatches per step per
    replica (the global batch over DP x micro-batch). ``strict``: a global batch that does not
    divide is an error (ct-train refuses it); in the --min-gpus search it is rounded down."""
    from ct_parallel.plan import PlanError, Workload

    dp = world // (dist.tensor_model_parallel_size * dist.pipeline_model_parallel_size)
    t = run.trainer
    if strict and t.global_batch_size % (dp * t.micro_batch_size):
        raise PlanError(f"trainer.global_batch_size={t.global_batch_size} is not divisible by data-parallel "
                        f"size x trainer.micro_batch_size = {dp} x {t.micro_batch_size}")
    return Workload(micro_batch_size=t.micro_batch_size, seq_len=run.seq_len,
                    precision="fp32" if run.precision.dtype == "fp32" else "bf16",
                    recompute=run.activation_checkpointing.mode,
                    recompute_every_n_blocks=run.activation_checkpointing.every_n_blocks,
                    num_microbatches=args.num_microbatches or max(1, t.global_batch_size // (dp * t.micro_batch_size)),
                    loss_chunk_tokens=run.loss.chunk_tokens if dist.engine == "native" else 0,
                    device=args.device, optimizer=run.optimizer.name)


def plan_inputs(args: argparse.Namespace, directory: Path):
    """(run, model, distributed config, world size, workload_for(world), extras_for(world)) of the
    run ct-train would start with these overrides."""
    run = composed_run(args, directory)
    model, dist = phase_model(run), run.distributed
    world = world_size(args, dist)
    workload(run, dist, world, args, strict=True)  # the given world must be one ct-train accepts

    def workload_for(world_size_: int):
        return workload(run, dist, world_size_, args, strict=world_size_ == world)

    def extras_for(world_size_: int) -> dict[str, float]:
        return teacher_extras(run, model, world_size_ // (dist.tensor_model_parallel_size
                                                          * dist.pipeline_model_parallel_size))

    return run, model, dist, world, workload_for, extras_for


# ------------------------------------------------------------------------------------ printing


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def billions(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.1f} M"


ZERO_NAMES = {0: "no ZeRO (optimizer state replicated)", 1: "ZeRO-1 (megatron distributed optimizer)",
              3: "ZeRO-3 (FSDP2)"}


def layer_split(p) -> str:
    counts = [len(range(s.layers[0], s.layers[1] + 1)) if s.layers else 0 for s in p.stages]
    if len(counts) == 1:
        return f"{counts[0]} layers"
    if len(set(counts)) == 1:
        return f"{counts[0]} layers each"
    middle = counts[1:-1]
    if middle and len(set(middle)) == 1:
        return f"layers {counts[0]} + {len(middle)}x{middle[0]} + {counts[-1]}"
    return "layers " + " + ".join(map(str, counts))


def precision_words(p) -> str:
    lay, w = p.layout, p.workload
    if w.precision == "fp32":
        return "fp32 params, grads, AdamW moments"
    if lay.engine == "megatron":
        return "bf16 params + fp32 grads, master and AdamW moments"
    if lay.zero == 3:
        return "fp32 sharded params, grads and AdamW moments, bf16 gathered params (FSDP2 mixed precision)"
    return "fp32 params, grads and AdamW moments, bf16 autocast"


def attention_words(p, model) -> str:
    from ct_parallel.plan import LOCAL_ATTENTION_BYTES_PER_SCORE, native_attention_path

    lay, w = p.layout, p.workload
    if lay.engine == "megatron":
        if lay.transformer_engine:
            return "Transformer Engine fused attention (no T x T scores)"
        return (f"megatron local spec ({LOCAL_ATTENTION_BYTES_PER_SCORE[w.precision]} bytes per T x T score and "
                "layer, a [B, 1, T, T] mask)")
    path = native_attention_path(model, w)
    return {"flex": "flex attention (compiled block mask, no T x T scores)",
            "varlen": "varlen flash attention (no T x T scores)",
            "causal": "causal flash attention (no T x T scores)",
            "sdpa": "SDPA with a dense document mask (a [B, 1, T, T] mask kept per layer)",
            "varlen_cpu": "CPU varlen: causal flash SDPA per document, K and V repeated to every head"}.get(path, path)


def render(p, model=None, command: str | None = None) -> str:
    lay, w = p.layout, p.workload
    cap_gib = p.capacity_bytes / 2**30
    worst = p.worst
    lines = [f"run       {command}"] if command else []
    lines += [
        f"model     {p.model}: {billions(p.total_parameters)} parameters, {billions(p.active_parameters)} active per token",
        f"layout    {lay.world_size} {'CPU processes' if w.device == 'cpu' else 'GPUs'} ({p.nodes} node{"s" if p.nodes > 1 else ""} x {p.gpus_per_node}): TP {lay.tp}, PP {lay.pp} "
        f"({layer_split(p)}), EP {lay.ep}, expert-TP {lay.etp}, DP {lay.dp}, expert-DP {lay.edp}, "
        f"sequence parallel {'on' if lay.sequence_parallel else 'off'}, {ZERO_NAMES[lay.zero]}",
        f"workload  micro-batch {w.micro_batch_size} x {w.seq_len} tokens, {w.microbatches_per_step} "
        f"microbatch{"es" if w.microbatches_per_step > 1 else ""} per step, {precision_words(p)}"
        + f", recompute {w.recompute}" + (f" every {w.recompute_every_n_blocks} blocks" if w.recompute_every_n_blocks > 1 else "")
        + (f", 1F1B: stage 0 holds {_in_flight(p, 0)} microbatch{"es" if _in_flight(p, 0) > 1 else ""} in flight"
           if lay.engine == "megatron" else
           f", native engine activations (eager ct-model), loss {f'chunks of {w.loss_chunk_tokens} tokens' if w.loss_chunk_tokens else 'on full logits'}"),
        *([f"attention {attention_words(p, model)}"] if model is not None else []),
        *(f"extra     {name}: {gib(value)} GiB per GPU" for name, value in p.extras.items()),
        "",
        f"{'stage':>5}  {'layers':<8}{'params/GPU':>11}{'params':>9}{'grads':>9}{'optim':>9}{'activ':>9}{'total':>9}  GiB",
    ]
    for s in p.stages:
        span = f"{s.layers[0]}-{s.layers[1]}" if s.layers else "-"
        mark = "  <- worst" if s is worst else ""
        lines.append(f"{s.stage:>5}  {span:<8}{billions(s.parameters):>11}{gib(s.parameter_bytes):>9}"
                     f"{gib(s.gradient_bytes):>9}{gib(s.optimizer_bytes):>9}{gib(s.activation_bytes):>9}"
                     f"{gib(s.total_bytes):>9}{mark}")
    by = worst.activation_bytes_by_recompute
    verdict = "fits" if p.fits else f"does NOT fit (over by {gib(worst.total_bytes - p.capacity_bytes)} GiB)"
    lines += [""]
    if lay.engine == "native":
        lines.append(peak_words(worst))
    lines += [
        f"worst stage {worst.stage}: {gib(worst.total_bytes)} GiB per GPU; an {p.capacity_bytes / 1e9:g} GB card "
        f"({cap_gib:.2f} GiB): {verdict}",
        f"stage {worst.stage} activations by recompute: none {gib(by['none'])}, selective {gib(by['selective'])}, "
        f"full {gib(by['full'])} GiB",
    ]
    if p.virtual_stages > 1:
        lines.append(f"note: interleaved 1F1B ({p.virtual_stages} virtual stages) is planned as plain 1F1B; its first "
                     f"stage holds about {1 + (lay.pp - 1) / (lay.pp * p.virtual_stages):.2f}x the activations "
                     "(Korthikanti et al. 2022, sec. 4.2.3)")
    if lay.tp > p.gpus_per_node:
        lines.append(f"note: TP {lay.tp} spans nodes ({p.gpus_per_node} GPUs each); tensor parallelism wants NVLink")
    return "\n".join(lines)


def peak_words(s) -> str:
    """Which moment of a native step is the peak (gradients are freed between steps)."""
    if s.peak_moment == "forward":
        held = s.gradient_bytes_in_forward or 0.0
        return (f"peak      the last microbatch's forward: activations + {gib(held)} GiB of gradients "
                "accumulated over the earlier microbatches (in the grads column: the optimizer step's)")
    return (f"peak      the optimizer step: every gradient + {gib(s.step_working_bytes)} GiB of the optimizer's "
            f"working memory (the forward's peak is {gib(s.forward_peak_bytes)} GiB)")


def _in_flight(p, stage: int) -> int:
    from ct_parallel.plan import in_flight

    return in_flight(p.layout, p.workload, stage)


# ---------------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> int:
    from ct_parallel.plan import plan, smallest_fitting

    directory = config_dir(args.config_dir)
    composed, model, dist, world, workload_for, extras_for = plan_inputs(args, directory)
    options = dict(gpu_memory_gb=args.gpu_memory_gb, gpus_per_node=args.gpus_per_node)
    result = plan(model, dist, world, workload_for(world), extras=extras_for(world), **options)
    smallest = (smallest_fitting(model, dist, workload_for(world), extras_for=extras_for, workload_for=workload_for,
                                 **options) if args.min_gpus else None)
    command = " ".join(["ct-train --phase", args.phase, *plan_overrides(args.overrides)]) + f" (on {args.device})"
    if args.json:
        out = {"run": command, **result.to_dict()}
        if args.min_gpus:
            out["min_gpus"] = None if smallest is None else {"world_size": smallest.layout.world_size,
                                                            "plan": smallest.to_dict()}
        print(json.dumps(out, indent=2))
        return 0
    print(render(result, model, command))
    if args.min_gpus:
        lay = result.layout
        scope = f"over DP at TP {lay.tp}, PP {lay.pp}, EP {lay.ep}, expert-TP {lay.etp}"
        if smallest is None:
            print(f"\nsmallest GPU count that fits ({scope}): none; what stays per GPU as DP grows is too big")
        else:
            print(f"\nsmallest GPU count that fits on {args.gpu_memory_gb:g} GB cards ({scope}): "
                  f"{smallest.layout.world_size} (DP {smallest.layout.dp})\n")
            print(render(smallest, model))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
