"""ct-train --phase NAME [hydra overrides]: run one phase of the recipe.

    ct-train --phase pretrain_phase1
    ct-train --phase pretrain_phase1 trainer.max_steps=50 run_dir=runs/try
    ct-train --phase pretrain_phase1 --nproc-per-node 2 distributed=ddp
    torchrun --nproc-per-node 8 -m ct_cli.train --phase pretrain_phase1 distributed=fsdp2 size=recipe
"""

from __future__ import annotations

import argparse
import json
import sys

from .common import config_dir, phases, run_config, run_guarded, setup_logging


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ct-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", default="pretrain_phase1", help="a file of configs/phase/ (default: %(default)s)")
    p.add_argument("--nproc-per-node", type=int, default=1,
                   help="launch this many local processes through torch's elastic launcher")
    p.add_argument("--config-dir", help="the configs/ directory (default: the checkout's)")
    p.add_argument("--print-config", action="store_true", help="print the composed config and exit")
    p.add_argument("--list-phases", action="store_true", help="list the phases and exit")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. trainer.max_steps=10 model=mobilellm_950m")
    return p


def printable(run) -> dict:
    """The typed configuration as the run sees it: every key, the model preset resolved."""
    values = run.to_dict()
    if run.init_from is None:
        resolved = run.model.resolve().to_dict()
        values["model"] = {"preset": run.model.preset, **{k: v for k, v in resolved.items() if k != "name"}}
    else:
        values["model"] = {"from": run.init_from, "note": "the model comes from init_from's config.json"}
    return values


def launch_local(nproc: int, argv: list[str]) -> int:
    """Re-run this command under torchrun with ``nproc`` processes on this machine."""
    from torch.distributed.run import main as torchrun

    rest = [a for a in argv if not a.startswith("--nproc-per-node")]
    if "--nproc-per-node" in argv:  # the separate-value form
        i = argv.index("--nproc-per-node")
        rest = argv[:i] + argv[i + 2:]
    torchrun(["--standalone", f"--nproc-per-node={nproc}", "-m", "ct_cli.train", *rest])
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_intermixed_args(argv)  # overrides may come before and after flags
    setup_logging()

    def run() -> int:
        directory = config_dir(args.config_dir)
        if args.list_phases:
            print("\n".join(phases(directory)))
            return 0
        run = run_config(args.phase, args.overrides, directory)  # validated before any launch
        if args.print_config:
            import yaml

            print(yaml.safe_dump(printable(run), sort_keys=False))
            return 0
        if args.nproc_per_node > 1:
            return launch_local(args.nproc_per_node, argv)
        from ct_stages.run import run_phase

        result = run_phase(run)
        print(json.dumps(result.summary))
        return 0

    return run_guarded(run)


if __name__ == "__main__":
    sys.exit(main())
