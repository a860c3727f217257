"""Device-dependent defaults, decided once at setup (issue 23 items 6 and 9): without a precision
group a run is bf16 on CUDA and fp32 on CPU; TF32 is on for CUDA's remaining fp32 matmuls unless
fp32 was chosen; fp8 on CUDA turns per-block compile on. An explicit choice is kept. CUDA is
simulated on this CPU machine: the device the run resolves is cuda:0 (init_distributed
monkeypatched), which is all setup looks at before the engine is built."""

from __future__ import annotations

import logging

import pytest
import torch
import yaml

from ct_cli.common import config_dir, run_config
from ct_precision import PrecisionConfig
from ct_parallel import CompileConfig

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def composed(*overrides: str, phase: str = "pretrain_phase1"):
    return run_config(phase, list(overrides), config_dir(None))


def preset(name: str) -> PrecisionConfig:
    return PrecisionConfig.from_dict(yaml.safe_load((config_dir(None) / "precision" / f"{name}.yaml").read_text()))


def test_the_default_is_auto_and_resolves_per_device():
    run = composed()
    assert run.precision.dtype == "auto" and run.compile.enabled is None
    on_cpu, notes = run.resolved_for(CPU)
    # The embedded CPU run is exactly what it was: the fp32 preset, no compile.
    assert on_cpu.precision == preset("fp32") and on_cpu.compile == CompileConfig(enabled=False)
    assert len(notes) == 1 and notes[0][0] == logging.INFO
    assert "precision=fp32 (precision.dtype=auto on cpu" in notes[0][1]
    on_cuda, notes = run.resolved_for(CUDA)
    assert on_cuda.precision == preset("bf16") and on_cuda.precision.wants_tf32
    assert on_cuda.compile.enabled is False  # bf16: compile stays a choice
    assert "precision=bf16 (precision.dtype=auto on cuda" in notes[0][1]
    # Everything but the two decided sections is untouched.
    rest = lambda r: {k: v for k, v in r.to_dict().items() if k not in ("precision", "compile")}  # noqa: E731
    assert rest(on_cuda) == rest(run) == rest(on_cpu)


def test_an_explicit_fp32_is_honoured_on_cuda_with_ieee_matmuls():
    on_cuda, notes = composed("precision=fp32").resolved_for(CUDA)
    assert on_cuda.precision == preset("fp32") and not on_cuda.precision.wants_tf32
    assert "precision=fp32 (chosen in the config)" in notes[0][1]
    assert composed("precision=fp32", "precision.tf32=true").resolved_for(CUDA)[0].precision.wants_tf32


def test_fp8_on_cuda_turns_compile_on_and_says_so():
    run = composed("precision=fp8")
    on_cuda, notes = run.resolved_for(CUDA)
    assert on_cuda.compile == CompileConfig(enabled=True)
    assert any(level == logging.INFO and line.startswith("compile.enabled=true (precision=fp8 on cuda")
               for level, line in notes)
    # CPU (emulated FP8, what the tests run): nothing changes.
    assert run.resolved_for(CPU)[0].compile == CompileConfig(enabled=False)
    # The megatron engine runs FP8 in Transformer Engine layers and refuses per-block compile.
    megatron = composed("precision=fp8", "distributed=megatron_tp2").resolved_for(CUDA)[0]
    assert megatron.compile.enabled is False


def test_an_explicit_compile_false_with_fp8_on_cuda_is_kept_with_a_warning():
    on_cuda, notes = composed("precision=fp8", "compile.enabled=false").resolved_for(CUDA)
    assert on_cuda.compile.enabled is False
    assert any(level == logging.WARNING and "compile.enabled=false with precision=fp8 on cuda" in line
               for level, line in notes)


def test_print_config_shows_the_undecided_defaults(capsys):
    from ct_cli import train as train_cli

    assert train_cli.main(["--phase", "pretrain_phase1", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["precision"]["dtype"] == "auto" and cfg["compile"]["enabled"] is None


@pytest.fixture
def restore_matmul_precision():
    yield
    torch.set_float32_matmul_precision("highest")
    for backend in ("cuda", "mkldnn"):
        torch._C._set_fp32_precision_setter(backend, "matmul", "none")


@pytest.mark.parametrize("overrides, dtype, compiled", [([], "bf16", False), (["precision=fp8"], "fp8", True),
                                                        (["precision=fp32"], "fp32", False)])
def test_setup_on_a_cuda_device_builds_the_resolved_run(monkeypatch, caplog, tmp_path, restore_matmul_precision,
                                                        overrides, dtype, compiled):
    """Through ct_stages.run.setup: the device init_distributed reports is cuda:0; what reaches the
    build step (engine, optimizer, checkpoints, config.json) is the resolved run, TF32 is set for
    the process, and the run log says what was chosen and why."""
    import ct_stages.run as run_mod
    from ct_parallel import DistInfo

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(run_mod, "init_distributed", lambda d: DistInfo(0, 1, 0, 0, 1, device=CUDA))
    monkeypatch.setattr(run_mod.PeakFlops, "for_device", classmethod(lambda cls, device, explicit: None))
    built = {}
    monkeypatch.setattr(run_mod, "_build", lambda run, *rest: built.setdefault("run", run))
    caplog.set_level(logging.INFO, logger="ct_stages")
    run_mod.setup(composed(f"run_dir={tmp_path}", *overrides))
    run = built["run"]
    assert run.precision == preset(dtype) and run.compile.enabled is compiled
    assert torch.backends.cuda.matmul.fp32_precision == ("ieee" if dtype == "fp32" else "tf32")
    assert f"precision={dtype} (" in caplog.text and "TF32 " in caplog.text
    assert ("compile.enabled=true (precision=fp8 on cuda" in caplog.text) is compiled


def test_megatron_without_transformer_engine_on_cuda_is_refused_before_any_work(monkeypatch):
    """The refusal comes from check_supported, the first thing setup does (before data and model)."""
    from ct_model import UserError
    from ct_parallel.megatron import transformer_impl
    from ct_stages.run import check_supported

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(transformer_impl, "transformer_engine_import_error", lambda: "ModuleNotFoundError: x")
    with pytest.raises(UserError, match="distributed.transformer_impl=auto.*uv sync --extra te"):
        check_supported(composed("distributed=megatron_tp2"))
    transformer_impl._warn_local_on_cuda.cache_clear()
    check_supported(composed("distributed=megatron_tp2", "distributed.transformer_impl=local"))  # the opt-in runs
