"""Per-block torch.compile: config validation; a compiled tiny model's loss and gradients equal eager,
alone and composed with activation checkpointing, with state_dict keys unchanged.

On CPU the compiled tests use the ``aot_eager`` backend: dynamo traces each block as one graph
(fullgraph, the checkpoint as a higher-order op) and AOTAutograd builds its joint forward/backward,
without inductor's C++ build (minutes cold on 2 cores). The inductor variant runs on GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ct_model import build_model, presets
from ct_parallel import ActivationCheckpointConfig, CompileConfig, apply_activation_checkpointing, apply_compile


def tiny():
    return presets.get("mobilellm_tiny", num_layers=2, hidden_size=32, num_attention_heads=2, num_query_groups=1,
                       kv_channels=16, ffn_hidden_size=64, vocab_size=128, max_position_embeddings=64)


def loss_and_grads(config, device, ac_mode="none", compile_config=None):
    model = build_model(config, device=device, seed=0)
    apply_activation_checkpointing(model, ActivationCheckpointConfig(mode=ac_mode))
    if compile_config is not None:
        apply_compile(model, compile_config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (2, 17), generator=g).to(device)
    doc = torch.zeros(2, 16, dtype=torch.long, device=device)
    doc[:, 7:] = 1
    pos = torch.arange(16, device=device).expand(2, 16).clone()
    pos[:, 7:] -= 7
    loss = F.cross_entropy(model(ids[:, :-1], pos, doc).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return model, loss.detach(), {k: p.grad.detach().clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("bad, needle", [
    (dict(enabled="yes"), "compile.enabled must be true or false"),
    (dict(fullgraph=1), "compile.fullgraph must be true or false"),
    (dict(backend=""), "compile.backend"),
    (dict(mode="fastest"), "compile.mode must be null or one of"),
])
def test_config_errors_name_the_field(bad, needle):
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        CompileConfig(**bad)


def test_disabled_is_a_no_op_and_options_reach_torch_compile():
    model = build_model(tiny(), seed=0)
    apply_compile(model, CompileConfig())
    assert all(getattr(b, "_compiled_call_impl", None) is None for b in model.layers)
    assert CompileConfig(mode="max-autotune").options() == {"fullgraph": True, "backend": "inductor",
                                                             "mode": "max-autotune"}


def check_compiled_equals_eager(device, backend, ac_mode, tol):
    torch._dynamo.reset()
    config = tiny()
    plain, want_loss, want = loss_and_grads(config, device)
    model, loss, got = loss_and_grads(config, device, ac_mode, CompileConfig(enabled=True, backend=backend))
    assert all(b._compiled_call_impl is not None for b in model.layers)
    assert list(model.state_dict()) == list(plain.state_dict())
    torch.testing.assert_close(loss, want_loss, rtol=tol, atol=tol)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=tol, atol=tol, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("ac_mode", ["none", "selective", "full"])
def test_compiled_blocks_equal_eager_on_cpu(ac_mode):
    check_compiled_equals_eager("cpu", "aot_eager", ac_mode, 1e-5)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("ac_mode", ["none", "selective"])
def test_inductor_compiled_blocks_equal_eager_on_gpu(ac_mode):
    torch.backends.cuda.matmul.allow_tf32 = False
    check_compiled_equals_eager("cuda", "inductor", ac_mode, 1e-5)


# ------------------------------------------------------------------ fp8 on CUDA turns compile on

@pytest.mark.parametrize("enabled, dtype, device, native, want, level", [
    (None, "fp8", "cuda", True, True, "INFO"),      # null: on, and said so
    (None, "fp8", "cpu", True, False, None),        # emulated FP8 on CPU: nothing changes
    (None, "bf16", "cuda", True, False, None),
    (None, "fp8", "cuda", False, False, None),      # megatron: FP8 in Transformer Engine, no block compile
    (False, "fp8", "cuda", True, False, "WARNING"),  # an explicit false is kept, with a warning
    (True, "fp8", "cpu", True, True, None),
    (True, "bf16", "cuda", True, True, None),
    (False, "bf16", "cuda", True, False, None),
])
def test_resolve_compile(enabled, dtype, device, native, want, level):
    import logging

    from ct_precision import PrecisionConfig
    from ct_parallel import resolve_compile

    config, note = resolve_compile(CompileConfig(enabled=enabled), PrecisionConfig.preset(dtype),
                                   torch.device(device), engine_compiles=native)
    assert config == CompileConfig(enabled=want)
    if level is None:
        assert note is None
    else:
        assert note[0] == getattr(logging, level) and f"compile.enabled={str(want).lower()}" in note[1]
        assert "precision=fp8 on cuda" in note[1]
