import pytest
import torch

from ct_precision import PrecisionConfig


def test_autocast_dtypes():
    assert PrecisionConfig("fp32").autocast_dtype is None
    assert PrecisionConfig("bf16").autocast_dtype is torch.bfloat16


def test_unknown_dtype_names_the_field():
    with pytest.raises(ValueError, match="precision.dtype"):
        PrecisionConfig("fp8")
