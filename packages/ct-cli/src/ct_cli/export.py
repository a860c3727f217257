"""ct-export CKPT OUT: a training checkpoint to an HF model directory (safetensors + config.json).

CKPT is a checkpoint directory (run_dir/checkpoints/step_NNNNNNNN) or a run directory (its newest
complete checkpoint is used). The tokenizer of the run is copied beside the weights.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from .common import UserFacingError, run_guarded, setup_logging


def find_checkpoint(path: Path) -> tuple[Path, Path]:
    """(checkpoint dir, run dir) for a checkpoint or run directory."""
    from ct_stages import CheckpointManager

    if (path / "meta.json").is_file() and (path / "engine").is_dir():
        return path, path.parent.parent
    latest = CheckpointManager(path / "checkpoints").latest()
    if latest is None:
        raise UserFacingError(f"{path}: neither a checkpoint (meta.json + engine/) nor a run directory with "
                              "complete checkpoints under checkpoints/")
    return latest, path


def export(checkpoint: Path, out: Path, arch: str | None) -> Path:
    import ct_data
    import ct_model
    from ct_parallel import build_native_engine

    ckpt, run_dir = find_checkpoint(checkpoint)
    config_path = run_dir / "model_config.json"
    if not config_path.is_file():
        raise UserFacingError(f"{config_path}: missing (the run directory records its model config there)")
    config = ct_model.ModelConfig.from_dict(json.loads(config_path.read_text()))
    model = ct_model.build_model(config, device="meta")
    model.to_empty(device="cpu")
    engine = build_native_engine(model)
    engine.load_checkpoint(str(ckpt / "engine"), load_optimizer=False)
    arch = arch or ("llama4" if config.qk_layernorm or config.rope_style == "interleaved" else "llama")
    ct_model.hf.save_hf(model, out, arch=arch)
    for candidate in (run_dir / "hf", run_dir / "tokenizer"):
        if (candidate / "tokenizer.json").is_file():
            ct_data.load_tokenizer(str(candidate)).save(str(out))
            break
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ct-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--arch", choices=["llama4", "llama"], help="default: llama4 for MobileLLM-style models")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()

    def run() -> int:
        if not args.checkpoint.exists():
            raise UserFacingError(f"{args.checkpoint}: no such checkpoint or run directory")
        print(export(args.checkpoint, args.out, args.arch))
        return 0

    return run_guarded(run)


if __name__ == "__main__":
    sys.exit(main())
