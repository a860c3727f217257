"""HF-format import and export (config.json + safetensors): Llama-4-text, Llama (mapped in
hf_llama.py) and DeepSeek-V3 (``deepseek_v3``: MLA + MoE, mapped in hf_deepseek.py).

No dependency on ``transformers``: the files are written and read directly, and tests check that
``transformers.AutoModelForCausalLM`` loads what we write with identical logits (and vice versa).
This module holds what every format shares (files, shards, checks); the format modules hold the
names and layouts, and ``_FORMATS`` picks one by arch, so they never import this module.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from . import hf_deepseek, hf_llama
from .config import ConfigError, ModelConfig
from .errors import HFFormatError
from .model import Decoder, build_model
from .safetensors_shards import DEFAULT_MAX_SHARD_BYTES, ShardWriter, is_weights_file
from .weights import load_into

__all__ = [
    "ALL_ARCHS", "HFFormatError", "HFWeights", "config_from_hf", "default_arch", "hf_config", "load_hf",
    "read_hf_config", "run_directory_error", "save_hf", "token_ids", "write_hf",
]

DEEPSEEK = "deepseek_v3"
# arch -> its format module: hf_config, converter, config_from_hf and plan_from_hf_names, each
# taking the arch (hf_llama serves two).
_FORMATS = {"llama4": hf_llama, "llama": hf_llama, DEEPSEEK: hf_deepseek}
_MODEL_TYPES = {"llama4_text": "llama4", "llama": "llama", "deepseek_v3": DEEPSEEK}
ALL_ARCHS = sorted(_FORMATS)
log = logging.getLogger("ct_model")


# ----------------------------------------------------------------------------- export


def hf_config(config: ModelConfig, arch: str, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json contents describing ``config`` in the ``arch`` layout (raises ConfigError
    when that architecture cannot hold the model)."""
    return _FORMATS[arch].hf_config(config, arch, dtype)


def default_arch(config: ModelConfig) -> str:
    """The HF architecture that holds ``config`` without conversion: DeepSeek-V3 for MLA / MoE,
    Llama-4's text model for the MobileLLM-R1 features (QK-norm, interleaved RoPE), plain Llama
    otherwise."""
    if config.multi_latent_attention or config.is_moe:
        return DEEPSEEK
    return "llama4" if config.qk_layernorm or config.rope_style == "interleaved" else "llama"


def token_ids(bos_id: int | None, eos_ids: Iterable[int], pad_id: int | None = None) -> dict:
    """The special token ids an export records (``write_hf(token_ids=...)``): ``eos_ids`` are every
    id generation stops on (a Llama-3 tokenizer's end-of-text, end-of-message and end-of-turn,
    128001/128008/128009), written as a list as Llama-3's own config.json does."""
    eos = sorted({int(i) for i in eos_ids})
    if not eos:
        raise ConfigError("token_ids: at least one eos id is needed")
    ids = {"bos_token_id": None if bos_id is None else int(bos_id),
           "eos_token_id": eos[0] if len(eos) == 1 else eos}
    if pad_id is not None:
        ids["pad_token_id"] = int(pad_id)
    return ids


def save_hf(model: Decoder, path: str | os.PathLike, arch: str | None = None,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, token_ids: dict | None = None) -> Path:
    """Write ``model`` as an HF checkpoint directory that ``transformers`` loads (``arch``:
    llama4 | llama | deepseek_v3; None picks ``default_arch``): ``write_hf`` fed with the model's
    own tensors (no copy of the state dict beyond one shard)."""
    items = ((name, value.detach()) for name, value in model.state_dict().items())
    return write_hf(items, model.config, path, arch=arch, max_shard_bytes=max_shard_bytes, token_ids=token_ids)


def write_hf(items: Iterable[tuple[str, torch.Tensor]], config: ModelConfig, path: str | os.PathLike,
             arch: str | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
             token_ids: dict | None = None) -> Path:
    """Write an HF checkpoint directory from ``items``, the model's (ct-model name, full tensor)
    pairs one at a time (any order, each once; an engine's ``full_state_items()``), converted to
    ``arch``'s names and layout as they arrive.

    Holds at most one safetensors shard of ``max_shard_bytes`` (plus the tensor being converted;
    a single tensor larger than that gets a shard of its own): shards are written as they fill,
    under temporary names, then renamed (``model.safetensors`` when one shard holds everything,
    else ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``), and config.json
    comes last. A previous export in ``path`` is removed first (config.json before anything), so
    an interrupted export never looks complete. Raises naming the tensor when one is unexpected,
    repeated, of the wrong shape, or missing at the end (nothing is then left looking complete).

    ``token_ids`` (``token_ids(bos, eos_ids, pad)``, from the tokenizer saved beside the weights)
    go into config.json and a generation_config.json, so that ``transformers``' ``generate``
    stops at the end of a turn; without them neither names a token."""
    arch = arch or default_arch(config)
    if arch not in ALL_ARCHS:
        raise ConfigError(f"arch must be one of {ALL_ARCHS}, got {arch!r}")
    convert = _FORMATS[arch].converter(config, arch)
    # The config dict first: an architecture that cannot hold the model raises before any file.
    hf_meta = hf_config(config, arch)
    expected = {k: tuple(v.shape) for k, v in build_model(config, device="meta").state_dict().items()}
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    _remove_previous_export(out)
    shards = ShardWriter(out, max_shard_bytes)
    seen: set[str] = set()
    dtype = None
    try:
        for name, tensor in items:
            _check_item(name, tensor, expected, seen, out)
            if name == "embed_tokens.weight":
                dtype = tensor.dtype
            for hf_name, value in convert(name, tensor):
                shards.add(hf_name, value)
            tensor = value = None  # dropped before the next one is produced, not after
        if missing := sorted(set(expected) - seen):
            raise HFFormatError(f"{out}: export incomplete: {len(missing)} tensors never arrived, e.g. {missing[:5]}")
        files = shards.finish()
    except BaseException:
        shards.abort()
        raise
    hf_meta["torch_dtype"] = str(dtype).removeprefix("torch.")
    if token_ids:
        hf_meta.update(token_ids)
        (out / "generation_config.json").write_text(json.dumps(token_ids, indent=2) + "\n")
    config_tmp = out / "config.json.tmp"
    config_tmp.write_text(json.dumps(hf_meta, indent=2) + "\n")
    os.replace(config_tmp, out / "config.json")
    log.info("HF export %s: %d weight file(s), %d bytes; at most %d bytes buffered (max_shard_bytes %d)",
             out, len(files), shards.total_size, shards.peak_buffered_bytes, max_shard_bytes)
    return out


def _check_item(name: str, tensor: torch.Tensor, expected: dict, seen: set, out: Path) -> None:
    if name not in expected:
        raise HFFormatError(f"{out}: tensor {name!r} is not part of a model of this configuration")
    if name in seen:
        raise HFFormatError(f"{out}: tensor {name!r} arrived twice")
    if tuple(tensor.shape) != expected[name]:
        raise HFFormatError(f"{out}: {name} has shape {tuple(tensor.shape)}, the configuration's is {expected[name]}")
    seen.add(name)


def _remove_previous_export(out: Path) -> None:
    """config.json first (the directory stops looking complete), then old weights and index: a
    smaller model's single file must not sit beside a new index, nor old shards beside new ones."""
    (out / "config.json").unlink(missing_ok=True)
    (out / "generation_config.json").unlink(missing_ok=True)
    for path in out.iterdir():
        if path.is_file() and is_weights_file(path.name):
            path.unlink()


# ----------------------------------------------------------------------------- import


def config_from_hf(meta: dict, source: str = "config.json") -> tuple[ModelConfig, str]:
    """ModelConfig and arch ('llama4' | 'llama' | 'deepseek_v3') for an HF config dict."""
    if meta.get("model_type") == "llama4" and "text_config" in meta:
        meta = meta["text_config"]
    model_type = meta.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise HFFormatError(
            f"{source}: model_type {model_type!r} is not supported; expected one of {sorted(_MODEL_TYPES)}"
        )
    arch = _MODEL_TYPES[model_type]
    return _FORMATS[arch].config_from_hf(meta, source, arch), arch


def run_directory_error(root: Path) -> HFFormatError | None:
    """The error for a ct-train run directory given where an HF model directory is expected (its
    config.json is the run's config, not a model's), pointing at its ``hf/``; None otherwise."""
    if not ((root / "model_config.json").is_file() or (root / "checkpoints").is_dir()):
        return None
    try:
        if "model_type" in json.loads((root / "config.json").read_text()):
            return None
    except (OSError, ValueError):
        pass
    hf = root / "hf"
    where = (f"its HF export is {hf}" if (hf / "config.json").is_file() else
             f"it has no HF export yet ({hf} is missing: `ct-export {root} OUT_DIR` writes one from its "
             "newest checkpoint)")
    return HFFormatError(f"{root} is a training run directory, not an HF model directory: {where}")


def read_hf_config(path: str | os.PathLike) -> tuple[ModelConfig, str]:
    """(ModelConfig, arch) of an HF model directory, from its config.json alone."""
    root = Path(path)
    config_path = root / "config.json"
    if (err := run_directory_error(root)) is not None:
        raise err
    if not config_path.is_file():
        raise HFFormatError(f"{config_path}: not found (is {root} an HF model directory?)")
    return config_from_hf(json.loads(config_path.read_text()), str(config_path))


def load_hf(path: str | os.PathLike, device: str | torch.device = "cpu",
            dtype: torch.dtype | None = None) -> tuple[Decoder, ModelConfig]:
    """Load an HF ``Llama4ForCausalLM``, ``LlamaForCausalLM`` or ``DeepseekV3ForCausalLM``
    directory into a Decoder: built on ``meta``, then filled one tensor at a time from the files
    (no second copy of the weights in memory), in ``dtype`` when given."""
    weights = HFWeights(path)
    model = build_model(weights.config, device="meta")
    model.to_empty(device=device)
    if dtype is not None:
        model.to(dtype)
    load_into(model, weights)
    return model, weights.config


class HFWeights:
    """An HF model directory as a weight source (ct_model.weights): our state-dict names, read
    lazily from the safetensors files (one file or ``model.safetensors.index.json`` shards), a
    slice of rows at a time (``safe_open(...).get_slice``), so a rank reads only what it holds."""

    def __init__(self, path: str | os.PathLike):
        self.root = Path(path)
        self.config, self.arch = read_hf_config(self.root)
        self.files = _tensor_files(self.root)
        self.plan = _FORMATS[self.arch].plan_from_hf_names(list(self.files), self.config, self.arch, self.root)

    def names(self) -> list[str]:
        return list(self.plan)

    def _file_shape(self, key: str) -> tuple[int, ...]:
        with safe_open(str(self.root / self.files[key]), framework="pt") as f:
            return tuple(f.get_slice(key).get_shape())

    def _read(self, key: str, start: int, stop: int | None) -> torch.Tensor:
        with safe_open(str(self.root / self.files[key]), framework="pt") as f:
            piece = f.get_slice(key)
            if not piece.get_shape():
                return f.get_tensor(key)
            return piece[start:stop if stop is not None else piece.get_shape()[0]]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.plan[name].shape(self._file_shape)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.plan[name].rows(self._read, start, stop)

    def full(self, name: str) -> torch.Tensor:
        shape = self.shape(name)
        return self.rows(name, 0, shape[0]) if shape else self._read(self.plan[name].key, 0, None)


def _tensor_files(root: Path) -> dict[str, str]:
    """Every file tensor's name -> the file holding it."""
    index = root / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    files = sorted(p.name for p in root.glob("*.safetensors"))
    if not files:
        raise HFFormatError(f"{root}: no *.safetensors weights found")
    out = {}
    for name in files:
        with safe_open(str(root / name), framework="pt") as f:
            out.update({key: name for key in f.keys()})
    return out
