"""Parameter counts from a ModelConfig alone (no model built): totals, what one token uses, and one
block's parameters by kind. The one place these formulas live: ct_parallel.plan groups the same
per-block kinds by how tensor and expert parallelism divide them."""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig


@dataclass(frozen=True)
class BlockParameters:
    """One block's parameters by kind (ct-model's shapes)."""

    attention_down: int  # MLA's down-projections to the q and kv latents (0 without MLA)
    attention: int  # q, k, v, o; with MLA the up-projections from the latents and o
    mlp: int  # a dense block's SwiGLU, or a MoE block's shared expert (0 when it has none)
    router: int  # a MoE block's router (0 for a dense block)
    experts: int  # a MoE block's routed experts, all of them (0 for a dense block)
    norms: int  # the two pre-norms, plus MLA's norms on the latents

    @property
    def matmul(self) -> int:
        return self.attention_down + self.attention + self.mlp + self.router + self.experts


def block_parameters(c: ModelConfig, index: int) -> BlockParameters:
    """Block ``index``'s parameters (the index decides dense or MoE: ``config.is_moe_layer``)."""
    h, heads = c.hidden_size, c.num_attention_heads
    down, attention, norms = 0, h * c.kv_channels * (2 * heads + 2 * c.num_query_groups), 2 * h
    if c.multi_latent_attention:
        rope = c.qk_pos_emb_head_dim
        q_out = heads * (c.qk_head_dim + rope)
        down = h * (c.kv_lora_rank + rope) + (h * c.q_lora_rank if c.q_lora_rank else 0)
        q_up = c.q_lora_rank * q_out if c.q_lora_rank else h * q_out
        attention = q_up + c.kv_lora_rank * heads * (c.qk_head_dim + c.v_head_dim) + heads * c.v_head_dim * h
        norms += c.kv_lora_rank + (c.q_lora_rank or 0)
    if not c.is_moe_layer(index):
        return BlockParameters(down, attention, 3 * h * c.ffn_hidden_size, 0, 0, norms)  # SwiGLU: gate, up, down
    return BlockParameters(down, attention, mlp=3 * h * (c.moe_shared_expert_intermediate_size or 0),
                           router=h * c.num_moe_experts,
                           experts=c.num_moe_experts * 3 * h * c.moe_ffn_hidden_size, norms=norms)


def block_matmul_parameters(c: ModelConfig) -> int:
    """Weights of one dense block's matrices (q, k, v, o and the SwiGLU MLP), norms excluded."""
    if c.is_moe or c.multi_latent_attention:
        raise ValueError("block_matmul_parameters is for uniform dense blocks; use "
                         "matmul_parameters(config, active=True) for MoE/MLA models")
    return block_parameters(c, 0).matmul


def matmul_parameters(c: ModelConfig, active: bool = False) -> int:
    """Matrix weights of all blocks (norms, embeddings excluded), one pass through each block.

    ``active=True`` counts only what one token multiplies with: the top-k routed experts plus the
    shared expert and router, which is what FLOPs per token must use for a MoE model.
    """
    total = 0
    for i in range(c.num_layers):
        b = block_parameters(c, i)
        total += b.matmul
        if active and b.experts:
            total -= b.experts // c.num_moe_experts * (c.num_moe_experts - c.moe_router_topk)
    return total


def count_from_config(c: ModelConfig, active: bool = False) -> int:
    """All parameters of a model of ``c`` (tied embeddings once); ``active``: those one token uses."""
    h = c.hidden_size
    embeddings = c.vocab_size * h * (1 if c.share_embeddings_and_output_weights else 2)
    norms = sum(block_parameters(c, i).norms for i in range(c.num_layers))
    return embeddings + matmul_parameters(c, active) + norms + h  # h: the final norm


def count_active_parameters(c: ModelConfig) -> int:
    """Parameters one token uses (top-k routed experts only); equals the total for dense models."""
    return count_from_config(c, active=True)
