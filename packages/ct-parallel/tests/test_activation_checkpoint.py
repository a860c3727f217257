"""Activation checkpointing: validation, gradients equal to no checkpointing, unchanged names, and
what selective checkpointing recomputes (ops counted in backward with a TorchDispatchMode)."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.utils._python_dispatch import TorchDispatchMode

from ct_model import build_model, generate, presets
from ct_model.hf import load_hf, save_hf
from ct_parallel import ActivationCheckpointConfig, apply_activation_checkpointing
from ct_parallel.activation_checkpoint import is_checkpointed


def tiny(**overrides):
    values = dict(num_layers=3, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                  ffn_hidden_size=128, vocab_size=256, max_position_embeddings=64)
    return presets.get("mobilellm_tiny", **{**values, **overrides})


def batch(config, b=2, t=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (b, t + 1), generator=g)
    doc = torch.zeros(b, t, dtype=torch.long)
    doc[:, 6:] = 1  # two packed documents: the dense-mask SDPA path
    pos = torch.arange(t).expand(b, t).clone()
    pos[:, 6:] -= 6
    return ids[:, :-1], ids[:, 1:], pos, doc


def loss_and_grads(config, mode, every=1, seed=0):
    model = build_model(config, seed=seed)
    apply_activation_checkpointing(model, ActivationCheckpointConfig(mode=mode, every_n_blocks=every))
    ids, labels, pos, doc = batch(config)
    loss = F.cross_entropy(model(ids, pos, doc).flatten(0, 1), labels.flatten())
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("bad, needle", [
    (dict(mode="partial"), "activation_checkpointing.mode must be one of"),
    (dict(mode="full", every_n_blocks=0), "activation_checkpointing.every_n_blocks"),
    (dict(mode="full", every_n_blocks=1.5), "activation_checkpointing.every_n_blocks"),
    (dict(mode="full", every_n_blocks=True), "activation_checkpointing.every_n_blocks"),
])
def test_config_errors_name_the_field(bad, needle):
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        ActivationCheckpointConfig(**bad)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="every_n_layers"):
        ActivationCheckpointConfig.from_dict({"mode": "full", "every_n_layers": 2})


@pytest.mark.parametrize("mode, every", [("full", 1), ("selective", 1), ("full", 2), ("selective", 2)])
def test_gradients_equal_no_checkpointing(mode, every):
    config = tiny()
    want_loss, want = loss_and_grads(config, "none")
    loss, got = loss_and_grads(config, mode, every)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7, msg=k)


def test_gradients_equal_with_layer_sharing():
    # Each shared block runs twice per forward: two checkpointed calls of one module.
    config = tiny(layer_sharing=True, num_layers=2)
    _, want = loss_and_grads(config, "none")
    for mode in ("full", "selective"):
        _, got = loss_and_grads(config, mode)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7, msg=(mode, k))


def test_every_n_blocks_picks_blocks_0_n_2n():
    model = build_model(tiny(num_layers=5), seed=0)
    apply_activation_checkpointing(model, ActivationCheckpointConfig(mode="full", every_n_blocks=2))
    assert [is_checkpointed(b) for b in model.layers] == ["full", None, "full", None, "full"]
    with pytest.raises(ValueError, match="already checkpointed"):
        apply_activation_checkpointing(model, ActivationCheckpointConfig(mode="selective"))


def test_parameter_names_state_dict_and_hf_export_unchanged(tmp_path):
    config = tiny()
    plain = build_model(config, seed=0)
    model = build_model(config, seed=0)
    apply_activation_checkpointing(model, ActivationCheckpointConfig(mode="selective"))
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert list(model.state_dict()) == list(plain.state_dict())
    assert list(get_model_state_dict(model)) == list(get_model_state_dict(plain))  # what DCP saves
    # A plain model loads the checkpointed model's state dict strictly, and the HF export reloads.
    plain.load_state_dict(model.state_dict(), strict=True)
    reloaded = load_hf(save_hf(model, tmp_path / "hf"))
    reloaded = reloaded[0] if isinstance(reloaded, tuple) else reloaded
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[k], v, rtol=0, atol=0)


def test_generation_with_kv_cache_is_unchanged():
    # No grad: the block runs plainly (a recompute would append to the KV cache twice).
    config = tiny()
    plain = build_model(config, seed=0)
    model = build_model(config, seed=0)
    apply_activation_checkpointing(model, ActivationCheckpointConfig(mode="full"))
    prompts = [[1, 2, 3, 4], [5, 6]]
    assert generate(model, prompts, 6) == generate(plain, prompts, 6)


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def backward_op_counts(config, mode, prepare=lambda model: model):
    """Ops the backward runs under checkpointing ``mode``; ``prepare`` converts the model first."""
    model = build_model(config, seed=0)
    prepare(model)
    apply_activation_checkpointing(model, ActivationCheckpointConfig(mode=mode))
    ids, labels, pos, doc = batch(config)
    loss = F.cross_entropy(model(ids, pos, doc).flatten(0, 1), labels.flatten())
    with OpCounter() as counter:
        loss.backward()
    return counter.counts


def test_selective_recomputes_elementwise_ops_but_no_matmul_or_attention():
    config = tiny()
    none, full, selective = (backward_op_counts(config, m) for m in ("none", "full", "selective"))
    attention = "_scaled_dot_product_flash_attention_for_cpu"
    layers = config.num_layers
    # Without checkpointing backward runs no forward op. Full recomputes each block's forward:
    # its matmuls (q, k, v, o, gate, up; down_proj's output is not needed by backward, and the
    # recompute stops early before it), its attention and its SiLU.
    assert none["silu"] == 0 and none[attention] == 0
    assert full["mm"] >= none["mm"] + 6 * layers
    assert full[attention] == layers and full["silu"] == layers
    # Selective: matmul and attention outputs were saved (backward runs exactly the no-AC
    # matmuls), the SiLU is recomputed.
    assert selective["mm"] == none["mm"] and selective[attention] == 0
    assert selective["silu"] == layers


# ------------------------------------------------------------------ what selective saves, by op

def test_every_saved_op_name_is_an_op_of_this_torch():
    """A renamed or removed op must fail here, not be skipped (the policy would then recompute that
    GEMM or attention kernel in every backward). The reference is torch's own dispatcher registry."""
    from torch._ops import HigherOrderOperator

    from ct_parallel.activation_checkpoint import MISSING_SAVED_OPS, SAVED_OP_NAMES, SAVED_OPS, resolve_op

    assert MISSING_SAVED_OPS == ()
    for name in SAVED_OP_NAMES:
        op = resolve_op(name)
        if name.startswith("higher_order::"):
            assert isinstance(op, HigherOrderOperator), name
        else:
            torch._C._dispatch_find_schema_or_throw(name, "")  # raises for an op the dispatcher lacks
            assert op.name() == name, (op.name(), name)
        assert op in SAVED_OPS
    assert len(SAVED_OPS) == len(SAVED_OP_NAMES)


def test_selective_policy_saves_gemms_and_attention_and_recomputes_the_rest():
    """Hand list, by the ops torch and torchao 0.18 actually call: torchao's Float8Linear and MXFP8
    linears end in aten._scaled_mm, its FP8 MoE GEMMs in aten._scaled_grouped_mm, ct-model's CUDA MoE
    in aten._grouped_mm, varlen attention is the torch_attn::_varlen_attn custom op (over the flash
    or cuDNN kernels)."""
    import torch.nn.attention.varlen  # noqa: F401  registers torch.ops.torch_attn
    from torch.utils.checkpoint import CheckpointPolicy

    from ct_parallel.activation_checkpoint import selective_policy

    aten = torch.ops.aten
    saved = [aten.mm.default, aten.addmm.default, aten.bmm.default, aten._scaled_mm.default,
             aten._scaled_mm_v2.default, aten._grouped_mm.default, aten._scaled_grouped_mm.default,
             aten._scaled_grouped_mm_v2.default, torch.ops.torch_attn._varlen_attn.default,
             aten._flash_attention_forward.default, aten._cudnn_attention_forward.default,
             aten._efficient_attention_forward.default, aten._scaled_dot_product_flash_attention.default,
             aten._scaled_dot_product_flash_attention_for_cpu.default,
             aten._scaled_dot_product_efficient_attention.default, aten._scaled_dot_product_cudnn_attention.default,
             torch.ops.higher_order.flex_attention, aten.max.default]
    recomputed = [aten.silu.default, aten.mul.Tensor, aten.add.Tensor, aten.rsqrt.default, aten._to_copy.default,
                  aten.abs.default, aten.clamp.default, aten.view.default, aten.cat.default, aten.amax.default]
    for op in saved:
        assert selective_policy(None, op) == CheckpointPolicy.MUST_SAVE, op
    for op in recomputed:
        assert selective_policy(None, op) == CheckpointPolicy.PREFER_RECOMPUTE, op


class _ScaledLinear(torch.autograd.Function):
    """y = x @ w.T through torch._scaled_mm on e4m3 operands (what torchao's subclass calls on CUDA;
    the CPU kernel exists too), backward in high precision."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        one = torch.ones((), dtype=torch.float32)
        f8 = torch.float8_e4m3fn
        return torch._scaled_mm(x.to(f8), w.to(f8).t(), scale_a=one, scale_b=one, out_dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return grad @ w, grad.t() @ x


def test_selective_checkpoint_keeps_the_fp8_gemm_output():
    """Counted in backward: under the selective policy aten._scaled_mm runs once (forward only);
    a recompute-everything policy reruns it. Gradients equal the uncheckpointed ones."""
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    from ct_parallel.activation_checkpoint import selective_policy

    g = torch.Generator().manual_seed(0)
    x0, w0 = torch.randn(32, 16, generator=g), torch.randn(48, 16, generator=g)

    def region(x, w):  # cos's backward needs sin's output: recomputed unless saved
        return torch.cos(torch.sin(_ScaledLinear.apply(x, w)))

    def run(policy):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        if policy is None:
            out = region(x, w)
        else:
            out = checkpoint(region, x, w, use_reentrant=False,
                             context_fn=lambda: create_selective_checkpoint_contexts(policy))
        with OpCounter() as counter:
            out.square().sum().backward()
        return counter.counts, x.grad, w.grad

    plain, x_ref, w_ref = run(None)
    sac, x_sac, w_sac = run(selective_policy)
    everything, _, _ = run(lambda ctx, op, *a, **k: CheckpointPolicy.PREFER_RECOMPUTE)
    assert plain["_scaled_mm"] == 0 and sac["_scaled_mm"] == 0 and everything["_scaled_mm"] == 1
    # cos's own backward computes sin once; the recompute adds one more under both policies.
    assert sac["sin"] == everything["sin"] == plain["sin"] + 1
    torch.testing.assert_close((x_sac, w_sac), (x_ref, w_ref), rtol=0, atol=0)


def test_selective_recomputes_no_gemm_of_fp8_linears():
    """torchao Float8Linear (emulated on CPU): eager, the policy sees aten.mm on float8 tensor
    subclasses; selective backward runs exactly the no-checkpointing matmuls."""
    from ct_precision import PrecisionConfig, convert_to_fp8

    config = tiny()
    precision = PrecisionConfig(dtype="fp8", param_dtype="bfloat16", compute_dtype="bfloat16",
                                fp8_min_matmul_elements=0)

    def counts(mode):
        return backward_op_counts(config, mode, prepare=lambda model: convert_to_fp8(model, precision))

    none, selective = counts("none"), counts("selective")
    assert none["mm"] > 0 and selective["mm"] == none["mm"]
    assert selective["silu"] == config.num_layers and none["silu"] == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (varlen attention is CUDA only)")
def test_selective_does_not_rerun_varlen_attention_on_gpu():
    """Packed documents on CUDA with attention_backend=varlen: full checkpointing reruns
    torch_attn::_varlen_attn once per block in backward, selective never."""
    config = tiny(attention_backend="varlen")

    def counts(mode):
        model = build_model(config, seed=0).cuda()
        apply_activation_checkpointing(model, ActivationCheckpointConfig(mode=mode))
        ids, labels, pos, doc = (t.cuda() for t in batch(config))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(ids, pos, doc).flatten(0, 1).float(), labels.flatten())
        with OpCounter() as counter:
            loss.backward()
        return counter.counts

    full, selective = counts("full"), counts("selective")
    assert full["_varlen_attn"] == config.num_layers and selective["_varlen_attn"] == 0
