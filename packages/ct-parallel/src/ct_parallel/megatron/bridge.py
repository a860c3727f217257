"""Weight bridge ct-model <-> megatron-core GPTModel, sharding for TP and splitting layers for PP.

Layouts (megatron side, full = before TP sharding):
- ``linear_qkv.weight``: per query group g, [q heads of g ; k_g ; v_g] stacked along rows
  ([groups * (heads/groups + 2) * head_dim, hidden]); TP takes whole groups (contiguous rows).
- ``linear_fc1.weight``: [gate ; up]; TP rank r holds [gate_r ; up_r] (SwiGLU chunks its output).
- row-parallel (``linear_proj``, ``linear_fc2``) shard columns; embeddings/output shard vocab rows.
Layer indices: megatron's ``TransformerLayer.layer_number`` is global (1-based), so PP and virtual
stages need no bookkeeping here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch import nn

from ct_model import ModelConfig

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Mapping:
    kind: str  # "plain" | "qkv" | "gated"
    ct_names: tuple[str, ...]
    tp_dim: int | None  # dimension split over TP ranks (None: replicated)


def unwrap(module: nn.Module) -> nn.Module:
    while hasattr(module, "module"):
        module = module.module
    return module


def mapping(name: str, chunk: nn.Module, config: ModelConfig) -> Mapping | None:
    """How the megatron parameter ``name`` of ``chunk`` (unwrapped GPTModel) maps to ct-model.
    None for a tied output layer (the embedding carries it)."""
    tied = config.share_embeddings_and_output_weights
    if name == "embedding.word_embeddings.weight":
        return Mapping("plain", ("embed_tokens.weight",), 0)
    if name == "output_layer.weight":
        return None if tied else Mapping("plain", ("lm_head.weight",), 0)
    if name == "decoder.final_layernorm.weight":
        return Mapping("plain", ("norm.weight",), None)
    m = _LAYER.match(name)
    if not m:
        raise KeyError(f"megatron parameter {name!r} has no ct-model counterpart")
    g = chunk.decoder.layers[int(m.group(1))].layer_number - 1
    rest, p = m.group(2), f"layers.{g}."
    if rest in ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"):
        return Mapping("plain", (p + "input_layernorm.weight",), None)
    if rest in ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"):
        return Mapping("plain", (p + "post_attention_layernorm.weight",), None)
    if rest == "self_attention.linear_qkv.weight":
        return Mapping("qkv", tuple(p + f"self_attn.{x}_proj.weight" for x in "qkv"), 0)
    if rest == "self_attention.linear_proj.weight":
        return Mapping("plain", (p + "self_attn.o_proj.weight",), 1)
    if rest == "mlp.linear_fc1.weight":
        return Mapping("gated", (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"), 0)
    if rest == "mlp.linear_fc2.weight":
        return Mapping("plain", (p + "mlp.down_proj.weight",), 1)
    raise KeyError(f"megatron parameter {name!r} has no ct-model counterpart")


def optimizer_name(name: str, chunk: nn.Module, config: ModelConfig) -> str:
    """A ct-model-style name for a megatron parameter (what optimizer builders see)."""
    m = mapping(name, chunk, config)
    if m is None:
        return "lm_head.weight"
    if m.kind == "qkv":
        return m.ct_names[0].replace("q_proj", "qkv_proj")
    if m.kind == "gated":
        return m.ct_names[0].replace("gate_proj", "gate_up_proj")
    return m.ct_names[0]


def _fuse_qkv(q, k, v, config: ModelConfig) -> torch.Tensor:
    g, d = config.num_query_groups, config.kv_channels
    per = config.num_attention_heads // g
    hidden = q.shape[1]
    return torch.cat((q.view(g, per * d, hidden), k.view(g, d, hidden), v.view(g, d, hidden)), dim=1).reshape(-1, hidden)


def _split_qkv(fused, config: ModelConfig):
    g, d = config.num_query_groups, config.kv_channels
    per = config.num_attention_heads // g
    hidden = fused.shape[1]
    q, k, v = fused.view(g, (per + 2) * d, hidden).split((per * d, d, d), dim=1)
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def shard(m: Mapping, ct_state: dict[str, torch.Tensor], config: ModelConfig, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's piece of the megatron tensor built from ct-model tensors."""
    tensors = [ct_state[n] for n in m.ct_names]
    if m.kind == "gated":
        return torch.cat([t.chunk(tp_size, dim=0)[tp_rank] for t in tensors], dim=0)
    full = _fuse_qkv(*tensors, config) if m.kind == "qkv" else tensors[0]
    return full if m.tp_dim is None else full.chunk(tp_size, dim=m.tp_dim)[tp_rank]


def unshard(m: Mapping, pieces: list[torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """ct-model tensors from the TP pieces (in TP rank order) of one megatron tensor."""
    if m.tp_dim is None:
        return {m.ct_names[0]: pieces[0]}
    if m.kind == "gated":
        halves = [p.chunk(2, dim=0) for p in pieces]
        return {m.ct_names[0]: torch.cat([h[0] for h in halves]), m.ct_names[1]: torch.cat([h[1] for h in halves])}
    full = torch.cat(pieces, dim=m.tp_dim)
    if m.kind == "qkv":
        return dict(zip(m.ct_names, _split_qkv(full, config)))
    return {m.ct_names[0]: full}


@torch.no_grad()
def load_ct_state_dict(chunks: list[nn.Module], ct_state: dict[str, torch.Tensor], config: ModelConfig) -> None:
    """Copy a full ct-model state dict into this rank's megatron chunks (every rank passes the
    same full dict; each takes its TP shard of its PP layers). Tied output layers on the last
    stage receive the embedding."""
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    for chunk in map(unwrap, chunks):
        for name, param in chunk.named_parameters():
            m = mapping(name, chunk, config)
            if m is None:  # tied output layer on a later pipeline stage
                m = Mapping("plain", ("embed_tokens.weight",), 0)
            param.copy_(shard(m, ct_state, config, tp_rank, tp_size).to(param.dtype))


def export_ct_state_dict(chunks: list[nn.Module], config: ModelConfig,
                         get: Callable[[nn.Parameter], torch.Tensor | None] = lambda p: p.data,
                         ) -> dict[str, torch.Tensor] | None:
    """Gather a full ct-model state dict (of weights, or of whatever ``get`` reads, e.g. grads)
    onto global rank 0; collective over all ranks, None elsewhere."""
    tp_group, pp_group = ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group()
    tp_size = ps.get_tensor_model_parallel_world_size()
    local: dict[str, torch.Tensor] = {}
    for chunk in map(unwrap, chunks):
        for name, param in chunk.named_parameters():
            m = mapping(name, chunk, config)
            if m is None:
                continue
            value = get(param)
            value = torch.zeros_like(param) if value is None else value.detach().to(param.dtype)
            if tp_size > 1 and m.tp_dim is not None:
                pieces = [torch.empty_like(value) for _ in range(tp_size)]
                dist.all_gather(pieces, value.contiguous(), group=tp_group)
            else:
                pieces = [value]
            local.update({k: v.cpu().clone() for k, v in unshard(m, pieces, config).items()})
    if ps.get_pipeline_model_parallel_world_size() > 1:
        gathered: list | None = [None] * ps.get_pipeline_model_parallel_world_size()
        first = dist.get_global_rank(pp_group, 0)
        dist.gather_object(local, gathered if dist.get_rank() == first else None, dst=first, group=pp_group)
        if dist.get_rank() == first:
            local = {k: v for part in gathered for k, v in part.items()}
    if dist.get_rank() != 0:
        return None
    return {k: local[k] for k in sorted(local, key=_ct_order)}


def _ct_order(name: str):
    m = re.match(r"layers\.(\d+)\.", name)
    return (1, int(m.group(1)), name) if m else ((0, 0, name) if name.startswith("embed") else (2, 0, name))
