"""The teacher cache written by several processes (row blocks of every global batch), read by any
number; its packed 32-bit entries against float16 planes and the float32 KD loss; bad caches
refused when the reader opens, naming the file."""

import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import ct_model
from ct_distill import (CacheError, CacheMismatchError, IncompleteCacheError, OnlineTeacher, TeacherCacheReader,
                        finalize_teacher_cache, DistillationLoss, wait_for_teacher_cache,
                        write_teacher_cache)
from ct_distill.cache_entries import entry_layout, pack_entries, unpack_entries

VOCAB, SEQ, GLOBAL_BATCH, STEPS, K, MICRO = 512, 32, 4, 4, 16, 1
TOTAL = GLOBAL_BATCH * STEPS


def tiny_config(**overrides):
    shape = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                 ffn_hidden_size=128, kv_channels=16, vocab_size=VOCAB, max_position_embeddings=128)
    return ct_model.presets.get("mobilellm_tiny", **{**shape, **overrides})


@pytest.fixture(scope="module")
def teacher():
    return OnlineTeacher(ct_model.build_model(tiny_config(), seed=1))


def global_batches(steps=STEPS, seed=0):
    """The loader's global batches: packed rows with their global sequence_index (step * B + j)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
        cut = int(torch.randint(5, SEQ - 5, (1,), generator=g))
        docs = (torch.arange(SEQ) >= cut).long().expand(GLOBAL_BATCH, SEQ).clone()
        pos = torch.cat([torch.arange(cut), torch.arange(SEQ - cut)]).expand(GLOBAL_BATCH, SEQ).clone()
        out.append({"input_ids": ids, "position_ids": pos, "document_ids": docs,
                    "sequence_index": torch.arange(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH)})
    return out


def rank_batches(batches, rank, world):
    """What rank ``rank`` of ``world`` yields: rows [r B/W, (r+1) B/W) of every global batch."""
    width = GLOBAL_BATCH // world
    rows = slice(rank * width, (rank + 1) * width)
    return [{key: value[rows] for key, value in b.items()} for b in batches]


def write_rank(teacher, root, rank, world, batches=None, **kw):
    width = GLOBAL_BATCH // world
    return write_teacher_cache(teacher, rank_batches(batches or global_batches(), rank, world), root, k=K,
                               batch_size=GLOBAL_BATCH, rows=range(rank * width, (rank + 1) * width),
                               rows_per_forward=MICRO, **kw)


def assert_same_cache(a: TeacherCacheReader, b: TeacherCacheReader, seqs=range(TOTAL)):
    x, y = a.get(seqs), b.get(seqs)
    assert torch.equal(x.ids, y.ids)
    assert torch.equal(x.logprobs.view(torch.int32), y.logprobs.view(torch.int32))  # bitwise
    assert torch.equal(a.hashes(seqs), b.hashes(seqs))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, teacher):
    """The reference: one writer over the whole global batch."""
    root = tmp_path_factory.mktemp("one") / "cache"
    write_rank(teacher, root, 0, 1, seqs_per_shard=3)
    return TeacherCacheReader(root)


# ----------------------------------------------------------------------------- packed entries


def test_packed_entries_hold_ids_and_float16_logprobs_exactly():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128_256, (64, 64), generator=g)
    logprobs = -torch.rand(64, 64, generator=g).pow(4) * 40  # many near 0, some far in the tail
    logprobs[0, :4] = torch.tensor([0.0, -1e-8, -float("inf"), -70000.0])  # zero, subnormal, -inf, overflow
    assert entry_layout(128_256) == (17, 15)
    for dtype in (torch.float16, torch.bfloat16):
        words = pack_entries(ids, logprobs, vocab_size=128_256, dtype=dtype)
        assert words.dtype == torch.int32 and words.shape == ids.shape
        got_ids, got = unpack_entries(words, vocab_size=128_256, dtype=dtype)
        assert torch.equal(got_ids, ids)
        # bitwise what a float16 (bfloat16) plane holds, except that the plane's -0.0 (a log-prob
        # within 3e-8 of 0) is served as +0.0: there is no sign bit (x + 0.0 maps -0.0 to +0.0)
        plane = logprobs.to(dtype).float()
        assert torch.equal(got.view(torch.int32), (plane + 0.0).view(torch.int32))
        assert torch.equal(got, plane)


def test_packed_entries_of_a_larger_vocabulary_round_the_logprob():
    vocab = 200_064  # 18 id bits: the float16 magnitude keeps 14 of its 15 bits (9 mantissa bits)
    assert entry_layout(vocab) == (18, 14)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (4096,), generator=g)
    logprobs = -torch.rand(4096, generator=g) * 30 - 1e-3
    got_ids, got = unpack_entries(pack_entries(ids, logprobs, vocab_size=vocab), vocab_size=vocab)
    assert torch.equal(got_ids, ids)
    half = logprobs.half().float()
    assert ((got - half).abs() / half.abs()).max() <= 2.0**-10  # half an ulp of a 9-bit mantissa
    with pytest.raises(ValueError, match="unpacked"):
        entry_layout(2**21 + 1)


def test_compact_cache_equals_float16_planes_and_its_kd_loss_the_float32_one(tmp_path, teacher):
    """The packed cache serves bitwise the float16 plane's log-probs (so its KD loss is the float16
    one exactly); both differ from float32 log-probs by float16 rounding only, bounded here."""
    batches = global_batches()
    caches = {}
    for name, dtype in (("packed", torch.float16), ("fp32", torch.float32)):
        write_rank(teacher, tmp_path / name, 0, 1, batches, logprobs_dtype=dtype)
        caches[name] = TeacherCacheReader(tmp_path / name)
    assert caches["packed"].index["bytes_per_entry"] == 4 and caches["fp32"].index["bytes_per_entry"] == 8
    packed, exact = caches["packed"].get(range(TOTAL)), caches["fp32"].get(range(TOTAL))
    assert torch.equal(packed.ids, exact.ids)
    half = exact.logprobs.half().float() + 0.0  # the float16 plane (its -0.0 read as +0.0), bitwise
    assert torch.equal(packed.logprobs.view(torch.int32), half.view(torch.int32))

    student = ct_model.build_model(tiny_config(num_layers=1), seed=2)
    worst = 0.0
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        for temperature in (1.0, 2.0):
            loss_fn = DistillationLoss(kind=kind, temperature=temperature, top_k=K)
            for b in batches:
                logits = student(b["input_ids"], b["position_ids"], b["document_ids"])
                total = {name: loss_fn(c.annotate(b), logits).item() for name, c in caches.items()}
                worst = max(worst, abs(total["packed"] - total["fp32"]) / abs(total["fp32"]))
    # Measured worst over the batches: forward KL 3.9e-6 (T=1) / 8.3e-7 (T=2), JSD 3.9e-7 / 9.6e-8,
    # reverse KL 5.3e-4 / 4.9e-4 (its loss here is ~0.03 per token, so the float16 rounding of the
    # log-probs, up to 2e-3 absolute near log(1/512), is a larger share of it).
    assert worst < 1e-3, worst


# ----------------------------------------------------------------------------- written by ranks


def test_cache_written_by_four_ranks_in_turn_reads_as_the_one_process_cache(tmp_path, teacher, one_process):
    root = tmp_path / "cache"
    for rank in range(4):  # each writes its own part; none of them is the whole cache
        part = write_rank(teacher, root, rank, 4, seqs_per_shard=3)
        assert part["dir"] == f"rows-{rank:06d}-{rank + 1:06d}" and part["num_seqs"] == STEPS
        assert not (root / "index.json").exists()
    index = finalize_teacher_cache(root, batch_size=GLOBAL_BATCH, parts=4, num_seqs=TOTAL, poll=0.01)
    assert index["num_seqs"] == TOTAL and len(index["parts"]) == 4
    reader = TeacherCacheReader(root)
    assert_same_cache(reader, one_process)
    # any row order, as the ranks of a 2-process run ask for their rows
    rows = [s for step in range(STEPS) for s in range(step * GLOBAL_BATCH + 2, (step + 1) * GLOBAL_BATCH)]
    assert_same_cache(reader, one_process, rows + [0, 5, 1])


_RANK_SCRIPT = textwrap.dedent("""
    import sys, torch
    import ct_model
    from safetensors.torch import load_file
    from ct_distill import OnlineTeacher, write_teacher_cache, finalize_teacher_cache, wait_for_teacher_cache
    root, rank, world, data, weights, k, micro, total = sys.argv[1:]
    rank, world, k, micro, total = int(rank), int(world), int(k), int(micro), int(total)
    torch.set_num_threads(1)
    config = ct_model.ModelConfig.from_dict(__import__("json").loads(open(weights + ".json").read()))
    teacher = OnlineTeacher.from_state_dict(config, weights)
    batches = torch.load(data)
    width = batches[0]["input_ids"].shape[0] // world
    rows = range(rank * width, (rank + 1) * width)
    mine = [{key: v[rows.start:rows.stop] for key, v in b.items()} for b in batches]
    write_teacher_cache(teacher, mine, root, k=k, batch_size=width * world, rows=rows, rows_per_forward=micro,
                        max_sequences=total, seqs_per_shard=3, resume=True)
    if rank == 0:
        finalize_teacher_cache(root, batch_size=width * world, parts=world, num_seqs=total, poll=0.05,
                               stall_timeout=120)
    else:
        wait_for_teacher_cache(root, poll=0.05, stall_timeout=120)
    print("done", rank)
""")


@pytest.mark.dist
def test_cache_written_by_two_processes_equals_the_one_process_cache(tmp_path, teacher, one_process):
    """Two processes write their halves of every global batch at once; the cache, read back in
    global order by one reader (or in either rank's rows), is bitwise the one-process cache."""
    from safetensors.torch import save_file

    weights = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.model.state_dict().items()}, str(weights))
    (tmp_path / "teacher.safetensors.json").write_text(json.dumps(teacher.config.to_dict()))
    torch.save(global_batches(), tmp_path / "batches.pt")
    root = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, str(root), str(rank), "2",
                               str(tmp_path / "batches.pt"), str(weights), str(K), str(MICRO), str(TOTAL)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    for rank, proc in enumerate(procs):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and f"done {rank}" in out, err[-3000:]
    index = json.loads((root / "index.json").read_text())
    assert [p["rows"] for p in index["parts"]] == [[0, 2], [2, 4]]
    assert index["teacher"]["fingerprint"] == teacher.identity()["fingerprint"]
    reader = TeacherCacheReader(root, seq_len=SEQ, k=K, vocab_size=VOCAB, teacher=teacher.identity())
    assert reader.num_seqs == TOTAL
    assert_same_cache(reader, one_process)


def test_a_rank_resumes_its_own_part(tmp_path, teacher, one_process):
    root = tmp_path / "cache"
    batches = global_batches()

    def dies_at_step_3():
        for step, b in enumerate(rank_batches(batches, 1, 2)):
            if step == 3:
                raise RuntimeError("rank 1 killed")
            yield b

    write_rank(teacher, root, 0, 2, batches, seqs_per_shard=3)
    with pytest.raises(RuntimeError, match="rank 1 killed"):
        write_teacher_cache(teacher, dies_at_step_3(), root, k=K, batch_size=GLOBAL_BATCH, rows=range(2, 4),
                            rows_per_forward=MICRO, seqs_per_shard=3)
    assert not (root / "rows-000002-000004" / "part.json").exists()
    assert len(list((root / "rows-000002-000004").glob("shard-*"))) == 2  # 6 rows in 2 shards of 3
    resumed = write_rank(teacher, root, 1, 2, batches, seqs_per_shard=3, resume=True)
    assert resumed["tokens_written"] == 2 * SEQ  # only the 2 rows no complete shard held
    finalize_teacher_cache(root, batch_size=GLOBAL_BATCH, parts=2, num_seqs=TOTAL, poll=0.01)
    assert_same_cache(TeacherCacheReader(root), one_process)


def test_writer_refuses_rows_of_another_layout(tmp_path, teacher):
    with pytest.raises(CacheMismatchError, match="sequence_index") as err:
        # rank 1's rows given to a writer told it holds rank 0's
        write_teacher_cache(teacher, rank_batches(global_batches(), 1, 2), tmp_path / "c", k=K,
                            batch_size=GLOBAL_BATCH, rows=range(0, 2))
    assert err.value.field == "sequence_index"


def test_finalize_waits_for_the_last_part_then_gives_up_on_a_stalled_one(tmp_path, teacher):
    root = tmp_path / "cache"
    write_rank(teacher, root, 0, 2)
    with pytest.raises(CacheError, match="no progress for 0 s; still missing rows-000002-000004"):
        finalize_teacher_cache(root, batch_size=GLOBAL_BATCH, parts=2, stall_timeout=0.0, poll=0.01)
    with pytest.raises(CacheError, match="still missing index.json"):
        wait_for_teacher_cache(root, stall_timeout=0.0, poll=0.01)
    # a rank that finished early waits (here in a thread) until the last part is written
    done = {}
    waiter = threading.Thread(target=lambda: done.update(index=finalize_teacher_cache(
        root, batch_size=GLOBAL_BATCH, parts=2, num_seqs=TOTAL, poll=0.01, stall_timeout=300)))
    waiter.start()
    write_rank(teacher, root, 1, 2)
    waiter.join(timeout=300)
    assert done["index"]["num_seqs"] == TOTAL
    wait_for_teacher_cache(root, stall_timeout=0.0)  # there: returns at once


def test_finalize_ignores_a_part_left_by_an_earlier_shorter_run(tmp_path, teacher):
    root = tmp_path / "cache"
    write_rank(teacher, root, 0, 2)
    write_rank(teacher, root, 1, 2, max_sequences=GLOBAL_BATCH)  # one step only: a run with max_steps=1
    with pytest.raises(CacheError, match="still missing rows-000002-000004"):
        finalize_teacher_cache(root, batch_size=GLOBAL_BATCH, parts=2, num_seqs=TOTAL, stall_timeout=0.0, poll=0.01)
    other = OnlineTeacher(ct_model.build_model(tiny_config(), seed=7))
    write_rank(other, root, 1, 2, overwrite=True)  # complete, but another teacher's
    expect = json.loads((root / "rows-000000-000002" / "part.json").read_text())
    with pytest.raises(CacheError, match="still missing rows-000002-000004"):
        finalize_teacher_cache(root, batch_size=GLOBAL_BATCH, parts=2, expect=expect, stall_timeout=0.0, poll=0.01)


def test_a_cache_of_another_layout_is_replaced_and_its_parts_removed(tmp_path, teacher, one_process):
    root = tmp_path / "cache"
    write_rank(teacher, root, 0, 4)  # a 4-process attempt that died after one part
    for rank in range(2):
        write_rank(teacher, root, rank, 2)
    finalize_teacher_cache(root, batch_size=GLOBAL_BATCH, parts=2, poll=0.01)
    assert sorted(p.name for p in root.glob("rows-*")) == ["rows-000000-000002", "rows-000002-000004"]
    assert_same_cache(TeacherCacheReader(root), one_process)


# ----------------------------------------------------------------------------- bad caches


@pytest.fixture
def two_part_cache(tmp_path, teacher):
    root = tmp_path / "cache"
    for rank in range(2):
        write_rank(teacher, root, rank, 2, seqs_per_shard=3)
    finalize_teacher_cache(root, batch_size=GLOBAL_BATCH, parts=2, poll=0.01)
    return root


def _edit_index(root, edit):
    index = json.loads((root / "index.json").read_text())
    edit(index)
    (root / "index.json").write_text(json.dumps(index))


def test_truncated_shard_is_refused_naming_it(two_part_cache):
    shard = two_part_cache / "rows-000002-000004" / "shard-000001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(CacheError, match=f"{shard}: {len(data) - 100} bytes but .* records {len(data)}"):
        TeacherCacheReader(two_part_cache)
    # even with the index edited to the truncated size, the shard's own header gives it away
    _edit_index(two_part_cache, lambda ix: ix["parts"][1]["shards"][1].update(bytes=len(data) - 100))
    with pytest.raises(CacheError, match=f"{shard}: .* header describes {len(data)} .*truncated"):
        TeacherCacheReader(two_part_cache)


def test_index_that_does_not_match_its_files_is_refused_naming_the_file(two_part_cache, tmp_path, teacher):
    root = two_part_cache
    part = root / "rows-000000-000002"
    # two same-sized shards of a part swapped: each one's header names other positions
    a, b = part / "shard-000000.safetensors", part / "shard-000001.safetensors"
    assert a.stat().st_size == b.stat().st_size
    os.replace(a, tmp_path / "x")
    os.replace(b, a)
    os.replace(tmp_path / "x", b)
    with pytest.raises(CacheMismatchError, match=f"{a}: first=3 but the index says 0") as err:
        TeacherCacheReader(root)
    assert err.value.field == "first"
    TeacherCacheReader(root, verify=False)  # sizes alone do not see it
    os.replace(a, tmp_path / "x")
    os.replace(b, a)
    os.replace(tmp_path / "x", b)

    # a shard of the same shape written by another teacher
    other = OnlineTeacher(ct_model.build_model(tiny_config(), seed=7))
    write_rank(other, tmp_path / "other", 0, 2, seqs_per_shard=3)
    saved = a.read_bytes()
    os.replace(tmp_path / "other" / "rows-000000-000002" / "shard-000000.safetensors", a)
    assert a.stat().st_size == len(saved)
    with pytest.raises(CacheMismatchError, match=f"{a}: written by another teacher"):
        TeacherCacheReader(root)
    a.write_bytes(saved)

    # a listed shard that is missing; parts that do not tile the batch
    os.replace(b, tmp_path / "b")
    with pytest.raises(IncompleteCacheError, match=f"{b}: listed in .* but missing"):
        TeacherCacheReader(root)
    os.replace(tmp_path / "b", b)
    TeacherCacheReader(root)
    _edit_index(root, lambda ix: ix["parts"].pop())
    with pytest.raises(CacheMismatchError, match="index.json: the parts' rows .* do not tile a batch of 4"):
        TeacherCacheReader(root)


def test_cache_of_another_teacher_or_format_is_refused(two_part_cache, teacher):
    other = OnlineTeacher(ct_model.build_model(tiny_config(), seed=7)).identity()
    with pytest.raises(CacheMismatchError, match="index.json: teacher fingerprint") as err:
        TeacherCacheReader(two_part_cache, teacher=other)
    assert err.value.field == "teacher.fingerprint"
    TeacherCacheReader(two_part_cache, teacher=teacher.identity())
    _edit_index(two_part_cache, lambda ix: ix.update(version=1))
    with pytest.raises(CacheMismatchError, match="v1 is not .* v2 .*older ct-distill: delete it"):
        TeacherCacheReader(two_part_cache)


def test_reader_serves_only_the_complete_prefix(tmp_path, teacher):
    """A loader that ran out mid-step on one rank: the index serves the sequences every part has."""
    root = tmp_path / "cache"
    batches = global_batches()
    write_rank(teacher, root, 0, 2, batches)
    write_rank(teacher, root, 1, 2, batches[:2], max_sequences=TOTAL)  # its loader ended after 2 steps
    index = finalize_teacher_cache(root, batch_size=GLOBAL_BATCH, parts=2, num_seqs=TOTAL, poll=0.01)
    # sequences 8 and 9 (rank 0's rows of step 2) are held too; 10 (rank 1's) is not
    assert index["exhausted"] and index["num_seqs"] == 2 * GLOBAL_BATCH + 2
    reader = TeacherCacheReader(root)
    reader.get(range(2 * GLOBAL_BATCH + 2))
    with pytest.raises(IndexError, match="outside the cache's \\[0, 10\\)"):
        reader.get([2 * GLOBAL_BATCH + 2])
