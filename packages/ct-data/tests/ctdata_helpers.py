"""Helpers shared by the ct-data tests (imported by name: conftest adds this folder to sys.path)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
GSM8K_DIR = REPO.parent / "shared" / "data" / "gsm8k"

WORDS = {
    # Disjoint vocabularies, so a document's source can be told from its text alone.
    "a": "apple banana cherry grape lemon mango melon peach pear plum".split(),
    "b": "red green blue black white yellow purple orange pink brown".split(),
    "c": "one two three four five six seven eight nine ten".split(),
}


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def make_docs(source: str, n: int, seed: int, lo: int = 1, hi: int = 60) -> list[str]:
    """n documents of lo..hi words from the source's own vocabulary, each starting with a unique tag."""
    rng = random.Random(f"{source}:{seed}")
    words = WORDS[source]
    return [f"{source}{i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi))) for i in range(n)]


def source_of(text: str) -> str:
    """The source of a document (or piece of one): its tag if it starts with one, else its words."""
    m = re.match(r"^(?:<\|begin_of_text\|>)?([abc])\d+:", text)
    if m:
        return m.group(1)
    hits = {s for s, ws in WORDS.items() if any(w in text for w in ws)}
    assert len(hits) == 1, f"text mixes sources {hits}: {text[:80]!r}"
    return hits.pop()


def row_stream(batches, row=0):
    """The concatenated columns of one row over several batches (lists of ints)."""
    import torch

    keys = ("input_ids", "labels", "position_ids", "document_ids")
    cat = {k: torch.cat([b[k][row] for b in batches]).tolist() for k in keys}
    return cat["input_ids"], cat["labels"], cat["position_ids"], cat["document_ids"]


def split_pieces(ids, pos, doc=None):
    """Cut a row stream into pieces at every position 0 that is not padding (doc id -1)."""
    pieces = []
    for i, (t, p) in enumerate(zip(ids, pos)):
        if doc is not None and doc[i] == -1:
            continue
        if p == 0 or not pieces:
            pieces.append([])
        pieces[-1].append(t)
    return pieces
