"""Turning records into token items: pretraining documents and SFT conversations.

An item is either a ``Doc`` (one or more pieces of token ids with their shifted labels) or a
``Skip`` holding the reason the record was not used. Labels follow the project's convention:
``labels[t]`` is the target at position t (already shifted), ``-100`` where nothing is predicted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ct_model.batch import IGNORE_INDEX as IGNORE

from ct_data.chat import ChatFormatError, validate_messages
from ct_data.config import SourceConfig
from ct_data.sources import (
    SKIP_BAD_MESSAGES,
    SKIP_NO_TARGET,
    SKIP_TOO_LONG,
    extract_messages,
    extract_text,
)
from ct_data.tokenizer import Tokenizer

LONG_DOC_POLICIES = ("split", "truncate")
SFT_TRUNCATION = ("drop", "truncate")
SFT_LOSS = ("assistant", "all")


@dataclass(slots=True)
class Piece:
    """A run of tokens packed as one document (position_ids restart, own document_id).

    ``ids`` and ``labels`` are int64 arrays: the packer copies slices of them into the batch, so
    its cost is per piece, not per token. ``ref`` is (position, piece number) when the piece can be
    read again from a prepared source: a carried-over piece is then saved as that, not its tokens.
    """

    ids: np.ndarray
    labels: np.ndarray
    ref: tuple[int, int] | None = None


@dataclass(slots=True)
class Doc:
    pieces: list[Piece]
    ntok: int  # tokens kept
    lost: int = 0  # tokens dropped by truncation
    split: bool = False  # cut into several pieces by the length cap


@dataclass(slots=True)
class Skip:
    reason: str
    extra: dict[str, Any] = field(default_factory=dict)


def next_token_labels(ids: np.ndarray) -> np.ndarray:
    """labels[t] = ids[t+1]; the last token predicts nothing (the next document is not its continuation)."""
    labels = np.empty_like(ids)
    labels[:-1] = ids[1:]
    if len(ids):
        labels[-1] = IGNORE
    return labels


def as_ids(ids) -> np.ndarray:
    return np.asarray(ids, dtype=np.int64)


class PretrainProcessor:
    """Text -> [BOS] + tokens (+ [EOS]), cut into pieces of at most ``max_doc_tokens``."""

    def __init__(self, tokenizer: Tokenizer, *, add_bos: bool = True, add_eos: bool = True,
                 max_doc_tokens: int | None = None, long_doc_policy: str = "split"):
        if long_doc_policy not in LONG_DOC_POLICIES:
            raise ValueError(f"long_doc_policy must be one of {LONG_DOC_POLICIES}, got {long_doc_policy!r}")
        if max_doc_tokens is not None and max_doc_tokens < 2:
            raise ValueError(f"max_doc_tokens must be >= 2 or None, got {max_doc_tokens}")
        self.tok = tokenizer
        self.add_bos, self.add_eos = add_bos, add_eos
        self.cap = max_doc_tokens
        self.policy = long_doc_policy

    def fields(self, src: SourceConfig) -> list[str]:
        return src.text_fields()

    def __call__(self, src: SourceConfig, records: list[dict[str, Any]]) -> list[Doc | Skip]:
        texts = [extract_text(src, r) for r in records]
        good = [t for t in texts if isinstance(t, str)]
        encoded = iter(self.tok.encode_batch(good, add_bos=self.add_bos, add_eos=self.add_eos) if good else [])
        out: list[Doc | Skip] = []
        for t in texts:
            out.append(Skip(t[0]) if isinstance(t, tuple) else self._doc(as_ids(next(encoded))))
        return out

    def from_tokens(self, tokens: np.ndarray) -> Doc:
        """A document from its text's token ids (a prepared source): BOS/EOS added as configured."""
        n = len(tokens) + self.add_bos + self.add_eos
        ids = np.empty(n, dtype=np.int64)
        ids[self.add_bos:n - self.add_eos] = tokens
        if self.add_bos:
            ids[0] = self.tok.bos_id
        if self.add_eos:
            ids[-1] = self.tok.eos_id
        return self._doc(ids)

    def _doc(self, ids: np.ndarray) -> Doc:
        cap = self.cap
        if cap is None or len(ids) <= cap:
            return Doc([Piece(ids, next_token_labels(ids))], len(ids))
        if self.policy == "truncate":
            kept = ids[:cap]
            return Doc([Piece(kept, next_token_labels(kept))], cap, lost=len(ids) - cap)
        pieces = [ids[i:i + cap] for i in range(0, len(ids), cap)]
        return Doc([Piece(p, next_token_labels(p)) for p in pieces], len(ids), split=True)


class SFTProcessor:
    """Conversation -> LLaMA-3 chat tokens with labels on assistant tokens (or on all tokens)."""

    def __init__(self, tokenizer: Tokenizer, *, max_tokens: int, truncation: str = "drop", loss_on: str = "assistant"):
        if truncation not in SFT_TRUNCATION:
            raise ValueError(f"truncation must be one of {SFT_TRUNCATION}, got {truncation!r}")
        if loss_on not in SFT_LOSS:
            raise ValueError(f"loss_on must be one of {SFT_LOSS}, got {loss_on!r}")
        self.tok = tokenizer
        self.max_tokens = max_tokens
        self.truncation = truncation
        self.loss_on = loss_on

    def fields(self, src: SourceConfig) -> list[str]:
        return src.chat_fields()

    def __call__(self, src: SourceConfig, records: list[dict[str, Any]]) -> list[Doc | Skip]:
        convs: list[list[dict[str, str]] | tuple[str]] = []
        for r in records:
            m = extract_messages(src, r)
            if not isinstance(m, tuple):
                try:
                    m = validate_messages(m)
                except ChatFormatError:
                    m = (SKIP_BAD_MESSAGES,)
            convs.append(m)
        good = [c for c in convs if not isinstance(c, tuple)]
        encoded = iter(self.tok.encode_chats_with_mask(good) if good else [])
        out: list[Doc | Skip] = []
        for c in convs:
            out.append(Skip(c[0]) if isinstance(c, tuple) else self._doc(*next(encoded)))
        return out

    def _doc(self, ids_list: list[int], mask: list[bool]) -> Doc | Skip:
        ids = as_ids(ids_list)
        n = len(ids)
        if self.loss_on == "all":
            labels = next_token_labels(ids)
        else:
            labels = np.full(n, IGNORE, dtype=np.int64)
            if n > 1:
                labels[:-1] = np.where(np.asarray(mask[1:], dtype=bool), ids[1:], IGNORE)
        lost = 0
        if n > self.max_tokens:
            if self.truncation == "drop":
                return Skip(SKIP_TOO_LONG)
            # Keep the beginning (system, prompt, start of the answer); the last kept token
            # predicts nothing because its target was cut off.
            lost = n - self.max_tokens
            ids, labels = ids[: self.max_tokens], labels[: self.max_tokens].copy()
            labels[-1] = IGNORE
            if (labels == IGNORE).all():
                return Skip(SKIP_NO_TARGET)
        return Doc([Piece(ids, labels)], len(ids), lost=lost)
