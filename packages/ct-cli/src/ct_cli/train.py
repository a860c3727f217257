"""ct-train --phase NAME [hydra overrides]: run one phase of the recipe.

    ct-train --phase pretrain_phase1
    ct-train --phase pretrain_phase1 trainer.max_steps=50 run_dir=runs/try
    ct-train --phase pretrain_phase1 --nproc-per-node 2 distributed=ddp
    ct-train --phase pretrain_phase1 --nproc-per-node 8 --shutdown-timeout 300 distributed=fsdp2
    torchrun --nproc-per-node 8 -m ct_cli.train --phase pretrain_phase1 distributed=fsdp2 size=recipe
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from .common import config_dir, phases, run_config, run_guarded, setup_logging

# How long the workers get after SIGTERM before the launcher SIGKILLs them: time to finish the step
# and write a checkpoint. torch's own default is 30 s, far too short for a large model; this one
# matches tools/launch/slurm.sbatch's warning lead time (--signal=B:TERM@120).
DEFAULT_SHUTDOWN_TIMEOUT = 120
SHUTDOWN_TIMEOUT_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"  # torchrun's own variable, honoured here too


def _seconds(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 seconds, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ct-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", default="pretrain_phase1", help="a file of configs/phase/ (default: %(default)s)")
    p.add_argument("--nproc-per-node", type=int, default=1,
                   help="launch this many local processes through torch's elastic launcher")
    p.add_argument("--shutdown-timeout", type=_seconds, metavar="SECONDS",
                   help="with --nproc-per-node: after SIGTERM, how long the workers get to finish their step and "
                        "write a checkpoint before they are killed; set it to the scheduler's warning lead time "
                        f"(SLURM --signal=TERM@SECONDS) (default: ${SHUTDOWN_TIMEOUT_ENV} or {DEFAULT_SHUTDOWN_TIMEOUT})")
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


def _without(argv: list[str], flag: str) -> list[str]:
    """``argv`` less ``flag`` in both forms (``--flag=V`` and ``--flag V``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            out.append(arg)
    return out


def shutdown_timeout(chosen: int | None) -> int:
    """The flag's value, else torchrun's environment variable, else DEFAULT_SHUTDOWN_TIMEOUT."""
    if chosen is not None:
        return chosen
    text = os.environ.get(SHUTDOWN_TIMEOUT_ENV, str(DEFAULT_SHUTDOWN_TIMEOUT))
    try:
        return _seconds(text)
    except (ValueError, argparse.ArgumentTypeError):
        from ct_model.errors import UserError

        raise UserError(f"{SHUTDOWN_TIMEOUT_ENV}={text!r}: expected a number of seconds >= 0") from None


def launch_local(nproc: int, argv: list[str], grace_s: int, entry: tuple[str, ...] = ("-m", "ct_cli.train")) -> int:
    """Re-run this command under torch's elastic launcher with ``nproc`` processes on this machine.

    On SIGTERM the launcher passes the signal on and waits up to ``grace_s`` for the workers
    (which finish their step, checkpoint and exit 143) before SIGKILL; it then exits 128 + the
    signal, as a single-process run does."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    rest = _without(_without(argv, "--nproc-per-node"), "--shutdown-timeout")
    try:
        torchrun(["--standalone", f"--nproc-per-node={nproc}", f"--shutdown-timeout={grace_s}", *entry, *rest])
    except SignalException as err:
        print(f"ct-train: {signal.Signals(err.sigval).name}: the workers were given up to {grace_s} s "
              "(--shutdown-timeout) to checkpoint and stop", file=sys.stderr)
        return 128 + int(err.sigval)
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
            from ct_stages.run import check_process_count

            check_process_count(run, args.nproc_per_node)  # one line here, not a traceback per rank
            return launch_local(args.nproc_per_node, argv, shutdown_timeout(args.shutdown_timeout))
        from ct_stages.run import run_phase

        from ct_stages.metrics import strict_json

        result = run_phase(run)
        print(strict_json(result.summary))  # a NaN loss as null, as in summary.json
        return 0

    return run_guarded(run)


if __name__ == "__main__":
    sys.exit(main())
