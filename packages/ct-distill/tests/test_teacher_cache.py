"""Online teacher, cache writer/reader: alignment, resume, atomicity, clear errors."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import ct_model
from ct_distill import (CacheError, CacheMismatchError, IncompleteCacheError, OnlineTeacher,
                        TeacherCacheReader, TeacherCacheWriter, VocabMismatchError, kd_loss,
                        DistillationLoss, write_teacher_cache)

VOCAB, SEQ, BATCH, STEPS, K = 512, 32, 2, 5, 16
PART0 = "rows-000000-000001"  # the part of a one-process writer numbering sequences 0, 1, 2, ...


def tiny_config(**overrides):
    shape = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                 ffn_hidden_size=128, kv_channels=16, vocab_size=VOCAB, max_position_embeddings=128)
    return ct_model.presets.get("mobilellm_tiny", **{**shape, **overrides})


@pytest.fixture(scope="module")
def teacher():
    return OnlineTeacher(ct_model.build_model(tiny_config(), seed=1))


@pytest.fixture(scope="module")
def student():
    return ct_model.build_model(tiny_config(num_layers=1), seed=2)


def loader(steps=STEPS, seed=0):
    """Packed batches in loader order: input_ids, position_ids, document_ids, labels."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
        docs = torch.zeros(BATCH, SEQ, dtype=torch.long)
        pos = torch.zeros(BATCH, SEQ, dtype=torch.long)
        for b in range(BATCH):
            cut = int(torch.randint(5, SEQ - 5, (1,), generator=g))
            docs[b, cut:] = 1
            pos[b] = torch.cat([torch.arange(cut), torch.arange(SEQ - cut)])
        labels = torch.cat([ids[:, 1:], torch.full((BATCH, 1), -100)], 1)
        labels[docs != torch.cat([docs[:, 1:], docs[:, -1:]], 1)] = -100  # last token of a doc
        yield {"input_ids": ids, "position_ids": pos, "document_ids": docs, "labels": labels}


def test_online_teacher_is_frozen(teacher):
    assert not teacher.model.training
    assert all(not p.requires_grad for p in teacher.model.parameters())
    batch = next(loader())
    logits = teacher(batch)
    assert logits.shape == (BATCH, SEQ, VOCAB) and not logits.requires_grad
    topk = teacher.topk(batch["input_ids"], K, batch["position_ids"], batch["document_ids"])
    assert topk.ids.shape == topk.logprobs.shape == (BATCH, SEQ, K)
    full = torch.log_softmax(logits.float(), -1)
    torch.testing.assert_close(topk.logprobs, full.gather(-1, topk.ids), rtol=1e-5, atol=1e-5)
    assert bool((topk.logprobs[..., :-1] >= topk.logprobs[..., 1:]).all())


def test_online_teacher_dtype_device_and_hf(tmp_path, teacher):
    ct_model.hf.save_hf(teacher.model, tmp_path / "hf")
    loaded = OnlineTeacher.from_hf(tmp_path / "hf", dtype=torch.float64, device="cpu")
    assert loaded.dtype == torch.float64 and loaded.device.type == "cpu"
    batch = next(loader())
    torch.testing.assert_close(loaded(batch).float(), teacher(batch), rtol=1e-4, atol=1e-4)
    from safetensors.torch import save_file
    save_file(teacher.model.state_dict(), str(tmp_path / "t.safetensors"))
    again = OnlineTeacher.from_state_dict(teacher.config, tmp_path / "t.safetensors")
    torch.testing.assert_close(again(batch), teacher(batch))
    assert again.identity()["fingerprint"] == teacher.identity()["fingerprint"]
    other = OnlineTeacher(ct_model.build_model(tiny_config(), seed=99))
    assert other.identity()["fingerprint"] != teacher.identity()["fingerprint"]


def test_vocabulary_mismatch_is_a_clear_error(teacher):
    small = tiny_config(vocab_size=VOCAB - 1)
    with pytest.raises(VocabMismatchError, match=f"teacher vocabulary size {VOCAB}.*student vocabulary size {VOCAB - 1}"):
        OnlineTeacher(ct_model.build_model(tiny_config(), seed=1), student_vocab_size=small)
    with pytest.raises(VocabMismatchError):
        teacher.check_vocab(ct_model.build_model(small, seed=0))
    teacher.check_vocab(VOCAB)
    batch = next(loader())
    student = ct_model.build_model(small, seed=0)
    with pytest.raises(VocabMismatchError):
        kd_loss(student(batch["input_ids"]), teacher(batch), batch["labels"])


def _write(tmp_path, teacher, name="cache", **kw):
    kw.setdefault("seqs_per_shard", 3)  # shards straddle batches
    return write_teacher_cache(teacher, loader(), tmp_path / name, k=K, **kw)


def _firsts(index):
    return [s["first"] for part in index["parts"] for s in part["shards"]]


def test_cache_index_and_stats(tmp_path, teacher):
    index = _write(tmp_path, teacher)
    assert index["num_seqs"] == BATCH * STEPS and index["seq_len"] == SEQ and index["k"] == K
    assert _firsts(index) == [0, 3, 6, 9]
    assert index["vocab_size"] == VOCAB and index["teacher"]["fingerprint"]
    # id and float16 log-prob packed in 4 bytes per entry, plus headers and hashes
    assert index["entry"] == "packed32" and index["bytes_per_entry"] == 4
    assert 4 * K <= index["bytes_per_token"] < 4 * K * 1.5
    assert index["tokens_per_second"] > 0
    assert not list((tmp_path / "cache").rglob("*.tmp"))


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_cached_and_online_give_the_same_loss(tmp_path, teacher, student, kind):
    _write(tmp_path, teacher, logprobs_dtype=torch.float32)
    reader = TeacherCacheReader(tmp_path / "cache", seq_len=SEQ, k=K, vocab_size=VOCAB,
                                teacher=teacher.identity())
    fp16 = (_write(tmp_path, teacher, name="fp16"), TeacherCacheReader(tmp_path / "fp16"))[1]
    loss_fn = DistillationLoss(kind=kind, temperature=2.0, top_k=K, ce_weight=0.1)
    for step, batch in enumerate(loader()):
        seq = range(step * BATCH, (step + 1) * BATCH)
        logits = student(batch["input_ids"], batch["position_ids"], batch["document_ids"])
        online = kd_loss(logits, teacher(batch), batch["labels"], kind=kind, temperature=2.0,
                         top_k=K, ce_weight=0.1)
        cached_total = loss_fn(reader.annotate(batch, seq), logits)
        count = (batch["labels"] != -100).sum()
        assert (cached_total / count).item() == pytest.approx(online.item(), rel=1e-5)
        annotated_online = loss_fn(teacher.annotate(batch, top_k=K), logits)
        assert (annotated_online / count).item() == pytest.approx(online.item(), rel=1e-5)
        half = loss_fn(fp16.annotate(batch, seq), logits)
        assert (half / count).item() == pytest.approx(online.item(), rel=2e-3)


def test_resume_reader_serves_the_same(tmp_path, teacher):
    _write(tmp_path, teacher)
    first = TeacherCacheReader(tmp_path / "cache")
    continuing = [first.get(range(i * BATCH, (i + 1) * BATCH)) for i in range(STEPS)]
    for n in (1, 3, 4):  # resume at a batch boundary, inside a shard, at a shard boundary
        fresh = TeacherCacheReader(tmp_path / "cache")
        got = fresh.get(range(n * BATCH, STEPS * BATCH))
        want_ids = torch.cat([c.ids for c in continuing])[n * BATCH:]
        assert torch.equal(got.ids, want_ids)
        assert torch.equal(got.logprobs, torch.cat([c.logprobs for c in continuing])[n * BATCH:])
    scattered = first.get([7, 2, 3, 9, 0])
    assert torch.equal(scattered.ids, torch.cat([continuing[i // 2].ids[i % 2 : i % 2 + 1] for i in [7, 2, 3, 9, 0]]))
    with pytest.raises(IndexError, match="outside"):
        first.get([BATCH * STEPS])


def test_annotate_checks_the_batch_tokens(tmp_path, teacher):
    _write(tmp_path, teacher)
    reader = TeacherCacheReader(tmp_path / "cache")
    batches = list(loader())
    reader.annotate(batches[1], [2, 3])
    with pytest.raises(CacheMismatchError, match="do not hold the tokens") as err:
        reader.annotate(batches[1], [4, 5])  # off by one step
    assert err.value.field == "input_ids"
    batches[1]["sequence_index"] = torch.tensor([2, 3])
    assert "teacher_topk_ids" in reader.annotate(batches[1])


def test_field_mismatch_names_the_field(tmp_path, teacher):
    _write(tmp_path, teacher)
    root = tmp_path / "cache"
    for field, value in (("seq_len", SEQ * 2), ("k", K + 1), ("vocab_size", VOCAB + 1)):
        with pytest.raises(CacheMismatchError, match=f"{field} is") as err:
            TeacherCacheReader(root, **{field: value})
        assert err.value.field == field
    TeacherCacheReader(root, teacher={**teacher.identity(), "source": "/moved/elsewhere"})
    other = OnlineTeacher(ct_model.build_model(tiny_config(), seed=5)).identity()
    with pytest.raises(CacheMismatchError, match="fingerprint") as err:
        TeacherCacheReader(root, teacher=other)
    assert err.value.field == "teacher.fingerprint"
    # a shard swapped in from another cache is caught when the reader opens, naming the file
    write_teacher_cache(teacher, loader(), tmp_path / "k8", k=8, seqs_per_shard=3)
    shard = f"{PART0}/shard-000001.safetensors"
    os.replace(tmp_path / "k8" / shard, root / shard)
    with pytest.raises(CacheError, match=f"{shard}: .* bytes but"):
        TeacherCacheReader(root)


def test_writer_that_raises_leaves_no_valid_index(tmp_path, teacher):
    def broken():
        for i, batch in enumerate(loader()):
            if i == 3:
                raise RuntimeError("loader died")
            yield batch

    with pytest.raises(RuntimeError, match="loader died"):
        write_teacher_cache(teacher, broken(), tmp_path / "c", k=K, seqs_per_shard=2)
    assert not (tmp_path / "c" / "index.json").exists()
    assert len(list((tmp_path / "c").rglob("shard-*"))) == 3  # complete shards stay, for resume
    with pytest.raises(IncompleteCacheError, match="incomplete cache"):
        TeacherCacheReader(tmp_path / "c")
    # resume keeps the complete shards and produces the same cache as an uninterrupted run
    index = write_teacher_cache(teacher, loader(), tmp_path / "c", k=K, seqs_per_shard=2, resume=True)
    assert index["tokens_written"] == (STEPS - 3) * BATCH * SEQ
    clean = write_teacher_cache(teacher, loader(), tmp_path / "clean", k=K, seqs_per_shard=2)
    a, b = TeacherCacheReader(tmp_path / "c"), TeacherCacheReader(tmp_path / "clean")
    assert a.num_seqs == b.num_seqs == BATCH * STEPS
    everything = range(BATCH * STEPS)
    assert torch.equal(a.get(everything).ids, b.get(everything).ids)
    assert torch.equal(a.get(everything).logprobs, b.get(everything).logprobs)
    assert _firsts(index) == _firsts(clean)


def test_killed_writer_leaves_no_valid_index(tmp_path):
    script = textwrap.dedent(f"""
        import os, torch
        from ct_distill import TeacherCacheWriter, TopK
        w = TeacherCacheWriter({str(tmp_path / 'c')!r}, seq_len=4, k=2, vocab_size=10,
                               teacher={{"name": "t"}}, seqs_per_shard=1)
        for i in range(3):
            w.add(torch.zeros(1, 4, dtype=torch.long), TopK(torch.zeros(1, 4, 2, dtype=torch.long), torch.zeros(1, 4, 2)))
        os._exit(9)  # killed before close(): no index
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert len(list((tmp_path / "c").rglob("shard-*.safetensors"))) == 3
    with pytest.raises(IncompleteCacheError):
        TeacherCacheReader(tmp_path / "c")


def test_existing_cache_is_not_overwritten_by_accident(tmp_path, teacher):
    _write(tmp_path, teacher)
    with pytest.raises(CacheError, match="already holds a complete cache"):
        _write(tmp_path, teacher)
    index = _write(tmp_path, teacher, max_sequences=3, overwrite=True)
    assert index["num_seqs"] == 3
    assert TeacherCacheReader(tmp_path / "cache").num_seqs == 3
    assert len(list((tmp_path / "cache").rglob("shard-*"))) == 1
    index_json = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert index_json["logprobs_dtype"] == "float16" and index_json["entry"] == "packed32"


def test_writer_rejects_wrong_shapes(tmp_path):
    w = TeacherCacheWriter(tmp_path / "c", seq_len=4, k=2, vocab_size=10, teacher={})
    with pytest.raises(CacheMismatchError, match="seq_len=4"):
        w.add(torch.zeros(1, 5, dtype=torch.long), (torch.zeros(1, 5, 2, dtype=torch.long), torch.zeros(1, 5, 2)))
    with pytest.raises(CacheMismatchError) as err:
        w.add(torch.zeros(1, 4, dtype=torch.long), (torch.zeros(1, 4, 3, dtype=torch.long), torch.zeros(1, 4, 3)))
    assert err.value.field == "k"
