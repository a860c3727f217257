"""Which process writes which rows of the teacher cache, and a process waiting for a part that
never comes gives up (stage.distill.cache_wait_s) with an error naming the missing part."""

import pytest
import torch

import ct_model
from ct_distill import CacheError, OnlineTeacher
from ct_parallel.distributed import DistInfo
from ct_stages.distill import cache_share, open_teacher_cache
from ct_stages.stages import DistillConfig

VOCAB, SEQ, B = 128, 16, 4


def info(rank, world, dp_rank=None, dp_size=None, tp_rank=0):
    return DistInfo(rank=rank, world_size=world, local_rank=rank, dp_rank=rank if dp_rank is None else dp_rank,
                    dp_size=world if dp_size is None else dp_size, tp_rank=tp_rank)


def test_every_process_writes_its_rows_when_the_batch_splits_over_all_of_them():
    made = []
    shares = [cache_share(info(r, 2), B, lambda rank, world: made.append((rank, world))) for r in range(2)]
    assert [(s.part, s.parts, s.rows, s.writes, s.finalizes) for s in shares] == [
        (0, 2, range(0, 2), True, True), (1, 2, range(2, 4), True, False)]
    shares[1].loader()
    assert made == [(1, 2)]
    # 4 processes, tensor-parallel pairs, a batch of 6: one writer per data-parallel rank
    tp = [cache_share(info(r, 4, dp_rank=r // 2, dp_size=2, tp_rank=r % 2), 6, lambda *a: None) for r in range(4)]
    assert [(s.part, s.parts, s.rows, s.writes) for s in tp] == [
        (0, 2, range(0, 3), True), (0, 2, range(0, 3), False), (1, 2, range(3, 6), True), (1, 2, range(3, 6), False)]


def test_cache_wait_s_is_checked():
    with pytest.raises(ValueError, match="stage.distill.cache_wait_s"):
        DistillConfig(teacher="cached", top_k=4, cache_wait_s=-1)


def _rank_batches(rank, world, steps=2):
    g = torch.Generator().manual_seed(0)
    width = B // world
    out = []
    for step in range(steps):
        ids = torch.randint(0, VOCAB, (B, SEQ), generator=g)
        rows = slice(rank * width, (rank + 1) * width)
        out.append({"input_ids": ids[rows], "sequence_index": torch.arange(step * B, (step + 1) * B)[rows]})
    return out


def test_a_missing_part_ends_the_wait_with_an_error_naming_it(tmp_path):
    teacher = OnlineTeacher(ct_model.build_model(ct_model.presets.get(
        "mobilellm_tiny", num_layers=1, hidden_size=32, num_attention_heads=2, num_query_groups=1,
        ffn_hidden_size=64, kv_channels=16, vocab_size=VOCAB, max_position_embeddings=64), seed=0))
    config = DistillConfig(teacher="cached", top_k=4, cache_wait_s=0.5)
    root = tmp_path / "cache"
    # rank 0 of 2 writes its rows, then waits for rank 1's, which never come
    share = cache_share(info(0, 2), B, lambda rank, world: _rank_batches(rank, world))
    with pytest.raises(CacheError, match=f"{root}: finishing the cache: no progress for 0.5 s; still missing "
                                         f"rows-000002-000004"):
        open_teacher_cache(config, teacher, root, 2 * B, share, 1, poll=0.05)
    assert (root / "rows-000000-000002" / "part.json").is_file() and not (root / "index.json").exists()
    # rank 1, once it has written its part, would wait for the index that rank 0 never writes
    share = cache_share(info(1, 2), B, lambda rank, world: _rank_batches(rank, world))
    with pytest.raises(CacheError, match=f"{root}: waiting for the cache: .* still missing index.json"):
        open_teacher_cache(config, teacher, root, 2 * B, share, 1, poll=0.05)
    # rank 0 again (a rerun): both parts there, the cache is finished and opened
    share = cache_share(info(0, 2), B, lambda rank, world: _rank_batches(rank, world))
    reader = open_teacher_cache(config, teacher, root, 2 * B, share, 1, poll=0.05)
    assert reader.num_seqs == 2 * B and [p["rows"] for p in reader.index["parts"]] == [[0, 2], [2, 4]]
