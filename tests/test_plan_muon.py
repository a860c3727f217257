"""ct-plan with optimizer=muon: the blocks' matrices hold one fp32 momentum buffer (Muon), not
AdamW's two moments; the plan's optimizer bytes are checked against a hand count and the count
against the parameters ct-stages gives Muon in a built model."""

from __future__ import annotations

import json

import pytest

import ct_model
from ct_cli import plan as plan_cli
from ct_parallel.plan import muon_parameters
from ct_stages.optim import is_muon_matrix

# mobilellm_950m: 22 layers, hidden 1536, 24 heads and 6 KV groups of head dim 64, SwiGLU 6144,
# vocab 128256, tied. Muon: q, k, v, o and gate, up, down of every block; AdamW: the embedding
# (also the output layer) and the norms.
MATRICES_950M = 22 * ((1536 * 1536 + 2 * 1536 * 384 + 1536 * 1536) + 3 * 1536 * 6144)
PARAMS_950M = 128_256 * 1536 + 22 * (1536 * 1536 + 2 * 1536 * 384 + 1536 * 1536 + 3 * 1536 * 6144 + 2 * 1536) + 1536


def optimizer_bytes(capsys, *args: str) -> float:
    assert plan_cli.main(["model=mobilellm_950m", "seq_len=2048", "trainer.micro_batch_size=4", *args, "--json"]) == 0
    (stage,) = json.loads(capsys.readouterr().out)["stages"]
    return stage["optimizer_bytes"]


@pytest.mark.parametrize("layout, world, shards", [("single", 1, 1), ("ddp", 2, 1), ("fsdp2", 8, 8)])
def test_muon_keeps_one_moment_for_the_block_matrices(capsys, layout, world, shards):
    """AdamW: 8 bytes (two fp32 moments) per parameter; Muon: 4 per block-matrix element, 8 for
    the rest. FSDP2 shards both over DP; single and DDP hold them whole."""
    args = [f"distributed={layout}", "--world-size", str(world)]
    adamw = optimizer_bytes(capsys, *args)
    muon = optimizer_bytes(capsys, *args, "optimizer=muon")
    assert adamw == pytest.approx(8 * PARAMS_950M / shards)
    assert muon == pytest.approx((8 * (PARAMS_950M - MATRICES_950M) + 4 * MATRICES_950M) / shards)


def test_megatron_with_muon_is_a_plan_error(capsys):
    code = plan_cli.main(["model=mobilellm_950m", "distributed=megatron_dp_distopt", "--world-size", "2",
                          "optimizer=muon"])
    err = capsys.readouterr().err
    assert code == 2 and "optimizer.name=muon" in err


@pytest.mark.parametrize("name", ["mobilellm_tiny", "deepseek_v3_tiny"])
def test_the_count_is_what_ct_stages_gives_muon(name):
    """Dense GQA and MLA + MoE (the router and the MLA norms stay with AdamW; 3-D experts count)."""
    config = ct_model.presets.get(name)
    model = ct_model.build_model(config)
    per_layer = [0] * config.num_layers
    for param_name, p in model.named_parameters():
        if is_muon_matrix(param_name, p):
            per_layer[int(param_name.split(".")[1])] += p.numel()
    assert [muon_parameters(config, i) for i in range(config.num_layers)] == per_layer
