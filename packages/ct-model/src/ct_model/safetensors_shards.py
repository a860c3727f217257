"""Named tensors streamed into safetensors shards, the layout ``transformers`` writes.

``ShardWriter.add(name, tensor)`` writes the tensor's bytes to disk at once and keeps only its
name, dtype, shape and offsets; a shard is closed (its header, then its data) when the next tensor
would push it past ``max_shard_bytes`` (a single larger tensor gets a shard of its own, as
transformers does). So the writer holds no tensor: an export never holds more than the tensor
being converted, whatever the shard size. ``finish()`` gives the shards their final names:
``model.safetensors`` when everything fitted one shard, else
``model-00001-of-0000N.safetensors`` ... plus ``model.safetensors.index.json``
(``metadata.total_size`` and ``weight_map``). Shards are written under temporary names until then,
so an interrupted export leaves no file a loader would take for weights.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch

# transformers' save_pretrained default max_shard_size ("5GB", decimal).
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def shard_name(index: int, count: int) -> str:
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def is_weights_file(name: str) -> bool:
    """A file a loader reads as weights (or the index naming them), or our own unfinished shard."""
    return (name in (SINGLE, INDEX) or ".safetensors.tmp" in name  # a shard and its data files
            or (name.startswith("model-") and name.endswith(".safetensors")))


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


# safetensors' dtype names (the format's spec), for the header written by hand below.
_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
_COPY_CHUNK = 64 * 2**20


class _OpenShard:
    """One safetensors file being written a tensor at a time: each tensor's bytes go straight to
    a data file of its element size; ``close`` writes the header (which needs every offset, hence
    last) and then the data files, widest elements first, so every tensor stays aligned to its
    element size (what safetensors' own writer guarantees by sorting)."""

    def __init__(self, path: Path):
        self.path = path
        self.size = 0
        self._groups: dict[int, tuple[Path, object, dict]] = {}  # element size -> (file, handle, entries)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} has no safetensors name")
        width = tensor.element_size()
        if width not in self._groups:
            data = self.path.with_name(f"{self.path.name}.{width}")
            self._groups[width] = (data, data.open("wb"), {})
        _, handle, entries = self._groups[width]
        start = handle.tell()
        handle.write(tensor.reshape(-1).view(torch.uint8).numpy().data)  # no copy of a contiguous tensor
        entries[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                         "data_offsets": [start, handle.tell()]}
        self.size += nbytes(tensor)

    def close(self) -> list[str]:
        """Write the file (header, then the data) and remove the data files; the tensor names."""
        header: dict = {"__metadata__": {"format": "pt"}}
        base, order = 0, sorted(self._groups, reverse=True)
        for width in order:
            data, handle, entries = self._groups[width]
            handle.close()
            for name, entry in entries.items():
                begin, end = entry["data_offsets"]
                header[name] = {**entry, "data_offsets": [base + begin, base + end]}
            base += data.stat().st_size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        with self.path.open("wb") as out:
            out.write(struct.pack("<Q", len(raw)) + raw)
            for width in order:
                with self._groups[width][0].open("rb") as src:
                    shutil.copyfileobj(src, out, _COPY_CHUNK)
            out.flush()
            os.fsync(out.fileno())
        self.discard()
        return [name for name in header if name != "__metadata__"]

    def discard(self) -> None:
        for data, handle, _ in self._groups.values():
            handle.close()
            data.unlink(missing_ok=True)
        self._groups = {}


class ShardWriter:
    """Writes ``add``-ed tensors into ``root`` as safetensors shards of at most ``max_shard_bytes``.

    Each tensor is written to disk when it is added (nothing is buffered): the writer holds no
    tensor of its own, so an export holds only the tensor being converted. A shard is closed when
    the next tensor would pass ``max_shard_bytes`` (a larger tensor gets a shard of its own).
    ``peak_buffered_bytes`` is the largest tensor handed over (what the caller held at once)."""

    def __init__(self, root: str | os.PathLike, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.root = Path(root)
        self.max_shard_bytes = max_shard_bytes
        self.peak_buffered_bytes = 0
        self.total_size = 0
        self.shards: list[tuple[Path, list[str]]] = []  # (temporary path, tensor names), in order
        self._open: _OpenShard | None = None
        self._names: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")
        self._names.add(name)
        tensor = tensor.detach().to("cpu").contiguous()
        size = nbytes(tensor)
        if self._open is not None and self._open.size and self._open.size + size > self.max_shard_bytes:
            self._flush()
        if self._open is None:
            self._open = _OpenShard(self.root / f"model-{len(self.shards) + 1:05d}.safetensors.tmp")
        self._open.write(name, tensor)
        self.total_size += size
        self.peak_buffered_bytes = max(self.peak_buffered_bytes, size)

    def _flush(self) -> None:
        if self._open is None:
            return
        shard, self._open = self._open, None
        self.shards.append((shard.path, shard.close()))

    def finish(self) -> list[Path]:
        """Write the last shard, give every shard its final name and write the index (several
        shards). Returns the files written."""
        self._flush()
        if not self.shards:
            raise ValueError("no tensors were written")
        if len(self.shards) == 1:
            final = self.root / SINGLE
            os.replace(self.shards[0][0], final)
            return [final]
        count, weight_map, files = len(self.shards), {}, []
        for i, (tmp, names) in enumerate(self.shards, start=1):
            final = self.root / shard_name(i, count)
            os.replace(tmp, final)
            files.append(final)
            weight_map.update(dict.fromkeys(names, final.name))
        index = {"metadata": {"total_size": self.total_size},
                 "weight_map": dict(sorted(weight_map.items()))}
        tmp = self.root / (INDEX + ".tmp")
        tmp.write_text(json.dumps(index, indent=2) + "\n")
        os.replace(tmp, self.root / INDEX)
        return [*files, self.root / INDEX]

    def abort(self) -> None:
        """Remove the shards written so far and the one being written (an export that failed)."""
        if self._open is not None:
            self._open.discard()
            self._open = None
        for path in self.root.glob("model-*.safetensors.tmp*"):  # a shard cut short included
            path.unlink(missing_ok=True)
        self.shards = []
