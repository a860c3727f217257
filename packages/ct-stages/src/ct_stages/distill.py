"""Teacher wiring for the midtrain stage: an online teacher, or a top-k cache written once.

The cache is written over the loader's global sequence order (the loader is layout-invariant, so
a 1-process loader yields exactly the sequences every layout trains on) and read back by global
sequence index, which the trainer derives from the step: resume-safe by construction.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from .stages import DistillConfig

log = logging.getLogger("ct_stages")
_DTYPES = {None: None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
                            total_sequences: int, cache_loader_factory, hidden: bool = False,
                            compute_dtype: torch.dtype | None = None):
    """A function adding teacher targets to a microbatch (keys read by ct_distill's KD loss).

    ``hidden``: an online teacher without top-k hands over its final hidden states and output
    weight instead of full logits (the chunked loss projects them chunk by chunk).
    ``compute_dtype``: the run's (see ``load_teacher``)."""
    teacher = load_teacher(config, student_config, device, compute_dtype)
    if config.teacher == "online":
        return lambda mb: teacher.annotate(mb, config.top_k, hidden=hidden)
    from ct_distill import TeacherCacheReader, write_teacher_cache

    root = Path(config.cache_dir or run_dir / "teacher_cache")
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    if is_main and not (root / "index.json").is_file():
        log.info("writing the teacher top-%d cache for %d sequences to %s", config.top_k, total_sequences, root)
        stats = write_teacher_cache(teacher, cache_loader_factory(), root, k=config.top_k,
                                    max_sequences=total_sequences, resume=True)
        log.info("teacher cache: %.0f tokens/s, %.1f bytes/token", stats.get("tokens_per_second") or 0,
                 stats.get("bytes_per_token") or 0)
        write_stats = {k: stats.get(k) for k in ("tokens_per_second", "bytes_per_token", "write_seconds")}
        (root / "write_stats.json").write_text(json.dumps(write_stats) + "\n")
    if dist.is_initialized():
        dist.barrier()
    reader = TeacherCacheReader(root, k=config.top_k, vocab_size=teacher.vocab_size)
    del teacher  # the cache replaces it
    return lambda mb: reader.annotate(mb)
