"""Every large GEMM of a ``precision=bf16`` training step runs in bf16: a dispatch-level audit of
one whole step (forward, chunked loss head, backward) of pretraining on single, DDP and FSDP2, of
the KD stage with its online teacher, and of the DeepSeek-V3-shaped MoE model.

An fp32 GEMM runs at a fraction of bf16 speed on a GPU (a tenth with TF32 off), so one left in the
loss head costs a large share of a step. What may stay fp32 is norm-sized work: the MoE router
(DeepSeek-V3 keeps gating in fp32), a GEMM whose output or contraction width is at most the number
of experts."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cli_support import TINY

aten = torch.ops.aten
GEMMS = {aten.mm.default, aten.addmm.default, aten.addmm_.default, aten._grouped_mm.default}
NORM_SIZED = 16  # >= the tiny MoE's 8 experts, far below any hidden, FFN or vocabulary width


class GemmAudit(TorchDispatchMode):
    """Counts the GEMMs that ran, by (op, operand dtypes, operand shapes), after autocast's casts."""

    def __init__(self):
        super().__init__()
        self.seen: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in GEMMS:
            operands = [a for a in args if isinstance(a, torch.Tensor)][-2:]  # (addmm: the two factors)
            self.seen[(func.__name__, tuple(t.dtype for t in operands), tuple(tuple(t.shape) for t in operands))] += 1
        return func(*args, **(kwargs or {}))

    def fp32_gemms(self) -> list:
        """fp32 GEMMs wider than norm-sized work in every dimension."""
        out = []
        for (name, dtypes, shapes), count in self.seen.items():
            (m, k), (_, n) = shapes[0][-2:], shapes[1][-2:]
            if torch.float32 in dtypes and min(m, k, n) > NORM_SIZED:
                out.append((name, dtypes, shapes, count))
        return out


def _audited_step(monkeypatch, audits: list):
    from ct_stages.trainer import Trainer

    step = Trainer._train_step

    def audited(self, batch):
        with GemmAudit() as audit:
            out = step(self, batch)
        audits.append(audit)
        return out

    monkeypatch.setattr(Trainer, "_train_step", audited)


def _audit(tmp_path, sample_dir, monkeypatch, phase: str, *overrides: str) -> GemmAudit:
    from ct_cli.common import config_dir, run_config
    from ct_stages.run import run_phase

    audits: list[GemmAudit] = []
    _audited_step(monkeypatch, audits)
    run = run_config(phase, [f"run_dir={tmp_path / 'run'}", f"sample_data.dir={sample_dir}", *TINY,
                             "trainer.max_steps=1", "precision=bf16", *overrides], config_dir())
    run_phase(run)
    (audit,) = audits
    assert sum(audit.seen.values()) > 10, audit.seen  # the step's GEMMs were seen at all
    return audit


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["single", "ddp", "fsdp2"])
def test_pretraining_step_has_no_fp32_gemm(tmp_path, sample_dir, monkeypatch, layout):
    """FSDP2 has no autocast (bf16 parameters instead): its chunked-CE weight gradient was fp32."""
    audit = _audit(tmp_path, sample_dir, monkeypatch, "pretrain_phase1", f"distributed={layout}")
    assert audit.fp32_gemms() == []
    # The vocabulary-sized GEMMs of the chunked loss head are there, in bf16.
    vocab = [key for key in audit.seen if 8192 in key[2][0] + key[2][1]]
    assert vocab and all(key[1] == (torch.bfloat16, torch.bfloat16) for key in vocab), vocab


@pytest.mark.slow
def test_kd_step_and_its_teacher_have_no_fp32_gemm(tmp_path, sample_dir, monkeypatch, reference_run):
    """The online teacher runs in the run's compute dtype (it ran its whole forward in fp32)."""
    audit = _audit(tmp_path, sample_dir, monkeypatch, "midtrain_phase1", f"init_from={reference_run / 'hf'}")
    assert audit.fp32_gemms() == []


@pytest.mark.slow
def test_moe_step_keeps_only_the_router_in_fp32(tmp_path, sample_dir, monkeypatch):
    audit = _audit(tmp_path, sample_dir, monkeypatch, "pretrain_phase1", "model=deepseek_v3_tiny")
    assert audit.fp32_gemms() == []
    router = [key for key in audit.seen if torch.float32 in key[1]]
    assert router, "the router's fp32 gating GEMMs were expected"
