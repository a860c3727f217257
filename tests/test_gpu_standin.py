"""Without a GPU, the CPU stands in for one (standin, a ct-model test helper): the loader's batches
are host memory, the model's tensors are on the "device", and any op that meets both fails as on CUDA.

Every path that feeds a model is run this way: the native engines' training and evaluation steps,
whole pretraining and KD phases through the trainer (with an online teacher), ct-eval's perplexity,
generation and lm-eval scoring, and datamix's gradients; DDP, FSDP2 and megatron TP2 / PP2 in
packages/ct-parallel/tests/dist_standin_checks.py. Each result is held to the same run without the
stand-in, so the device moves change no number."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from cli_support import TINY, train_losses

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packages" / "ct-parallel" / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packages" / "ct-model" / "tests"))  # standin

import parallel_testlib as lib  # noqa: E402
from ct_model import build_model  # noqa: E402
from standin import HostDeviceMismatch, StandInDevice, is_host, to_host  # noqa: E402


def _single_engine():
    from ct_parallel import DistributedConfig, build_engine

    engine = build_engine(build_model(lib.tiny_config(), seed=0), DistributedConfig())
    engine.setup_optimizer(lib.build_optimizer)
    return engine


def _steps(engine, batch, steps: int = 2) -> list[float]:
    losses = []
    for _ in range(steps):
        losses.append(engine.forward_backward(batch, lib.loss_fn).loss)
        engine.clip_grad_norm(1.0)
        engine.optimizer_step()
        engine.zero_grad()
    return losses


def test_the_stand_in_catches_a_model_fed_from_the_host():
    """The check itself: an unmoved batch fails, a moved one runs (so the tests below can fail)."""
    model = build_model(lib.tiny_config(), seed=0)
    ids = to_host(lib.global_batch(lib.tiny_config())[0]["input_ids"])
    with StandInDevice(), pytest.raises(HostDeviceMismatch, match="embedding"):
        model(ids)
    with StandInDevice() as device:
        model(ids.to(torch.device("cpu")))
    assert device.moved == 1


def test_native_engine_moves_host_batches_to_the_device():
    batch = lib.global_batch(lib.tiny_config())
    want = _steps(_single_engine(), batch)
    engine = _single_engine()
    with StandInDevice() as device:
        got = _steps(engine, to_host(batch))
        evaluated = engine.forward_only(to_host(batch), lib.loss_fn).loss
    assert got == want
    assert device.moved == 3 * 4 * len(batch)  # 2 steps + 1 evaluation x 4 tensors a microbatch, once each
    assert evaluated == engine.forward_only(batch, lib.loss_fn).loss


def test_native_engine_takes_batches_already_on_the_device():
    """What a benchmark hands it: the token counts must not mix host and device tensors."""
    batch = lib.global_batch(lib.tiny_config())
    want = _steps(_single_engine(), batch)
    with StandInDevice() as device:
        got = _steps(_single_engine(), batch)
    assert got == want and device.moved == 0


def _phase(tmp_path, sample_dir, phase: str, name: str, *extra: str):
    from ct_cli.common import config_dir, run_config

    return run_config(phase, [f"run_dir={tmp_path / name}", f"sample_data.dir={sample_dir}", *TINY,
                              "trainer.max_steps=2", "trainer.eval_every=1", "trainer.eval_batches=1", *extra],
                      config_dir())


def _fit_on_stand_in(monkeypatch, moved: list[int]):
    """Train with every batch the objective splits coming from host memory, and each training step and
    evaluation on the stand-in (checkpoints are written outside it: DCP wants device "cpu")."""
    from ct_stages.objective import Objective
    from ct_stages.trainer import Trainer

    split, fit = Objective.microbatches, Trainer.fit

    def host_microbatches(self, batch, micro_batch_size):
        return split(self, to_host(batch), micro_batch_size)

    def on_stand_in(fn):
        def run(*args):
            with StandInDevice() as device:
                out = fn(*args)
            moved.append(device.moved)
            return out
        return run

    def fit_on_stand_in(self):
        self._train_step = on_stand_in(self._train_step)
        self.evaluate = on_stand_in(self.evaluate)
        return fit(self)

    monkeypatch.setattr(Objective, "microbatches", host_microbatches)
    monkeypatch.setattr(Trainer, "fit", fit_on_stand_in)


@pytest.mark.slow
def test_pretrain_and_kd_phases_train_from_host_batches(tmp_path, sample_dir, monkeypatch):
    """The trainer's whole loop (evaluation, checkpoints, export) and the midtrain stage's online
    teacher: hidden states on the device projected per chunk by the KD loss, and top-k targets."""
    from ct_stages.run import run_phase

    runs = {}
    for name in ("plain", "stand_in"):
        with monkeypatch.context() as patch:
            moved: list[int] = []
            if name == "stand_in":
                _fit_on_stand_in(patch, moved)
            pretrain = run_phase(_phase(tmp_path, sample_dir, "pretrain_phase1", f"{name}_pre"))
            init = f"init_from={pretrain.hf_dir}"
            run_phase(_phase(tmp_path, sample_dir, "midtrain_phase1", f"{name}_mid", init))
            run_phase(_phase(tmp_path, sample_dir, "midtrain_phase1", f"{name}_topk", init, "stage.distill.top_k=4"))
        runs[name] = ([train_losses(tmp_path / f"{name}_{phase}") for phase in ("pre", "mid", "topk")], moved)
    assert runs["stand_in"][0] == runs["plain"][0]
    # 2 steps and 2 evaluations in each phase, each moving its batch
    assert len(runs["stand_in"][0][2]) == 2 and len(runs["stand_in"][1]) == 12 and all(runs["stand_in"][1])


def test_evaluation_scores_and_generates_on_the_device(tmp_path, sample_dir):
    """ct-eval's held-out perplexity and greedy generation, and the lm-eval adapter's scoring."""
    from ct_data import sample
    from ct_stages import evaluate as ev

    tokenizer = sample.build_tokenizer(sample_dir, 8192, split_digits=True)  # the conftest's, loaded
    model = build_model(lib.tiny_config(vocab_size=tokenizer.vocab_size), seed=0).eval()
    texts = ["The cat sat on the mat.", "Two plus two is four, and four plus four is eight."]
    problems = [{"question": "What is 2 + 3?", "answer": "5"}]
    want = ev.text_perplexity(model, tokenizer, texts), ev.reasoning_accuracy(model, tokenizer, problems,
                                                                               max_new_tokens=8)
    with StandInDevice():
        got = ev.text_perplexity(model, tokenizer, texts), ev.reasoning_accuracy(model, tokenizer, problems,
                                                                                  max_new_tokens=8)
    assert got[0] == want[0]
    assert [s["output"] for s in got[1]["samples"]] == [s["output"] for s in want[1]["samples"]]
    pytest.importorskip("lm_eval")
    from ct_stages.harness import CTModelLM

    lm = CTModelLM(model, tokenizer)
    context, continuation = [tokenizer.bos_id] + tokenizer.encode("2 + 3 ="), tokenizer.encode(" 5")
    want_logprob = lm._logprob(context, continuation)
    with StandInDevice():
        assert lm._logprob(context, continuation) == want_logprob


def test_datamix_gradients_run_on_the_device():
    from ct_datamix.influence import influence_scores

    model = build_model(lib.tiny_config(), seed=0)
    g = torch.Generator().manual_seed(0)
    train = [torch.randint(1, 256, (n,), generator=g) for n in (12, 9, 16, 7)]
    probes = {"math": [torch.randint(1, 256, (10,), generator=g) for _ in range(2)]}
    want = influence_scores(model, train, probes, batch_size=2)
    with StandInDevice():
        got = influence_scores(model, to_host(train), {"math": to_host(probes["math"])}, batch_size=2)
    assert is_host(got["math"])  # the scores come back to host memory, as on a GPU machine
    torch.testing.assert_close(got["math"].as_subclass(torch.Tensor), want["math"], rtol=0, atol=0)


@pytest.mark.dist
@pytest.mark.slow
def test_ddp_fsdp2_and_megatron_layouts_move_host_batches(tmp_path):
    import json

    out = tmp_path / "standin.json"
    lib.torchrun("dist_standin_checks.py", str(out), shim=True, timeout=400)
    results = json.loads(out.read_text())
    assert set(results) == {"ddp", "fsdp2", "megatron_tp2", "megatron_pp2"}
    for name, r in results.items():
        assert r["moved"] > 0, name  # the batches really came from the host
        assert r["loss"] <= lib.TOL, (name, r)  # (compare_losses in the script raised above TOL)
