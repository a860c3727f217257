"""ct-pipeline: all five phases of the recipe in order, each from the previous one's export.

    ct-pipeline                                  # the embedded CPU run under runs/pipeline
    ct-pipeline run_dir=runs/p2 trainer.seed=7   # overrides apply to every phase
    ct-pipeline --phases pretrain_phase1,pretrain_phase2

Resumable as a whole: a finished phase (summary.json present) is skipped, an interrupted one
resumes from its newest checkpoint. At the end the reasoning accuracy of the pretrained model and
of the final model are compared on the held-out problems and written to pipeline_summary.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import subprocess
import sys
from pathlib import Path

from .common import UserFacingError, config_dir, run_config, run_guarded, setup_logging

PHASES = ["pretrain_phase1", "pretrain_phase2", "midtrain_phase1", "midtrain_phase2",
          "posttrain_general", "posttrain_reasoning"]
log = logging.getLogger("ct_cli")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ct-pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phases", default=",".join(PHASES), help="comma-separated phases (default: all, in order)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes per phase (through ct-train)")
    p.add_argument("--config-dir")
    p.add_argument("--datamix", action="store_true",
                   help="re-weight each mid-training mixture by influence (one ct-datamix round) before it runs")
    p.add_argument("--datamix-samples", type=int, default=32, help="--datamix: samples per source and per probe")
    p.add_argument("--skip-eval", action="store_true", help="do not evaluate reasoning accuracy at the end")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every phase; run_dir=DIR sets the root")
    return p


def split_root(overrides: list[str]) -> tuple[Path, list[str]]:
    root, rest = Path("runs/pipeline"), []
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
        directory = config_dir(args.config_dir)
        root, overrides = split_root(args.overrides)
        phases = [p for p in args.phases.split(",") if p]
        # One sample-data directory for all phases (unless given), under the pipeline's run_dir.
        if not any(o.startswith("sample_data.dir=") for o in overrides):
            overrides = [f"sample_data.dir={root / 'sample_data'}", *overrides]
        # Compose and validate every phase first: a bad override fails before hours of training.
        configs = {p: run_config(p, [f"run_dir={root / p}", *overrides], directory) for p in phases}
        results, datamix = {}, {}
        for phase in phases:
            summary_path = root / phase / "summary.json"
            # Resumed: a finished phase reports its cached round; an unfinished one computes (or reuses) it.
            if args.datamix and phase.startswith("midtrain") and (
                    not summary_path.is_file() or (root / phase / "datamix" / "datamix.json").is_file()):
                if args.nproc_per_node > 1:
                    raise UserFacingError("--datamix runs single-process only (drop --nproc-per-node)")
                from .datamix import reweight_phase

                data, datamix[phase] = reweight_phase(configs[phase].to_dict(), root / phase / "datamix",
                                                      samples=args.datamix_samples)
                configs[phase] = dataclasses.replace(configs[phase], data=data)
            if summary_path.is_file():
                log.info("%s: already done (%s), skipping", phase, summary_path)
            elif args.nproc_per_node > 1:
                cmd = [sys.executable, "-m", "ct_cli.train", "--phase", phase, f"--nproc-per-node={args.nproc_per_node}",
                       "--config-dir", str(directory), f"run_dir={root / phase}", *overrides]
                subprocess.run(cmd, check=True)
            else:
                from ct_stages.run import run_phase

                log.info("=== %s ===", phase)
                run_phase(configs[phase])
            results[phase] = json.loads(summary_path.read_text())
        summary = {"phases": {p: {k: r[k] for k in ("final_loss", "steps", "consumed_tokens")}
                              for p, r in results.items()}}
        if datamix:
            summary["datamix"] = datamix
        if not args.skip_eval and "posttrain_reasoning" in phases:
            summary["reasoning_accuracy"] = compare_accuracy(root, configs["posttrain_reasoning"])
        (root / "pipeline_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary, indent=2))
        return 0

    return run_guarded(run)


def compare_accuracy(root: Path, run) -> dict:
    """Held-out accuracy of the pretrained model (end of pretraining) and of the final model."""
    from ct_stages.evaluate_models import evaluate_reasoning_dirs

    candidates = {"pretrained": root / "pretrain_phase2" / "hf", "final": root / "posttrain_reasoning" / "hf"}
    existing = {k: v for k, v in candidates.items() if (v / "config.json").is_file()}
    reasoning, sample = run.eval.reasoning, run.sample_data
    return evaluate_reasoning_dirs(existing, sample.dir, sample.seed, max_problems=reasoning.max_problems,
                                   max_new_tokens=reasoning.max_new_tokens, scale=sample.scale)


if __name__ == "__main__":
    sys.exit(main())
