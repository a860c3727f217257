"""Probe sets: per capability domain, samples whose loss the mixture should lower.

A probe is ``NAME=PATH`` (or ``NAME=PATH#FIELD`` to read another text field): PATH is anything a
ct-data source takes (local jsonl/parquet/txt, glob, HF dataset name). The embedded default builds
code, math and knowledge probes from the parts of the sample data that are NOT in its training
files: held-out math problems (math/eval.jsonl); pydoc topics, standard-library source files and
module docstrings that the sample build left out of code/ and prose/ (budgeted or scaled away), then
the standard-library directories it never reads (idlelib, turtledemo, lib2to3, ensurepip).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ct_data import SourceConfig

from .errors import DatamixError

EMBEDDED_DOMAINS = ("code", "math", "knowledge")


def parse_probe(spec: str) -> SourceConfig:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise DatamixError(f"probe {spec!r}: expected NAME=PATH (or NAME=PATH#FIELD)")
    path, _, field = path.partition("#")
    local = os.path.sep in path or Path(path).suffix in (".jsonl", ".json", ".parquet", ".txt")
    if local and not any(ch in path for ch in "*?[") and not Path(path).exists():
        raise DatamixError(f"probe {name!r}: file {path!r} does not exist")
    return SourceConfig(name=name, path=path, text_field=field or "text")


# Standard-library directories the sample build never reads: held out by construction.
HELD_OUT_DIRS = ("idlelib", "turtledemo", "lib2to3", "ensurepip")


def _candidate_files(docs) -> list[str]:
    """The sample build's own candidate files, then those of HELD_OUT_DIRS (relative paths)."""
    root = Path(docs.stdlib_dir())
    extra = sorted(str(p.relative_to(root)).replace(os.sep, "/") for d in HELD_OUT_DIRS
                   for p in (root / d).rglob("*.py") if "__pycache__" not in p.parts and "tests" not in p.parts)
    return docs.stdlib_files() + extra


def build_sample_probes(sample_dir: str | os.PathLike, out_dir: str | os.PathLike, n: int = 64) -> dict[str, str]:
    """Write code / math / knowledge probe files (``text`` field) from held-out sample data; returns paths."""
    import pyarrow.parquet as pq

    from ct_data.sample import docs

    d, out = Path(sample_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trained_code = set(pq.read_table(d / "code" / "train.parquet", columns=["path"]).column(0).to_pylist())
    with open(d / "prose" / "train.jsonl", encoding="utf-8") as f:
        trained_docs = {json.loads(line)["source"] for line in f}
    knowledge = [text for name, text in docs.pydoc_topics() if f"pydoc:{name}" not in trained_docs][:n]
    code: list[str] = []
    for rel in _candidate_files(docs):
        if len(code) >= n and len(knowledge) >= n:
            break
        src = docs.read_source(rel)
        if not src or not src.strip():
            continue
        if rel not in trained_code and len(code) < n:
            code.append(src)
        md = docs.module_docs(rel, src)
        if md is not None and f"docstrings:{md.module}" not in trained_docs and len(knowledge) < n:
            knowledge.append(md.text())
    with open(d / "math" / "eval.jsonl", encoding="utf-8") as f:
        math = [f"{r['question']}\n{r['solution']}" for r in map(json.loads, f)][:n]
    paths = {}
    for name, texts in (("code", code), ("math", math), ("knowledge", knowledge)):
        if not texts:
            raise DatamixError(f"embedded probe {name!r}: no held-out sample data left in {str(d)!r}")
        paths[name] = str(out / f"{name}.jsonl")
        Path(paths[name]).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return paths
