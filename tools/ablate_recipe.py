"""Does each part of the embedded recipe earn its place? Reruns parts of a finished ct-recipe run.

    uv run python tools/ablate_recipe.py [--root runs/recipe] [--only kd,sft] [--write docs/experiments.md]

From the same checkpoints of a finished `ct-recipe` run (RUN_DIR below), at the same steps:

(a) post-training, from midtrain_phase2/hf: general SFT then reasoning SFT (the recipe run's own
    exports) vs reasoning SFT alone for G+R steps vs one SFT on the general+reasoning mixture
    (weights G:R) for G+R steps; held-out greedy accuracy of each.
(b) mid-training, from pretrain_phase2/hf: KD (the recipe run's midtrain_phase1 + midtrain_phase2)
    vs plain continued pretraining (the same two phases with stage.kind=pretrain, same steps, data
    and tokens); held-out loss on the phase-1 mid-training mixture (documents no phase trained on)
    and held-out accuracy after the same general + reasoning SFT.

Minutes to an hour on 2 cores (not in CI). Runs go under RUN_DIR/ablation/; a finished one is reused.
With --write, the markdown table replaces the block between the ablation markers in that file.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from pathlib import Path

from ct_cli.common import config_dir, run_config

BEGIN, END = "<!-- ablate_recipe:begin -->", "<!-- ablate_recipe:end -->"
log = logging.getLogger("ablate_recipe")
EXTRA: list[str] = []  # --set overrides for every run (a smoke test shrinks batches with them)


def train(root: Path, phase: str, name: str, overrides: list[str]) -> Path:
    """One ct-train phase under RUN_DIR/ablation/NAME (skipped when its export exists)."""
    from ct_stages.run import run_phase

    run_dir = root / "ablation" / name
    if not (run_dir / "summary.json").is_file():
        log.info("=== %s (%s) ===", name, phase)
        run_phase(run_config(phase, [f"run_dir={run_dir}", f"sample_data.dir={root / 'sample_data'}",
                                     "logging.progress=false", *EXTRA, *overrides], config_dir(None)))
    return run_dir / "hf"


def steps(root: Path, phase: str) -> int:
    return json.loads((root / phase / "summary.json").read_text())["steps"]


def accuracy(root: Path, models: dict[str, Path], problems: int) -> dict[str, dict]:
    from ct_stages.evaluate_models import evaluate_reasoning_dirs

    # The recipe run's own sample settings: another scale would rebuild its sample directory.
    sample = json.loads((root / "posttrain_reasoning" / "config.json").read_text())["sample_data"]
    return evaluate_reasoning_dirs(models, root / "sample_data", sample["seed"], max_problems=problems,
                                   max_new_tokens=96, scale=sample["scale"])


def heldout_texts(root: Path, n: int, seed: int = 0) -> dict[str, list[str]]:
    """Documents of each mid-training source that no phase trained on: standard-library files the
    sample corpus left out (its character budgets take a seeded subset), and the held-out problems.
    At scale 1 the prose budget takes every module's docstrings, so prose has none held out."""
    import pyarrow.parquet as pq
    from ct_data.sample import docs, load_math_eval

    sample = root / "sample_data"
    used_code = set(pq.read_table(sample / "code" / "train.parquet", columns=["path"]).column("path").to_pylist())
    used_docs = {json.loads(line)["source"] for line in open(sample / "prose" / "train.jsonl")}
    files = docs.stdlib_files()
    random.Random(seed).shuffle(files)
    prose, code = [], []
    for rel in files:
        src = docs.read_source(rel)
        if not src or not src.strip() or rel in used_code:
            continue
        md = docs.module_docs(rel, src)
        if md is not None and f"docstrings:{md.module}" not in used_docs and len(prose) < n:
            prose.append(md.text())
        if len(code) < n:
            code.append(src)
        if len(prose) >= n and len(code) >= n:
            break
    math = [f"{p['question']}\n{p['solution']}" for p in load_math_eval(sample)[:n]]
    return {"prose": prose, "code": code, "math": math}


def mixture_loss(models: dict[str, Path], texts: dict[str, list[str]], weights: dict[str, float]) -> dict:
    """Per-source held-out loss and its mixture-weighted mean (the phase-1 mid-training weights)."""
    from ct_stages.evaluate import load_model_and_tokenizer, text_perplexity

    out = {}
    texts = {s: t for s, t in texts.items() if t}  # a source without held-out documents drops out
    for name, hf_dir in models.items():
        model, tokenizer = load_model_and_tokenizer(hf_dir)
        per = {s: text_perplexity(model, tokenizer, t, seq_len=256)["eval_loss"] for s, t in texts.items()}
        total = sum(weights[s] for s in per)
        out[name] = {**per, "mixture": sum(weights[s] * per[s] for s in per) / total}
    return out


def ablate_sft(root: Path, problems: int) -> list[str]:
    g, r = steps(root, "posttrain_general"), steps(root, "posttrain_reasoning")
    start = f"init_from={root / 'midtrain_phase2' / 'hf'}"
    alone = train(root, "posttrain_reasoning", "reasoning_only", [start, f"trainer.max_steps={g + r}"])
    mixed = train(root, "posttrain_reasoning", "mixed_sft", [start, f"trainer.max_steps={g + r}",
                                                             "data=sample_sft_mixed",
                                                             f"data.sources.0.weight={g}", f"data.sources.1.weight={r}"])
    acc = accuracy(root, {"sequential": root / "posttrain_reasoning" / "hf", "alone": alone, "mixed": mixed}, problems)
    rows = [("general SFT then reasoning SFT (the recipe run)", f"{g} + {r}", acc["sequential"]),
            ("reasoning SFT alone", f"{g + r}", acc["alone"]),
            ("general + reasoning mixed in one SFT", f"{g + r}", acc["mixed"])]
    lines = ["| post-training from midtrain_phase2 | steps | held-out accuracy |", "|---|---|---|"]
    return lines + [f"| {name} | {n} | {_pct(a)} |" for name, n, a in rows]


def ablate_kd(root: Path, problems: int, docs_per_source: int, downstream: bool) -> list[str]:
    m1, m2 = steps(root, "midtrain_phase1"), steps(root, "midtrain_phase2")
    ce1 = train(root, "midtrain_phase1", "ce_phase1", [f"init_from={root / 'pretrain_phase2' / 'hf'}",
                                                       "stage.kind=pretrain", f"trainer.max_steps={m1}"])
    ce2 = train(root, "midtrain_phase2", "ce_phase2", [f"init_from={ce1}", "stage.kind=pretrain",
                                                       f"trainer.max_steps={m2}"])
    models = {"kd": root / "midtrain_phase2" / "hf", "ce": ce2, "teacher": root / "teacher" / "hf",
              "start": root / "pretrain_phase2" / "hf"}
    models = {k: v for k, v in models.items() if (v / "config.json").is_file()}
    run = run_config("midtrain_phase1", [f"sample_data.dir={root / 'sample_data'}"], config_dir(None))
    weights = {s["name"]: s["weight"] for s in run.data["sources"]}
    losses = mixture_loss(models, heldout_texts(root, docs_per_source), weights)
    finals = {"kd": root / "posttrain_reasoning" / "hf"}
    if downstream:  # the same general + reasoning SFT after the CE mid-training
        general = train(root, "posttrain_general", "ce_general", [f"init_from={ce2}",
                                                                   f"trainer.max_steps={steps(root, 'posttrain_general')}"])
        finals["ce"] = train(root, "posttrain_reasoning", "ce_reasoning", [
            f"init_from={general}", f"trainer.max_steps={steps(root, 'posttrain_reasoning')}"])
    finals = {k: v for k, v in finals.items() if (v / "config.json").is_file()}
    acc = accuracy(root, finals, problems) if finals else {}
    names = {"start": "start (pretrain_phase2 export)", "teacher": "the embedded teacher",
             "kd": f"KD mid-training ({m1} + {m2} steps)", "ce": f"continued pretraining, CE ({m1} + {m2} steps)"}
    lines = ["| model | held-out loss: mixture | prose | code | math | accuracy after general + reasoning SFT |",
             "|---|---|---|---|---|---|"]
    for k, loss in losses.items():
        a = _pct(acc[k]) if k in acc else ""
        per = " | ".join(f"{loss[s]:.3f}" if s in loss else "n/a" for s in ("prose", "code", "math"))
        lines.append(f"| {names[k]} | **{loss['mixture']:.3f}** | {per} | {a} |")
    return lines


def _pct(a: dict) -> str:
    return f"{100 * a['accuracy']:.1f}% ({a['correct']}/{a['problems']})"


def write_block(path: Path, text: str) -> None:
    doc = path.read_text()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{path}: no {BEGIN} ... {END} block to replace")
    head, rest = doc.split(BEGIN, 1)
    path.write_text(head + BEGIN + "\n" + text + "\n" + END + rest.split(END, 1)[1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=Path("runs/recipe"), help="a finished ct-recipe run_dir")
    p.add_argument("--only", default="kd,sft", help="which ablations: kd, sft or both (comma-separated)")
    p.add_argument("--problems", type=int, default=200, help="held-out problems per accuracy")
    p.add_argument("--docs", type=int, default=40, help="held-out documents per mid-training source")
    p.add_argument("--no-downstream", action="store_true", help="(b): skip the SFT after CE mid-training")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="Hydra override for every ablation run (e.g. trainer.global_batch_size=4)")
    p.add_argument("--write", type=Path, help="markdown file whose ablation block gets the tables")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    parts = [x for x in args.only.split(",") if x]
    EXTRA.extend(args.set)
    cmd = "uv run python tools/ablate_recipe.py " + " ".join(sys.argv[1:])
    blocks = [f"`{cmd}`"]
    if "sft" in parts:
        blocks.append("\n".join(ablate_sft(args.root, args.problems)))
    if "kd" in parts:
        blocks.append("\n".join(ablate_kd(args.root, args.problems, args.docs, not args.no_downstream)))
    text = "\n\n".join(blocks)
    print(text)
    if args.write:
        write_block(args.write, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
