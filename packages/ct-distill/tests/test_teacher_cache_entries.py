"""The packed 32-bit cache entry against an independent (numpy, bit by bit) unpacking at the edges
of the vocabularies it supports, an index that promises more than its files hold, and a version-1
cache directory (refused, naming the index and saying to delete it)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import ct_model
from ct_distill import CacheError, CacheMismatchError, OnlineTeacher, TeacherCacheReader, write_teacher_cache
from ct_distill.cache_entries import entry_layout, pack_entries, unpack_entries

# The packed entry is lossless (ids exact, log-probs bitwise float16) up to 2^17 ids: 17 id bits
# + the 15 bits of a float16 without its sign. Larger vocabularies round the log-prob.
LOSSLESS_VOCAB = 2**17


def independent_unpack(words: torch.Tensor, id_bits: int, logprob_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode with numpy only: the word as uint32, the id its low ``id_bits`` bits, the float16
    magnitude the next ``logprob_bits`` bits shifted back to the top of 15, the sign set."""
    w = words.numpy().view(np.uint32).astype(np.uint64)
    ids = (w & np.uint64((1 << id_bits) - 1)).astype(np.int64)
    mag = (w >> np.uint64(id_bits)) << np.uint64(15 - logprob_bits)
    assert int(mag.max(initial=0)) < 1 << 15  # never reaches the sign bit
    half = (mag.astype(np.uint16) | np.uint16(0x8000)).view(np.float16)  # the sign bit: <= 0
    return ids, half.astype(np.float32)


def edge_entries(vocab: int):
    """Every edge id with every edge log-prob: 0, the smallest float16 subnormal, 1 ulp below -1,
    a tail value, float16's largest finite and -inf (a masked id)."""
    ids = torch.tensor(sorted({i for i in (0, 1, 2, vocab // 2, vocab - 2, vocab - 1) if 0 <= i < vocab}))
    lp = torch.tensor([0.0, -(2.0**-24), -1.0009765625, -17.25, -65504.0, -float("inf")])
    pairs = torch.cartesian_prod(torch.arange(len(ids)), torch.arange(len(lp)))
    return ids[pairs[:, 0]], lp[pairs[:, 1]]


@pytest.mark.parametrize("vocab", [2, 8192, 128_256, LOSSLESS_VOCAB])
def test_packed_entry_round_trips_up_to_the_lossless_vocabulary_limit(vocab):
    assert entry_layout(vocab) == (max(1, (vocab - 1).bit_length()), 15)
    ids, logprobs = edge_entries(vocab)
    g = torch.Generator().manual_seed(vocab)
    ids = torch.cat([ids, torch.randint(0, vocab, (4096,), generator=g)])
    logprobs = torch.cat([logprobs, -torch.rand(4096, generator=g).pow(3) * 30])
    words = pack_entries(ids, logprobs, vocab_size=vocab)
    assert words.dtype == torch.int32
    got_ids, got = independent_unpack(words, *entry_layout(vocab))
    assert np.array_equal(got_ids, ids.numpy())
    want = logprobs.numpy().astype(np.float16)
    want[want == 0] = -0.0  # the sign is implied: +0.0 is stored as the magnitude 0, read as -0.0
    assert np.array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32))  # bitwise
    lib_ids, lib = unpack_entries(words, vocab_size=vocab)  # the reader's decoding: the same values
    assert np.array_equal(lib_ids.numpy(), got_ids) and np.array_equal(lib.numpy(), got)


def test_ids_at_the_limit_use_every_bit_of_the_word():
    """id 2^17 - 1 with float16's -inf (magnitude 0x7C00): the word's top bit set (a negative int32)."""
    words = pack_entries(torch.tensor([LOSSLESS_VOCAB - 1]), torch.tensor([-float("inf")]), vocab_size=LOSSLESS_VOCAB)
    assert int(words.numpy().view(np.uint32)[0]) == (0x7C00 << 17) | (LOSSLESS_VOCAB - 1)
    assert int(words[0]) < 0


def test_a_vocabulary_past_the_limit_takes_an_id_bit_from_the_logprob():
    vocab = LOSSLESS_VOCAB + 1  # one id more: 18 id bits, 14 magnitude bits (9 mantissa bits)
    assert entry_layout(vocab) == (18, 14)
    ids = torch.tensor([0, LOSSLESS_VOCAB - 1, LOSSLESS_VOCAB, 1, 5, vocab - 1])
    logprobs = torch.tensor([-0.0, -1.0, -65472.0, -1.0009765625, -3.001953125, -65504.0])
    got_ids, got = independent_unpack(pack_entries(ids, logprobs, vocab_size=vocab), 18, 14)
    assert np.array_equal(got_ids, ids.numpy())
    # exact where float16's last mantissa bit is 0; one float16 ulp rounded to nearest where it is 1
    assert got[:3].tolist() == [-0.0, -1.0, -65472.0]
    assert got[3:5].tolist() == [-1.001953125, -3.00390625]
    # float16's largest finite lies half-way to 2^16 at 9 mantissa bits: rounded (as IEEE's ties
    # would) to -inf, a probability of 0 either way
    assert got[5] == -float("inf")
    with pytest.raises(ValueError, match="top-k ids outside"):
        pack_entries(torch.tensor([LOSSLESS_VOCAB]), torch.tensor([-1.0]), vocab_size=LOSSLESS_VOCAB)


# ----------------------------------------------------------------------------- bad directories

VOCAB, SEQ, K = 256, 16, 8


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    teacher = OnlineTeacher(ct_model.build_model(ct_model.presets.get(
        "mobilellm_tiny", num_layers=1, hidden_size=32, num_attention_heads=2, num_query_groups=1,
        ffn_hidden_size=64, kv_channels=16, vocab_size=VOCAB, max_position_embeddings=64), seed=3))
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, VOCAB, (2, SEQ), generator=g)} for _ in range(3)]
    root = tmp_path_factory.mktemp("c") / "cache"
    write_teacher_cache(teacher, batches, root, k=K, seqs_per_shard=4)
    return root


def _copy_with_index(cache, tmp_path, edit):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(cache, root)
    index = json.loads((root / "index.json").read_text())
    edit(index)
    (root / "index.json").write_text(json.dumps(index))
    return root


def test_an_index_pointing_past_the_end_of_its_shards_is_refused_naming_it(cache, tmp_path):
    assert TeacherCacheReader(cache).num_seqs == 6
    root = _copy_with_index(cache, tmp_path, lambda ix: ix.update(num_seqs=7, num_tokens=7 * SEQ))
    with pytest.raises(CacheMismatchError, match=f"{root / 'index.json'}: num_seqs=7 but its parts hold 6"):
        TeacherCacheReader(root)


def test_an_index_whose_shard_claims_more_rows_than_its_file_is_refused_naming_the_shard(cache, tmp_path):
    def grow(ix):  # the last shard (2 rows) listed as 3, the part and the cache as 7
        ix["parts"][0]["shards"][-1]["num_seqs"] += 1
        ix["parts"][0]["num_seqs"] += 1
        ix["num_seqs"] += 1

    root = _copy_with_index(cache, tmp_path, grow)
    shard = root / "rows-000000-000001" / "shard-000001.safetensors"
    with pytest.raises(CacheMismatchError, match=f"{shard}: num_seqs=2 but the index says 3"):
        TeacherCacheReader(root)


def test_a_version_1_cache_directory_is_refused_saying_to_delete_it(tmp_path):
    """What ct-distill before v2 wrote: top-level shards of int32 ids + float16 log-probs."""
    root = tmp_path / "v1"
    root.mkdir()
    save_file({"topk_ids": torch.zeros(2, SEQ, K, dtype=torch.int32),
               "topk_logprobs": torch.zeros(2, SEQ, K, dtype=torch.float16),
               "input_hash": torch.zeros(2, dtype=torch.int64)}, str(root / "shard-000000.safetensors"))
    (root / "index.json").write_text(json.dumps({
        "format": "ct-distill/teacher-topk-cache", "version": 1, "seq_len": SEQ, "k": K, "vocab_size": VOCAB,
        "teacher": {}, "ids_dtype": "int32", "logprobs_dtype": "float16", "num_seqs": 2,
        "shards": [{"file": "shard-000000.safetensors", "first_seq": 0, "num_seqs": 2}]}))
    with pytest.raises(CacheError, match=f"{root / 'index.json'}: format .* v1 is not .* v2 .*delete it") as err:
        TeacherCacheReader(root)
    assert err.value.field == "format"
