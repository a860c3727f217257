"""ct-export CKPT OUT: a training checkpoint to an HF model directory (safetensors + config.json).

CKPT is a checkpoint directory (run_dir/checkpoints/step_NNNNNNNN) or a run directory (its newest
complete checkpoint is used). The tokenizer of the run is copied beside the weights, and its
BOS/EOS ids go into config.json and generation_config.json.

OUT must be a new or empty directory; ``--force`` replaces an export already there. The run
directory itself and its checkpoints/ are refused even then (the run's config.json lives there).

The weights are streamed one tensor at a time into safetensors shards (``--max-shard-size``,
default 5GB; ct_model.hf.write_hf holds at most one shard): a native (DCP) checkpoint is read
tensor by tensor, never as a whole model; a megatron checkpoint is loaded by megatron, in one
process resharded to TP=PP=1, or under torchrun in the layout it was written in, each rank
holding its share (``torchrun --nproc-per-node N -m ct_cli.export CKPT OUT``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from collections.abc import Iterator
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


def check_target(out: Path, run_dir: Path, force: bool) -> None:
    """Refuse an OUT that would overwrite something: the run directory (its config.json is the
    run's) or a place inside its checkpoints/, an existing file, or (without ``force``) a non-empty
    directory."""
    target, run = out.resolve(), run_dir.resolve()
    if target == run or run / "checkpoints" in (target, *target.parents):
        raise UserFacingError(f"{out}: this is the run directory {run_dir} (or inside its checkpoints/); "
                              f"export into a directory of its own, e.g. {run_dir / 'export'}")
    if out.exists() and not out.is_dir():
        raise UserFacingError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserFacingError(f"{out}: not empty; choose a new directory, or pass --force to replace the "
                              "export there")


def export(checkpoint: Path, out: Path, arch: str | None, max_shard_bytes: int | None = None,
           force: bool = True) -> Path:
    """Stream the checkpoint's weights, one tensor at a time, into an HF directory (safetensors
    shards of at most ``max_shard_bytes``, ct_model.hf.write_hf). Under torchrun (megatron
    checkpoints) every rank reads its share and rank 0 writes."""
    import ct_data
    import ct_model
    from ct_model.safetensors_shards import DEFAULT_MAX_SHARD_BYTES
    from ct_stages.checkpoint import read_meta

    ckpt, run_dir = find_checkpoint(checkpoint)
    check_target(out, run_dir, force)
    config_path = run_dir / "model_config.json"
    if not config_path.is_file():
        raise UserFacingError(f"{config_path}: missing (the run directory records its model config there)")
    config = ct_model.ModelConfig.from_dict(json.loads(config_path.read_text()))
    meta = read_meta(ckpt)
    engine_kind = meta.get("engine", "native")  # checkpoints from before the field were native
    main = _rank() == 0
    if engine_kind == "megatron":
        items = megatron_state_items(ckpt, config, meta)
    elif engine_kind == "native":
        # One process reads a DCP checkpoint tensor by tensor; other torchrun ranks have no part.
        items = native_state_items(ckpt, config) if main else (item for item in ())
    else:
        raise UserFacingError(f"{ckpt}: written by an unknown engine {engine_kind!r} (meta.json)")
    tokenizer = next((ct_data.load_tokenizer(str(c)) for c in (run_dir / "hf", run_dir / "tokenizer")
                      if (c / "tokenizer.json").is_file()), None)
    ids = None if tokenizer is None else ct_model.hf.token_ids(tokenizer.bos_id, tokenizer.stop_ids, tokenizer.pad_id)
    with contextlib.closing(items):
        if not main:
            for _ in items:  # take part in the gathers; nothing arrives here
                pass
            return out
        ct_model.hf.write_hf(items, config, out, arch=arch, token_ids=ids,
                             max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)
    if tokenizer is not None:
        tokenizer.save(str(out))
    return out


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def native_state_items(ckpt: Path, config) -> Iterator[tuple[str, "torch.Tensor"]]:
    """A DCP checkpoint of the native engine (any world size, single/DDP/FSDP2), read one tensor
    at a time: DCP assembles each full tensor from the saved shards into a buffer of its size, so
    the process holds one tensor (never the model). Checked against the config before any is read."""
    import ct_model

    reader = _metadata_once_reader(str(ckpt / "engine"))
    saved = reader.read_metadata().state_dict_metadata
    entries = {}
    for name in ct_model.build_model(config, device="meta").state_dict():
        entry = saved.get(f"model.{name}")
        if entry is None or not hasattr(entry, "size"):
            raise UserFacingError(f"{ckpt / 'engine'}: no tensor 'model.{name}' in the checkpoint "
                                  f"(written for another model config than {ckpt.parent.parent / 'model_config.json'}?)")
        entries[name] = entry
    return _read_one_by_one(reader, entries)


def _read_one_by_one(reader, entries: dict) -> Iterator[tuple[str, "torch.Tensor"]]:
    import torch
    import torch.distributed.checkpoint as dcp

    for name, entry in entries.items():
        tensor = torch.empty(entry.size, dtype=entry.properties.dtype)
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"model": {name: tensor}}, storage_reader=reader, no_dist=True)
        yield name, tensor
        del tensor


def _metadata_once_reader(path: str):
    """A DCP FileSystemReader that parses the checkpoint's metadata once, not once per tensor (it
    lists every tensor and optimizer entry: re-reading it per tensor would be quadratic)."""
    from torch.distributed.checkpoint import FileSystemReader

    class Reader(FileSystemReader):
        _metadata = None

        def read_metadata(self):
            if self._metadata is None:
                self._metadata = super().read_metadata()
            return self._metadata

    return Reader(path)


def megatron_state_items(ckpt: Path, config, meta: dict) -> Iterator[tuple[str, "torch.Tensor"]]:
    """A megatron dist_checkpointing directory (any TP/PP/EP layout) loaded by megatron itself,
    then streamed through the engine one tensor at a time (rank 0 receives; others yield nothing).
    One process: resharded to TP=PP=1, so the model is in that process once (never a second copy).
    Under torchrun: in the layout it was written in (TP, PP, EP from meta.json), each rank holding
    its share only."""
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
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dcfg = DistributedConfig.from_dict({**layout, "engine": "megatron"})
    else:
        dcfg = DistributedConfig(engine="megatron", transformer_impl=layout.get("transformer_impl", "auto"))
    owns = not torch.distributed.is_initialized()
    init_distributed(dcfg)
    try:
        # Built on meta and filled with zeros (rank by rank, its share only): the checkpoint
        # overwrites every weight, so drawing initial values would be wasted work.
        model = ct_model.build_model(config, device="meta")
        engine = build_engine(model, dcfg, weights=_Zeros(model))
        engine.load_checkpoint(str(ckpt / "engine"), load_optimizer=False)
    except BaseException:
        if owns:
            shutdown_distributed(dcfg)
        raise
    return _stream_then_shut_down(engine, dcfg, owns)


def _stream_then_shut_down(engine, dcfg, owns: bool) -> Iterator[tuple[str, "torch.Tensor"]]:
    from ct_parallel import shutdown_distributed

    try:
        yield from engine.full_state_items()
    finally:
        if owns:
            shutdown_distributed(dcfg)


class _Zeros:
    """A weight source (ct_model.weights) of zeros in ``model``'s shapes: a placeholder that a
    checkpoint load then overwrites."""

    def __init__(self, model):
        self.shapes = {k: tuple(v.shape) for k, v in [*model.named_parameters(), *model.named_buffers()]}

    def names(self) -> list[str]:
        return list(self.shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def rows(self, name: str, start: int, stop: int):
        import torch

        return torch.zeros((stop - start, *self.shapes[name][1:]))

    def full(self, name: str):
        import torch

        return torch.zeros(self.shapes[name])


def parse_size(text: str) -> int:
    """Bytes from '5GB', '500MB', '100KB' (decimal, as transformers' max_shard_size) or a number."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit) and upper[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(upper[: -len(unit)]) * factor)
    if upper.isdigit():
        return int(upper)
    raise argparse.ArgumentTypeError(f"--max-shard-size: {text!r} is not a size such as 5GB, 500MB or 1000000")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ct-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--arch", choices=["llama4", "llama", "deepseek_v3"],
                   help="default: deepseek_v3 for MLA/MoE models, llama4 for MobileLLM-style models "
                        "(QK-norm, interleaved RoPE), else llama")
    p.add_argument("--max-shard-size", type=parse_size, default=None, metavar="SIZE",
                   help="largest safetensors shard, e.g. 5GB (the default, as transformers), 500MB; the "
                        "export holds at most one shard in memory")
    p.add_argument("--force", action="store_true",
                   help="OUT may be a non-empty directory: the export there is replaced")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()

    def run() -> int:
        if not args.checkpoint.exists():
            raise UserFacingError(f"{args.checkpoint}: no such checkpoint or run directory")
        out = export(args.checkpoint, args.out, args.arch, args.max_shard_size, force=args.force)
        if _rank() == 0:
            print(out)
        return 0

    return run_guarded(run)


if __name__ == "__main__":
    sys.exit(main())
