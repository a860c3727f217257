"""HF ``Llama4ForCausalLM`` (``llama4_text``) and ``LlamaForCausalLM`` (``llama``): config and
weight mapping, one of the format modules that ``ct_model.hf`` picks by arch.

- ``llama4``: the released MobileLLM-R1 format; RoPE is interleaved and QK-norm is parameter-free
  after RoPE, exactly as in this package.
- ``llama``: rotate-half RoPE, no QK-norm.

Exporting a model to the other RoPE layout permutes the rows of q_proj/k_proj inside each head,
which is exact (a relabelling of the rotated pairs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import torch

from .config import ConfigError, ModelConfig
from .errors import HFFormatError
from .hf_tensors import Rename

# arch -> (HF architecture, model_type, the name of the MLP module)
ARCHS = {
    "llama4": ("Llama4ForCausalLM", "llama4_text", "feed_forward"),
    "llama": ("LlamaForCausalLM", "llama", "mlp"),
}


def _interleaved_to_rotate_half(head_dim: int) -> torch.Tensor:
    return torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))


def _permute_heads(weight: torch.Tensor, head_dim: int, order: torch.Tensor) -> torch.Tensor:
    rows, cols = weight.shape
    return weight.view(rows // head_dim, head_dim, cols)[:, order].reshape(rows, cols)


# ----------------------------------------------------------------------------- export


def hf_config(config: ModelConfig, arch: str, dtype: torch.dtype) -> dict:
    """The config.json contents describing ``config`` in the ``arch`` layout."""
    if config.multi_latent_attention or config.is_moe:
        raise ConfigError(f"an MLA/MoE model cannot be exported as arch={arch!r}; use 'deepseek_v3'")
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


def converter(config: ModelConfig, arch: str) -> Callable[[str, torch.Tensor], Iterator[tuple[str, torch.Tensor]]]:
    """(our name, tensor) -> its ``arch`` file tensors."""
    target_style = "interleaved" if arch == "llama4" else "rotate_half"
    return partial(_items, config=config, arch=arch, permute=config.rope_style != target_style)


def _items(name: str, value: torch.Tensor, config: ModelConfig, arch: str,
           permute: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """One of our tensors as Llama / Llama-4 file tensors: a layer-shared block's tensors twice
    (exact, larger file); q/k rows permuted per head when the RoPE layouts differ."""
    if name in ("embed_tokens.weight", "norm.weight"):
        yield "model." + name, value
        return
    if name == "lm_head.weight":
        yield name, value
        return
    parts = name.split(".", 2)
    if parts[0] != "layers" or len(parts) < 3:
        raise HFFormatError(f"tensor {name!r} has no {ARCHS[arch][0]} counterpart")
    layer, rest = int(parts[1]), parts[2]
    if permute and rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
        order = _interleaved_to_rotate_half(config.kv_channels)
        if config.rope_style == "rotate_half":
            order = torch.argsort(order)  # inverse: rotate-half rows back to interleaved
        value = _permute_heads(value, config.kv_channels, order)
    rest = rest.replace("mlp.", f"{ARCHS[arch][2]}.")
    repeats = 2 if config.layer_sharing else 1
    for r in range(repeats):
        yield f"model.layers.{layer * repeats + r}.{rest}", value


# ----------------------------------------------------------------------------- import


def config_from_hf(meta: dict, source: str, arch: str) -> ModelConfig:
    """The ModelConfig of an ``arch`` config dict."""
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
    return ModelConfig(
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


def _check_llama4_dense(meta: dict, source: str) -> None:
    layers = meta.get("num_hidden_layers", 0)
    if meta.get("moe_layers"):
        raise HFFormatError(f"{source}: MoE layers {meta['moe_layers']} are not supported (dense only)")
    no_rope = meta.get("no_rope_layers") or [1] * layers
    if not all(no_rope[:layers]):
        raise HFFormatError(f"{source}: no_rope_layers has NoPE layers; every layer must use RoPE")


def plan_from_hf_names(keys: list[str], config: ModelConfig, arch: str, root: Path) -> dict:
    """HF file tensor names -> how each of our state-dict tensors is read (a ``Rename`` each)."""
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
