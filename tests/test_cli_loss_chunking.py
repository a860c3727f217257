"""ct-train with loss.chunk_tokens > 0 trains exactly as with the full logits (chunk 0): pretraining
CE, and mid-training KD from an online teacher (its hidden states projected per chunk). The cached
top-k teacher through the chunked loss is covered by packages/ct-stages/tests/test_loss_chunking.py
(a CLI pair for it took ~4 more minutes on 2 shared cores)."""

from __future__ import annotations

import pytest

from cli_support import TINY, ct, train_losses

STEPS = 3
CHUNK = 64  # below the 2 x 64 positions of a microbatch: several chunks each


def _train(run, sample_dir, phase, chunk, *extra):
    ct("train", "--phase", phase, f"run_dir={run}", f"sample_data.dir={sample_dir}", *TINY,
       f"trainer.max_steps={STEPS}", "trainer.checkpoint_every=100", f"loss.chunk_tokens={chunk}", *extra)
    return train_losses(run)


def _assert_same(chunked: dict, full: dict, tol: float = 1e-5):
    assert sorted(chunked) == sorted(full) == list(range(1, STEPS + 1))
    for step in full:  # AdamW steps compound the fp32 reordering a little: 1e-5, not 1e-6
        assert abs(chunked[step] - full[step]) <= tol * abs(full[step]), (step, chunked, full)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, sample_dir):
    root = tmp_path_factory.mktemp("chunking")
    full = _train(root / "full", sample_dir, "pretrain_phase1", 0)
    chunked = _train(root / "chunked", sample_dir, "pretrain_phase1", CHUNK)
    return root / "full" / "hf", full, chunked


@pytest.mark.slow
def test_pretrain_with_chunked_ce_equals_full_logits(pretrained):
    _, full, chunked = pretrained
    _assert_same(chunked, full)


@pytest.mark.slow
def test_midtrain_with_chunked_kd_from_an_online_teacher_equals_full_logits(tmp_path, sample_dir, pretrained):
    extra = [f"init_from={pretrained[0]}", "stage.distill.teacher=online"]
    full = _train(tmp_path / "full", sample_dir, "midtrain_phase1", 0, *extra)
    chunked = _train(tmp_path / "chunked", sample_dir, "midtrain_phase1", CHUNK, *extra)
    _assert_same(chunked, full)
