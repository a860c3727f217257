"""The posttrain_reasoning recipe configuration (32,768-token rows, chunked loss) runs its first
training steps on CPU with no T x T tensor and no [micro x seq x vocab] tensor: the recipe's own
composed config, with only the model shrunk and the batch cut to one row so CPU can afford it."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from cli_support import SAMPLE_SCALE

# tensor_probe: a ct-model test helper
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packages" / "ct-model" / "tests"))

SEQ = 32_768
VOCAB = 8192  # the embedded tokenizer's


def _recipe_config(run_dir, sample_dir, chunk_tokens):
    from ct_cli.common import config_dir, run_config

    return run_config("posttrain_reasoning", [
        "size=recipe", f"run_dir={run_dir}", f"sample_data.dir={sample_dir}",
        f"sample_data.scale={SAMPLE_SCALE}", "init_from=null", "logging.progress=false",
        "model.num_layers=1", "model.hidden_size=64", "model.ffn_hidden_size=128",
        "model.num_attention_heads=4", "model.num_query_groups=2",
        "trainer.max_steps=1", "trainer.global_batch_size=1", "trainer.micro_batch_size=1",
        "trainer.checkpoint_every=100", f"loss.chunk_tokens={chunk_tokens}",
    ], config_dir(None))


@pytest.mark.slow
def test_reasoning_recipe_at_32k_tokens_allocates_no_t_by_t_and_no_full_logits(tmp_path, sample_dir):
    from tensor_probe import LargestTensor
    from ct_stages.run import run_phase

    config = _recipe_config(tmp_path / "run", sample_dir, chunk_tokens=1024)
    # The recipe's values reached the run: 32k rows, packed SFT documents, the chunked loss.
    assert config.seq_len == SEQ and config.stage.kind == "posttrain" and config.loss.chunk_tokens == 1024
    assert config.model.attention_backend in (None, "auto")  # None: the preset's own, auto
    with LargestTensor() as probe:
        result = run_phase(config)
    assert result.steps == 1 and math.isfinite(result.final_loss), result
    # Hundreds of SFT documents packed into the row: the case the dense mask would have served.
    data = result.summary["data"]
    assert data["packing_efficiency"] > 0.9 and data["sources"]["sft_reasoning"]["docs"] > 10, data
    # A T x T row is 1.07e9 elements and the full logits 2.7e8; the largest legitimate tensors
    # are the [vocab, hidden] embedding and [T, ffn] activations (~4e6).
    assert probe.largest < SEQ * VOCAB // 16, probe.largest
