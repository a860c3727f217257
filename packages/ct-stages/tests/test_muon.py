"""optimizer=muon: the update against a float64 reference written out here, the AdamW half against
torch's AdamW, and which parameters go where."""

import math

import pytest
import torch

import ct_model
from ct_stages.muon import MuonWithAdamW
from ct_stages.optim import OptimizerConfig, build_optimizer, muon_groups


def reference_ns(m: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Quintic Newton-Schulz on one 2-D matrix in float64, X <- aX + b(XX^T)X + c(XX^T)^2 X."""
    x = m.double()
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / torch.linalg.matrix_norm(x)
    for _ in range(steps):
        a = x @ x.T
        x = 3.4445 * x - 4.7750 * a @ x + 2.0315 * a @ a @ x
    return x.T if tall else x


def reference_step(w, g, buf, *, lr, wd, mu, split):
    """One Muon step on a float64 copy: EMA momentum, nesterov, per-matrix NS x 0.2 sqrt(max dim)."""
    buf = mu * buf + (1 - mu) * g
    u = (1 - mu) * g + mu * buf
    mats = u.reshape(-1, *u.shape[-2:])
    rows = u.shape[-2] // split
    out = torch.empty_like(mats)
    for i, mat in enumerate(mats):
        for s in range(split):
            block = mat[s * rows:(s + 1) * rows]
            out[i, s * rows:(s + 1) * rows] = reference_ns(block) * 0.2 * math.sqrt(max(block.shape))
    w = w * (1 - lr * wd) - lr * out.reshape(u.shape)
    return w, buf


@pytest.mark.parametrize("shape, split", [((24, 40), 1), ((40, 24), 1), ((3, 16, 12), 1), ((2, 20, 12), 2)])
def test_muon_matches_a_float64_reference(shape, split):
    torch.manual_seed(0)
    w = torch.randn(shape)
    param = torch.nn.Parameter(w.clone())
    opt = MuonWithAdamW([{"params": [param], "muon": True, "split": split, "weight_decay": 0.1}], lr=0.05)
    ref, buf = w.double(), torch.zeros(shape, dtype=torch.float64)
    for _ in range(3):
        g = torch.randn(shape)
        param.grad = g.clone()
        opt.step()
        ref, buf = reference_step(ref, g.double(), buf, lr=0.05, wd=0.1, mu=0.95, split=split)
    moved = (ref - w.double()).abs().max()
    assert moved > 0.05  # the comparison below is not of two unmoved tensors
    torch.testing.assert_close(param.detach().double(), ref, rtol=0, atol=2e-5)


def test_newton_schulz_output_is_nearly_orthogonal():
    torch.manual_seed(1)
    from ct_stages.muon import newton_schulz
    singular = torch.linalg.svdvals(newton_schulz(torch.randn(32, 64), 5, torch.float32))
    # The quintic trades exact convergence for speed: singular values land near 1, not at 1.
    assert singular.min() > 0.6 and singular.max() < 1.25


def test_adamw_groups_step_like_torch_adamw():
    torch.manual_seed(2)
    ws = [torch.randn(8, 5), torch.randn(7)]
    ours = [torch.nn.Parameter(w.clone()) for w in ws]
    theirs = [torch.nn.Parameter(w.clone()) for w in ws]
    groups = lambda ps: [{"params": [ps[0]], "weight_decay": 0.1}, {"params": [ps[1]], "weight_decay": 0.0}]
    a = MuonWithAdamW(groups(ours), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    b = torch.optim.AdamW(groups(theirs), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for _ in range(4):
        grads = [torch.randn_like(w) for w in ws]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def _names_by_group(model_name: str, config: OptimizerConfig):
    model = ct_model.build_model(ct_model.presets.get(model_name))
    names = {id(p): n.replace("layers.1.", "layers.N.").replace("layers.0.", "layers.N.")
             for n, p in model.named_parameters()}
    return [(g, {names[id(p)] for p in g["params"]}) for g in muon_groups(model.named_parameters(), config)]


def test_groups_send_block_matrices_to_muon_and_the_rest_to_adamw():
    config = OptimizerConfig(name="muon", lr=1e-3, weight_decay=0.1, muon_lr=0.02, muon_weight_decay=0.01)
    groups = _names_by_group("deepseek_v3_tiny", config)
    muon = {n: g for g, names in groups if g.get("muon") for n in names}
    adamw = {n: g for g, names in groups if not g.get("muon") for n in names}
    for name in ("embed_tokens.weight", "lm_head.weight", "norm.weight", "layers.N.mlp.gate.weight",
                 "layers.N.input_layernorm.weight"):
        assert name in adamw and "lr" not in adamw[name]  # AdamW groups take optimizer.lr (the default)
    for name in ("layers.N.self_attn.o_proj.weight", "layers.N.mlp.down_proj", "layers.N.mlp.gate_up_proj",
                 "layers.N.mlp.shared_experts.up_proj.weight", "layers.N.self_attn.kv_b_proj.weight"):
        assert muon[name]["lr"] == 0.02 and muon[name]["weight_decay"] == 0.01
    assert muon["layers.N.mlp.gate_up_proj"]["split"] == 2 and muon["layers.N.mlp.down_proj"]["split"] == 1
    assert adamw["norm.weight"]["weight_decay"] == 0.0 and adamw["lm_head.weight"]["weight_decay"] == 0.1


def test_muon_lr_and_weight_decay_default_to_adamws():
    groups = _names_by_group("mobilellm_tiny", OptimizerConfig(name="muon", lr=3e-3, weight_decay=0.05))
    (muon, names), = [(g, n) for g, n in groups if g.get("muon")]
    assert muon["lr"] == 3e-3 and muon["weight_decay"] == 0.05
    assert "layers.N.self_attn.q_proj.weight" in names and "embed_tokens.weight" not in names


def test_build_optimizer_muon_trains_a_tiny_model():
    torch.manual_seed(3)
    model = ct_model.build_model(ct_model.presets.get("mobilellm_tiny").replace(num_layers=2))
    opt = build_optimizer(model.named_parameters(), OptimizerConfig(name="muon", lr=3e-3))
    ids = torch.randint(0, 100, (2, 16))
    losses = []
    for _ in range(8):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


@pytest.mark.parametrize("bad, field", [
    ({"muon_lr": 0.0}, "optimizer.muon_lr"), ({"muon_weight_decay": -1.0}, "optimizer.muon_weight_decay"),
    ({"muon_momentum": 1.0}, "optimizer.muon_momentum"), ({"muon_ns_steps": 0}, "optimizer.muon_ns_steps"),
    ({"muon_nesterov": "yes"}, "optimizer.muon_nesterov"), ({"muon_adjust_lr": "spectral"}, "optimizer.muon_adjust_lr"),
])
def test_muon_config_errors_name_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        OptimizerConfig(name="muon", **bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_muon_runs_newton_schulz_in_bf16_close_to_the_reference():
    """On CUDA the NS runs in bf16: the step follows the float64 reference to bf16 resolution."""
    torch.manual_seed(4)
    w, g = torch.randn(64, 96), torch.randn(64, 96)
    param = torch.nn.Parameter(w.cuda())
    opt = MuonWithAdamW([{"params": [param], "muon": True, "weight_decay": 0.0}], lr=0.05)
    param.grad = g.cuda()
    opt.step()
    ref, _ = reference_step(w.double(), g.double(), torch.zeros_like(w, dtype=torch.float64),
                            lr=0.05, wd=0.0, mu=0.95, split=1)
    delta, want = (param.detach().cpu().double() - w.double()), ref - w.double()
    assert (delta - want).norm() / want.norm() < 2e-2



@pytest.mark.dist
def test_row_sharded_matrices_are_spread_over_ranks_and_match_one_process(tmp_path):
    """FSDP2's layout on 2 gloo ranks: each matrix is orthogonalised once, by its owner (round
    robin: rank 0 the 1st and 3rd, rank 1 the 2nd), and the parameters are bit-identical to one
    process stepping the full tensors (the same NS on the same gathered matrix)."""
    import sys
    from pathlib import Path

    import torch.multiprocessing as mp

    sys.path.insert(0, str(Path(__file__).parent))  # spawned processes import the worker by name
    from muon_spread_worker import SPREAD, spread_problem, spread_worker

    out = tmp_path / "spread.pt"
    mp.spawn(spread_worker, args=(str(tmp_path / "store"), str(out)), nprocs=2)
    got = torch.load(out)
    params, grads = spread_problem()
    single = [torch.nn.Parameter(p.clone()) for p in params]
    opt = MuonWithAdamW([{"params": [p], "muon": True, "split": split, "weight_decay": 0.1}
                         for p, (_, split) in zip(single, SPREAD)], lr=0.05)
    for step_grads in grads:
        for p, g in zip(single, step_grads):
            p.grad = g.clone()
        opt.step()
    for want, have, before in zip(single, got["params"], params):
        assert not torch.equal(want.detach(), before)
        assert torch.equal(have, want.detach())
    shapes = [shape for shape, _ in SPREAD]
    assert got["calls"] == [[shapes[0], shapes[2]] * 3, [shapes[1]] * 3]
