"""The .bin/.idx format: byte layout against a hand-built file, megatron-core reading our files and
ours reading megatron's, and each kind of damage a clear error naming the file."""

import struct

import numpy as np
import pytest

from ct_data.indexed import IndexedDataError, IndexedShard, IndexedWriter, token_dtype
from ct_data.prepared import PreparedSource

DOCS = [[5, 6, 7], [], [1], [65535, 0, 2, 9]]


def write(prefix, docs=DOCS, dtype=np.uint16):
    w = IndexedWriter(prefix, np.dtype(dtype))
    for d in docs:
        w.add(np.array(d, dtype=np.int64))
    return w.finish()


def hand_built_idx(docs, code, itemsize):
    """The .idx megatron's _IndexWriter writes, from its documented layout (one sequence per document)."""
    lengths = [len(d) for d in docs]
    pointers = [sum(lengths[:i]) * itemsize for i in range(len(docs))]
    out = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
    out += struct.pack("<Q", len(docs)) + struct.pack("<Q", len(docs) + 1)
    out += struct.pack(f"<{len(docs)}i", *lengths) + struct.pack(f"<{len(docs)}q", *pointers)
    out += struct.pack(f"<{len(docs) + 1}q", *range(len(docs) + 1))
    return out


@pytest.mark.parametrize("dtype,code", [(np.uint16, 8), (np.int32, 4)])
def test_layout_matches_hand_built_file(tmp_path, dtype, code):
    info = write(tmp_path / "s", dtype=dtype)
    idx = (tmp_path / "s.idx").read_bytes()
    assert idx == hand_built_idx(DOCS, code, np.dtype(dtype).itemsize)
    assert (tmp_path / "s.bin").read_bytes() == np.array(sum(DOCS, []), dtype=dtype).tobytes()
    assert info["docs"] == 4 and info["tokens"] == 8 and info["bin_bytes"] == 8 * np.dtype(dtype).itemsize
    shard = IndexedShard(tmp_path / "s")
    assert [shard.doc(i).tolist() for i in range(len(shard))] == DOCS
    assert shard.doc_lengths().tolist() == [3, 0, 1, 4]


def test_token_dtype():
    assert token_dtype(8192) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.int32 and token_dtype(128256) == np.int32  # megatron has no uint32


def test_out_of_range_id_refused(tmp_path):
    w = IndexedWriter(tmp_path / "s", np.dtype(np.uint16))
    with pytest.raises(ValueError, match="out of range"):
        w.add(np.array([70000]))


def test_megatron_reads_ours(tmp_path):
    idx = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    write(tmp_path / "s")
    ds = idx.IndexedDataset(str(tmp_path / "s"))
    assert len(ds) == 4 and ds.index.dtype == np.uint16
    assert [ds[i].tolist() for i in range(4)] == DOCS
    assert ds.document_indices.tolist() == [0, 1, 2, 3, 4]


def test_we_read_megatrons(tmp_path):
    """megatron's builder, including a document of several sequences (sentence-split data)."""
    idx = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    torch = pytest.importorskip("torch")
    b = idx.IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.int32)
    b.add_document(torch.tensor([1, 2, 3, 4, 5]), [2, 3])  # one document, two sequences
    b.add_item(torch.tensor([7, 8]))
    b.end_document()
    b.add_document(torch.tensor([9]), [1])
    b.finalize(str(tmp_path / "m.idx"))
    src = PreparedSource(str(tmp_path / "m"))
    assert src.num_docs == 3
    assert [src.doc(i).tolist() for i in range(3)] == [[1, 2, 3, 4, 5], [7, 8], [9]]


# ----------------------------------------------------------------------------- damage
def test_truncated_bin(tmp_path):
    write(tmp_path / "s")
    data = (tmp_path / "s.bin").read_bytes()
    (tmp_path / "s.bin").write_bytes(data[:-2])
    with pytest.raises(IndexedDataError, match=r"s\.bin: truncated"):
        PreparedSource(str(tmp_path / "s"))


def test_truncated_idx(tmp_path):
    write(tmp_path / "s")
    data = (tmp_path / "s.idx").read_bytes()
    (tmp_path / "s.idx").write_bytes(data[:-8])
    with pytest.raises(IndexedDataError, match=r"s\.idx: .*truncated or corrupt"):
        PreparedSource(str(tmp_path / "s"))


def test_not_an_index(tmp_path):
    write(tmp_path / "s")
    (tmp_path / "s.idx").write_bytes(b"garbage" * 10)
    with pytest.raises(IndexedDataError, match=r"s\.idx: not a megatron indexed-dataset index"):
        PreparedSource(str(tmp_path / "s"))


def _poke_pointer(path, seq, value, num_seqs):
    data = bytearray(path.read_bytes())
    off = 34 + 4 * num_seqs + 8 * seq
    data[off:off + 8] = struct.pack("<q", value)
    path.write_bytes(bytes(data))


def test_last_pointer_past_the_end(tmp_path):
    write(tmp_path / "s")
    _poke_pointer(tmp_path / "s.idx", 3, 1000, 4)
    with pytest.raises(IndexedDataError, match=r"s\.bin: truncated: the index s\.idx points to byte 1,008"):
        PreparedSource(str(tmp_path / "s"))


def test_inner_pointer_past_the_end(tmp_path):
    """Found by the per-shard check when the shard is first read (before the first batch)."""
    write(tmp_path / "s")
    _poke_pointer(tmp_path / "s.idx", 0, 4000, 4)
    src = PreparedSource(str(tmp_path / "s"))  # the O(1) checks at open see nothing wrong
    with pytest.raises(IndexedDataError, match=r"s\.idx: sequence 0 ends at byte 4,006, past the end of s\.bin"):
        src.doc(2)


def test_ids_beyond_the_vocabulary_without_manifest(tmp_path):
    class Tok:
        vocab_size = 100
    write(tmp_path / "s", docs=[[1, 2], [3, 500]])
    src = PreparedSource(str(tmp_path / "s"), tokenizer=Tok())
    assert src.doc(0).tolist() == [1, 2]
    with pytest.raises(IndexedDataError, match=r"s\.bin: document 1 holds token id 500, beyond the tokenizer's "
                                               r"vocabulary of 100"):
        src.doc(1)


def test_missing_files(tmp_path):
    write(tmp_path / "s")
    (tmp_path / "s.bin").unlink()
    with pytest.raises(IndexedDataError, match=r"s\.bin: file not found"):
        PreparedSource(str(tmp_path / "s"))
