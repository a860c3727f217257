"""ct-plan: per-GPU memory of a model on a parallel layout, and whether it fits an 80 GB card.

    ct-plan model=deepseek_v3_671b distributed=deepseek_v3_671b --world-size 2048
    ct-plan model=mobilellm_950m distributed=megatron_dp_distopt --world-size 8 seq_len=2048 \\
        trainer.micro_batch_size=4 activation_checkpointing.mode=selective
    ct-plan model=deepseek_v3_671b distributed=deepseek_v3_671b --min-gpus
    ct-plan --phase pretrain_phase1 size=recipe model=mobilellm_950m distributed=fsdp2 precision=bf16 \
        --world-size 8

``--phase NAME``: the overrides are ct-train's, composed exactly as ct-train composes them, and
the plan is of that run: its model, layout, micro-batch, seq_len, precision (auto and fp8 plan as
bf16: a GPU run), activation checkpointing, loss chunking and, for mid-training with an online
teacher, the teacher's weights and targets on every GPU.

Keys use ct-train's names: ``model=`` and ``distributed=`` pick configs/model/ and
configs/distributed/ files (or a path to a YAML file), ``model.FIELD=`` / ``distributed.FIELD=``
override one field, ``trainer.micro_batch_size``, ``seq_len``, ``precision`` (bf16 | fp32) and
``activation_checkpointing.mode`` (none | selective | full). The arithmetic is
ct_parallel.plan (formulas and sources in docs/ct-parallel.md, "Planning a layout: ct-plan").
Bad input exits 2 with one line naming the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from ct_model.errors import UserError

from .common import EXIT_USER_ERROR, UserFacingError, config_dir

WORKLOAD_KEYS = {"trainer.micro_batch_size": "micro_batch_size", "seq_len": "seq_len",
                 "precision": "precision", "activation_checkpointing.mode": "recompute"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ct-plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="model=NAME distributed=NAME model.FIELD=V distributed.FIELD=V "
                   "trainer.micro_batch_size=N seq_len=N precision=bf16|fp32 activation_checkpointing.mode=M")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--world-size", type=int, help="GPUs in all (default: the smallest the layout allows)")
    size.add_argument("--dp", type=int, help="data-parallel size instead of --world-size (world = TP x PP x DP)")
    p.add_argument("--num-microbatches", type=int, help="microbatches per step per replica (default: >= PP)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="card memory in 10^9 bytes (default 80)")
    p.add_argument("--min-gpus", action="store_true",
                   help="also search DP (TP, PP, EP, expert-TP as given) for the smallest world size that fits")
    p.add_argument("--phase", help="plan this ct-train phase: the overrides are ct-train's (e.g. size=recipe)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--config-dir", help="configs/ directory (default: this checkout's)")
    return p.parse_intermixed_args(argv)  # key=value overrides may follow the flags


def split_overrides(items: list[str]) -> dict[str, Any]:
    """``key=value`` strings into a dict, values read as YAML scalars (ct-train's override syntax)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserFacingError(f"expected key=value, got {item!r}")
        known = key in ("model", "distributed") or key.startswith(("model.", "distributed.")) or key in WORKLOAD_KEYS
        if not known:
            raise UserFacingError(f"{key}: unknown key for ct-plan; known: model, distributed, model.FIELD, "
                                  f"distributed.FIELD, {', '.join(WORKLOAD_KEYS)}")
        out[key] = value if key in ("model", "distributed") else yaml.safe_load(value)
    return out


def read_group_file(group: str, choice: str, directory: Path) -> dict[str, Any]:
    """configs/GROUP/CHOICE.yaml, or CHOICE itself when it is a path to a YAML file."""
    import yaml

    path = Path(choice)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = directory / group / f"{choice}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (directory / group).glob("*.yaml"))
        raise UserFacingError(f"{group}={choice}: no such file or {group} config; known: {', '.join(known)}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserFacingError(f"{group}={choice}: {path} is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise UserFacingError(f"{group}={choice}: {path} must hold a mapping of fields")
    return values


def fields_of(group: str, overrides: dict[str, Any]) -> dict[str, Any]:
    prefix = group + "."
    return {k[len(prefix):]: v for k, v in overrides.items() if k.startswith(prefix)}


def model_config(overrides: dict[str, Any], directory: Path):
    import ct_model

    if "model" not in overrides:
        raise UserFacingError("model=NAME (a configs/model/ file or a preset's YAML) is required")
    values = {**read_group_file("model", overrides["model"], directory), **fields_of("model", overrides)}
    preset = values.pop("preset", None)
    values = {k: v for k, v in values.items() if v is not None}  # null keeps the preset's value
    known = {f.name for f in dataclasses.fields(ct_model.ModelConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserFacingError(f"model: unknown field(s) {', '.join(unknown)}")
    try:
        if preset is not None:
            return ct_model.presets.get(preset, **values)
        return ct_model.ModelConfig.from_dict(values)
    except TypeError as err:  # a required field missing (a YAML without a preset)
        raise UserFacingError(f"model: {err}") from None
    except UserError as err:  # ModelConfig's messages name the field; say which group it is
        raise UserFacingError(f"model: {err}") from None


def distributed_config(overrides: dict[str, Any], directory: Path):
    from ct_parallel import DistributedConfig

    values = {**read_group_file("distributed", overrides.get("distributed", "single"), directory),
              **fields_of("distributed", overrides)}
    try:
        return DistributedConfig.from_dict(values)
    except ValueError as err:  # DistributedConfig's messages already name distributed.FIELD
        raise UserFacingError(str(err)) from None


def workload(overrides: dict[str, Any], model, num_microbatches: int | None):
    from ct_parallel.plan import Workload

    # The context defaults to the model's (4096 for both MobileLLM-R1 and DeepSeek-V3 pretraining).
    values = {"seq_len": model.max_position_embeddings, "num_microbatches": num_microbatches}
    values.update({WORKLOAD_KEYS[k]: v for k, v in overrides.items() if k in WORKLOAD_KEYS})
    return Workload(**values)


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


# ------------------------------------------------------------------------------- --phase mode

# Bytes per element of a teacher's dtype (stage.distill.teacher_dtype, or its config.json's).
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}


def _hf_model_config(directory: Path):
    import ct_model

    return ct_model.hf.config_from_hf(json.loads((directory / "config.json").read_text()),
                                      str(directory / "config.json"))[0]


def phase_model(run):
    """The model the run trains: init_from's config.json when that checkpoint exists, else the
    model section (what ct-train builds fresh; a later phase's start is the same shape)."""
    path = run.init_path
    if path is not None and (path / "config.json").is_file():
        return _hf_model_config(path)
    return run.model.resolve()


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
        teacher, name = _hf_model_config(path), path.name
        dtype = d.teacher_dtype or meta.get("torch_dtype") or (meta.get("text_config") or {}).get("torch_dtype") or "fp32"
    else:
        raise UserFacingError(f"stage.distill.teacher_path={d.teacher_path}: no config.json there to size the "
                              "teacher (its weights and targets are on every GPU); point it at the teacher's "
                              "HF directory")
    size = DTYPE_BYTES.get(str(dtype), 4)
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


def phase_plan_inputs(args: argparse.Namespace, directory: Path):
    """(model, distributed config, workload, world size, extras_for(world)) of the run ct-train would
    start with these overrides."""
    from ct_parallel.plan import PlanError, Workload

    from .common import run_config

    run = run_config(args.phase, args.overrides, directory)
    model, dist = phase_model(run), run.distributed
    world = world_size(args, dist)
    dp = world // (dist.tensor_model_parallel_size * dist.pipeline_model_parallel_size)
    t = run.trainer
    if t.global_batch_size % (dp * t.micro_batch_size):
        raise PlanError(f"trainer.global_batch_size={t.global_batch_size} is not divisible by data-parallel "
                        f"size x trainer.micro_batch_size = {dp} x {t.micro_batch_size}")
    work = Workload(micro_batch_size=t.micro_batch_size, seq_len=run.seq_len,
                    # auto is bf16 on the GPUs a plan is for; FP8 linears keep their bf16 input for backward.
                    precision="fp32" if run.precision.dtype == "fp32" else "bf16",
                    recompute=run.activation_checkpointing.mode,
                    recompute_every_n_blocks=run.activation_checkpointing.every_n_blocks,
                    num_microbatches=args.num_microbatches or t.global_batch_size // (dp * t.micro_batch_size),
                    loss_chunk_tokens=run.loss.chunk_tokens if dist.engine == "native" else 0)

    def extras_for(world_size_: int) -> dict[str, float]:
        return teacher_extras(run, model, world_size_ // (dist.tensor_model_parallel_size
                                                          * dist.pipeline_model_parallel_size))

    return model, dist, work, world, extras_for


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


def render(p) -> str:
    lay, w = p.layout, p.workload
    cap_gib = p.capacity_bytes / 2**30
    worst = p.worst
    lines = [
        f"model     {p.model}: {billions(p.total_parameters)} parameters, {billions(p.active_parameters)} active per token",
        f"layout    {lay.world_size} GPUs ({p.nodes} node{"s" if p.nodes > 1 else ""} x {p.gpus_per_node}): TP {lay.tp}, PP {lay.pp} "
        f"({layer_split(p)}), EP {lay.ep}, expert-TP {lay.etp}, DP {lay.dp}, expert-DP {lay.edp}, "
        f"sequence parallel {'on' if lay.sequence_parallel else 'off'}, {ZERO_NAMES[lay.zero]}",
        f"workload  micro-batch {w.micro_batch_size} x {w.seq_len} tokens, "
        + ("bf16 params + fp32 grads, master and AdamW moments" if w.precision == "bf16" else "fp32 params, grads, AdamW moments")
        + f", recompute {w.recompute}" + (f" every {w.recompute_every_n_blocks} blocks" if w.recompute_every_n_blocks > 1 else "")
        + (f", 1F1B: stage 0 holds {_in_flight(p, 0)} microbatch{"es" if _in_flight(p, 0) > 1 else ""} in flight"
           if lay.engine == "megatron" else
           f", native engine activations (eager ct-model), loss {f'chunks of {w.loss_chunk_tokens} tokens' if w.loss_chunk_tokens else 'on full logits'}"),
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
    lines += [
        "",
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


def _in_flight(p, stage: int) -> int:
    from ct_parallel.plan import in_flight

    return in_flight(p.layout, p.workload, stage)


# ---------------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> int:
    from ct_parallel.plan import plan, smallest_fitting

    directory = config_dir(args.config_dir)
    extras_for = None
    if args.phase:
        model, dist, work, world, extras_for = phase_plan_inputs(args, directory)
    else:
        overrides = split_overrides(args.overrides)
        model = model_config(overrides, directory)
        dist = distributed_config(overrides, directory)
        work = workload(overrides, model, args.num_microbatches)
        world = world_size(args, dist)
    options = dict(gpu_memory_gb=args.gpu_memory_gb, gpus_per_node=args.gpus_per_node)
    result = plan(model, dist, world, work, extras=extras_for(world) if extras_for else None, **options)
    smallest = smallest_fitting(model, dist, work, extras_for=extras_for, **options) if args.min_gpus else None
    if args.json:
        out = result.to_dict()
        if args.min_gpus:
            out["min_gpus"] = None if smallest is None else {"world_size": smallest.layout.world_size,
                                                            "plan": smallest.to_dict()}
        print(json.dumps(out, indent=2))
        return 0
    print(render(result))
    if args.min_gpus:
        lay = result.layout
        scope = f"over DP at TP {lay.tp}, PP {lay.pp}, EP {lay.ep}, expert-TP {lay.etp}"
        if smallest is None:
            print(f"\nsmallest GPU count that fits ({scope}): none; what stays per GPU as DP grows is too big")
        else:
            print(f"\nsmallest GPU count that fits on {args.gpu_memory_gb:g} GB cards ({scope}): "
                  f"{smallest.layout.world_size} (DP {smallest.layout.dp})\n")
            print(render(smallest))
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
