"""Losses without full logits through the engines: chunked CE and KD (online and cached teachers)
equal the unchunked losses and gradients, single process and under DDP/FSDP2 (2 gloo processes),
and a training step with chunking on never allocates a [micro x seq x vocab] tensor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "ct-model" / "tests"))  # tensor_probe, a ct-model test helper

import loss_chunking_lib as lib  # noqa: E402
from ct_model.batch import ModelOutput  # noqa: E402
from ct_parallel import build_native_engine  # noqa: E402
from ct_stages import LossConfig  # noqa: E402
from tensor_probe import LargestTensor  # noqa: E402

TOL = 1e-6  # relative, fp32 (the bound)


@pytest.fixture(scope="module")
def teacher():
    return lib.build_teacher()


@pytest.mark.parametrize("variant", lib.VARIANTS)
def test_chunked_equals_unchunked_through_the_single_process_engine(variant, teacher):
    mbs = lib.microbatches(variant)
    want_loss, want_grads = lib.reference_step(variant, mbs, teacher)
    results = {}
    for chunk in (0, lib.CHUNK):
        model = lib.build_student()
        engine = build_native_engine(model)
        results[chunk] = lib.engine_step(engine, model, lib.build_stage(variant, chunk, teacher), mbs)
    (loss0, grads0), (loss_c, grads_c) = results[0], results[lib.CHUNK]
    assert abs(loss_c - loss0) <= TOL * abs(loss0), (loss_c, loss0)
    assert lib.worst_grad(grads_c, grads0) <= TOL
    # and both equal the plain full-logits loop (the engine adds nothing of its own)
    assert abs(loss0 - want_loss) <= TOL * abs(want_loss)
    assert lib.worst_grad(grads0, want_grads) <= TOL


def test_the_chunked_loss_really_receives_hidden_states(teacher):
    """Guards the equivalence test against comparing the logits path with itself."""
    seen = []
    stage = lib.build_stage("pretrain", lib.CHUNK, teacher)
    inner = stage.loss

    class Spy(type(inner)):
        def from_hidden(self, mb, output):
            seen.append(type(output))
            return inner.from_hidden(mb, output)

    spy = Spy(inner.chunk_tokens, inner.fused_kernel)
    model = lib.build_student()
    build_native_engine(model).forward_backward(lib.microbatches("pretrain", n_micro=1), spy)
    assert seen == [ModelOutput]
    # the online teacher's targets are its hidden states and weight, not logits
    mb = lib.annotated(lib.build_stage("midtrain_online", lib.CHUNK, teacher), lib.microbatches("pretrain", 1))[0]
    assert "teacher_logits" not in mb and mb["teacher_hidden"].shape[-1] == 48
    assert mb["teacher_output_weight"].data_ptr() == teacher.model.output_weight.data_ptr()  # not a copy


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["pretrain", "midtrain_online"])
def test_no_micro_by_seq_by_vocab_tensor_in_a_chunked_training_step(variant, teacher):
    b, t = 2, 64
    full = b * t * lib.VOCAB  # 65,536; every other tensor of this model is at most half of it
    mbs = lib.microbatches(variant, n_micro=2, b=b, t=t)
    largest = {}
    for chunk in (0, 16):
        model = lib.build_student()
        engine = build_native_engine(model)
        stage = lib.build_stage(variant, chunk, teacher)
        with LargestTensor() as probe:  # annotation (teacher forward) included
            engine.forward_backward(lib.annotated(stage, mbs), stage.loss)
        largest[chunk] = probe.largest
    assert largest[16] < full // 2 + 1, largest
    assert largest[0] >= full, largest  # the probe does see full logits when they exist


def test_forward_only_with_chunking_equals_unchunked_and_computes_no_gradient(teacher):
    mbs = lib.microbatches("pretrain")
    losses = []
    for chunk in (0, lib.CHUNK):
        model = lib.build_student()
        engine = build_native_engine(model)
        losses.append(engine.forward_only(mbs, lib.build_stage("pretrain", chunk, teacher).loss).loss)
        assert all(p.grad is None for p in model.parameters())
    assert abs(losses[1] - losses[0]) <= TOL * losses[0]


def test_logits_engines_still_get_the_unchunked_loss(teacher):
    """Megatron passes logits: a chunked stage loss must accept them (and the hidden-mode teacher)."""
    for variant in ("pretrain", "midtrain_online"):
        mbs = lib.microbatches(variant, n_micro=1)
        model = lib.build_student()
        chunked = lib.build_stage(variant, lib.CHUNK, teacher)
        plain = lib.build_stage(variant, 0, teacher)
        with torch.no_grad():
            logits = model(mbs[0]["input_ids"], mbs[0]["position_ids"], mbs[0]["document_ids"])
            got = chunked.loss(lib.annotated(chunked, mbs)[0], logits)
            want = plain.loss(lib.annotated(plain, mbs)[0], logits)
        torch.testing.assert_close(got, want, rtol=TOL, atol=0)


@pytest.mark.parametrize("variant, chunk", [("midtrain_online", 0), ("midtrain_online", lib.CHUNK),
                                            ("midtrain_cached", 0)])
def test_the_kd_stage_loss_runs_on_vocabulary_slices(teacher, variant, chunk):
    """Megatron TP hands the KD loss its vocabulary slice: the stage's loss carries ct-distill's
    slice implementation (for every teacher form), equal to the loss on the logits. One slice
    holding the whole vocabulary here; tests/test_vocab_parallel_kd.py splits over 2 processes."""
    from ct_model.batch import VocabShard
    from ct_model.loss import LossInput

    stage = lib.build_stage(variant, chunk, teacher)
    assert stage.loss.supports(LossInput.VOCAB_SHARDS)
    on_shards = stage.loss.from_vocab_shards
    mb = lib.annotated(stage, lib.microbatches(variant, n_micro=1))[0]
    with torch.no_grad():
        logits = lib.build_student()(mb["input_ids"], mb["position_ids"], mb["document_ids"])
    whole = VocabShard(0, logits.shape[-1], sum=lambda x: x, use_locally=lambda x: x, max=lambda x: x)
    torch.testing.assert_close(on_shards(mb, logits, whole), stage.loss(mb, logits), rtol=TOL, atol=0)


@pytest.mark.parametrize("bad, field", [(dict(chunk_tokens=-1), "loss.chunk_tokens"),
                                        (dict(fused_kernel="triton"), "loss.fused_kernel")])
def test_loss_config_errors_name_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        LossConfig(**bad)


def test_loss_section_is_part_of_the_run_config():
    from ct_stages.config import ConfigKeyError, RunConfig

    assert RunConfig.from_dict({"loss": {"chunk_tokens": 64}}).loss.chunk_tokens == 64
    assert RunConfig().to_dict()["loss"] == {"chunk_tokens": 1024, "fused_kernel": "auto"}
    with pytest.raises(ConfigKeyError, match="loss.chunk_tokens"):
        RunConfig.from_dict({"loss": {"chunk_tokens": "many"}})


# -- multi-process (torchrun, gloo) ------------------------------------------------------------------
@pytest.mark.dist
@pytest.mark.slow
def test_chunked_equals_unchunked_under_ddp_and_fsdp2(tmp_path):
    out = tmp_path / "chunking.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(29700 + os.getpid() % 1000), str(HERE / "dist_loss_chunking_checks.py"), str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    results = json.loads(out.read_text())
    assert set(results) == {f"{s}/{v}" for s in ("ddp", "fsdp2") for v in lib.VARIANTS}
    for name, r in results.items():
        assert r["chunked_vs_unchunked_loss"] <= TOL and r["chunked_vs_unchunked_grad"] <= TOL, (name, r)
        # the distributed run itself is right: against the single-process full-logits loop
        assert r["unchunked_vs_reference_loss"] <= 1e-5 and r["unchunked_vs_reference_grad"] <= 1e-5, (name, r)
