"""HF ``DeepseekV3ForCausalLM`` (model_type ``deepseek_v3``): config and weight mapping.

One of the format modules that ``ct_model.hf`` picks by arch (``deepseek_v3``), with the same
four functions as hf_llama (their ``arch`` argument is always ``deepseek_v3`` here). Attention, norms, dense
MLPs, the router and the shared expert already carry transformers' names; the differences are
- routed experts: ours are 3D tensors (``mlp.gate_up_proj`` [E, 2I, H], ``mlp.down_proj``
  [E, H, I]); files hold one matrix per expert (``mlp.experts.{j}.gate_proj.weight`` ..., the
  released DeepSeek-V3 layout, which transformers' save_pretrained also writes). Import accepts
  transformers' fused in-memory names (``mlp.experts.gate_up_proj``) too;
- the selection bias: ours ``mlp.gate.expert_bias``, HF ``mlp.gate.e_score_correction_bias``.
RoPE layout is a config flag there (``rope_interleave``), so no weight is permuted.

Not supported (refused with the field named): scaled RoPE (yarn: the released 671B config uses
it; ModelConfig has no rope-scaling fields yet), FP8 block-quantised weights (``weight_scale_inv``:
dequantise first), softmax routing, un-normalised top-k weights. Multi-token-prediction layers
(``model.layers.{i}`` with i >= num_hidden_layers) are skipped on import.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from functools import partial

import torch

from .config import ConfigError, ModelConfig
from .errors import HFFormatError
from .hf_tensors import Rename, StackExperts

ARCH = ("DeepseekV3ForCausalLM", "deepseek_v3")
_EXPERT = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


# ----------------------------------------------------------------------------- config


def _check_exportable(c: ModelConfig) -> None:
    if not c.multi_latent_attention:
        raise ConfigError("arch='deepseek_v3' needs multi_latent_attention=True")
    if c.qk_layernorm or c.layer_sharing:
        raise ConfigError("arch='deepseek_v3' has no qk_layernorm / layer_sharing; set both False")
    if not c.is_moe:
        return
    if c.moe_router_score_function != "sigmoid":
        raise ConfigError("moe_router_score_function must be 'sigmoid' for arch='deepseek_v3' "
                          f"(got {c.moe_router_score_function!r})")
    shared = c.moe_shared_expert_intermediate_size
    if shared is None or shared % c.moe_ffn_hidden_size:
        raise ConfigError(f"moe_shared_expert_intermediate_size={shared} must be a multiple of "
                          f"moe_ffn_hidden_size={c.moe_ffn_hidden_size} for arch='deepseek_v3' "
                          "(HF counts shared experts)")


def hf_config(c: ModelConfig, arch: str, dtype: torch.dtype) -> dict:
    _check_exportable(c)
    moe = c.is_moe
    groups = c.moe_router_num_groups
    return {
        "architectures": [ARCH[0]],
        "model_type": ARCH[1],
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.ffn_hidden_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_attention_heads,
        # MLA expands the kv latent to every head; transformers' repeat_kv must be a no-op.
        "num_key_value_heads": c.num_attention_heads,
        "q_lora_rank": c.q_lora_rank,
        "kv_lora_rank": c.kv_lora_rank,
        "qk_nope_head_dim": c.qk_head_dim,
        "qk_rope_head_dim": c.qk_pos_emb_head_dim,
        "v_head_dim": c.v_head_dim,
        "rope_interleave": c.rope_style == "interleaved",
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rotary_base},
        "rope_theta": c.rotary_base,
        # A dense model (no experts) is every layer dense; the MoE fields are then placeholders.
        "first_k_dense_replace": c.moe_first_dense_layers if moe else c.num_layers,
        "n_routed_experts": c.num_moe_experts if moe else 2,
        "num_experts_per_tok": c.moe_router_topk if moe else 1,
        "moe_intermediate_size": c.moe_ffn_hidden_size if moe else 1,
        "n_shared_experts": c.moe_shared_expert_intermediate_size // c.moe_ffn_hidden_size if moe else 1,
        "n_group": groups or 1,
        "topk_group": c.moe_router_group_topk or 1,
        # Ours normalises the top-k weights whenever k > 1 (DeepSeek-V3's rule).
        "norm_topk_prob": moe and c.moe_router_topk > 1,
        "routed_scaling_factor": c.moe_router_topk_scaling_factor or 1.0,
        "num_nextn_predict_layers": 0,  # no multi-token-prediction module is exported
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.layernorm_epsilon,
        "tie_word_embeddings": c.share_embeddings_and_output_weights,
        "initializer_range": c.init_method_std,
        "hidden_act": "silu",
        "attention_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def config_from_hf(meta: dict, source: str, arch: str) -> ModelConfig:
    def need(key):
        if meta.get(key) is None:
            raise HFFormatError(f"{source}: required field {key!r} is missing")
        return meta[key]

    rope = meta.get("rope_parameters") or meta.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise HFFormatError(f"{source}: rope_scaling type {rope_type!r} is not supported (only 'default'; "
                            "yarn scaling, as in the released 671B config, is not implemented)")
    if meta.get("scoring_func", "sigmoid") != "sigmoid":
        raise HFFormatError(f"{source}: scoring_func {meta['scoring_func']!r} is not supported (sigmoid only)")
    if meta.get("attention_bias"):
        raise HFFormatError(f"{source}: attention_bias=true is not supported")
    if meta.get("quantization_config"):
        raise HFFormatError(f"{source}: quantization_config is set (FP8 weights); dequantise to bf16 first")
    layers, heads, hidden = need("num_hidden_layers"), need("num_attention_heads"), need("hidden_size")
    dense = meta.get("first_k_dense_replace", 0)
    topk = meta.get("num_experts_per_tok", 1)
    if dense < layers and topk > 1 and not meta.get("norm_topk_prob", True):
        raise HFFormatError(f"{source}: norm_topk_prob=false with num_experts_per_tok={topk} is not "
                            "supported (top-k weights are always normalised)")
    groups = meta.get("n_group")
    grouped = groups not in (None, 1)
    moe = dict(
        num_moe_experts=need("n_routed_experts"), moe_router_topk=topk,
        moe_ffn_hidden_size=need("moe_intermediate_size"),
        moe_shared_expert_intermediate_size=(meta.get("n_shared_experts") or 0) * meta["moe_intermediate_size"] or None,
        moe_first_dense_layers=dense, moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_num_groups=groups if grouped else None,
        moe_router_group_topk=meta.get("topk_group") if grouped else None,
        moe_router_topk_scaling_factor=meta.get("routed_scaling_factor"),
    ) if dense < layers else {}
    try:
        return ModelConfig(
            num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
            ffn_hidden_size=need("intermediate_size"), vocab_size=need("vocab_size"),
            # Unused by MLA; hidden/heads when that divides (as the presets), else the value width.
            kv_channels=None if hidden % heads == 0 else meta.get("v_head_dim"),
            max_position_embeddings=meta.get("max_position_embeddings", 4096),
            rotary_base=float(rope.get("rope_theta", meta.get("rope_theta", 10_000.0))),
            rope_style="interleaved" if meta.get("rope_interleave", True) else "rotate_half",
            layernorm_epsilon=meta.get("rms_norm_eps", 1e-6),
            share_embeddings_and_output_weights=bool(meta.get("tie_word_embeddings", False)),
            init_method_std=meta.get("initializer_range", 0.02),
            multi_latent_attention=True, q_lora_rank=meta.get("q_lora_rank"),
            kv_lora_rank=need("kv_lora_rank"), qk_head_dim=need("qk_nope_head_dim"),
            qk_pos_emb_head_dim=need("qk_rope_head_dim"), v_head_dim=need("v_head_dim"),
            name=meta.get("_name_or_path", "hf"), **moe,
        )
    except ConfigError as err:
        raise HFFormatError(f"{source}: {err}") from err


# ----------------------------------------------------------------------------- weights


def converter(config: ModelConfig, arch: str) -> Callable[[str, torch.Tensor], Iterator[tuple[str, torch.Tensor]]]:
    """(our name, tensor) -> its HF file tensors."""
    return partial(_items, c=config)


def _items(name: str, value: torch.Tensor, c: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """One of our tensors -> its HF file tensor(s): a 3D expert tensor one matrix per expert
    (views into it: the writer copies what it keeps), the selection bias renamed."""
    parts = name.split(".")
    if name == "lm_head.weight":
        yield name, value
        return
    if parts[0] == "layers" and c.is_moe_layer(int(parts[1])) and parts[2] == "mlp":
        prefix = f"model.layers.{parts[1]}.mlp."
        rest = ".".join(parts[3:])
        if rest == "gate_up_proj":
            gates, ups = value.chunk(2, dim=1)  # [E, 2I, H]: gate rows, then up rows
            for j in range(value.shape[0]):
                yield f"{prefix}experts.{j}.gate_proj.weight", gates[j]
                yield f"{prefix}experts.{j}.up_proj.weight", ups[j]
            return
        if rest == "down_proj":
            for j in range(value.shape[0]):
                yield f"{prefix}experts.{j}.down_proj.weight", value[j]
            return
        if rest == "gate.expert_bias":
            if not c.moe_router_enable_expert_bias:
                value = torch.zeros_like(value)  # HF always adds it; ours ignores it
            yield prefix + "gate.e_score_correction_bias", value
            return
    yield "model." + name, value


def plan_from_hf_names(keys, c: ModelConfig, arch: str, root) -> dict:
    """HF file tensor names -> how each of our state-dict tensors is read (``Rename`` or, for
    per-expert matrices, ``StackExperts`` into the 3D tensors)."""
    plan, experts = {}, {}
    for key in keys:
        if key.endswith("weight_scale_inv"):
            raise HFFormatError(f"{root}: {key!r} is an FP8 scale (quantised checkpoint); dequantise first")
        if key == "lm_head.weight":
            if not c.share_embeddings_and_output_weights:
                plan[key] = Rename(key)
            continue
        if not key.startswith("model."):
            raise HFFormatError(f"{root}: unexpected tensor {key!r}")
        name = key.removeprefix("model.")
        if name.startswith("layers.") and int(name.split(".")[1]) >= c.num_layers:
            continue  # multi-token-prediction module(s): not part of this model
        if match := _EXPERT.match(name):
            layer, j, kind = int(match[1]), int(match[2]), match[3]
            experts.setdefault(layer, {}).setdefault(kind, {})[j] = key
            continue
        name = (name.replace(".mlp.experts.gate_up_proj", ".mlp.gate_up_proj")
                .replace(".mlp.experts.down_proj", ".mlp.down_proj")
                .replace(".mlp.gate.e_score_correction_bias", ".mlp.gate.expert_bias"))
        plan[name] = Rename(key)
    for layer, kinds in experts.items():
        e = c.num_moe_experts
        for kind in ("gate_proj", "up_proj", "down_proj"):
            if sorted(kinds.get(kind, {})) != list(range(e)):
                raise HFFormatError(f"{root}: layer {layer} needs {kind} of experts 0..{e - 1}, found "
                                    f"{sorted(kinds.get(kind, {}))[:8]}")
        plan[f"layers.{layer}.mlp.gate_up_proj"] = StackExperts(
            tuple((kinds["gate_proj"][j], kinds["up_proj"][j]) for j in range(e)))
        plan[f"layers.{layer}.mlp.down_proj"] = StackExperts(tuple((kinds["down_proj"][j],) for j in range(e)))
    if not c.share_embeddings_and_output_weights and "lm_head.weight" not in plan:
        raise HFFormatError(f"{root}: lm_head.weight missing and tie_word_embeddings is false")
    return plan
