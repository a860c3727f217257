"""Shared pieces of the distributed equivalence checks: a tiny model, a global batch with packed
documents and ignored labels, the single-process ct-model reference, and comparisons."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ct_model import build_model, presets
from ct_model.loss import Loss, LossInput, vocab_parallel_cross_entropy_sum

STEPS = 3
LR = 1e-3
TOL = 1e-5  # relative (per tensor: ||a - b|| / ||b||), as the issue asks
# Parameters after optimizer steps: AdamW divides by sqrt(v), so fp32 rounding in gradient
# elements near zero is amplified in the update (seen: 1.02e-05 on a TP2 v_proj). Losses and
# gradients keep TOL.
PARAM_TOL = 3e-5


def tiny_config(**overrides):
    # mobilellm_tiny's architecture (GQA, QK-norm, interleaved RoPE, tied) at CPU-test size.
    values = dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                  ffn_hidden_size=128, vocab_size=256, max_position_embeddings=64)
    values.update(overrides)
    return presets.get("mobilellm_tiny", **values)


def global_batch(config, n_micro: int = 4, b: int = 2, t: int = 16, seed: int = 0) -> list[dict]:
    """n_micro microbatches [b, t]: two documents per row (positions restart), a few -100 labels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_micro):
        ids = torch.randint(0, config.vocab_size, (b, t + 1), generator=g)
        cut = 5 + i % 3
        doc = torch.zeros(b, t, dtype=torch.long)
        doc[:, cut:] = 1
        pos = torch.arange(t).expand(b, t).clone()
        pos[:, cut:] -= cut
        labels = ids[:, 1:].clone()
        labels[:, cut - 1] = -100  # no target across a document boundary
        labels[0, : i + 1] = -100  # unequal scored tokens per microbatch
        out.append({"input_ids": ids[:, :-1].contiguous(), "labels": labels, "position_ids": pos, "document_ids": doc})
    return out


def gathered_loss_fn(mb, logits):
    """Summed CE as a plain function of the logits: under megatron TP it receives the gathered
    full-vocabulary logits."""
    return F.cross_entropy(logits.flatten(0, 1).float(), mb["labels"].flatten(), ignore_index=-100, reduction="sum")


class _LogitsOrShardsCE(Loss):
    """Summed CE from the full logits, or (megatron) from this rank's vocabulary shard by
    ``on_shards(mb, local, shard)``; never from hidden states, so native engines run the model's
    own output layer (FP8 included)."""

    inputs = frozenset({LossInput.LOGITS, LossInput.VOCAB_SHARDS})

    def __init__(self, on_shards):
        self.on_shards = on_shards

    def from_logits(self, mb, logits):
        return gathered_loss_fn(mb, logits)

    def from_vocab_shards(self, mb, local, shard):
        return self.on_shards(mb, local, shard)


# The same loss; under megatron it runs as megatron's vocab-parallel cross-entropy on the shards.
loss_fn = _LogitsOrShardsCE(vocab_parallel_cross_entropy_sum)


def _ce_on_vocab_shards(mb, local, shard):
    """Summed CE from this rank's vocabulary slice through the VocabShard operations (the path
    ct-distill's KD losses take under megatron TP), written out independently of megatron's CE."""
    local = local.float()
    top = shard.max(local.max(-1, keepdim=True).values)
    lse = shard.use_locally(top + shard.sum(torch.exp(local - top).sum(-1, keepdim=True)).log())
    labels = mb["labels"]
    scored = labels != -100
    owned = scored & (labels >= shard.start) & (labels < shard.end)
    index = (labels - shard.start).clamp(0, local.shape[-1] - 1).unsqueeze(-1)
    picked = (local - lse).gather(-1, index).squeeze(-1)
    target = shard.sum(torch.where(owned, picked, torch.zeros_like(picked)))
    return -torch.where(scored, target, torch.zeros_like(target)).sum()


shard_loss_fn = _LogitsOrShardsCE(_ce_on_vocab_shards)


def build_optimizer(named):
    return torch.optim.AdamW([p for _, p in named], lr=LR, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-6)


def reference(config, batch, steps: int = STEPS, seed: int = 0):
    """Single-process ct-model: losses per step, grads of step 0, params after ``steps`` steps."""
    model = build_model(config, seed=seed)
    opt = build_optimizer(list(model.named_parameters()))
    tokens = sum(int((mb["labels"] != -100).sum()) for mb in batch)
    losses, grads = [], None
    for step in range(steps):
        total = 0.0
        for mb in batch:
            loss = loss_fn(mb, model(mb["input_ids"], mb["position_ids"], mb["document_ids"]))
            (loss / tokens).backward()
            total += loss.item()
        losses.append(total / tokens)
        if step == 0:
            grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return losses, grads, params


def shard_for_dp(batch, dp_rank: int, dp_size: int):
    per = len(batch) // dp_size
    return batch[dp_rank * per:(dp_rank + 1) * per]


def run_engine(engine, batch, steps: int = STEPS, grads_fn=None, loss=None):
    engine.setup_optimizer(build_optimizer)
    losses, grads = [], None
    for step in range(steps):
        result = engine.forward_backward(batch, loss or loss_fn)
        losses.append(result.loss)
        if step == 0 and grads_fn is not None:
            grads = grads_fn()
        engine.clip_grad_norm(None)
        engine.optimizer_step()
        engine.zero_grad()
    return losses, grads, engine.full_model_state_dict()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def compare(label: str, got: dict | None, want: dict, tol: float = TOL) -> float:
    """Max per-tensor relative difference; raises when above ``tol`` or keys differ."""
    if got is None:
        return 0.0
    if set(got) != set(want):
        raise AssertionError(f"{label}: keys differ: {sorted(set(got) ^ set(want))}")
    worst = max(rel(got[k], want[k]) for k in want)
    if worst > tol:
        bad = {k: rel(got[k], want[k]) for k in want if rel(got[k], want[k]) > tol}
        raise AssertionError(f"{label}: relative difference {worst:.2e} > {tol:.0e} in {bad}")
    return worst


def compare_losses(label: str, got: list[float], want: list[float], tol: float = TOL) -> float:
    worst = max(abs(g - w) / abs(w) for g, w in zip(got, want))
    if worst > tol:
        raise AssertionError(f"{label}: losses {got} vs reference {want} (rel {worst:.2e})")
    return worst


def torchrun(script: str, *args: str, nproc: int = 2, shim: bool = False, timeout: int = 240) -> None:
    """Launch ``script`` (in this directory) under torchrun with gloo; through the megatron CPU
    shim when ``shim``. Raises with the tails of stdout/stderr when it fails."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(29400 + os.getpid() % 1000)]
    cmd += [str(here / "megatron_cpu_run.py"), str(here / script)] if shim else [str(here / script)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd + list(args), env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
