"""Shared pieces of the chunked-loss equivalence checks (in-process and under torchrun): a tiny
student and teacher, microbatches for each stage, and a plain-torch reference step on full logits."""

from __future__ import annotations

import torch

import ct_model
from ct_distill import OnlineTeacher
from ct_stages import DistillConfig, LossConfig, Objective, StageConfig, build_loss

VOCAB = 512
CHUNK = 5  # several chunks per microbatch, the last one ragged
TOP_K = 8
# The three stages; midtrain with an online teacher (hidden states projected per chunk) and with
# cached top-k targets (the keys TeacherCacheReader attaches; produced here by the teacher itself).
VARIANTS = ("pretrain", "posttrain", "midtrain_online", "midtrain_cached")


def student_config(**overrides):
    values = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, kv_channels=8,
                  ffn_hidden_size=64, vocab_size=VOCAB, max_position_embeddings=128)
    values.update(overrides)
    return ct_model.presets.get("mobilellm_tiny", **values)


def build_student(seed: int = 0, **overrides):
    return ct_model.build_model(student_config(**overrides), seed=seed)


def build_teacher() -> OnlineTeacher:
    # Another width than the student's: the teacher's own output weight must be the one used.
    config = student_config(num_layers=1, hidden_size=48, kv_channels=12)
    return OnlineTeacher(ct_model.build_model(config, seed=11), student_vocab_size=VOCAB)


def microbatches(variant: str, n_micro: int = 4, b: int = 2, t: int = 16, seed: int = 0) -> list[dict]:
    """Packed rows (two documents, positions restart) with unscored labels; posttrain scores only
    the 'assistant' tail of each document, as SFT masking does."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_micro):
        ids = torch.randint(0, VOCAB, (b, t + 1), generator=g)
        cut = 5 + i % 3
        doc = torch.zeros(b, t, dtype=torch.long)
        doc[:, cut:] = 1
        pos = torch.arange(t).expand(b, t).clone()
        pos[:, cut:] -= cut
        labels = ids[:, 1:].clone()
        labels[:, cut - 1] = -100
        labels[0, : i + 1] = -100  # unequal scored tokens per microbatch
        if variant == "posttrain":
            labels[:, : cut - 3] = -100
            labels[:, cut: cut + 4] = -100
        out.append({"input_ids": ids[:, :-1].contiguous(), "labels": labels, "position_ids": pos,
                    "document_ids": doc})
    return out


def stage_config(variant: str) -> StageConfig:
    if variant == "midtrain_online":
        return StageConfig(kind="midtrain", distill=DistillConfig(kind="forward_kl", temperature=2.0, ce_weight=0.3))
    if variant == "midtrain_cached":
        return StageConfig(kind="midtrain", distill=DistillConfig(teacher="cached", kind="jsd", top_k=TOP_K,
                                                                  beta=0.4, ce_weight=0.2))
    return StageConfig(kind=variant)


def build_stage(variant: str, chunk_tokens: int, teacher: OnlineTeacher | None) -> Objective:
    """The objective as run.build_objective wires it: the online teacher in hidden mode when chunking."""
    config, annotate = stage_config(variant), None
    if variant == "midtrain_online":
        annotate = lambda mb: teacher.annotate(mb, None, hidden=chunk_tokens > 0)  # noqa: E731
    elif variant == "midtrain_cached":
        annotate = lambda mb: teacher.annotate(mb, TOP_K)  # noqa: E731
    return Objective(build_loss(config, LossConfig(chunk_tokens=chunk_tokens, fused_kernel="none")), annotate)


def annotated(stage: Objective, mbs: list[dict]) -> list[dict]:
    return [stage.annotate(mb) if stage.annotate else mb for mb in mbs]


def reference_step(variant: str, mbs: list[dict], teacher: OnlineTeacher | None, seed: int = 0):
    """Plain torch: full logits from model(...), the stage's loss on them, one backward of
    sum / scored tokens. Returns (loss, grads)."""
    model = build_student(seed)
    stage = build_stage(variant, 0, teacher)
    mbs = annotated(stage, mbs)
    tokens = sum(int((mb["labels"] != -100).sum()) for mb in mbs)
    total = 0.0
    for mb in mbs:
        loss = stage.loss(mb, model(mb["input_ids"], mb["position_ids"], mb["document_ids"]))
        (loss / tokens).backward()
        total += loss.item()
    return total / tokens, {k: p.grad.detach().clone() for k, p in model.named_parameters()}


def full_grads(model) -> dict[str, torch.Tensor]:
    return {k: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
            for k, p in model.named_parameters()}


def engine_step(engine, model, stage: Objective, mbs: list[dict]):
    result = engine.forward_backward(annotated(stage, mbs), stage.loss)
    return result.loss, full_grads(model)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def worst_grad(got: dict, want: dict) -> float:
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    return max(rel(got[k], want[k]) for k in want)
