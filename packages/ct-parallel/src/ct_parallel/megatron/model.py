"""ct-model's architecture as a megatron-core GPTModel: config mapping and ModuleSpec.

Numerics are matched to ct-model, not approximated:
- RMSNorm: ``torch.nn.functional.rms_norm`` with the model's epsilon (a small norm class that
  also works with sequence parallelism, which megatron's torch-norm wrapper refuses).
- SwiGLU without biases: ``gated_linear_unit`` + SiLU.
- RoPE: megatron's ``rotary_interleaved`` pairs adjacent elements exactly as ct-model's
  "interleaved" style (and the default pairs i with i + d/2, as "rotate_half"). The angles are
  computed from the batch's ``position_ids`` (which restart at every packed document), not from
  0..T-1 as GPTModel does by default.
- QK-norm: ct-model's is a parameter-free RMS over head_dim applied AFTER RoPE; megatron's
  ``qk_layernorm`` is learnable and applied before RoPE. We do not use megatron's: the core
  attention in the spec is wrapped so that q and k are RMS-normalised after RoPE, as in ct-model.
- Document masking: with Transformer Engine, packed documents go to attention as THD
  (``packed.py``: cu_seqlens, causal within each document); with the local spec (CPU), whose
  attention takes no THD, the boolean mask from ct-model's predicate is passed instead.
- MLA (DeepSeek-V3): megatron's MLASelfAttention. Its RoPE always de-interleaves the rotated
  dims (``mla_rotary_interleaved``: [x0, x2, ...; x1, x3, ...]) and then rotates halves, which is
  ct-model's "interleaved" style up to one permutation applied to q and k alike, so q.k (and
  everything after) is equal; ct-model's rotate_half style with MLA has no megatron equivalent.
  Softmax scale 1/sqrt(qk_head_dim + qk_pos_emb_head_dim) (rope_type "rope": mscale 1). The latent
  norms use ct-model's fixed eps (LATENT_NORM_EPS), not layernorm_epsilon. RoPE angles come from
  the batch's position ids here too (MLA would compute 0..T-1 itself), except with THD, where
  megatron restarts positions at every cu_seqlens boundary itself.
- MoE (DeepSeek-V3): megatron's MoELayer (shared expert + routed experts, dropless) with a router
  whose group scores are ct-model's (the sum of each group's best min(2, experts per group)
  scores, as DeepSeek-V3 and transformers; megatron sums the best topk // group_topk, which
  agrees only when that is 2). Gating in fp32 (``moe_router_dtype``). The aux-loss-free expert
  bias is megatron's own update (finalize_model_grads: bias += rate * sign(mean load - load),
  loads summed over TP x DP x CP), the same rule and rate as ct_model.moe.update_expert_bias.
Anything ct-model has that this mapping cannot express raises ``UnsupportedModelError`` naming
the field.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from ct_model.errors import UserError
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_submodules,
    get_gpt_layer_with_transformer_engine_submodules,
)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.multi_latent_attention import MLASelfAttention
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, get_transformer_layer_offset
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from torch import nn

from ct_model import ModelConfig
from ct_model.mla import LATENT_NORM_EPS

from ..config import DistributedConfig
from .transformer_impl import have_transformer_engine, use_transformer_engine  # noqa: F401 - the spec choice


class UnsupportedModelError(UserError):
    """A ModelConfig field has no exact megatron-core equivalent."""


def check_supported(model_config: ModelConfig, dist_config: DistributedConfig) -> None:
    c = model_config
    if c.layer_sharing:
        raise UnsupportedModelError(
            "ModelConfig.layer_sharing=True (every block run twice) has no megatron-core equivalent; "
            "use the native engine (single/ddp/fsdp2) for layer-shared models")
    tp, pp = dist_config.tensor_model_parallel_size, dist_config.pipeline_model_parallel_size
    for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size", "vocab_size"):
        if getattr(c, name) % tp:
            raise UnsupportedModelError(f"ModelConfig.{name}={getattr(c, name)} is not divisible by "
                                        f"tensor_model_parallel_size={tp}")
    chunks = pp * (dist_config.virtual_pipeline_model_parallel_size or 1)
    if c.num_layers % chunks:
        raise UnsupportedModelError(f"ModelConfig.num_layers={c.num_layers} is not divisible by pipeline stages x "
                                    f"virtual stages = {chunks}")
    if c.multi_latent_attention:
        _check_mla(c, tp)
    if c.is_moe:
        _check_moe(c, dist_config)


def _check_mla(c: ModelConfig, tp: int) -> None:
    if c.rope_style != "interleaved":
        raise UnsupportedModelError(
            f"ModelConfig.rope_style={c.rope_style!r} with multi_latent_attention: megatron's MLA always "
            "de-interleaves the RoPE dims, which equals only ct-model's 'interleaved' style")
    # megatron's local spec shards the down projections' outputs over TP and gathers them.
    widths = {"kv_lora_rank + qk_pos_emb_head_dim": c.kv_lora_rank + c.qk_pos_emb_head_dim}
    if c.q_lora_rank is not None:
        widths["q_lora_rank"] = c.q_lora_rank
    for name, width in widths.items():
        if width % tp:
            raise UnsupportedModelError(f"ModelConfig.{name}={width} is not divisible by "
                                        f"tensor_model_parallel_size={tp}")


def _check_moe(c: ModelConfig, dist_config: DistributedConfig) -> None:
    if c.moe_router_score_function != "sigmoid":
        # megatron's softmax routing ignores the expert bias and scores groups on raw logits.
        raise UnsupportedModelError(f"ModelConfig.moe_router_score_function={c.moe_router_score_function!r}: the "
                                    "megatron engine maps only 'sigmoid' routing (DeepSeek-V3's) exactly")
    if c.moe_aux_loss_coeff > 0:
        raise UnsupportedModelError(
            f"ModelConfig.moe_aux_loss_coeff={c.moe_aux_loss_coeff}: the sequence-wise balance loss is not mapped "
            "to megatron's seq_aux_loss yet (its loss scaling differs from the engines'); set it to 0 or use "
            "the native engine")
    if dist_config.tensor_model_parallel_size > 1 and not dist_config.sequence_parallel:
        # megatron's MoELayer refuses to train under TP without SP.
        raise UnsupportedModelError(
            f"distributed.sequence_parallel=false with a MoE model (ModelConfig.num_moe_experts="
            f"{c.num_moe_experts}) and tensor_model_parallel_size={dist_config.tensor_model_parallel_size}: "
            "megatron-core needs sequence parallelism there; set distributed.sequence_parallel=true")
    ep = dist_config.expert_model_parallel_size
    if c.num_moe_experts % ep:
        raise UnsupportedModelError(f"ModelConfig.num_moe_experts={c.num_moe_experts} is not divisible by "
                                    f"expert_model_parallel_size={ep}")
    etp = dist_config.expert_tensor_parallel_size or dist_config.tensor_model_parallel_size
    if c.moe_ffn_hidden_size % etp:
        raise UnsupportedModelError(f"ModelConfig.moe_ffn_hidden_size={c.moe_ffn_hidden_size} is not divisible by "
                                    f"expert_tensor_parallel_size={etp}")
    shared = c.moe_shared_expert_intermediate_size
    if shared is not None and shared % dist_config.tensor_model_parallel_size:
        raise UnsupportedModelError(f"ModelConfig.moe_shared_expert_intermediate_size={shared} is not divisible by "
                                    f"tensor_model_parallel_size={dist_config.tensor_model_parallel_size}")


def _mla_fields(c: ModelConfig) -> dict:
    """MLATransformerConfig's fields (plain RoPE: no yarn, so mscale is 1 and the softmax scale is
    ct-model's 1/sqrt(qk_head_dim + qk_pos_emb_head_dim))."""
    return dict(
        multi_latent_attention=True, q_lora_rank=c.q_lora_rank, kv_lora_rank=c.kv_lora_rank,
        qk_head_dim=c.qk_head_dim, qk_pos_emb_head_dim=c.qk_pos_emb_head_dim, v_head_dim=c.v_head_dim,
        rope_type="rope", rotary_base=c.rotary_base, rotary_scaling_factor=1.0, mscale=1.0, mscale_all_dim=0.0,
    )


def _moe_fields(c: ModelConfig, dist_config: DistributedConfig, on_gpu: bool) -> dict:
    return dict(
        num_moe_experts=c.num_moe_experts,
        moe_router_topk=c.moe_router_topk,
        moe_ffn_hidden_size=c.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=c.moe_shared_expert_intermediate_size,
        moe_layer_freq=[0 if i < c.moe_first_dense_layers else 1 for i in range(c.num_layers)],
        moe_router_score_function=c.moe_router_score_function,
        moe_router_enable_expert_bias=c.moe_router_enable_expert_bias,
        moe_router_bias_update_rate=c.moe_router_bias_update_rate,
        moe_router_num_groups=c.moe_router_num_groups,
        moe_router_group_topk=c.moe_router_group_topk,
        moe_router_topk_scaling_factor=c.moe_router_topk_scaling_factor,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_router_dtype="fp32",  # ct-model gates in fp32 (DeepSeek-V3 sec. 3.3.1)
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=on_gpu,
        moe_permute_fusion=False,
        moe_router_fusion=False,
        expert_model_parallel_size=dist_config.expert_model_parallel_size,
        expert_tensor_parallel_size=dist_config.expert_tensor_parallel_size,
    )


def transformer_config(model_config: ModelConfig, dist_config: DistributedConfig, *,
                       bf16: bool = False, recompute: dict | None = None, fp8: dict | None = None) -> TransformerConfig:
    """The one mapping ModelConfig -> TransformerConfig (field names are the same by design).

    ``recompute``: recompute_granularity / recompute_method / recompute_num_layers fields
    (ct_parallel.recompute.megatron_recompute), none by default. ``fp8``: the fp8 / fp8_recipe
    fields (ct_parallel.precision.megatron_fp8_fields), none by default. ``bf16``: the precision
    the chunks run in, given here and not set afterwards: it makes the parameters (params_dtype)
    and the pipeline's p2p buffers (pipeline_dtype) bf16, and modules read it when they are built
    (the local attention upcasts its softmax to fp32 only for bf16 inputs, which it learns from
    config.bf16). attention_softmax_in_fp32 is on either way."""
    check_supported(model_config, dist_config)
    c = model_config
    on_gpu = torch.cuda.is_available()
    vpp = dist_config.virtual_pipeline_model_parallel_size if dist_config.pipeline_schedule == "interleaved" else None
    extra = {}
    if c.multi_latent_attention:
        extra.update(_mla_fields(c))
    if c.is_moe:
        extra.update(_moe_fields(c, dist_config, on_gpu))
    cls = MLATransformerConfig if c.multi_latent_attention else TransformerConfig
    return cls(
        num_layers=c.num_layers,
        hidden_size=c.hidden_size,
        num_attention_heads=c.num_attention_heads,
        num_query_groups=c.num_query_groups,
        ffn_hidden_size=c.ffn_hidden_size,
        kv_channels=c.kv_channels,
        layernorm_epsilon=c.layernorm_epsilon,
        init_method_std=c.init_method_std,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # MLA de-interleaves before rotating halves (see module docstring): not interleaved there.
        rotary_interleaved=c.rope_style == "interleaved" and not c.multi_latent_attention,
        # Our QK-norm lives in the core attention wrapper (after RoPE), see module docstring. With
        # MLA, megatron's qk_layernorm means the latent norms (q_a_layernorm, kv_a_layernorm): on.
        qk_layernorm=c.multi_latent_attention,
        apply_rope_fusion=False,  # per-sample position ids; the fused kernels take one row
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=dist_config.tensor_model_parallel_size,
        pipeline_model_parallel_size=dist_config.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp,
        sequence_parallel=dist_config.sequence_parallel,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        bf16=bf16,
        # The engine scales losses by 1/(global scored tokens) itself; megatron must not divide
        # by the number of microbatches or average over data-parallel ranks.
        calculate_per_token_loss=True,
        batch_p2p_sync=on_gpu,
        # gloo (CPU) matches point-to-point messages between two ranks by order; batched p2p
        # with PP=2 interleaved (next and previous stage are the same rank) mismatches them.
        batch_p2p_comm=on_gpu,
        use_cpu_initialization=not on_gpu,
        # Weights come from the ct-model through the bridge; megatron's init would be overwritten.
        perform_initialization=False,
        **(recompute or {}),
        **(fp8 or {}),
        **extra,
    )


class RMSNorm(nn.Module):
    """ct-model's RMSNorm with megatron's norm signature; marks its weight for sequence
    parallelism so megatron all-reduces its gradient over the TP group."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


@functools.cache
def post_rope_qk_norm(core_attention_cls: type, eps: float) -> type:
    """A core-attention class that RMS-normalises q and k (parameter-free, over head_dim) before
    attending. Core attention receives q and k after RoPE, which is where ct-model normalises."""

    class PostRopeQKNormAttention(core_attention_cls):
        def forward(self, query, key, value, *args, **kwargs):
            query = F.rms_norm(query, (query.shape[-1],), eps=eps)
            key = F.rms_norm(key, (key.shape[-1],), eps=eps)
            return super().forward(query, key, value, *args, **kwargs)

    PostRopeQKNormAttention.__name__ = f"PostRopeQKNorm{core_attention_cls.__name__}"
    PostRopeQKNormAttention.__qualname__ = PostRopeQKNormAttention.__name__
    return PostRopeQKNormAttention


class LatentRMSNorm(RMSNorm):
    """MLA's latent norms (q_a_layernorm, kv_a_layernorm) at ct-model's fixed eps: megatron passes
    layernorm_epsilon, which ct-model (like DeepSeek and transformers) does not use there."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(config, hidden_size, LATENT_NORM_EPS, **unused)
        if not config.sequence_parallel:
            # Without SP the latents are whole on every TP rank and so are these grads, but
            # finalize_model_grads SUMS every "q_layernorm" weight's grad over TP (right for
            # per-head q norms, twice too much here); averaging equal grads changes nothing.
            setattr(self.weight, "average_gradients_across_tp_domain", True)


class MLACoreAttention(nn.Module):
    """Softmax attention for MLA on the local spec: megatron's local DotProductAttention takes
    one head width (``kv_channels``), MLA's keys (qk_head_dim + qk_pos_emb_head_dim) and values
    (v_head_dim) differ. q, k, v [s, b, heads, d]; the mask is megatron's (True = masked out);
    returns [s, b, heads * v_head_dim]."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type, softmax_scale: float,
                 **_unused):
        super().__init__()
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, packed_seq_params=None, **_unused):
        if packed_seq_params is not None:
            raise ValueError("MLA on the local spec takes a dense mask, not THD (use Transformer Engine)")
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, d]
        mask = None if attention_mask is None else ~attention_mask
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             scale=self.softmax_scale)
        s, b = query.shape[:2]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


class PositionIdRotaryEmbedding(RotaryEmbedding):
    """MLA's RoPE angles: the ones its attention module was handed for this call (from the batch's
    position ids, see CTMLASelfAttention), else megatron's 0..T-1."""

    ct_freqs: torch.Tensor | None = None

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, **kwargs) -> torch.Tensor:
        if self.ct_freqs is not None:
            return self.ct_freqs
        return super().forward(max_seq_len, offset, packed_seq, **kwargs)


class CTMLASelfAttention(MLASelfAttention):
    """MLASelfAttention that takes the RoPE angles of the batch's position ids (megatron's MLA
    asserts it is handed none and computes 0..T-1). The angles travel as the layer's
    ``rotary_pos_emb`` argument, so activation recompute re-runs with the same ones."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The same module with a forward that can return the handed angles (no new state).
        self.rotary_pos_emb.__class__ = PositionIdRotaryEmbedding

    def _qkv_down_projection(self, hidden_states):
        """Under TP the local spec's kv down projection is column-parallel and megatron gathers
        its output with an op whose backward only slices: the shared RoPE key's grad, partial on
        each rank (from its own heads), would lose the other ranks' parts. Hand megatron the
        gathered latent in the layout whose backward sums them instead."""
        q_compressed, kv_combined = super()._qkv_down_projection(hidden_states)
        width = self.config.kv_lora_rank + self.config.qk_pos_emb_head_dim
        if kv_combined.size(-1) == width:
            return q_compressed, kv_combined
        kv_combined = tensor_parallel.gather_from_tensor_model_parallel_region(kv_combined)
        if self.config.sequence_parallel:
            # [s / TP, b, width]: megatron then all-gathers the RoPE key over the sequence, whose
            # backward reduce-scatters (sums) its grads.
            return q_compressed, tensor_parallel.scatter_to_sequence_parallel_region(kv_combined)
        latent, k_rope = kv_combined.split((self.config.kv_lora_rank, self.config.qk_pos_emb_head_dim), dim=-1)
        # Identity forward, all-reduce backward: the RoPE key's grad summed over the TP heads.
        return q_compressed, torch.cat((latent, tensor_parallel.copy_to_tensor_model_parallel_region(k_rope)), -1)

    def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None, packed_seq_params=None, **kwargs):
        # THD (TE): megatron restarts the angles at every cu_seqlens boundary itself.
        self.rotary_pos_emb.ct_freqs = None if packed_seq_params is not None else rotary_pos_emb
        try:
            return super().forward(hidden_states, attention_mask, *args, packed_seq_params=packed_seq_params, **kwargs)
        finally:
            self.rotary_pos_emb.ct_freqs = None


def _ct_group_limited_topk(scores, topk, num_tokens, num_experts, num_groups, group_topk):
    """ct_model.moe's group-limited top-k: a group scores the sum of its best min(2, experts per
    group) scores (DeepSeek-V3, transformers), then top-k experts inside the best groups."""
    grouped = scores.view(num_tokens, num_groups, num_experts // num_groups)
    group_scores = grouped.topk(min(2, num_experts // num_groups), dim=-1).values.sum(-1)
    keep = torch.zeros_like(group_scores, dtype=torch.bool)
    keep.scatter_(1, group_scores.topk(group_topk, dim=-1, sorted=False).indices, True)
    masked = grouped.masked_fill(~keep[..., None], float("-inf")).view(num_tokens, num_experts)
    return torch.topk(masked, k=topk, dim=-1)


class CTTopKRouter(TopKRouter):
    """megatron's TopKRouter with ct-model's group scoring (megatron sums each group's best
    topk // group_topk scores; ct-model, DeepSeek-V3 and transformers the best two). The routing
    function looks its group top-k up in moe_utils at call time, so it is swapped for the call."""

    def routing(self, logits, *args, **kwargs):
        original = moe_utils.group_limited_topk
        moe_utils.group_limited_topk = _ct_group_limited_topk
        try:
            return super().routing(logits, *args, **kwargs)
        finally:
            moe_utils.group_limited_topk = original


def _with_ct_router(mlp):
    """The MoE builder (a partial of MoELayer) with CTTopKRouter."""
    submodules = dataclasses.replace(mlp.keywords["submodules"], router=CTTopKRouter)
    return functools.partial(mlp.func, *mlp.args, **{**mlp.keywords, "submodules": submodules})


def layer_spec(model_config: ModelConfig, te: bool, thd: bool | None = None, moe: bool = False) -> ModuleSpec:
    """The TransformerLayer spec: megatron's local (or TE) GPT layer with our norm and QK-norm
    (MLA and a MoE MLP (``moe``) as the model has them).

    ``thd`` (default: with TE): documents arrive as THD segments, attended causally (TE turns
    ``causal`` into ``padding_causal`` for THD); otherwise TE needs the ``arbitrary`` mask type
    to apply the dense document mask. The local attention applies a passed mask under ``causal``."""
    thd = te if thd is None else thd
    mla = model_config.multi_latent_attention
    kw = dict(num_experts=model_config.num_moe_experts if moe else None, multi_latent_attention=mla,
              qk_layernorm=mla)  # with MLA: the latent norms
    if te:
        if mla and model_config.layernorm_epsilon != LATENT_NORM_EPS:
            # TE fuses the latent norms into the up projections at layernorm_epsilon.
            raise UnsupportedModelError(
                f"ModelConfig.layernorm_epsilon={model_config.layernorm_epsilon} with multi_latent_attention under "
                f"Transformer Engine: TE's latent norms take it, ct-model's use {LATENT_NORM_EPS}; set it to "
                f"{LATENT_NORM_EPS} or distributed.transformer_impl=local")
        sub = get_gpt_layer_with_transformer_engine_submodules(moe_grouped_gemm=moe, **kw)
    else:
        sub = get_gpt_layer_local_submodules(normalization="RMSNorm", **kw)
        sub.input_layernorm = RMSNorm
        sub.pre_mlp_layernorm = RMSNorm
    attn = sub.self_attention
    if mla:
        attn.module = CTMLASelfAttention
        if not te:
            attn.submodules.q_layernorm = LatentRMSNorm
            attn.submodules.kv_layernorm = LatentRMSNorm
            attn.submodules.core_attention = MLACoreAttention
    if moe:
        sub.mlp = _with_ct_router(sub.mlp)
    dense_te = te and not thd  # a block-diagonal causal mask, which TE takes only as "arbitrary"
    attn.params = {**attn.params, "attn_mask_type": AttnMaskType.arbitrary if dense_te else AttnMaskType.causal}
    if model_config.qk_layernorm and not mla:
        attn.submodules.core_attention = post_rope_qk_norm(attn.submodules.core_attention,
                                                           model_config.layernorm_epsilon)
    return ModuleSpec(module=TransformerLayer, submodules=sub)


def block_spec(model_config: ModelConfig, config: TransformerConfig, te: bool,
               vp_stage: int | None, thd: bool | None = None) -> TransformerBlockSubmodules:
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)  # this chunk's first global layer
    if te:
        from megatron.core.extensions.transformer_engine import TENorm
        norm = TENorm
    else:
        norm = RMSNorm
    specs = [layer_spec(model_config, te, thd, moe=model_config.is_moe_layer(offset + i)) for i in range(n)]
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=norm)


def rope_freqs(position_ids: torch.Tensor, head_dim: int, base: float, interleaved: bool) -> torch.Tensor:
    """Megatron-layout RoPE angles [T, B or 1, 1, head_dim] from position ids [B, T] (ct-model's
    formula: inv_freq = base^(-2i/d), angle = position x inv_freq, in float32)."""
    if bool((position_ids == position_ids[:1]).all()):
        position_ids = position_ids[:1]  # one row broadcasts over the batch
    exponent = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    angles = position_ids.to(torch.float32)[..., None] * (1.0 / (base**exponent))
    emb = angles.repeat_interleave(2, dim=-1) if interleaved else torch.cat((angles, angles), dim=-1)
    return emb.transpose(0, 1)[:, :, None, :].contiguous()


class CTGPTModel(GPTModel):
    """GPTModel whose RoPE angles follow the batch's position ids (documents restart at 0)."""

    def __init__(self, *args, ct_config: ModelConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.ct_config = ct_config

    def _preprocess(self, input_ids, position_ids, *args, **kwargs):
        out = super()._preprocess(input_ids, position_ids, *args, **kwargs)
        # MLA: GPTModel computes no angles (the attention would); ours go to it through the layers.
        mla = self.ct_config.multi_latent_attention
        if position_ids is None or (out[1] is None and not mla):
            return out
        freqs = rope_freqs(position_ids, self.ct_config.rope_dim, self.ct_config.rotary_base,
                           self.config.rotary_interleaved)
        return (out[0], freqs, *out[2:])


def build_gpt_chunks(model_config: ModelConfig, config: TransformerConfig, te: bool,
                     thd: bool | None = None) -> list[CTGPTModel]:
    """This rank's model chunks (one, or one per virtual pipeline stage); ``thd`` as in layer_spec."""
    from megatron.core import parallel_state as ps

    vpp = config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        chunks.append(CTGPTModel(
            config=config,
            transformer_layer_spec=block_spec(model_config, config, te, stage, thd),
            vocab_size=model_config.vocab_size,
            max_sequence_length=model_config.max_position_embeddings,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            # Logits stay split over the vocabulary under TP: the engine computes cross-entropy on
            # the shards and gathers the full vocabulary only for losses that need it (KD).
            parallel_output=True,
            share_embeddings_and_output_weights=model_config.share_embeddings_and_output_weights,
            position_embedding_type="rope",
            rotary_base=model_config.rotary_base,
            vp_stage=stage,
            ct_config=model_config,
        ))
    return chunks
