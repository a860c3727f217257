"""ct-recipe: the recipe's six phases in order (PHASES: pretraining 1 and 2, mid-training 1 and 2,
general SFT, reasoning SFT), each from the previous one's export, plus a teacher phase by default.

    ct-recipe                                  # the embedded CPU run under runs/recipe
    ct-recipe run_dir=runs/p2 trainer.seed=7   # overrides apply to every phase
    ct-recipe --phases pretrain_phase1,pretrain_phase2

Mid-training distils from a teacher: by default the recipe run trains a stronger embedded one just
before mid-training (phase `teacher`: the student's pretrain_phase2 export trained further on the
mid-training mixture, under RUN_DIR/teacher, reused when already there; --teacher-model gives it
another shape, trained from scratch); `stage.distill.teacher_path=DIR` distils from any HF model
directory instead and trains none.

Resumable as a whole: a finished phase (summary.json present) is skipped, an interrupted one
resumes from its newest checkpoint. At the end the held-out reasoning accuracy after each part
(pretraining, mid-training, general SFT, reasoning SFT) and each phase's wall time are printed
and written to recipe_summary.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from .common import UserFacingError, config_dir, run_config, run_guarded, setup_logging

PHASES = ["pretrain_phase1", "pretrain_phase2", "midtrain_phase1", "midtrain_phase2",
          "posttrain_general", "posttrain_reasoning"]
log = logging.getLogger("ct_cli")
# Empty: the student's own shape, continued from its pretrain_phase2 export. A teacher from scratch
# (any other shape) pays for its whole pretraining inside the recipe run: an 8-layer one trained for
# 200 steps (10 minutes) was still worse than the student on held-out code (docs/experiments.md).
DEFAULT_TEACHER = ""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ct-recipe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phases", default=",".join(PHASES), help="comma-separated phases (default: all, in order)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes per phase (through ct-train)")
    p.add_argument("--config-dir")
    p.add_argument("--datamix", action="store_true",
                   help="re-weight each mid-training mixture by influence (one ct-datamix round) before it runs")
    p.add_argument("--datamix-samples", type=int, default=32, help="--datamix: samples per source and per probe")
    p.add_argument("--teacher-model", default=DEFAULT_TEACHER,
                   help="shape of the embedded mid-training teacher: ModelConfig fields over the student's, "
                        "e.g. num_layers=8 (trained from scratch). Default: the student's shape, continued from "
                        "its pretrain_phase2 export. Ignored when stage.distill.teacher_path is given")
    p.add_argument("--skip-eval", action="store_true", help="do not evaluate reasoning accuracy at the end")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every phase; run_dir=DIR sets the root")
    return p


def split_root(overrides: list[str]) -> tuple[Path, list[str]]:
    root, rest = Path("runs/recipe"), []
    for item in overrides:
        if item.startswith("run_dir="):
            root = Path(item.split("=", 1)[1])
        else:
            rest.append(item)
    return root, rest


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    setup_logging()

    def run() -> int:
        start = time.monotonic()
        directory = config_dir(args.config_dir)
        root, overrides = split_root(args.overrides)
        phases = [p for p in args.phases.split(",") if p]
        # One sample-data directory for all phases (unless given), under the recipe run's run_dir.
        if not any(o.startswith("sample_data.dir=") for o in overrides):
            overrides = [f"sample_data.dir={root / 'sample_data'}", *overrides]
        teacher = teacher_plan(root, phases, overrides, args.teacher_model)
        # Compose and validate every phase first: a bad override fails before hours of training.
        order = phase_order(phases, teacher)
        # One override list per phase: it composes the config and is what a multi-process ct-train gets.
        phase_args = {p: phase_overrides(root, p, overrides, teacher) for p in order}
        configs = {p: run_config(p, phase_args[p], directory) for p in order}
        check_teachers(configs)
        if args.nproc_per_node > 1:  # distributed=single: one line now, not a failed ct-train per phase
            from ct_stages.run import check_process_count

            for config in configs.values():
                check_process_count(config, args.nproc_per_node)
        timings = Timings(root / "recipe_timings.json")
        results, datamix = {}, {}
        for phase in configs:
            if args.datamix and phase.startswith("midtrain"):
                datamix_round(args, root, phase, configs, datamix)
            results[phase] = run_one(args, directory, phase, configs[phase], phase_args[phase], timings)
        summary = {"phases": {p: {**{k: r[k] for k in ("final_loss", "steps", "consumed_tokens")},
                                  "wall_s": timings.get(p)} for p, r in results.items()}}
        if datamix:
            summary["datamix"] = datamix
        if not args.skip_eval and "posttrain_reasoning" in phases:
            eval_start = time.monotonic()
            summary["reasoning_accuracy"] = phase_accuracy(root, configs["posttrain_reasoning"])
            timings.record("eval", time.monotonic() - eval_start)
        summary["wall_s"] = {"eval": timings.get("eval"), "this_invocation": round(time.monotonic() - start, 1),
                             "total_measured": timings.total()}
        from ct_stages.metrics import strict_json

        text = strict_json(summary, indent=2)  # strict JSON: a NaN loss is null
        (root / "recipe_summary.json").write_text(text + "\n")
        print(text)
        print(summary_table(summary))
        return 0

    return run_guarded(run)


@dataclasses.dataclass(frozen=True)
class TeacherPlan:
    train: bool  # the recipe run trains (or reuses) its own teacher under root/teacher
    path: Path | None = None  # what the mid-training phases distil from (None: the user's override)
    overrides: tuple[str, ...] = ()


def teacher_plan(root: Path, phases: list[str], overrides: list[str], shape: str) -> TeacherPlan:
    """Train the embedded teacher only when a mid-training phase runs and no teacher_path is given."""
    if not any(p.startswith("midtrain") for p in phases) or any(
            o.startswith("stage.distill.teacher_path=") for o in overrides):
        return TeacherPlan(train=False)
    fields = [f"model.{kv.strip()}" for kv in shape.split(",") if kv.strip()]
    # Another shape cannot start from the student's weights: it is pretrained from scratch.
    scratch = ["init_from=null"] if fields else []
    # The shape goes after the user's overrides: a student override (model.hidden_size=...) must not
    # shrink the teacher; --teacher-model is how a user (or a test) sizes it.
    return TeacherPlan(True, root / "teacher" / "hf",
                       (f"run_dir={root / 'teacher'}", *overrides, *fields, *scratch))


def phase_order(phases: list[str], teacher: TeacherPlan) -> list[str]:
    """The teacher trains just before the first mid-training phase: it may start from pretrain_phase2."""
    if not teacher.train:
        return list(phases)
    first = next(i for i, p in enumerate(phases) if p.startswith("midtrain"))
    return [*phases[:first], "teacher", *phases[first:]]


def phase_extra(phase: str, teacher: TeacherPlan) -> list[str]:
    if teacher.train and phase.startswith("midtrain"):
        return [f"stage.distill.teacher_path={teacher.path}"]
    return []


def phase_overrides(root: Path, phase: str, overrides: list[str], teacher: TeacherPlan) -> list[str]:
    """The overrides that compose ``phase`` (also what a multi-process ct-train gets)."""
    if phase == "teacher":
        return list(teacher.overrides)
    return [f"run_dir={root / phase}", *overrides, *phase_extra(phase, teacher)]


def check_teachers(configs: dict) -> None:
    """A teacher path the user gave, or the export the embedded teacher starts from, must hold an HF
    model (or be made by an earlier phase of this run) before any phase trains."""
    if "teacher" in configs and configs["teacher"].init_path:
        start = configs["teacher"].init_path
        made_here = any(Path(os.path.normpath(run.run_path / "hf")) == start for run in configs.values())
        if not made_here and not (start / "config.json").is_file():
            raise UserFacingError(f"teacher: init_from={configs['teacher'].init_from} holds no HF model (no "
                                  "config.json); run pretrain_phase2 first or give --teacher-model to train one "
                                  "from scratch")
    for phase, run in configs.items():
        path = run.stage.distill.teacher_path if run.stage.kind == "midtrain" else None
        trained_here = "teacher" in configs and Path(path or "") == configs["teacher"].run_path / "hf"
        if path and not trained_here and not (Path(path) / "config.json").is_file():
            raise UserFacingError(f"{phase}: stage.distill.teacher_path={path} holds no HF model (no config.json)")


def datamix_round(args, root: Path, phase: str, configs: dict, records: dict) -> None:
    summary_path = root / phase / "summary.json"
    # Resumed: a finished phase reports its cached round; an unfinished one computes (or reuses) it.
    if summary_path.is_file() and not (root / phase / "datamix" / "datamix.json").is_file():
        return
    if args.nproc_per_node > 1:
        raise UserFacingError("--datamix runs single-process only (drop --nproc-per-node)")
    from .datamix import reweight_phase

    data, records[phase] = reweight_phase(configs[phase].to_dict(), root / phase / "datamix",
                                          samples=args.datamix_samples)
    configs[phase] = dataclasses.replace(configs[phase], data=data)


def run_one(args, directory: Path, phase: str, run, overrides: list[str], timings: "Timings") -> dict:
    """Train one phase unless its summary.json exists; returns that summary."""
    summary_path = run.run_path / "summary.json"
    if summary_path.is_file():
        log.info("%s: already done (%s), skipping", phase, summary_path)
        return json.loads(summary_path.read_text())
    begin = time.monotonic()
    if args.nproc_per_node > 1:
        cmd = [sys.executable, "-m", "ct_cli.train", "--phase", phase, f"--nproc-per-node={args.nproc_per_node}",
               "--config-dir", str(directory), *overrides]
        subprocess.run(cmd, check=True)
    else:
        from ct_stages.run import run_phase

        log.info("=== %s ===", phase)
        run_phase(run)
    timings.record(phase, time.monotonic() - begin)
    return json.loads(summary_path.read_text())


class Timings:
    """Wall seconds per phase, kept across resumed invocations (a skipped phase keeps its time)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.values = json.loads(path.read_text()) if path.is_file() else {}

    def record(self, name: str, seconds: float) -> None:
        self.values[name] = round(seconds, 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        from ct_stages.metrics import strict_json

        self.path.write_text(strict_json(self.values, indent=2) + "\n")

    def get(self, name: str) -> float | None:
        return self.values.get(name)

    def total(self) -> float:
        return round(sum(self.values.values()), 1)


# Held-out accuracy after each part of the recipe: the export that ends it.
EVAL_POINTS = {"pretrain": "pretrain_phase2", "midtrain": "midtrain_phase2", "general_sft": "posttrain_general",
               "reasoning_sft": "posttrain_reasoning"}


def phase_accuracy(root: Path, run) -> dict:
    """Held-out reasoning accuracy of each part's export that exists (batched greedy decoding)."""
    from ct_stages.evaluate_models import evaluate_reasoning_dirs

    candidates = {k: root / phase / "hf" for k, phase in EVAL_POINTS.items()}
    existing = {k: v for k, v in candidates.items() if (v / "config.json").is_file()}
    reasoning, sample = run.eval.reasoning, run.sample_data
    return evaluate_reasoning_dirs(existing, sample.dir, sample.seed, max_problems=reasoning.max_problems,
                                   max_new_tokens=reasoning.max_new_tokens, scale=sample.scale)


def summary_table(summary: dict) -> str:
    """The printed table: each phase's steps, loss and wall time, and accuracy where it is measured."""
    after = {phase: part for part, phase in EVAL_POINTS.items()}
    accuracy = summary.get("reasoning_accuracy", {})
    lines = ["phase                 steps  final loss  wall (s)  held-out accuracy after it",
             "--------------------  -----  ----------  --------  ---------------------------"]
    for phase, r in summary["phases"].items():
        acc = accuracy.get(after.get(phase, ""))
        shown = f"{100 * acc['accuracy']:.1f}% ({acc['correct']}/{acc['problems']})" if acc else ""
        wall = f"{r['wall_s']:.0f}" if r["wall_s"] is not None else "?"
        lines.append(f"{phase:<20}  {r['steps']:>5}  {r['final_loss']:>10.3f}  {wall:>8}  {shown}")
    walls = summary["wall_s"]
    lines.append(f"evaluation: {walls['eval'] or 0:.0f} s; total measured wall time {walls['total_measured']:.0f} s "
                 f"({walls['total_measured'] / 60:.1f} min)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
