from pathlib import Path

import pytest
import torch
import yaml

from ct_precision import PrecisionConfig, apply_tf32

ROOT = Path(__file__).resolve().parents[3]


def load(name: str) -> PrecisionConfig:
    return PrecisionConfig.from_dict(yaml.safe_load((ROOT / "configs" / "precision" / f"{name}.yaml").read_text()))


def test_shipped_presets_say_what_each_engine_needs():
    fp32, bf16, fp8 = load("fp32"), load("bf16"), load("fp8")
    assert (fp32.autocast_dtype, fp32.param_dtype, fp32.reduce_dtype) == (None, "float32", "float32")
    assert (bf16.autocast_dtype, bf16.param_dtype, bf16.reduce_dtype) == (torch.bfloat16, "bfloat16", "float32")
    assert fp8.fp8 and fp8.fp8_recipe == "tensorwise" and fp8.reduce_dtype == "float32"


@pytest.mark.parametrize("bad, field", [
    (dict(dtype="fp16"), "precision.dtype"),
    (dict(param_dtype="float16"), "precision.param_dtype"),
    (dict(dtype="bf16", compute_dtype="int8"), "precision.compute_dtype"),
    (dict(fp8_recipe="delayed"), "precision.fp8_recipe"),
    (dict(fp8_min_matmul_elements=-1), "fp8_min_matmul_elements"),
    (dict(dtype="fp32", param_dtype="bfloat16"), "dtype=fp32"),
    (dict(fsdp_param_dtype="bfloat16"), "fsdp_param_dtype"),
])
def test_errors_name_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        PrecisionConfig.from_dict(bad)


def test_high_precision_layer_rules():
    rules = PrecisionConfig(dtype="fp8", param_dtype="bfloat16", compute_dtype="bfloat16",
                            fp8_min_matmul_elements=64 * 64)
    assert rules.keeps_high_precision(torch.nn.Embedding(32, 64))           # embeddings: always
    assert rules.keeps_high_precision(torch.nn.Linear(64, 40))              # 40 is not a multiple of 16
    assert rules.keeps_high_precision(torch.nn.Linear(32, 64))              # 2048 < 4096: size rule
    assert not rules.keeps_high_precision(torch.nn.Linear(64, 64))          # 4096: converted
    assert not PrecisionConfig(dtype="fp8").keeps_high_precision(torch.nn.Linear(32, 16))  # size rule off


# ------------------------------------------------------------------ auto, presets and TF32

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def test_presets_are_the_shipped_yaml_files():
    from ct_precision import NAMES

    for name in NAMES:
        assert PrecisionConfig.preset(name) == load(name), name


def test_auto_is_bf16_on_cuda_and_fp32_on_cpu():
    auto = PrecisionConfig(dtype="auto")
    on_cpu, why_cpu = auto.resolve(CPU)
    on_cuda, why_cuda = auto.resolve(CUDA)
    assert on_cpu == PrecisionConfig() == load("fp32")  # the CPU default is exactly the old fp32
    assert on_cuda == load("bf16")
    assert "precision=fp32" in why_cpu and "auto on cpu" in why_cpu
    assert "precision=bf16" in why_cuda and "auto on cuda" in why_cuda
    assert auto.resolve(CUDA)[0].autocast_dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp8"])
def test_an_explicit_preset_is_kept_on_every_device(name):
    chosen = load(name)
    for device in (CPU, CUDA):
        resolved, why = chosen.resolve(device)
        assert resolved == chosen and "chosen in the config" in why


def test_auto_refuses_a_field_set_beside_it():
    with pytest.raises(ValueError, match="precision.compute_dtype cannot be set beside it"):
        PrecisionConfig(dtype="auto", compute_dtype="bfloat16")
    with pytest.raises(ValueError, match="precision.tf32 must be true, false or null"):
        PrecisionConfig(tf32="yes")
    PrecisionConfig(dtype="auto", tf32=False)  # tf32 is not part of the preset choice


@pytest.mark.parametrize("dtype, tf32, want", [
    ("fp32", None, False), ("bf16", None, True), ("fp8", None, True),  # explicit fp32: IEEE, as asked
    ("fp32", True, True), ("bf16", False, False), ("fp8", False, False),
])
def test_which_runs_use_tf32(dtype, tf32, want):
    assert PrecisionConfig.preset(dtype, tf32=tf32).wants_tf32 is want
    assert PrecisionConfig(dtype="auto", tf32=tf32).resolve(CUDA)[0].wants_tf32 is (True if tf32 is None else tf32)


@pytest.fixture
def restore_matmul_precision():
    """apply_tf32 sets process-wide flags: put torch's untouched state back (legacy and per-backend)."""
    yield
    torch.set_float32_matmul_precision("highest")
    for backend in ("cuda", "mkldnn"):
        torch._C._set_fp32_precision_setter(backend, "matmul", "none")


def test_apply_tf32_sets_cudas_matmul_mode_readable_through_both_apis(restore_matmul_precision):
    line = apply_tf32(load("bf16"), CUDA)
    # New and legacy readers agree (setting only the new flag would make the legacy ones raise).
    assert torch.backends.cuda.matmul.fp32_precision == "tf32" and torch.backends.cuda.matmul.allow_tf32
    assert torch.get_float32_matmul_precision() == "high"
    assert line.startswith("TF32 on for fp32 matmuls on cuda (precision=bf16")
    line = apply_tf32(load("fp32"), CUDA)  # a later phase in the same process: back to IEEE
    assert torch.backends.cuda.matmul.fp32_precision == "ieee" and not torch.backends.cuda.matmul.allow_tf32
    assert line.startswith("TF32 off")


def test_apply_tf32_leaves_a_cpu_run_alone(restore_matmul_precision):
    before = torch.get_float32_matmul_precision(), torch.backends.mkldnn.matmul.fp32_precision
    assert apply_tf32(load("bf16"), CPU) is None
    assert (torch.get_float32_matmul_precision(), torch.backends.mkldnn.matmul.fp32_precision) == before
