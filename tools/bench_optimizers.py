"""AdamW vs Muon, linear decay vs WSD: held-out loss against steps and against seconds, CPU.

    uv run python tools/bench_optimizers.py [--steps 60] [--lrs 4e-3,1e-2] [--seeds 0] [--extra-seeds 1]
                                            [--timing-rounds 20] [--out runs/bench_optimizers]
                                            [--write docs/experiments.md]

Every run: pretrain_phase1 on the embedded sample data, mobilellm_tiny, the same tokens in the same
order (trainer.seed), fp32, one process. The four arms (AdamW + linear, the recipe; AdamW + WSD;
Muon + linear; Muon + WSD, 1-sqrt decay over the last 20%) each run at every LR of --lrs (the WSD
arms: of --wsd-lrs, where 'best' takes the same optimizer's best linear LR) and every seed of
--seeds (for Muon: optimizer.lr and optimizer.muon_lr both, match_rms_adamw scaling); each arm's
best LR (lowest final held-out loss, mean over those seeds) is then also run with the seeds of
--extra-seeds, and the curves reported are that LR's mean over all seeds. Finished runs are kept
in --out and reused, so invocations over one --out may run arms side by side (--arms);
--partial reports unfinished runs as far as they got, marked.

Held-out split: the embedded sample data is built once, then its prose, code and math documents
are split by position (the last --heldout-fraction of each file; prose and code are in a seeded
random order, math rows are distinct generated problems): training sees only the first part (its
own sample directory, the tokenizer trained on it), and the loss every --eval-every steps is on
--eval-batches batches packed from the held-out documents alone (ct-train's monitor evaluator,
pointed at the held-out mixture: documents no run trains on).

Table: steps to reach the recipe's final held-out loss (the first evaluated step from which the
loss stays at or below it), as ratios of the recipe's, and time per step: AdamW and Muon steps
timed alternately in one process (--timing-rounds, medians), so the load of a shared CPU falls on
both alike; time to target = the steps ratio x the time-per-step ratio. The runs' own step times
are not used: runs one after another (or side by side) meet different loads.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

from ct_cli.common import config_dir, run_config

BEGIN, END = "<!-- bench_optimizers:begin -->", "<!-- bench_optimizers:end -->"
ARMS = {  # the linear arms first: the WSD arms can take their best LR (--wsd-lrs best)
    "adamw+linear": ["optimizer=adamw", "schedule.name=linear"],
    "muon+linear": ["optimizer=muon", "schedule.name=linear"],
    "adamw+wsd": ["optimizer=adamw", "schedule.name=wsd", "schedule.decay_ratio=0.2", "schedule.decay_shape=1-sqrt"],
    "muon+wsd": ["optimizer=muon", "schedule.name=wsd", "schedule.decay_ratio=0.2", "schedule.decay_shape=1-sqrt"],
}
log = logging.getLogger("bench_optimizers")


SPLIT = ("prose", "code", "math")  # the pretraining sources (ct_data.sample.FILES keys)


def split_sample(out: Path, fraction: float) -> tuple[Path, Path]:
    """The embedded sample data built under ``out/sample_data``, split by document into
    ``out/sample_train`` and ``out/sample_heldout`` (sample-data directories, each with a manifest
    of its own files, so ct-train takes the train one as built and trains its tokenizer there)."""
    import hashlib

    import pyarrow.parquet as pq

    from ct_data import sample

    full, parts = out / "sample_data", {"train": out / "sample_train", "heldout": out / "sample_heldout"}
    if all(_split_done(d) for d in parts.values()):  # never rewrite files a running invocation reads
        return parts["train"], parts["heldout"]
    sample.build(full)
    manifest = json.loads((full / "manifest.json").read_text())
    hashes = {name: dict(manifest["files"]) for name in parts}
    for key in SPLIT:
        rel = sample.FILES[key]
        if rel.endswith(".parquet"):
            table = pq.read_table(full / rel)
            cut = table.num_rows - max(1, round(table.num_rows * fraction))
            halves = {"train": table.slice(0, cut), "heldout": table.slice(cut)}
        else:
            lines = (full / rel).read_text().splitlines(keepends=True)
            cut = len(lines) - max(1, round(len(lines) * fraction))
            halves = {"train": lines[:cut], "heldout": lines[cut:]}
        for name, d in parts.items():
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            if rel.endswith(".parquet"):
                pq.write_table(halves[name], d / rel, compression="zstd")
            else:
                (d / rel).write_text("".join(halves[name]))
            hashes[name][rel] = hashlib.sha256((d / rel).read_bytes()).hexdigest()
    for name, d in parts.items():  # the files not split (SFT, math eval) are copied unchanged
        for rel in set(sample.FILES.values()) - {sample.FILES[k] for k in SPLIT}:
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / rel).write_bytes((full / rel).read_bytes())
        (d / "manifest.json").write_text(json.dumps({**manifest, "files": hashes[name]}, indent=2, sort_keys=True))
    return parts["train"], parts["heldout"]


def _split_done(d: Path) -> bool:
    import hashlib

    try:
        files = json.loads((d / "manifest.json").read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    return all((d / rel).is_file() and hashlib.sha256((d / rel).read_bytes()).hexdigest() == digest
               for rel, digest in files.items())


def heldout_evaluator(heldout: Path):
    """ct-train's monitor evaluator (trainer.eval_every, eval_batches batches drawn once with
    another seed), given the held-out documents' mixture instead of the training one."""
    import ct_data
    import ct_stages.run as phase

    original = phase.fixed_batch_evaluator

    def evaluator(engine, mixture, tokenizer, run, info):
        return original(engine, ct_data.load_data_config(run.data, sample_dir=heldout), tokenizer, run, info)

    phase.fixed_batch_evaluator = evaluator


def run(out: Path, arm: str, lr: float, seed: int, args) -> dict:
    """One training run (reused when its summary exists); its held-out curve and step times."""
    from ct_stages.run import run_phase

    run_dir = out / f"{arm}_lr{lr:g}_seed{seed}"
    muon_lr = [f"optimizer.muon_lr={lr}"] if arm.startswith("muon") else []
    if args.partial and not (run_dir / "summary.json").is_file():
        log.info("%s: not finished, its held-out curve so far", run_dir)
    elif not (run_dir / "summary.json").is_file():
        log.info("=== %s lr=%g seed=%d ===", arm, lr, seed)
        run_phase(run_config("pretrain_phase1", [
            f"run_dir={run_dir}", f"sample_data.dir={out / 'sample_train'}", "logging.progress=false",
            "precision=fp32", f"trainer.max_steps={args.steps}", f"trainer.global_batch_size={args.batch}",
            f"trainer.micro_batch_size={args.batch}", f"seq_len={args.seq_len}", f"trainer.seed={seed}",
            f"trainer.eval_every={args.eval_every}", f"trainer.eval_batches={args.eval_batches}", f"trainer.checkpoint_every={args.steps}",
            "schedule.warmup_steps=10", f"optimizer.lr={lr}", *muon_lr, *ARMS[arm]], config_dir(None)))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_loss"] for r in records if r.get("event") == "eval"}
    times = {r["step"]: r["step_time_s"] for r in records if r.get("event") == "train"}
    return {"eval": evals, "times": times}


def step_time_ratio(args) -> dict[str, float]:
    """Median seconds of a training step (forward + backward, then the optimizer step) with AdamW
    and with Muon, the two timed in alternating steps in one process on the same batch, so a load
    that comes and goes on a shared CPU falls on both alike (the runs above run one after another
    and meet different loads). The model and optimizers as ct-train builds them for these runs."""
    import time

    import torch

    import ct_model
    from ct_stages.optim import build_optimizer

    run = run_config("pretrain_phase1", ["precision=fp32", "optimizer=muon"], config_dir(None))
    config = run.model.resolve()
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    arms = {}
    for name in ("adamw", "muon"):
        torch.manual_seed(0)
        model = ct_model.build_model(config)
        optimizer_config = type(run.optimizer)(**{**vars(run.optimizer), "name": name})
        arms[name] = (model, build_optimizer(model.named_parameters(), optimizer_config), [], [])
    for _ in range(args.timing_rounds):
        for model, optimizer, steps, opt_steps in arms.values():
            start = time.perf_counter()
            logits = model(ids[:, :-1])
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
            middle = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            end = time.perf_counter()
            steps.append(end - start)
            opt_steps.append(end - middle)
    med = {name: (statistics.median(a[2]), statistics.median(a[3])) for name, a in arms.items()}
    return {"adamw_step_s": med["adamw"][0], "muon_step_s": med["muon"][0],
            "adamw_optimizer_s": med["adamw"][1], "muon_optimizer_s": med["muon"][1],
            "ratio": med["muon"][0] / med["adamw"][0]}


def cached_step_time_ratio(args) -> dict[str, float]:
    """step_time_ratio, kept in --out (as the runs are) for these rounds, batch and length."""
    path = args.out / f"step_time_{args.timing_rounds}x{args.batch}x{args.seq_len}.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(step_time_ratio(args), indent=2))
    return json.loads(path.read_text())


def timing_text(t: dict[str, float], args) -> str:
    return (f"Time per step, alternating AdamW and Muon steps in one process ({args.timing_rounds} rounds, "
            f"{args.batch} x {args.seq_len} tokens, medians): AdamW {t['adamw_step_s']:.3f} s "
            f"(optimizer step {t['adamw_optimizer_s']:.3f} s), Muon {t['muon_step_s']:.3f} s (optimizer step "
            f"{t['muon_optimizer_s']:.3f} s): **Muon / AdamW = {t['ratio']:.2f}x**.")


def mean_curve(runs: list[dict]) -> dict:
    steps = sorted(set.intersection(*(set(r["eval"]) for r in runs)))
    evals = {s: statistics.mean(r["eval"][s] for r in runs) for s in steps}
    times = {s: statistics.mean(r["times"][s] for r in runs) for s in runs[0]["times"]}  # per step, over seeds
    return {"eval": evals, "times": times}


def step_time(curve: dict) -> float:
    """The median step time: other jobs on a shared CPU stall single steps 10x (logged as slow
    steps), and a sum would charge those stalls to whichever arm was running."""
    return statistics.median(curve["times"].values())


def first_reaching(curve: dict, target: float) -> int | None:
    """The first monitored step from which the loss stays <= target (short noisy curves dip early
    and rise again: a first touch would credit an arm with a lucky batch)."""
    steps = sorted(curve["eval"])
    return next((s for s in steps if all(curve["eval"][t] <= target for t in steps if t >= s)), None)


def table(best: dict[str, tuple[float, dict]], sweep: dict, muon_step: float | None = None) -> str:
    """``muon_step``: Muon's time per step / AdamW's from the alternating timing; when given it
    prices the steps (time to target = steps x that ratio), else each run's median step time
    (which meets whatever load its run met)."""
    recipe = best["adamw+linear"][1]
    last = max(recipe["eval"])
    target = recipe["eval"][last]
    base_steps = first_reaching(recipe, target)
    timed = "alternating timing" if muon_step else "runs' median step"
    lines = [f"Target: the recipe's (AdamW + linear) final held-out loss, {target:.4f}.", "",
             f"| arm | best LR | final loss | steps to target | x recipe | s/step x recipe ({timed}) | "
             "time to target x recipe | LR sweep: final loss |",
             "|---|---|---|---|---|---|---|---|"]
    for arm, (lr, curve) in best.items():
        final = curve["eval"][max(curve["eval"])]
        cell = f"{final:.4f}" if max(curve["eval"]) == last else f"{final:.4f} (step {max(curve['eval'])}, unfinished)"
        steps = first_reaching(curve, target)
        if muon_step:
            per_step = muon_step if arm.startswith("muon") else 1.0
        else:
            per_step = step_time(curve) / step_time(recipe)
        ratio = steps / base_steps if steps else None
        swept = ", ".join(f"{x:g}: {loss:.4f}" for x, loss in sweep[arm])
        lines.append(f"| {arm} | {lr:g} | {cell} | {steps or 'not reached'} | {f'{ratio:.2f}' if ratio else '-'} | "
                     f"{per_step:.2f} | {f'{ratio * per_step:.2f}' if ratio else '-'} | {swept} |")
    return "\n".join(lines)


def plot(best: dict, path: Path, timing: dict | None = None) -> None:
    """Held-out loss against steps, and against seconds: steps x the alternating timing's step
    time for the arm's optimizer when given, else x the run's median step time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for arm, (lr, curve) in best.items():
        steps = sorted(curve["eval"])
        by_step.plot(steps, [curve["eval"][s] for s in steps], label=f"{arm} (lr {lr:g})")
        per_step = timing[f"{arm.split('+')[0]}_step_s"] if timing else step_time(curve)
        by_time.plot([s * per_step for s in steps], [curve["eval"][s] for s in steps], label=arm)
    by_step.set_xlabel("step")
    by_time.set_xlabel("seconds (steps x time per step, CPU" + (", alternating timing)" if timing else ")"))
    for ax in (by_step, by_time):
        ax.set_ylabel("held-out loss")
        ax.grid(alpha=0.3)
    by_step.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_block(path: Path, text: str) -> None:
    doc = path.read_text()
    block = f"{BEGIN}\n{text}\n{END}"
    doc = doc[:doc.index(BEGIN)] + block + doc[doc.index(END) + len(END):] if BEGIN in doc else doc + "\n" + block + "\n"
    path.write_text(doc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--heldout-fraction", type=float, default=0.1)
    parser.add_argument("--lrs", default="4e-3,1e-2")
    parser.add_argument("--wsd-lrs", default="", help="the WSD arms' sweep; 'best': the linear arm's best LR "
                        "for the same optimizer (default: --lrs)")
    parser.add_argument("--seeds", default="0", help="the LR sweep's seeds")
    parser.add_argument("--arms", default=",".join(ARMS), help="a subset of " + ", ".join(ARMS))
    parser.add_argument("--extra-seeds", default="", help="more seeds, run at each arm's best LR only")
    parser.add_argument("--timing-rounds", type=int, default=20, help="alternating AdamW / Muon steps timed "
                        "in one process (0: none)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_optimizers"))
    parser.add_argument("--png", type=Path, default=Path("docs/bench_optimizers.png"))
    parser.add_argument("--write", type=Path, help="replace the bench_optimizers block in this markdown file")
    parser.add_argument("--timing-only", action="store_true", help="only the alternating step timing")
    parser.add_argument("--partial", action="store_true", help="report unfinished runs as far as they got "
                        "(marked in the table) instead of running them")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.timing_only:
        print(timing_text(cached_step_time_ratio(args), args))
        return 0
    lrs, seeds = [float(x) for x in args.lrs.split(",")], [int(x) for x in args.seeds.split(",")]
    extra = [int(x) for x in args.extra_seeds.split(",") if x]
    split_sample(args.out, args.heldout_fraction)
    heldout_evaluator(args.out / "sample_heldout")
    best, sweep = {}, {}
    for arm in args.arms.split(","):  # the sweep first, every arm, so a stopped invocation has a whole comparison
        swept = lrs
        if arm.endswith("wsd") and args.wsd_lrs:
            swept = ([best[arm.replace("wsd", "linear")][0]] if args.wsd_lrs == "best"
                     else [float(x) for x in args.wsd_lrs.split(",")])
        runs = {lr: [run(args.out, arm, lr, seed, args) for seed in seeds] for lr in swept}
        finals = {lr: (c := mean_curve(r))["eval"][max(c["eval"])] for lr, r in runs.items()}
        sweep[arm] = sorted(finals.items())
        lr = min(finals, key=finals.get)
        best[arm] = (lr, runs[lr])
    for arm, (lr, runs) in best.items():
        best[arm] = (lr, mean_curve(runs + [run(args.out, arm, lr, seed, args) for seed in extra]))
    timing = cached_step_time_ratio(args) if args.timing_rounds else None
    text = (f"Held-out loss, mean over seeds {','.join(map(str, seeds + extra))} at each arm's best LR "
            f"(the sweep on seeds {args.seeds}); {args.steps} steps.\n\n"
            + table(best, sweep, timing["ratio"] if timing else None))
    if timing:
        text += "\n\n" + timing_text(timing, args)
    print(text)
    plot(best, args.png, timing)
    if args.write:
        write_block(args.write, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
