"""distributed.transformer_impl: which megatron spec the engine builds. On CUDA without a usable
Transformer Engine, ``auto`` refuses (naming the key, the install command and the local spec's
cost) rather than falling back silently; ``local`` is the explicit opt-in; without CUDA (the CPU
shim) ``auto`` keeps the local spec. CUDA and the TE import are monkeypatched: no GPU needed."""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch

from ct_model.errors import UserError
from ct_parallel import DistributedConfig
from ct_parallel.megatron import transformer_impl
from ct_parallel.megatron.transformer_impl import TransformerEngineUnavailable, use_transformer_engine

MISSING = "ModuleNotFoundError: No module named 'transformer_engine'"


def layout(impl: str) -> DistributedConfig:
    return DistributedConfig(engine="megatron", tensor_model_parallel_size=2, transformer_impl=impl)


@pytest.fixture
def cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    transformer_impl._warn_local_on_cuda.cache_clear()  # warn again in each test


def te_importable(monkeypatch, ok: bool) -> None:
    monkeypatch.setattr(transformer_impl, "transformer_engine_import_error", lambda: None if ok else MISSING)


def test_without_cuda_auto_and_local_build_the_local_spec(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    te_importable(monkeypatch, True)  # even with TE installed: megatron on CPU is the test shim's
    assert not use_transformer_engine(layout("auto")) and not use_transformer_engine(layout("local"))
    with pytest.raises(TransformerEngineUnavailable, match="transformer_impl=transformer_engine.*no CUDA device"):
        use_transformer_engine(layout("transformer_engine"))


def test_on_cuda_without_transformer_engine_auto_refuses_naming_the_key_the_install_and_the_cost(cuda, monkeypatch):
    te_importable(monkeypatch, False)
    with pytest.raises(TransformerEngineUnavailable) as err:
        use_transformer_engine(layout("auto"))
    message = str(err.value)
    assert isinstance(err.value, UserError)  # the CLI prints it in one line, exit 2
    for needle in ("distributed.transformer_impl=auto", MISSING, "uv sync --extra te", "[B, 1, T, T]",
                   "6 bytes per score", "distributed.transformer_impl=local"):
        assert needle in message, (needle, message)
    with pytest.raises(TransformerEngineUnavailable, match="transformer_impl=transformer_engine.*uv sync --extra te"):
        use_transformer_engine(layout("transformer_engine"))


def test_on_cuda_local_is_the_explicit_opt_in_and_says_what_it_costs(cuda, monkeypatch, caplog):
    te_importable(monkeypatch, False)
    with caplog.at_level(logging.WARNING, logger=transformer_impl.__name__):
        assert not use_transformer_engine(layout("local"))
    assert "transformer_impl=local on CUDA" in caplog.text and "O(T^2)" in caplog.text, caplog.text


def test_on_cuda_with_transformer_engine_auto_builds_the_te_spec(cuda, monkeypatch):
    te_importable(monkeypatch, True)
    assert use_transformer_engine(layout("auto")) and use_transformer_engine(layout("transformer_engine"))


def test_the_import_check_reports_why_transformer_engine_is_unusable(monkeypatch):
    """The real check (not monkeypatched): a stand-in TE that imports is usable; one whose torch
    API fails to import (a build against another torch fails there too) is not, with the reason."""
    te = types.ModuleType("transformer_engine")
    monkeypatch.setitem(sys.modules, "transformer_engine", te)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", types.ModuleType("transformer_engine.pytorch"))
    assert transformer_impl.transformer_engine_import_error() is None
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)  # import raises ImportError
    assert transformer_impl.transformer_engine_import_error().startswith("ModuleNotFoundError")


def test_the_engine_refuses_before_any_work(cuda, monkeypatch):
    """MegatronEngine decides first: no parallel state, model conversion or weight copy happens
    on a CUDA machine that would silently get the local spec."""
    from ct_parallel.megatron.engine import MegatronEngine

    te_importable(monkeypatch, False)
    with pytest.raises(TransformerEngineUnavailable, match="distributed.transformer_impl=auto"):
        MegatronEngine(torch.nn.Linear(1, 1), layout("auto"))
