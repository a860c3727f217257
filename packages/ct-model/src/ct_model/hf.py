"""HF-format import and export (config.json + safetensors): Llama-4-text, Llama and DeepSeek-V3
(``deepseek_v3``: MLA + MoE, mapped in hf_deepseek.py).

No dependency on ``transformers``: the files are written and read directly, and tests check that
``transformers.AutoModelForCausalLM`` loads what we write with identical logits (and vice versa).

- ``llama4`` (``Llama4ForCausalLM`` / ``llama4_text``): the released MobileLLM-R1 format; RoPE is
  interleaved and QK-norm is parameter-free after RoPE, exactly as in this package.
- ``llama`` (``LlamaForCausalLM``): rotate-half RoPE, no QK-norm.

Exporting a model to the other RoPE layout permutes the rows of q_proj/k_proj inside each head,
which is exact (a relabelling of the rotated pairs).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ConfigError, ModelConfig
from .errors import UserError
from .model import Decoder, build_model
from .weights import load_into

ARCHS = {
    "llama4": ("Llama4ForCausalLM", "llama4_text", "feed_forward"),
    "llama": ("LlamaForCausalLM", "llama", "mlp"),
}
_MODEL_TYPES = {"llama4_text": "llama4", "llama": "llama", "deepseek_v3": "deepseek_v3"}
# DeepseekV3ForCausalLM: its mapping lives in hf_deepseek.py (imported lazily, it imports this).
DEEPSEEK = "deepseek_v3"
ALL_ARCHS = sorted([*ARCHS, DEEPSEEK])


class HFFormatError(UserError):
    """An HF checkpoint directory is missing something or describes an unsupported model."""


def _interleaved_to_rotate_half(head_dim: int) -> torch.Tensor:
    return torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))


def _permute_heads(weight: torch.Tensor, head_dim: int, order: torch.Tensor) -> torch.Tensor:
    rows, cols = weight.shape
    return weight.view(rows // head_dim, head_dim, cols)[:, order].reshape(rows, cols)


# ----------------------------------------------------------------------------- export


def hf_config(config: ModelConfig, arch: str, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json contents describing ``config`` in the ``arch`` layout."""
    hf_arch, model_type, _ = ARCHS[arch]
    depth = config.effective_depth
    common = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": depth,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_query_groups,
        "head_dim": config.kv_channels,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.layernorm_epsilon,
        "rope_theta": config.rotary_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rotary_base},
        "tie_word_embeddings": config.share_embeddings_and_output_weights,
        "initializer_range": config.init_method_std,
        "hidden_act": "silu",
        "attention_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if arch == "llama":
        if config.qk_layernorm:
            raise ConfigError(
                "qk_layernorm=True cannot be exported as arch='llama' (LlamaForCausalLM has no "
                "QK-norm); export with arch='llama4'"
            )
        return {**common, "intermediate_size": config.ffn_hidden_size, "mlp_bias": False}
    return {
        **common,
        "intermediate_size": config.ffn_hidden_size,
        "intermediate_size_mlp": config.ffn_hidden_size,
        "use_qk_norm": config.qk_layernorm,
        "no_rope_layers": [1] * depth,
        "moe_layers": [],
        "num_local_experts": 1,
        "num_experts_per_tok": 1,
        # Full causal attention on every layer (no chunked-local attention, no temperature tuning).
        "attention_chunk_size": None,
        "attn_temperature_tuning": False,
    }


def default_arch(config: ModelConfig) -> str:
    """The HF architecture that holds ``config`` without conversion: DeepSeek-V3 for MLA / MoE,
    Llama-4's text model for the MobileLLM-R1 features (QK-norm, interleaved RoPE), plain Llama
    otherwise."""
    if config.multi_latent_attention or config.is_moe:
        return DEEPSEEK
    return "llama4" if config.qk_layernorm or config.rope_style == "interleaved" else "llama"


def save_hf(model: Decoder, path: str | os.PathLike, arch: str | None = None) -> Path:
    """Write ``model`` as an HF checkpoint directory that ``transformers`` loads (``arch``:
    llama4 | llama | deepseek_v3; None picks ``default_arch``)."""
    arch = arch or default_arch(model.config)
    if arch not in ALL_ARCHS:
        raise ConfigError(f"arch must be one of {ALL_ARCHS}, got {arch!r}")
    config = model.config
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    dtype = state["embed_tokens.weight"].dtype
    if arch == DEEPSEEK:
        from . import hf_deepseek

        meta = hf_deepseek.hf_config(config, dtype)
        tensors = hf_deepseek.to_hf_names(state, config)
    else:
        if config.multi_latent_attention or config.is_moe:
            raise ConfigError(f"an MLA/MoE model cannot be exported as arch={arch!r}; use 'deepseek_v3'")
        target_style = "interleaved" if arch == "llama4" else "rotate_half"
        meta = hf_config(config, arch, dtype)
        tensors = _to_hf_names(state, config, arch, config.rope_style != target_style)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    # Write under temporary names and rename, so an interrupted export never looks complete.
    weights_tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(weights_tmp), metadata={"format": "pt"})
    os.replace(weights_tmp, out / "model.safetensors")
    config_tmp = out / "config.json.tmp"
    config_tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(config_tmp, out / "config.json")
    return out


def _to_hf_names(state: dict, config: ModelConfig, arch: str, permute: bool) -> dict:
    mlp_name = ARCHS[arch][2]
    order = _interleaved_to_rotate_half(config.kv_channels)
    if config.rope_style == "rotate_half":
        order = torch.argsort(order)  # inverse: rotate-half rows back to interleaved
    repeats = 2 if config.layer_sharing else 1
    out = {"model.embed_tokens.weight": state["embed_tokens.weight"],
           "model.norm.weight": state["norm.weight"]}
    if not config.share_embeddings_and_output_weights:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(config.num_layers):
        for r in range(repeats):  # layer sharing exports each shared block twice (exact)
            dst = f"model.layers.{i * repeats + r}."
            for key, value in state.items():
                prefix = f"layers.{i}."
                if not key.startswith(prefix):
                    continue
                name = key[len(prefix):]
                if permute and name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
                    value = _permute_heads(value, config.kv_channels, order)
                out[dst + name.replace("mlp.", f"{mlp_name}.")] = value.contiguous().clone()
    return out


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
    if arch == DEEPSEEK:
        from . import hf_deepseek

        return hf_deepseek.config_from_hf(meta, source), arch

    def need(key):
        if key not in meta:
            raise HFFormatError(f"{source}: required field {key!r} is missing")
        return meta[key]

    rope = meta.get("rope_parameters") or meta.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise HFFormatError(f"{source}: rope type {rope_type!r} is not supported (only 'default')")
    theta = rope.get("rope_theta", meta.get("rope_theta", 10_000.0))
    if arch == "llama4":
        _check_llama4_dense(meta, source)
        ffn = meta.get("intermediate_size_mlp", meta.get("intermediate_size"))
        qk_norm = bool(meta.get("use_qk_norm", True))
    else:
        ffn = need("intermediate_size")
        qk_norm = False
        if meta.get("attention_bias") or meta.get("mlp_bias"):
            raise HFFormatError(f"{source}: biases in attention/MLP are not supported")
    heads = need("num_attention_heads")
    config = ModelConfig(
        num_layers=need("num_hidden_layers"),
        hidden_size=need("hidden_size"),
        num_attention_heads=heads,
        num_query_groups=meta.get("num_key_value_heads") or heads,
        kv_channels=meta.get("head_dim") or need("hidden_size") // heads,
        ffn_hidden_size=ffn,
        vocab_size=need("vocab_size"),
        max_position_embeddings=meta.get("max_position_embeddings", 2048),
        rotary_base=float(theta),
        rope_style="interleaved" if arch == "llama4" else "rotate_half",
        layernorm_epsilon=meta.get("rms_norm_eps", 1e-5),
        qk_layernorm=qk_norm,
        share_embeddings_and_output_weights=bool(meta.get("tie_word_embeddings", False)),
        init_method_std=meta.get("initializer_range", 0.02),
        name=meta.get("_name_or_path", "hf"),
    )
    return config, arch


def _check_llama4_dense(meta: dict, source: str) -> None:
    layers = meta.get("num_hidden_layers", 0)
    if meta.get("moe_layers"):
        raise HFFormatError(f"{source}: MoE layers {meta['moe_layers']} are not supported (dense only)")
    no_rope = meta.get("no_rope_layers") or [1] * layers
    if not all(no_rope[:layers]):
        raise HFFormatError(f"{source}: no_rope_layers has NoPE layers; every layer must use RoPE")


def read_hf_config(path: str | os.PathLike) -> tuple[ModelConfig, str]:
    """(ModelConfig, arch) of an HF model directory, from its config.json alone."""
    root = Path(path)
    config_path = root / "config.json"
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


@dataclass(frozen=True)
class Rename:
    """One of our tensors is one file tensor."""

    key: str

    def shape(self, shape_of) -> tuple[int, ...]:
        return shape_of(self.key)

    def rows(self, read, start: int, stop: int) -> torch.Tensor:
        return read(self.key, start, stop)


@dataclass(frozen=True)
class StackExperts:
    """A 3D expert tensor [E, ...]: expert j is its file tensors ``parts[j]`` joined along rows."""

    parts: tuple[tuple[str, ...], ...]

    def shape(self, shape_of) -> tuple[int, ...]:
        first = [shape_of(k) for k in self.parts[0]]
        return (len(self.parts), sum(s[0] for s in first), *first[0][1:])

    def rows(self, read, start: int, stop: int) -> torch.Tensor:
        return torch.stack([torch.cat([read(k, 0, None) for k in self.parts[j]]) for j in range(start, stop)])


class HFWeights:
    """An HF model directory as a weight source (ct_model.weights): our state-dict names, read
    lazily from the safetensors files (one file or ``model.safetensors.index.json`` shards), a
    slice of rows at a time (``safe_open(...).get_slice``), so a rank reads only what it holds."""

    def __init__(self, path: str | os.PathLike):
        self.root = Path(path)
        self.config, self.arch = read_hf_config(self.root)
        self.files = _tensor_files(self.root)
        self.plan = _plan_from_hf_names(list(self.files), self.config, self.arch, self.root)

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


def _plan_from_hf_names(keys: list[str], config: ModelConfig, arch: str, root: Path) -> dict:
    if arch == DEEPSEEK:
        from . import hf_deepseek

        return hf_deepseek.plan_from_hf_names(keys, config, root)
    mlp_name = ARCHS[arch][2]
    plan = {}
    for key in keys:
        # Multimodal Llama-4 checkpoints nest the text model under language_model.
        name = key.removeprefix("language_model.")
        if name == "lm_head.weight":
            if not config.share_embeddings_and_output_weights:
                plan[name] = Rename(key)
            continue
        if not name.startswith("model."):
            raise HFFormatError(f"{root}: unexpected tensor {key!r}")
        plan[name.removeprefix("model.").replace(f".{mlp_name}.", ".mlp.")] = Rename(key)
    if not config.share_embeddings_and_output_weights and "lm_head.weight" not in plan:
        raise HFFormatError(f"{root}: lm_head.weight missing and tie_word_embeddings is false")
    return plan
