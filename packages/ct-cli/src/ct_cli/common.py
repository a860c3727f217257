"""What every entry point shares: finding configs/, composing them, and reporting user errors."""

from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

from ct_model.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C'd command


def config_dir(explicit: str | None = None) -> Path:
    """configs/ of this checkout (editable install), else ./configs, else $CT_CONFIG_DIR."""
    candidates = [explicit, os.environ.get("CT_CONFIG_DIR"),
                  Path(__file__).resolve().parents[4] / "configs", Path.cwd() / "configs"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "config.yaml").is_file():
            return Path(candidate).resolve()
    raise UserFacingError("cannot find the configs/ directory (config.yaml); pass --config-dir or set CT_CONFIG_DIR")


class UserFacingError(UserError):
    """A bad command line (unknown phase, bad override, missing configs/)."""


def phases(directory: Path) -> list[str]:
    return sorted(p.stem for p in (directory / "phase").glob("*.yaml"))


SCHEMA_NAME = "run_schema"


def register_schema() -> None:
    """The RunConfig defaults as the config.yaml's first default: every key exists (and is shown by
    --print-config) before any YAML file speaks, and YAML files state only what differs."""
    from hydra.core.config_store import ConfigStore
    from ct_stages.config import RunConfig

    ConfigStore.instance().store(name=SCHEMA_NAME, node=RunConfig.defaults())


def compose(phase: str, overrides: list[str], directory: Path) -> dict[str, Any]:
    """The resolved config of ``phase`` with Hydra ``overrides``, as plain containers."""
    import yaml
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    known = phases(directory)
    if phase not in known:
        raise UserFacingError(f"unknown phase {phase!r}; known phases: {', '.join(known)}")
    register_schema()
    try:
        with initialize_config_dir(config_dir=str(directory), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=[f"phase={phase}", *overrides])
        return OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise UserFacingError(f"bad config or override: {str(err).splitlines()[0]}") from err
    except yaml.YAMLError as err:  # a config file of the user's that is not YAML (Hydra passes it on)
        raise UserFacingError(yaml_error(err)) from err


def yaml_error(err) -> str:
    """One line: the file, the line and the problem of a YAML parse error (tabs named as such)."""
    mark = getattr(err, "problem_mark", None)
    where = f"{mark.name}:{mark.line + 1}" if mark is not None else "a config file"
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    hint = "; YAML indents with spaces, never a tab" if "\\t" in problem or "\t" in problem else ""
    return f"{where}: not valid YAML ({problem}){hint}"


def run_config(phase: str, overrides: list[str], directory: Path):
    """The typed RunConfig of ``phase`` with ``overrides`` (composed, then validated once)."""
    from ct_stages.config import RunConfig

    return RunConfig.from_dict(compose(phase, overrides, directory))


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input, reported in one line with exit status 2."""
    return (UserError, FileNotFoundError)


# Write failures a user fixes on the machine, not in the code: said in one line, naming the file.
DISK_ERRORS = {errno.ENOSPC: "free space", errno.EDQUOT: "free space (disk quota)",
               errno.EROFS: "choose a writable run_dir=", errno.EACCES: "fix its permissions"}


def disk_error(err: BaseException) -> str | None:
    """The one line for a write that the file system refused (None: not such an error)."""
    if not isinstance(err, OSError) or err.errno not in DISK_ERRORS:
        return None
    where = f"{err.filename}: " if err.filename else ""
    return (f"{where}{err.strerror}; {DISK_ERRORS[err.errno]}, then run the same command again (a rerun resumes "
            "from the newest complete checkpoint)")


def run_guarded(fn: Callable[[], int | None]) -> int:
    from ct_stages.trainer import Preempted

    try:
        return fn() or 0
    except Preempted as err:  # a checkpoint was written: say so, exit 143 / 130 (SLURM requeues on 143)
        print(f"preempted: {err}", file=sys.stderr)
        return err.exit_status
    except KeyboardInterrupt:  # Ctrl-C outside the training loop, or a second one inside it
        print("interrupted: stopped at once; the newest complete checkpoint (if any) is where a rerun resumes",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - classify, then re-raise what is not a user error
        if isinstance(err, user_errors()):
            print(f"error: {err}", file=sys.stderr)
            return EXIT_USER_ERROR
        if disk_error(err) is not None:
            print(f"error: {disk_error(err)}", file=sys.stderr)
            return EXIT_USER_ERROR
        raise
