"""Named tensors streamed into safetensors shards, the layout ``transformers`` writes.

``ShardWriter.add(name, tensor)`` buffers tensors until the next one would push the buffer past
``max_shard_bytes``; then the buffer is written as one shard and dropped. So the writer holds at
most one shard (``max_shard_bytes``, or one tensor when a single tensor is larger, which then gets
a shard of its own, as transformers does). ``finish()`` gives the shards their final names:
``model.safetensors`` when everything fitted one shard, else
``model-00001-of-0000N.safetensors`` ... plus ``model.safetensors.index.json``
(``metadata.total_size`` and ``weight_map``). Shards are written under temporary names until then,
so an interrupted export leaves no file a loader would take for weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

# transformers' save_pretrained default max_shard_size ("5GB", decimal).
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def shard_name(index: int, count: int) -> str:
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def is_weights_file(name: str) -> bool:
    """A file a loader reads as weights (or the index naming them), or our own unfinished shard."""
    return (name in (SINGLE, INDEX) or name.endswith(".safetensors.tmp")
            or (name.startswith("model-") and name.endswith(".safetensors")))


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class ShardWriter:
    """Writes ``add``-ed tensors into ``root`` as safetensors shards of at most ``max_shard_bytes``.

    ``buffered_bytes`` counts the bytes held for the shard being filled; ``peak_buffered_bytes``
    is its maximum over the export (what the memory bound refers to)."""

    def __init__(self, root: str | os.PathLike, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.root = Path(root)
        self.max_shard_bytes = max_shard_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffered_bytes = 0
        self.peak_buffered_bytes = 0
        self.total_size = 0
        self.shards: list[tuple[Path, list[str]]] = []  # (temporary path, tensor names), in order
        self._names: set[str] = set()
        self._storages: set[int] = set()  # storages already in the buffer (a tensor added twice)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")
        self._names.add(name)
        tensor = tensor.detach().to("cpu").contiguous()
        size = nbytes(tensor)
        if self.buffer and self.buffered_bytes + size > self.max_shard_bytes:
            self._flush()
        self.buffer[name] = self._owned(tensor)
        self.buffered_bytes += size
        self.total_size += size
        self.peak_buffered_bytes = max(self.peak_buffered_bytes, self.buffered_bytes)

    def _owned(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` holding its own storage: a view into a larger tensor (one expert of a 3D
        expert tensor) would keep all of it alive, and safetensors refuses two tensors sharing
        memory (a layer-shared block written twice)."""
        storage = tensor.untyped_storage()
        if storage.nbytes() > nbytes(tensor) or storage.data_ptr() in self._storages:
            tensor = tensor.clone()
            storage = tensor.untyped_storage()
        self._storages.add(storage.data_ptr())
        return tensor

    def _flush(self) -> None:
        if not self.buffer:
            return
        path = self.root / f"model-{len(self.shards) + 1:05d}.safetensors.tmp"
        save_file(self.buffer, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.buffer)))
        self.buffer, self.buffered_bytes, self._storages = {}, 0, set()

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
        """Drop what was buffered and remove the shards written so far (an export that failed)."""
        self.buffer, self.buffered_bytes = {}, 0
        for path in self.root.glob("model-*.safetensors.tmp"):  # a shard cut short included
            path.unlink(missing_ok=True)
        self.shards = []
