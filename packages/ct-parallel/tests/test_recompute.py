"""Activation checkpointing and compile through build_engine: the megatron mapping and refusals
(in process), the single-process engine, and DDP / FSDP2 / megatron TP=2, PP=2 (2 gloo processes)
with checkpointing equal to without."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import parallel_testlib as lib  # noqa: E402
from ct_parallel import DistributedConfig, build_engine, check_recompute_combination  # noqa: E402
from ct_parallel.recompute import megatron_recompute  # noqa: E402
from ct_parallel import ActivationCheckpointConfig, CompileConfig  # noqa: E402
from ct_parallel.activation_checkpoint import is_checkpointed  # noqa: E402

MEGATRON = DistributedConfig(engine="megatron")


@pytest.mark.parametrize("mode, every, layout, want", [
    ("none", 1, {}, {}),
    ("full", 1, {}, {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}),
    ("selective", 1, {}, {"recompute_granularity": "selective"}),
    # 8 layers over PP=2 -> 4 per stage; every 3rd block -> ceil(4/3) = 2 recomputed per stage.
    ("full", 3, dict(pipeline_model_parallel_size=2),
     {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 2}),
    # PP=2 x VPP=2 -> 2 layers per chunk; every 2nd -> 1 per chunk.
    ("full", 2, dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2,
                     pipeline_schedule="interleaved"),
     {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 1}),
])
def test_megatron_recompute_mapping(mode, every, layout, want):
    dist = DistributedConfig(engine="megatron", **layout)
    got = megatron_recompute(ActivationCheckpointConfig(mode, every), lib.tiny_config(num_layers=8), dist)
    assert got == want


def test_megatron_refuses_compile_and_sparse_selective_naming_both_keys():
    with pytest.raises(ValueError, match=r"compile\.enabled=true with distributed\.engine=megatron"):
        check_recompute_combination(ActivationCheckpointConfig(), CompileConfig(enabled=True), MEGATRON)
    with pytest.raises(ValueError, match=r"activation_checkpointing\.mode=selective with every_n_blocks=2 and "
                                         r"distributed\.engine=megatron"):
        check_recompute_combination(ActivationCheckpointConfig("selective", 2), CompileConfig(), MEGATRON)
    for strategy in ("single", "ddp", "fsdp2"):  # the native engines take every combination
        check_recompute_combination(ActivationCheckpointConfig("selective", 2), CompileConfig(enabled=True),
                                    DistributedConfig(strategy=strategy))


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_single_process_engine_with_checkpointing_matches_reference(tmp_path, mode):
    from ct_model import build_model

    config = lib.tiny_config(num_layers=2)
    batch = lib.global_batch(config, n_micro=2)
    want_losses, want_grads, want_params = lib.reference(config, batch, steps=2)
    model = build_model(config, seed=0)
    engine = build_engine(model, DistributedConfig(), activation_checkpointing=ActivationCheckpointConfig(mode))
    assert [is_checkpointed(b) for b in model.layers] == [mode, mode]
    grads = lambda: {k: p.grad.detach().clone() for k, p in model.named_parameters()}  # noqa: E731
    losses, got_grads, params = lib.run_engine(engine, batch, steps=2, grads_fn=grads)
    lib.compare_losses(mode, losses, want_losses, tol=1e-6)
    lib.compare(f"{mode} grads", got_grads, want_grads, tol=1e-6)
    lib.compare(f"{mode} params", params, want_params, tol=1e-6)
    # The DCP checkpoint of a checkpointed model loads into a plain one.
    engine.save_checkpoint(tmp_path / "ckpt")
    plain = build_engine(build_model(config, seed=3), DistributedConfig())
    plain.setup_optimizer(lib.build_optimizer)
    plain.load_checkpoint(tmp_path / "ckpt")
    lib.compare("reload", plain.full_model_state_dict(), params, tol=0.0)


@pytest.mark.dist
@pytest.mark.slow
def test_ddp_and_fsdp2_with_checkpointing_and_compile_match_single_process(tmp_path):
    out = tmp_path / "recompute_native.json"
    lib.torchrun("dist_recompute_native_checks.py", str(out), timeout=400)
    results = json.loads(out.read_text())
    assert set(results) == {"ddp_full", "ddp_selective", "fsdp2_full", "fsdp2_selective",
                            "fsdp2_selective_compile_aot_eager"}
    for name, r in results.items():
        for key in ("loss", "grad", "param"):
            tol = lib.PARAM_TOL if key == "param" else lib.TOL  # AdamW amplifies rounding: see PARAM_TOL
            assert r[key] <= tol, (name, key, r)


@pytest.mark.dist
@pytest.mark.slow
def test_megatron_tp2_pp2_recompute_equals_no_recompute(tmp_path):
    out = tmp_path / "recompute_megatron.json"
    lib.torchrun("dist_recompute_megatron_checks.py", str(out), shim=True, timeout=400)
    results = json.loads(out.read_text())
    assert set(results) == {"tp2_full_1", "tp2_selective_1", "pp2_full_1", "pp2_selective_1", "pp2_full_2"}
    for name, r in results.items():
        for key in ("loss", "grad", "param"):
            assert r[key] <= 1e-6, (name, key, r)
        assert r["loss_vs_ct"] <= lib.TOL and r["grad_vs_ct"] <= lib.TOL, (name, r)
