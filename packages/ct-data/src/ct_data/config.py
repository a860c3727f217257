"""Source configuration: one dataclass per data source, validated at construction."""

from __future__ import annotations

import dataclasses
import math
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ct_model.errors import UserError

FILE_FORMATS = ("json", "parquet", "text", "indexed")  # indexed: pre-tokenized .bin/.idx shards
TEXT_SAMPLE_BY = ("document", "paragraph", "line")


class DataConfigError(UserError):
    """A configuration error, raised before any data is read; the message names the source and field."""


@dataclass(frozen=True)
class SourceConfig:
    """One data source.

    ``path`` is a local file, directory or glob (parquet, jsonl, json, txt), an ``hf://datasets/...``
    file path or glob, or a HF hub dataset name (read with ``streaming=True``). With
    ``file_format="indexed"`` (pretraining only) it is a directory written by ``ct-data tokenize``
    or megatron ``.bin``/``.idx`` data (ct_data.prepared).

    Pretraining reads ``text_field`` (or formats ``text_template`` with the record's fields, e.g.
    ``"{question}\\n{answer}"``). SFT reads ``messages_field`` (a list of {role, content}), or, when
    ``prompt_field`` and ``response_field`` are set, builds a user/assistant pair from them, with an
    optional ``system_prompt``.
    """

    name: str
    path: str
    weight: float = 1.0
    text_field: str = "text"
    messages_field: str = "messages"
    prompt_field: str | None = None
    response_field: str | None = None
    system_prompt: str | None = None
    text_template: str | None = None
    # hub datasets
    subset: str | None = None
    split: str = "train"
    data_files: str | tuple[str, ...] | None = None
    revision: str | None = None
    # local files
    file_format: str | None = None  # override the extension: json | parquet | text; indexed (ct-data tokenize)
    text_sample_by: str = "document"  # .txt files: one document per file, paragraph or line
    # a document containing U+FFFD (what an invalid UTF-8 byte decodes to) counts as undecodable
    allow_replacement_char: bool = False
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        def err(field_name: str, msg: str) -> DataConfigError:
            return DataConfigError(f"source {self.name!r}: field {field_name!r} {msg}")

        if not isinstance(self.name, str) or not self.name:
            raise DataConfigError(f"source name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.path, str) or not self.path:
            raise err("path", f"must be a non-empty string, got {self.path!r}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)):
            raise err("weight", f"must be a number, got {self.weight!r}")
        if not math.isfinite(self.weight) or self.weight < 0:
            raise err("weight", f"must be finite and >= 0, got {self.weight!r}")
        for f in ("text_field", "messages_field", "split"):
            v = getattr(self, f)
            if not isinstance(v, str) or not v:
                raise err(f, f"must be a non-empty string, got {v!r}")
        if (self.prompt_field is None) != (self.response_field is None):
            raise err("prompt_field" if self.prompt_field is None else "response_field",
                      "must be set together with the other of prompt_field/response_field")
        if self.file_format is not None and self.file_format not in FILE_FORMATS:
            raise err("file_format", f"must be one of {FILE_FORMATS}, got {self.file_format!r}")
        if self.text_sample_by not in TEXT_SAMPLE_BY:
            raise err("text_sample_by", f"must be one of {TEXT_SAMPLE_BY}, got {self.text_sample_by!r}")
        if self.text_template is not None:
            try:
                keys = self.template_fields()
            except ValueError as e:
                raise err("text_template", f"is not a valid format string: {e}") from None
            if not keys:
                raise err("text_template", "names no field (use {field} placeholders)")
        if isinstance(self.data_files, list):
            object.__setattr__(self, "data_files", tuple(self.data_files))

    def template_fields(self) -> list[str]:
        if self.text_template is None:
            return []
        return [f for _, f, _, _ in string.Formatter().parse(self.text_template) if f]

    def text_fields(self) -> list[str]:
        """The record fields pretraining reads."""
        return self.template_fields() if self.text_template else [self.text_field]

    def chat_fields(self) -> list[str]:
        """The record fields SFT reads."""
        if self.prompt_field is not None:
            return [self.prompt_field, self.response_field]  # type: ignore[list-item]
        return [self.messages_field]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, name: str | None = None) -> "SourceConfig":
        if not isinstance(d, Mapping):  # e.g. data.sources=[1,2] on the command line
            raise DataConfigError(f"data.sources: each source is a mapping with at least name and path "
                                  f"(data.sources=[{{name: web, path: web.jsonl}}]), got {d!r}")
        d = dict(d)
        if name is not None:
            d.setdefault("name", name)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DataConfigError(f"source {d.get('name')!r}: unknown field(s) {unknown}; known: {sorted(known)}")
        if "name" not in d or "path" not in d:
            raise DataConfigError(f"source {d.get('name')!r}: fields 'name' and 'path' are required")
        return cls(**d)


def normalize_sources(sources: Sequence[SourceConfig | Mapping[str, Any]] | Mapping[str, Any]) -> list[SourceConfig]:
    """Accept SourceConfigs, dicts, or a {name: dict} mapping; check names and weights."""
    if isinstance(sources, Mapping):
        items = [SourceConfig.from_dict(v, name=k) for k, v in sources.items()]
    else:
        items = [s if isinstance(s, SourceConfig) else SourceConfig.from_dict(s) for s in sources]
    if not items:
        raise DataConfigError("no data sources given")
    names = [s.name for s in items]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataConfigError(f"duplicate source name(s) {dup}")
    if sum(s.weight for s in items) <= 0:
        raise DataConfigError(f"source weights are all zero ({', '.join(names)}): field 'weight' must be > 0 "
                              "for at least one source")
    return items
