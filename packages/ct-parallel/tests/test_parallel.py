"""ct-parallel tests. Fast in-process tests first; the `dist` tests launch torchrun (2 gloo
processes) once per engine family and check every layout against a single-process ct-model run."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(HERE))

import parallel_testlib as lib  # noqa: E402
from ct_parallel import DistributedConfig  # noqa: E402


def _torchrun(script: str, *args: str, nproc: int = 2, shim: bool = False, timeout: int = 240) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(29400 + os.getpid() % 1000)]
    cmd += [str(HERE / "megatron_cpu_run.py"), str(HERE / script)] if shim else [str(HERE / script)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd + list(args), env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")


# -- fast, in-process ------------------------------------------------------------------------------
def test_import_does_not_import_megatron():
    code = "import sys, ct_parallel; assert 'megatron' not in sys.modules, 'megatron imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_megatron_version_is_the_pinned_one():
    """Canary (cheap half): the CPU shim is written against one megatron-core version."""
    import megatron_cpu_shim

    assert importlib.metadata.version("megatron-core") == megatron_cpu_shim.PINNED_VERSION


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "distributed").glob("*.yaml")), ids=lambda p: p.stem)
def test_distributed_yaml_is_valid(path):
    DistributedConfig.from_dict(yaml.safe_load(path.read_text()))


def test_expected_layouts_exist():
    names = {p.stem for p in (ROOT / "configs" / "distributed").glob("*.yaml")}
    assert {"single", "ddp", "fsdp2", "megatron_tp2", "megatron_tp2_sp", "megatron_pp2",
            "megatron_pp2_interleaved", "megatron_tp2_pp2"} <= names


@pytest.mark.parametrize("bad, field", [
    (dict(engine="native", tensor_model_parallel_size=2), "megatron"),
    (dict(engine="megatron", sequence_parallel=True), "sequence_parallel"),
    (dict(engine="megatron", pipeline_model_parallel_size=2, pipeline_schedule="interleaved"), "virtual"),
    (dict(engine="megatron", pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2), "interleaved"),
    (dict(strategy="zero9"), "strategy"),
    (dict(fsdp_param_dtype="bfloat16"), "fsdp_param_dtype"),  # moved to precision=
    (dict(expert_model_parallel_size=2), "expert"),
    (dict(engine="megatron", tensor_model_parallel_size=2, expert_model_parallel_size=2), "sequence_parallel"),
    (dict(engine="megatron", expert_tensor_parallel_size=0), "expert_tensor_parallel_size"),
    (dict(engine="megatron", num_layers_in_first_pipeline_stage=3), "pipeline_model_parallel_size >= 2"),
    (dict(engine="megatron", pipeline_model_parallel_size=2, num_layers_in_last_pipeline_stage=-1),
     "num_layers_in_last_pipeline_stage"),
    (dict(bogus=1), "bogus"),
])
def test_config_errors_name_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        DistributedConfig.from_dict(bad)


def test_expert_and_uneven_layouts_are_described_but_refused_by_the_engines():
    """DeepSeek-V3's layout is a valid description (ct-plan plans it); the engines refuse its uneven
    pipeline stages, naming keys (its EP 64 the megatron engine runs)."""
    cfg = DistributedConfig.from_dict(yaml.safe_load((ROOT / "configs/distributed/deepseek_v3_671b.yaml").read_text()))
    assert (cfg.expert_model_parallel_size, cfg.pipeline_model_parallel_size) == (64, 16)
    errors = cfg.engine_support_errors()
    assert len(errors) == 2, errors
    assert "num_layers_in_first_pipeline_stage=3" in errors[0] and "num_layers_in_last_pipeline_stage=2" in errors[1]
    assert DistributedConfig(engine="megatron", tensor_model_parallel_size=2).engine_support_errors() == []
    assert DistributedConfig(engine="megatron", expert_model_parallel_size=2).engine_support_errors() == []
    with pytest.raises(ValueError, match="num_layers_in_first_pipeline_stage=3"):
        from ct_parallel import build_engine
        build_engine(None, cfg)


def test_data_parallel_size():
    cfg = DistributedConfig(engine="megatron", tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    assert cfg.data_parallel_size(8) == 2
    with pytest.raises(ValueError, match="divisible"):
        cfg.data_parallel_size(6)


def test_single_process_engine_via_factory(tmp_path):
    from ct_model import build_model
    from ct_parallel import build_engine, init_distributed

    cfg = DistributedConfig()
    info = init_distributed(cfg)
    assert (info.dp_rank, info.dp_size) == (0, 1)
    config = lib.tiny_config(num_layers=2)
    batch = lib.global_batch(config, n_micro=2)
    want, _, params = lib.reference(config, batch, steps=2)
    engine = build_engine(build_model(config, seed=0), cfg)
    got, _, state = lib.run_engine(engine, batch, steps=2)
    lib.compare_losses("single", got, want, tol=1e-6)
    lib.compare("single params", state, params, tol=1e-6)
    engine.save_checkpoint(tmp_path / "ckpt")
    other = build_engine(build_model(config, seed=3), cfg)
    other.setup_optimizer(lib.build_optimizer)
    other.load_checkpoint(tmp_path / "ckpt")
    lib.compare("reload", other.full_model_state_dict(), state, tol=0.0)


# -- multi-process (torchrun, gloo) ------------------------------------------------------------------
@pytest.mark.dist
@pytest.mark.slow
def test_native_ddp_fsdp2_match_single_process_and_fsdp_checkpoint_loads_in_one_process(tmp_path):
    out, ckpt = tmp_path / "native.json", tmp_path / "fsdp2_ckpt"
    _torchrun("dist_native_checks.py", str(out), str(ckpt))
    results = json.loads(out.read_text())
    for strategy in ("ddp", "fsdp2"):
        for key in ("loss", "grad", "param"):
            tol = lib.PARAM_TOL if key == "param" else lib.TOL  # AdamW amplifies rounding: see PARAM_TOL
            assert results[strategy][key] <= tol, (strategy, key, results[strategy])
    # FSDP=2 checkpoint -> one process: same weights, logits equal the reference model's.
    from ct_model import build_model
    from ct_parallel import build_engine

    config = lib.tiny_config()
    want = torch.load(f"{out}.params.pt")
    engine = build_engine(build_model(config, seed=7), DistributedConfig())
    engine.setup_optimizer(lib.build_optimizer)
    engine.load_checkpoint(ckpt)
    lib.compare("fsdp2 -> single", engine.full_model_state_dict(), want, tol=0.0)
    ref = build_model(config, seed=7)
    ref.load_state_dict(want)
    mb = lib.global_batch(config)[0]
    with torch.no_grad():
        torch.testing.assert_close(engine.model(mb["input_ids"], mb["position_ids"], mb["document_ids"]),
                                   ref(mb["input_ids"], mb["position_ids"], mb["document_ids"]), rtol=0, atol=0)


@pytest.mark.dist
@pytest.mark.slow
def test_megatron_layouts_match_single_process(tmp_path):
    """TP=2 (cross-entropy on the vocabulary shards, a loss given the gathered logits, and a loss
    with its own VocabShard implementation), TP=2+SP, PP=2 1F1B, PP=2 interleaved, megatron DDP=2,
    DDP=2 + distributed optimizer:
    loss at 3 steps, step-0 gradients and weights after 3 AdamW steps equal ct-model single-process
    (fp32, <= 1e-5 relative); TP=2 checkpoint reloads at PP=2 and DP=2 with equal weights and loss.
    Also the canary: the shim installs against this megatron-core (a failure here after an
    upgrade means megatron_cpu_shim.py needs revisiting)."""
    out = tmp_path / "megatron.json"
    _torchrun("dist_megatron_checks.py", str(out), str(tmp_path / "tp2_ckpt"), shim=True)
    results = json.loads(out.read_text())
    expected = {"tp2", "tp2_gathered", "tp2_on_shards", "tp2_sp", "pp2", "pp2_interleaved", "dp2", "dp2_distopt", "reload_tp2_pp2", "reload_tp2_dp2",
                "pp2_llama", "layer_sharing_error", "strict_load"}
    assert expected <= set(results), sorted(results)
    assert "layer_sharing" in results["layer_sharing_error"]["message"]
    # Strict loading: a checkpoint of 4 layers into 2 is refused (megatron's default loads part).
    assert "nothing was loaded" in results["strict_load"]["message"]
    assert "layers.2" in results["strict_load"]["message"] or "decoder.layers" in results["strict_load"]["message"]
    for name, r in results.items():
        for key in ("loss", "grad", "param"):
            if key in r:
                tol = lib.PARAM_TOL if key == "param" else lib.TOL  # the bound dist_megatron_checks uses
                assert r[key] <= tol, (name, key, r)
