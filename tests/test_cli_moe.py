"""ct-train on the DeepSeek-V3-shaped tiny model (MLA + MoE) on CPU: it learns, logs the expert
load, balances with the bias (and the optional aux loss), and exports a DeepseekV3ForCausalLM."""

from __future__ import annotations

import pytest
import torch

from cli_support import TINY, ct, events, train_losses

transformers = pytest.importorskip("transformers")


MOE = ["model=deepseek_v3_tiny", "+model.moe_aux_loss_coeff=0.001"]
MOE_KEYS = [f"moe/layers.{i}.{k}" for i in (1, 2, 3) for k in ("load_max", "load_min", "bias_range")]


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory, sample_dir):
    """One single-process 8-step run (all inside the phase's warmup: its first losses do not
    depend on max_steps, so the shorter multi-process run compares with it)."""
    run = tmp_path_factory.mktemp("moe") / "run"
    ct("train", "--phase", "pretrain_phase1", f"run_dir={run}", f"sample_data.dir={sample_dir}", *TINY,
       *MOE, "trainer.max_steps=8", "trainer.checkpoint_every=4")
    return run


def test_deepseek_v3_tiny_trains_through_the_cli(moe_run):
    run = moe_run
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


@pytest.mark.dist
def test_fsdp2_two_processes_match_single_process_with_the_same_expert_load(tmp_path, sample_dir, moe_run):
    run = tmp_path / "fsdp2"
    ct("train", "--phase", "pretrain_phase1", "--nproc-per-node", "2", "distributed=fsdp2", f"run_dir={run}",
       f"sample_data.dir={sample_dir}", *TINY, *MOE, "trainer.max_steps=3")
    single = {e["step"]: e for e in events(moe_run) if e["event"] == "train"}
    for record in (e for e in events(run) if e["event"] == "train"):
        want = single[record["step"]]
        assert record["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert record["aux_loss"] == pytest.approx(want["aux_loss"], rel=1e-5)
        # Loads summed over both ranks equal the single process's: the same shares, the same bias.
        assert {k: record[k] for k in MOE_KEYS} == pytest.approx({k: want[k] for k in MOE_KEYS}, abs=1e-7)
