"""ct-train on the DeepSeek-V3-shaped tiny model (MLA + MoE) on CPU: it learns, logs the expert
load, balances with the bias (and the optional aux loss), and exports a DeepseekV3ForCausalLM."""

from __future__ import annotations

import pytest
import torch

from cli_support import TINY, ct, events, train_losses

transformers = pytest.importorskip("transformers")


def test_deepseek_v3_tiny_trains_through_the_cli(tmp_path, sample_dir):
    run = tmp_path / "run"
    ct("train", "--phase", "pretrain_phase1", "model=deepseek_v3_tiny", f"run_dir={run}",
       f"sample_data.dir={sample_dir}", *TINY, "trainer.max_steps=8", "trainer.checkpoint_every=4",
       "+model.moe_aux_loss_coeff=0.001")
    losses = train_losses(run)
    assert sorted(losses) == list(range(1, 9))
    assert losses[8] < losses[1] - 1.0  # from ~ln(8192) = 9.0 (measured: 9.02 -> 7.37)
    records = [e for e in events(run) if e["event"] == "train"]
    for r in records:
        for layer in (1, 2, 3):  # layer 0 is dense: no router, no figures
            assert 0 <= r[f"moe/layers.{layer}.load_min"] <= 1 / 8 <= r[f"moe/layers.{layer}.load_max"] <= 0.5
        assert "moe/layers.0.load_max" not in r
        assert 0 < r["aux_loss"] < 0.001 * 8  # coeff x a term in [~1, E]
    # Each bias moves by at most the update rate (1e-3) per step, up or down: after 8 steps the
    # range is positive and at most 2 x 8 x 1e-3.
    assert 0 < records[-1]["moe/layers.1.bias_range"] <= 0.016 + 1e-6
    import ct_model

    ours, config = ct_model.hf.load_hf(run / "hf")
    assert config.is_moe and config.multi_latent_attention and config.moe_aux_loss_coeff == 0
    assert float(ours.layers[1].mlp.gate.expert_bias.abs().sum()) > 0  # the trained bias was exported
    theirs = transformers.AutoModelForCausalLM.from_pretrained(run / "hf").eval()
    ids = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        assert (ours(ids) - theirs(input_ids=ids).logits).abs().max() < 1e-4
