"""Checkpoints to score with: HF export directories, or a directory of them (a run's exports)."""

from __future__ import annotations

from pathlib import Path

from .errors import DatamixError


def expand_checkpoints(paths: list[str]) -> list[Path]:
    """Each path is an HF directory (config.json) or a directory whose subdirectories are; in order.

    The order is the training order t = 1..T that the joint weights alpha_t ~ t follow: as given on
    the command line, and sorted by name (step-numbered names sort by step when zero-padded) inside
    a directory.
    """
    if not paths:
        raise DatamixError("no checkpoint given (--checkpoint DIR)")
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / "config.json").is_file():
            out.append(p)
            continue
        subs = sorted(d for d in p.iterdir() if (d / "config.json").is_file()) if p.is_dir() else []
        if not subs:
            raise DatamixError(f"checkpoint {str(p)!r}: not an HF export directory (no config.json) and holds none")
        out.extend(subs)
    return out


def load_checkpoint(path: Path, tokenizer, device: str = "cpu"):
    from ct_model.hf import load_hf

    model, config = load_hf(path, device=device)
    if tokenizer is not None and config.vocab_size != tokenizer.vocab_size:
        raise DatamixError(f"checkpoint {str(path)!r}: vocabulary size {config.vocab_size} differs from the "
                           f"tokenizer's {tokenizer.vocab_size}")
    return model.float().eval()
