"""The embedded sample corpus: local datasets built from the Python install and a math generator.

``build(out_dir, seed)`` writes::

    prose/train.jsonl          {"text", "source"}          pydoc topics + stdlib docstrings
    code/train.parquet         {"content", "path"}         stdlib source files
    math/train.jsonl           {"text", "question", "solution", "answer"}
    math/eval.jsonl            {"question", "solution", "answer"}   held out (disjoint keys)
    sft_general/train.jsonl    {"messages"}                instructions from the docs
    sft_reasoning/train.parquet {"messages"}               system prompt + math question -> solution
    manifest.json              seed, scale, versions, sha256 of every file

The same seed (and scale) on the same Python gives byte-identical files; a second ``build`` with a
matching manifest returns at once. The files are read by the loaders through the same code path as
real data (see ``pretrain_sources`` / ``sft_sources`` and configs/data/sample_*.yaml).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ct_data.config import SourceConfig
from ct_data.sample import docs as _docs
from ct_data.sample.math import REASONING_SYSTEM_PROMPT, Problem, is_eval_key, problems

SAMPLE_VERSION = 2  # 2: column work inside each arithmetic step
FILES = {
    "prose": "prose/train.jsonl",
    "code": "code/train.parquet",
    "math": "math/train.jsonl",
    "math_eval": "math/eval.jsonl",
    "sft_general": "sft_general/train.jsonl",
    "sft_reasoning": "sft_reasoning/train.parquet",
}
# Sizes at scale 1.0: about 0.5M prose, 0.8M code and 0.8M math tokens with an 8k-entry BPE.
BASE_SIZES = {
    "docstring_chars": 1_000_000,
    "code_chars": 2_500_000,
    "math_train": 15_000,
    "math_eval": 500,
    "sft_general": 3_000,
    "sft_reasoning": 4_000,
}

__all__ = ["REASONING_SYSTEM_PROMPT", "Problem", "build", "is_eval_key", "load_math_eval", "pretrain_sources",
           "problems", "sft_sources", "tokenizer_texts", "build_tokenizer", "FILES"]


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode("utf-8")


def _parquet(rows: list[dict[str, Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf, compression="zstd")
    return buf.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # readers (or other ranks building the same directory) never see a partial file


def _manifest_key(seed: int, scale: float) -> dict[str, Any]:
    return {"version": SAMPLE_VERSION, "seed": seed, "scale": scale, "python": platform.python_version()}


def _sizes(scale: float) -> dict[str, int]:
    return {k: max(1, int(round(v * scale))) for k, v in BASE_SIZES.items()}


def _up_to_date(out: Path, key: dict[str, Any]) -> bool:
    try:
        man = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    if any(man.get(k) != v for k, v in key.items()):
        return False
    for rel, digest in man.get("files", {}).items():
        p = out / rel
        if not p.is_file() or hashlib.sha256(p.read_bytes()).hexdigest() != digest:
            return False
    return set(man.get("files", {})) == set(FILES.values())


def build(out_dir: str | os.PathLike, seed: int = 0, *, scale: float = 1.0, force: bool = False) -> dict[str, str]:
    """Write the sample datasets under ``out_dir``; returns {dataset: file path}.

    ``scale`` multiplies every size (tests use small scales). Skips the work when ``out_dir`` already
    holds a build with the same seed, scale and Python version (checked against the manifest's hashes).
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    out = Path(out_dir)
    key = _manifest_key(seed, float(scale))
    paths = {name: str(out / rel) for name, rel in FILES.items()}
    if not force and _up_to_date(out, key):
        return paths
    sizes = _sizes(scale)
    files = _docs.stdlib_files()

    # Prose: every pydoc topic (scaled) plus module docstrings up to a character budget.
    rng = random.Random(f"ct_data.sample:{seed}:prose")
    topics = _docs.pydoc_topics()
    if scale < 1:
        topics = rng.sample(topics, max(1, int(len(topics) * scale)))
    prose = [{"text": text, "source": f"pydoc:{name}"} for name, text in topics]
    order = files[:]
    rng.shuffle(order)
    modules, budget = [], sizes["docstring_chars"]
    for rel in order:
        if budget <= 0:
            break
        src = _docs.read_source(rel)
        md = _docs.module_docs(rel, src) if src else None
        if md is not None:
            modules.append(md)
            text = md.text()
            budget -= len(text)
            prose.append({"text": text, "source": f"docstrings:{md.module}"})
    rng.shuffle(prose)

    # Code: whole source files up to a character budget.
    rng = random.Random(f"ct_data.sample:{seed}:code")
    order = files[:]
    rng.shuffle(order)
    code, budget = [], sizes["code_chars"]
    for rel in order:
        if budget <= 0:
            break
        src = _docs.read_source(rel)
        if src and src.strip():
            code.append({"content": src, "path": rel})
            budget -= len(src)

    # Math: train problems (keys outside the eval split) and the held-out eval split.
    train_it = problems(seed, "train")
    math_train = [next(train_it) for _ in range(sizes["math_train"])]
    eval_it = problems(seed, "eval")
    math_eval = [next(eval_it) for _ in range(sizes["math_eval"])]
    sft_it = problems(seed + 1_000_003, "train")
    reasoning = [{"messages": next(sft_it).chat()} for _ in range(sizes["sft_reasoning"])]

    rng = random.Random(f"ct_data.sample:{seed}:sft_general")
    general = [{"messages": m} for m in _docs.general_chats(rng, modules, topics, sizes["sft_general"])]

    blobs = {
        FILES["prose"]: _jsonl(prose),
        FILES["code"]: _parquet(code),
        FILES["math"]: _jsonl([{"text": p.text(), "question": p.question, "solution": p.solution,
                                "answer": p.answer} for p in math_train]),
        FILES["math_eval"]: _jsonl([{"question": p.question, "solution": p.solution, "answer": p.answer}
                                    for p in math_eval]),
        FILES["sft_general"]: _jsonl(general),
        FILES["sft_reasoning"]: _parquet(reasoning),
    }
    for rel, data in blobs.items():
        _write_atomic(out / rel, data)
    manifest = {**key, "files": {rel: hashlib.sha256(d).hexdigest() for rel, d in blobs.items()},
                "counts": {"prose": len(prose), "code": len(code), "math": len(math_train),
                           "math_eval": len(math_eval), "sft_general": len(general),
                           "sft_reasoning": len(reasoning)}}
    _write_atomic(out / "manifest.json", (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return paths


# ----------------------------------------------------------------------------- helpers for users
def pretrain_sources(sample_dir: str | os.PathLike, weights: dict[str, float] | None = None) -> list[SourceConfig]:
    """SourceConfigs over the sample prose, code and math (default weights 0.4 / 0.3 / 0.3)."""
    w = {"prose": 0.4, "code": 0.3, "math": 0.3, **(weights or {})}
    d = Path(sample_dir)
    return [
        SourceConfig("prose", str(d / FILES["prose"]), weight=w["prose"]),
        SourceConfig("code", str(d / FILES["code"]), weight=w["code"], text_field="content"),
        SourceConfig("math", str(d / FILES["math"]), weight=w["math"]),
    ]


def sft_sources(sample_dir: str | os.PathLike, kind: str = "reasoning") -> list[SourceConfig]:
    """SourceConfigs of the sample chats: kind "general", "reasoning" or "both"."""
    d = Path(sample_dir)
    out = []
    if kind in ("general", "both"):
        out.append(SourceConfig("sft_general", str(d / FILES["sft_general"])))
    if kind in ("reasoning", "both"):
        out.append(SourceConfig("sft_reasoning", str(d / FILES["sft_reasoning"])))
    if not out:
        raise ValueError(f"kind must be 'general', 'reasoning' or 'both', got {kind!r}")
    return out


def load_math_eval(sample_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The held-out math problems: dicts with question, solution and the exact integer answer."""
    with open(Path(sample_dir) / FILES["math_eval"], encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def tokenizer_texts(sample_dir: str | os.PathLike, max_chars: int = 3_000_000) -> Iterator[str]:
    """A deterministic subsample of prose, code, math and chat text for training a tokenizer."""
    import pyarrow.parquet as pq

    d = Path(sample_dir)
    share = {"prose": 0.35, "code": 0.35, "math": 0.15, "sft": 0.15}

    def take(texts: Iterator[str], budget: float) -> Iterator[str]:
        for t in texts:
            if budget <= 0:
                return
            budget -= len(t)
            yield t

    def jsonl(rel: str, field: str) -> Iterator[Any]:
        with open(d / rel, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)[field]

    yield from take(jsonl(FILES["prose"], "text"), share["prose"] * max_chars)
    yield from take(iter(pq.read_table(d / FILES["code"], columns=["content"]).column(0).to_pylist()),
                    share["code"] * max_chars)
    yield from take(jsonl(FILES["math"], "text"), share["math"] * max_chars)
    chats = (m["content"] for msgs in jsonl(FILES["sft_general"], "messages") for m in msgs)
    yield from take(chats, share["sft"] * max_chars)


def build_tokenizer(sample_dir: str | os.PathLike, vocab_size: int = 8192, out_dir: str | os.PathLike | None = None,
                    *, max_chars: int = 3_000_000, split_digits: bool = False):
    """Train (or load, when already there) the embedded default tokenizer on the sample corpus.

    Saved to ``out_dir`` (default ``<sample_dir>/tokenizer-<vocab_size>``).
    """
    from ct_data.tokenizer import load_tokenizer, train_tokenizer

    default_name = f"tokenizer-{vocab_size}" + ("-digits" if split_digits else "")
    out = Path(out_dir) if out_dir is not None else Path(sample_dir) / default_name
    stamp = out / "ct_data_source.json"
    want = {"manifest_sha256": hashlib.sha256((Path(sample_dir) / "manifest.json").read_bytes()).hexdigest(),
            "vocab_size": vocab_size, "max_chars": max_chars, "split_digits": split_digits}
    try:
        if json.loads(stamp.read_text()) == want:
            return load_tokenizer(out)
    except (OSError, ValueError):
        pass
    tok = train_tokenizer(tokenizer_texts(sample_dir, max_chars), vocab_size, out, split_digits=split_digits)
    stamp.write_text(json.dumps(want, sort_keys=True) + "\n")
    return tok
