"""Shared fixtures for the cross-package (CLI, end-to-end) tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cli_support import SAMPLE_SCALE  # noqa: E402


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    """Sample data and its tokenizer, built once for the whole session."""
    from ct_data import sample

    out = tmp_path_factory.mktemp("sample")
    sample.build(out, seed=0, scale=SAMPLE_SCALE)
    sample.build_tokenizer(out, 8192, split_digits=True)  # what the default config trains
    return out


