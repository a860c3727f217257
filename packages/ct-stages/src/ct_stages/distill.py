"""Teacher wiring for the midtrain stage: an online teacher, or a top-k cache written once.

The cache is written by every process of the run: each runs the teacher over the rows its own
loader yields (a row block of every global batch; the loader is layout-invariant, so the rows are
those the training loader of any layout yields for the same global sequences) and writes its own
part. The first process then waits, on files, for every part and writes the index; the others wait
for the index.

The global sequence index (``step * B + j``) is derived once, by the ct_data loader, which attaches
it to every row (``sequence_index``). The writer places the rows of its block by its own count
(``RowBlock``) and only checks them against the loader's index; training reads the targets by the
batch's index (``Stage.microbatches`` hands it to the reader, then drops it). So the cache serves
any world size: resume-safe by construction.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ct_model.dtypes import dtypes

from .stages import DistillConfig

log = logging.getLogger("ct_stages")
_DTYPES = {None: None, **dtypes("fp32", "bf16", "fp16")}


@dataclass(frozen=True)
class CacheShare:
    """This process's share of writing the teacher cache: row block ``part`` of ``parts`` equal
    blocks of every global batch of ``batch_size`` sequences, from ``loader()`` (a loader built
    for that rank and world). ``writes=False``: another process holds the same block."""

    part: int
    parts: int
    batch_size: int
    writes: bool
    loader: Callable[[], object]

    @property
    def finalizes(self) -> bool:
        return self.writes and self.part == 0

    @property
    def rows(self) -> range:
        width = self.batch_size // self.parts
        return range(self.part * width, (self.part + 1) * width)


def cache_share(info, global_batch: int, loader_factory: Callable[[int, int], object]) -> CacheShare:
    """Every process writes when the global batch splits over all of them (a tensor- or
    pipeline-parallel rank then writes rows of its own, with its own copy of the teacher);
    otherwise one process per data-parallel rank (tensor and pipeline rank 0) writes that rank's
    rows and the others wait."""
    if global_batch % info.world_size == 0:
        rank, world, writes = info.rank, info.world_size, True
    else:
        rank, world, writes = info.dp_rank, info.dp_size, info.tp_rank == 0 and info.pp_rank == 0
    return CacheShare(rank, world, global_batch, writes, lambda: loader_factory(rank, world))


def load_teacher(config: DistillConfig, student_config, device: torch.device,
                 compute_dtype: torch.dtype | None = None):
    """The frozen teacher on ``device``, in ``stage.distill.teacher_dtype`` or, when that is unset,
    in the run's compute dtype (bf16 in a bf16 or fp8 run: the teacher's forward is then bf16
    GEMMs at half the weight memory; an fp32 run keeps the export's own dtype)."""
    from ct_distill import OnlineTeacher

    if not config.teacher_path:
        raise ValueError("stage.distill.teacher_path is not set (an HF model directory of the teacher)")
    if not (Path(config.teacher_path) / "config.json").is_file():
        raise FileNotFoundError(f"stage.distill.teacher_path={config.teacher_path}: no HF model there")
    if config.teacher_dtype not in _DTYPES:
        raise ValueError(f"stage.distill.teacher_dtype must be one of {list(_DTYPES)}, got {config.teacher_dtype!r}")
    dtype = _DTYPES[config.teacher_dtype] if config.teacher_dtype is not None else compute_dtype
    return OnlineTeacher.from_hf(config.teacher_path, dtype=dtype, device=device,
                                 student_vocab_size=student_config.vocab_size)


def build_teacher_annotator(config: DistillConfig, student_config, run_dir: Path, device: torch.device,
                            total_sequences: int, share: CacheShare, hidden: bool = False,
                            compute_dtype: torch.dtype | None = None, rows_per_forward: int | None = None):
    """A function adding teacher targets to a microbatch (keys read by ct_distill's KD loss).

    ``hidden``: an online teacher without top-k hands over its final hidden states and output
    weight instead of full logits (the chunked loss projects them chunk by chunk).
    ``compute_dtype``: the run's (see ``load_teacher``). ``share``: this process's part of writing
    a cached teacher; ``rows_per_forward``: rows per teacher forward while writing it."""
    teacher = load_teacher(config, student_config, device, compute_dtype)
    if config.teacher == "online":
        return lambda mb: teacher.annotate(mb, config.top_k, hidden=hidden)
    reader = open_teacher_cache(config, teacher, Path(config.cache_dir or run_dir / "teacher_cache"),
                                total_sequences, share, rows_per_forward)
    del teacher  # the cache replaces it
    return lambda mb: reader.annotate(mb)


def open_teacher_cache(config: DistillConfig, teacher, root: Path, total_sequences: int, share: CacheShare,
                       rows_per_forward: int | None, poll: float = 2.0):
    """Write this process's part of the cache unless the cache is complete, wait for the index,
    and open it: a cache of another teacher, an index that does not match its files or a truncated
    shard is an error naming the file here, before step 1."""
    from ct_distill import CacheError, TeacherCacheReader, finalize_teacher_cache, wait_for_teacher_cache

    if not (root / "index.json").is_file():
        part = _write_part(teacher, share, root, config.top_k, total_sequences, rows_per_forward) if share.writes else None
        # Waiting is on files, not a collective: it ends with an error naming the missing part(s)
        # once none has gained a shard for stage.distill.cache_wait_s seconds.
        if share.finalizes:
            index = finalize_teacher_cache(root, batch_size=share.batch_size, parts=share.parts,
                                           num_seqs=total_sequences, expect=part,
                                           stall_timeout=config.cache_wait_s, poll=poll)
            _write_stats(root, index)
        else:
            wait_for_teacher_cache(root, stall_timeout=config.cache_wait_s, poll=poll)
    reader = TeacherCacheReader(root, k=config.top_k, vocab_size=teacher.vocab_size, teacher=teacher.identity())
    if reader.num_seqs < total_sequences and not reader.index.get("exhausted"):
        raise CacheError(f"{root / 'index.json'}: holds {reader.num_seqs} sequences but the run needs "
                         f"{total_sequences} (trainer.max_steps x trainer.global_batch_size); delete the cache "
                         f"or set stage.distill.cache_dir elsewhere to write a longer one")
    return reader


def _write_part(teacher, share: CacheShare, root: Path, k: int, total_sequences: int,
                rows_per_forward: int | None) -> dict:
    from ct_distill import write_teacher_cache

    log.info("writing rows %d/%d of the teacher top-%d cache (%d sequences in all) to %s", share.part,
             share.parts, k, total_sequences, root)
    loader = share.loader()
    try:
        part = write_teacher_cache(teacher, loader, root, k=k, max_sequences=total_sequences, resume=True,
                                   batch_size=share.batch_size, rows=share.rows, rows_per_forward=rows_per_forward)
    finally:
        if hasattr(loader, "close"):
            loader.close()
    log.info("teacher cache part %s: %.0f tokens/s, %.1f bytes/token", part.get("dir"),
             part.get("tokens_per_second") or 0, part.get("part_bytes_per_token") or 0)
    return part


def _write_stats(root: Path, index: dict) -> None:
    """write_stats.json: the parts' tokens written over the slowest part's time (what tools read)."""
    parts = [json.loads((root / p["dir"] / "part.json").read_text()) for p in index["parts"]]
    seconds = max((p.get("write_seconds") or 0.0) for p in parts)
    tokens = sum(p.get("tokens_written") or 0 for p in parts)
    stats = {"tokens_per_second": tokens / seconds if seconds > 0 else None,
             "bytes_per_token": index.get("bytes_per_token"), "write_seconds": seconds,
             "parts": len(parts), "per_part_tokens_per_second": [p.get("tokens_per_second") for p in parts]}
    (root / "write_stats.json").write_text(json.dumps(stats) + "\n")
