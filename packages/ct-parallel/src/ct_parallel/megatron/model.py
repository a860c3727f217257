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
Anything ct-model has that this mapping cannot express raises ``UnsupportedModelError`` naming
the field.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from ct_model.errors import UserError
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_submodules,
    get_gpt_layer_with_transformer_engine_submodules,
)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch import nn

from ct_model import ModelConfig

from ..config import DistributedConfig


class UnsupportedModelError(UserError):
    """A ModelConfig field has no exact megatron-core equivalent."""


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return torch.cuda.is_available()


def use_transformer_engine(dist_config: DistributedConfig) -> bool:
    if dist_config.transformer_impl == "local":
        return False
    if dist_config.transformer_impl == "transformer_engine":
        if not have_transformer_engine():
            raise RuntimeError("distributed.transformer_impl=transformer_engine needs transformer_engine and CUDA")
        return True
    return have_transformer_engine()


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


def transformer_config(model_config: ModelConfig, dist_config: DistributedConfig, *,
                       bf16: bool = False, recompute: dict | None = None, fp8: dict | None = None) -> TransformerConfig:
    """The one mapping ModelConfig -> TransformerConfig (field names are the same by design).

    ``recompute``: recompute_granularity / recompute_method / recompute_num_layers fields
    (ct_parallel.recompute.megatron_recompute), none by default. ``fp8``: the fp8 / fp8_recipe
    fields (ct_parallel.precision.megatron_fp8_fields), none by default."""
    check_supported(model_config, dist_config)
    c = model_config
    on_gpu = torch.cuda.is_available()
    vpp = dist_config.virtual_pipeline_model_parallel_size if dist_config.pipeline_schedule == "interleaved" else None
    return TransformerConfig(
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
        rotary_interleaved=c.rope_style == "interleaved",
        # Our QK-norm lives in the core attention wrapper (after RoPE), see module docstring.
        qk_layernorm=False,
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


def layer_spec(model_config: ModelConfig, te: bool, thd: bool | None = None) -> ModuleSpec:
    """The TransformerLayer spec: megatron's local (or TE) GPT layer with our norm and QK-norm.

    ``thd`` (default: with TE): documents arrive as THD segments, attended causally (TE turns
    ``causal`` into ``padding_causal`` for THD); otherwise TE needs the ``arbitrary`` mask type
    to apply the dense document mask. The local attention applies a passed mask under ``causal``."""
    thd = te if thd is None else thd
    if te:
        sub = get_gpt_layer_with_transformer_engine_submodules(qk_layernorm=False)
    else:
        sub = get_gpt_layer_local_submodules(qk_layernorm=False, normalization="RMSNorm")
        sub.input_layernorm = RMSNorm
        sub.pre_mlp_layernorm = RMSNorm
    attn = sub.self_attention
    dense_te = te and not thd  # a block-diagonal causal mask, which TE takes only as "arbitrary"
    attn.params = {**attn.params, "attn_mask_type": AttnMaskType.arbitrary if dense_te else AttnMaskType.causal}
    if model_config.qk_layernorm:
        attn.submodules.core_attention = post_rope_qk_norm(attn.submodules.core_attention,
                                                           model_config.layernorm_epsilon)
    return ModuleSpec(module=TransformerLayer, submodules=sub)


def block_spec(model_config: ModelConfig, config: TransformerConfig, te: bool,
               vp_stage: int | None, thd: bool | None = None) -> TransformerBlockSubmodules:
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    if te:
        from megatron.core.extensions.transformer_engine import TENorm
        norm = TENorm
    else:
        norm = RMSNorm
    return TransformerBlockSubmodules(layer_specs=[layer_spec(model_config, te, thd)] * n, layer_norm=norm)


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
        if position_ids is None or out[1] is None:
            return out
        freqs = rope_freqs(position_ids, self.ct_config.kv_channels, self.ct_config.rotary_base,
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
