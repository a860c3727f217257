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
        from ct_stages.checkpoint import verify

        issues = verify(path)
        if issues:
            raise UserFacingError(f"{path}: damaged checkpoint: {'; '.join(issues)}")
        return path, path.parent.parent
    latest = CheckpointManager(path / "checkpoints").latest_verified()
    if latest is None:
        raise UserFacingError(f"{path}: neither a checkpoint (meta.json + engine/) nor a run directory with "
                              "complete checkpoints under checkpoints/")
    return latest, path


def export(checkpoint: Path, out: Path, arch: str | None) -> Path:
    import ct_data
    import ct_model
    from ct_stages.checkpoint import read_meta

    ckpt, run_dir = find_checkpoint(checkpoint)
    config_path = run_dir / "model_config.json"
    if not config_path.is_file():
        raise UserFacingError(f"{config_path}: missing (the run directory records its model config there)")
    config = ct_model.ModelConfig.from_dict(json.loads(config_path.read_text()))
    meta = read_meta(ckpt)
    engine_kind = meta.get("engine", "native")  # checkpoints from before the field were native
    if engine_kind == "megatron":
        state = megatron_model_state(ckpt, config, meta)
    elif engine_kind == "native":
        state = native_model_state(ckpt, config)
    else:
        raise UserFacingError(f"{ckpt}: written by an unknown engine {engine_kind!r} (meta.json)")
    model, _, _ = ct_model.model_from_state(config, state)
    ct_model.hf.save_hf(model, out, arch=arch)
    for candidate in (run_dir / "hf", run_dir / "tokenizer"):
        if (candidate / "tokenizer.json").is_file():
            ct_data.load_tokenizer(str(candidate)).save(str(out))
            break
    return out


def native_model_state(ckpt: Path, config) -> dict:
    """A DCP checkpoint of the native engine (any world size, single/DDP/FSDP2) read in one process."""
    import ct_model
    from ct_parallel import build_native_engine

    model = ct_model.build_model(config, device="meta")
    model.to_empty(device="cpu")
    engine = build_native_engine(model)
    engine.load_checkpoint(str(ckpt / "engine"), load_optimizer=False)
    return engine.full_model_state_dict()


def megatron_model_state(ckpt: Path, config, meta: dict) -> dict:
    """A megatron dist_checkpointing directory (any TP/PP layout) resharded to TP=PP=1 in this
    process by megatron itself, then mapped to ct-model names by the bridge."""
    import torch

    import ct_model
    from ct_parallel import (DistributedConfig, build_engine, init_distributed, megatron_can_run,
                             shutdown_distributed)

    layout = meta.get("layout", {})
    if not megatron_can_run():
        raise UserFacingError(
            f"{ckpt}: written by the megatron engine (TP={layout.get('tensor_model_parallel_size', '?')}, "
            f"PP={layout.get('pipeline_model_parallel_size', '?')}); reading it needs megatron-core with CUDA, "
            "and this machine has none. Export on a GPU machine, or use the run's own hf/ export")
    single = DistributedConfig(engine="megatron", transformer_impl=layout.get("transformer_impl", "auto"))
    owns = not torch.distributed.is_initialized()
    init_distributed(single)
    try:
        model = ct_model.build_model(config, seed=0)  # overwritten by the checkpoint
        engine = build_engine(model, single)
        engine.load_checkpoint(str(ckpt / "engine"), load_optimizer=False)
        return engine.full_model_state_dict()
    finally:
        if owns:
            shutdown_distributed(single)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ct-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--arch", choices=["llama4", "llama", "deepseek_v3"],
                   help="default: deepseek_v3 for MLA/MoE models, llama4 for MobileLLM-style models "
                        "(QK-norm, interleaved RoPE), else llama")
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
