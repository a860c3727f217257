"""Documents of a source as token tensors: the units whose influence is measured."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ct_data import SourceConfig
from ct_data.sources import extract_text, iter_record_batches, open_dataset

from .errors import DatamixError

POOL_FACTOR = 4  # samples are drawn from the first POOL_FACTOR x n valid documents of a source


@dataclass
class Sample:
    source: str
    index: int            # position of the record in the source
    text: str
    ids: torch.Tensor     # BOS + tokens, at most max_tokens


def read_texts(src: SourceConfig, limit: int) -> list[tuple[int, str]]:
    """The first ``limit`` valid (index, text) documents of a source."""
    out: list[tuple[int, str]] = []
    pos = 0
    for batch in iter_record_batches(src, open_dataset(src), 0, 256):
        for record in batch:
            text = extract_text(src, record)
            if not isinstance(text, tuple):
                out.append((pos, text))
            pos += 1
            if len(out) >= limit:
                return out
    return out


def draw_samples(src: SourceConfig, tokenizer, n: int, max_tokens: int, seed: int, what: str = "source") -> list[Sample]:
    """``n`` documents of ``src`` (deterministic for ``seed``), tokenised with BOS and cut to ``max_tokens``."""
    if n < 1:
        raise DatamixError(f"{what} {src.name!r}: samples per source must be >= 1, got {n}")
    pool = read_texts(src, POOL_FACTOR * n)
    if not pool:
        raise DatamixError(f"{what} {src.name!r}: zero usable samples in {src.path!r}")
    chosen = sorted(random.Random(f"{seed}:{src.name}").sample(range(len(pool)), min(n, len(pool))))
    out = []
    for k in chosen:
        index, text = pool[k]
        ids = [tokenizer.bos_id, *tokenizer.encode(text)][:max_tokens]
        if len(ids) >= 2:  # at least one next-token target
            out.append(Sample(src.name, index, text, torch.tensor(ids, dtype=torch.long)))
    if not out:
        raise DatamixError(f"{what} {src.name!r}: zero samples with at least one token in {src.path!r}")
    return out
