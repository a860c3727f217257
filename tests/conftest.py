"""Shared fixtures for the cross-package (CLI, end-to-end) tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cli_support import SAMPLE_SCALE, TINY, ct, train_losses  # noqa: E402


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    """Sample data and its tokenizer, built once for the whole session."""
    from ct_data import sample

    out = tmp_path_factory.mktemp("sample")
    sample.build(out, seed=0, scale=SAMPLE_SCALE)
    sample.build_tokenizer(out, 8192, split_digits=True)  # what the default config trains
    return out




REFERENCE_STEPS = 8


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, sample_dir) -> Path:
    """The uninterrupted single-process TINY run, 8 steps (checkpoints, an HF export): what the
    killed, preempted, resumed and multi-process runs are compared with, and a trained model for
    tests that need one. Its losses do not depend on max_steps (all 8 steps lie inside the phase's
    10 warmup steps) nor on how often it checkpoints, so one launch serves every test that runs up
    to 8 steps. Read it, never write into it."""
    run = tmp_path_factory.mktemp("reference")
    ct("train", "--phase", "pretrain_phase1", f"run_dir={run}", f"sample_data.dir={sample_dir}", *TINY,
       f"trainer.max_steps={REFERENCE_STEPS}")
    return run


@pytest.fixture(scope="session")
def reference_losses(reference_run) -> dict[int, float]:
    return train_losses(reference_run)
