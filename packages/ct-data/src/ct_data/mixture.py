"""Data mixtures as configuration (the YAML files under configs/data/), turned into loaders.

A mixture file holds::

    name: pretrain_phase1
    kind: pretrain                    # or sft
    tokenizer: meta-llama/Llama-3.2-1B   # optional: the tokenizer the recipe names
    loader: {packing: per_source, add_eos: false}   # keyword arguments of build_*_loader
    sources:
      - {name: fineweb_edu, path: HuggingFaceFW/fineweb-edu, weight: 63.75}

``{sample_dir}`` in a source path stands for the directory written by ``ct_data.sample.build``.
Plain dicts and Hydra/OmegaConf containers are accepted as well as file paths.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ct_data.config import DataConfigError, SourceConfig, normalize_sources

KINDS = ("pretrain", "sft")
_COMMON = {"on_exhausted", "max_epochs", "mix_jitter", "prefetch", "read_batch", "validate", "workers"}
LOADER_OPTIONS = {
    "pretrain": _COMMON | {"packing", "add_bos", "add_eos", "max_doc_tokens", "long_doc_policy"},
    "sft": _COMMON | {"packing", "loss_on", "truncation", "max_example_tokens", "lookahead"},
}
# Loader options that existed once: a config still setting one is told what replaced it.
_REMOVED_LOADER_OPTIONS = {
    "micro_batch_size": "the trainer splits each batch into micro-batches: set trainer.micro_batch_size",
}
_TOP_KEYS = {"name", "kind", "tokenizer", "loader", "sources", "notes", "left_out"}


def _plain(x: Any) -> Any:
    """OmegaConf containers (or any mapping/sequence) as plain dicts and lists."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, Sequence) and not isinstance(x, (str, bytes)):
        return [_plain(v) for v in x]
    return x


@dataclass
class DataMixture:
    name: str
    kind: str
    sources: list[SourceConfig]
    loader_options: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    notes: str = ""

    def build_loader(self, tokenizer, seq_len: int, batch_size: int, seed: int, rank: int = 0,
                     world_size: int = 1, **overrides: Any):
        from ct_data.loader import build_pretrain_loader, build_sft_loader

        opts = {**self.loader_options, **overrides}
        build = build_pretrain_loader if self.kind == "pretrain" else build_sft_loader
        return build(self.sources, tokenizer, seq_len, batch_size, seed, rank, world_size, **opts)


def load_data_config(config: str | os.PathLike | Mapping[str, Any], *, sample_dir: str | os.PathLike | None = None
                     ) -> DataMixture:
    """Read a mixture from a YAML file or a mapping; ``{sample_dir}`` in paths is filled in."""
    where = "data config"
    if isinstance(config, (str, os.PathLike)):
        import yaml

        where = f"data config {os.fspath(config)!r}"
        with open(config) as f:
            config = yaml.safe_load(f)
    d = _plain(config)
    if not isinstance(d, dict):
        raise DataConfigError(f"{where}: expected a mapping at the top level")
    unknown = sorted(set(d) - _TOP_KEYS)
    if unknown:
        raise DataConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(_TOP_KEYS)}")
    kind = d.get("kind", "pretrain")
    if kind not in KINDS:
        raise DataConfigError(f"{where}: field 'kind' must be one of {KINDS}, got {kind!r}")
    loader = d.get("loader") or {}
    for key in sorted(set(loader) & set(_REMOVED_LOADER_OPTIONS)):
        raise DataConfigError(f"{where}: loader option {key!r} was removed; {_REMOVED_LOADER_OPTIONS[key]}")
    bad = sorted(set(loader) - LOADER_OPTIONS[kind])
    if bad:
        raise DataConfigError(f"{where}: unknown loader option(s) {bad} for kind {kind!r}; "
                              f"known: {sorted(LOADER_OPTIONS[kind])}")
    if "sources" not in d:
        raise DataConfigError(f"{where}: field 'sources' is missing")
    sources = normalize_sources(d["sources"])
    out = []
    for s in sources:
        if "{sample_dir}" in s.path:
            if sample_dir is None:
                raise DataConfigError(f"source {s.name!r}: field 'path' {s.path!r} needs sample_dir "
                                      f"(the directory written by ct_data.sample.build)")
            s = replace(s, path=s.path.replace("{sample_dir}", os.fspath(sample_dir)))
        out.append(s)
    return DataMixture(name=d.get("name", ""), kind=kind, sources=out, loader_options=dict(loader),
                       tokenizer=d.get("tokenizer"), notes=d.get("notes", ""))
