"""Fixtures: a small BPE trained on the spot and a small sample corpus."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ctdata_helpers import WORDS  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    import pydoc_data.topics

    from ct_data import train_tokenizer

    texts = list(pydoc_data.topics.topics.values())[:40]
    texts += [" ".join(ws) for ws in WORDS.values()] * 20
    return train_tokenizer(texts, 1024, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory):
    from ct_data import sample

    d = tmp_path_factory.mktemp("sample")
    sample.build(d, seed=0, scale=0.05)
    return d
