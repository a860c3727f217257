"""Named model shapes. The MobileLLM-R1 shapes are exactly the released ones."""

from __future__ import annotations

from .config import ConfigError, ModelConfig

LLAMA3_VOCAB = 128_256

_MOBILELLM_R1 = dict(
    vocab_size=LLAMA3_VOCAB,
    kv_channels=64,
    rope_style="interleaved",
    qk_layernorm=True,
    share_embeddings_and_output_weights=True,
    layernorm_epsilon=1e-5,
    init_method_std=0.02,
    # Base (4k-context) models; post-trained 32k models use 8e6 (see the reasoning SFT phase).
    rotary_base=1_000_000.0,
    max_position_embeddings=4096,
)

_DEEPSEEK_V3 = dict(
    multi_latent_attention=True,
    moe_router_score_function="sigmoid",
    moe_router_enable_expert_bias=True,
    # The released weights rotate adjacent pairs of the RoPE dims (HF: rope_interleave=True).
    rope_style="interleaved",
    rotary_base=10_000.0,
    layernorm_epsilon=1e-6,
    share_embeddings_and_output_weights=False,
    init_method_std=0.02,
)

_PRESETS: dict[str, dict] = {
    # CPU-sized, same architecture as MobileLLM-R1 (GQA, QK-norm, interleaved RoPE, tied
    # embeddings). Heads, groups and layers are even so TP=2 and PP=2 divide it.
    "mobilellm_tiny": dict(
        _MOBILELLM_R1, num_layers=4, hidden_size=256, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=768, vocab_size=8192, max_position_embeddings=1024,
    ),
    "mobilellm_140m": dict(
        _MOBILELLM_R1, num_layers=15, hidden_size=576, num_attention_heads=9, num_query_groups=3,
        ffn_hidden_size=2048,
    ),
    "mobilellm_360m": dict(
        _MOBILELLM_R1, num_layers=15, hidden_size=1024, num_attention_heads=16, num_query_groups=4,
        ffn_hidden_size=4096,
    ),
    "mobilellm_950m": dict(
        _MOBILELLM_R1, num_layers=22, hidden_size=1536, num_attention_heads=24, num_query_groups=6,
        ffn_hidden_size=6144,
    ),
    "llama2_7b": dict(
        num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=32,
        ffn_hidden_size=11008, vocab_size=32_000, max_position_embeddings=4096,
        rotary_base=10_000.0, rope_style="rotate_half", layernorm_epsilon=1e-5,
        share_embeddings_and_output_weights=False,
    ),
    "llama3_70b": dict(
        num_layers=80, hidden_size=8192, num_attention_heads=64, num_query_groups=8,
        ffn_hidden_size=28_672, vocab_size=LLAMA3_VOCAB, max_position_embeddings=8192,
        rotary_base=500_000.0, rope_style="rotate_half", layernorm_epsilon=1e-5,
        share_embeddings_and_output_weights=False,
    ),
    # DeepSeek-V3 exactly as released (HF DeepseekV3Config defaults), multi-token prediction
    # excluded: 671,026,404,352 parameters, ~37.6B active per token.
    "deepseek_v3_671b": dict(
        _DEEPSEEK_V3, num_layers=61, hidden_size=7168, num_attention_heads=128,
        ffn_hidden_size=18_432, vocab_size=129_280, num_moe_experts=256, moe_router_topk=8,
        moe_ffn_hidden_size=2048, moe_shared_expert_intermediate_size=2048,
        moe_first_dense_layers=3, moe_router_num_groups=8, moe_router_group_topk=4,
        moe_router_topk_scaling_factor=2.5, q_lora_rank=1536, kv_lora_rank=512,
        qk_head_dim=128, qk_pos_emb_head_dim=64, v_head_dim=128, max_position_embeddings=4096,
    ),
    # CPU-sized, same structure (MLA with q and kv latents, one dense first layer, shared +
    # routed experts in groups). Heads, experts and layers even for TP/EP/PP of 2.
    "deepseek_v3_tiny": dict(
        _DEEPSEEK_V3, num_layers=4, hidden_size=256, num_attention_heads=4,
        ffn_hidden_size=768, vocab_size=8192, num_moe_experts=8, moe_router_topk=2,
        moe_ffn_hidden_size=128, moe_shared_expert_intermediate_size=128,
        moe_first_dense_layers=1, moe_router_num_groups=4, moe_router_group_topk=2,
        moe_router_topk_scaling_factor=2.5, q_lora_rank=96, kv_lora_rank=64,
        qk_head_dim=32, qk_pos_emb_head_dim=16, v_head_dim=32, max_position_embeddings=1024,
    ),
}


def names() -> list[str]:
    return sorted(_PRESETS)


def get(name: str, **overrides) -> ModelConfig:
    """The preset ``name`` as a ModelConfig, with optional field overrides."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(names())}")
    return ModelConfig(**{**_PRESETS[name], **overrides, "name": name})
