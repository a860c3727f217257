from pathlib import Path

import pytest
import torch
import yaml

from ct_precision import PrecisionConfig

ROOT = Path(__file__).resolve().parents[3]


def load(name: str) -> PrecisionConfig:
    return PrecisionConfig.from_dict(yaml.safe_load((ROOT / "configs" / "precision" / f"{name}.yaml").read_text()))


def test_shipped_presets_say_what_each_engine_needs():
    fp32, bf16, fp8 = load("fp32"), load("bf16"), load("fp8")
    assert (fp32.autocast_dtype, fp32.torch_param_dtype, fp32.torch_reduce_dtype) == (None, torch.float32, torch.float32)
    assert (bf16.autocast_dtype, bf16.torch_param_dtype, bf16.torch_reduce_dtype) == (
        torch.bfloat16, torch.bfloat16, torch.float32)
    assert fp8.fp8 and fp8.fp8_recipe == "tensorwise" and fp8.torch_reduce_dtype == torch.float32


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
