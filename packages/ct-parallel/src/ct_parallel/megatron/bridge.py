"""Weight bridge ct-model <-> megatron-core GPTModel, sharding for TP and splitting layers for PP.

Layouts (megatron side, full = before TP sharding):
- ``linear_qkv.weight``: per query group g, [q heads of g ; k_g ; v_g] stacked along rows
  ([groups * (heads/groups + 2) * head_dim, hidden]); TP takes whole groups (contiguous rows).
- ``linear_fc1.weight``: [gate ; up]; TP rank r holds [gate_r ; up_r] (SwiGLU chunks its output).
- row-parallel (``linear_proj``, ``linear_fc2``) shard columns; embeddings/output shard vocab rows.
- MLA: the down/up projections map one to one (per-head layouts [nope ; rope] and [nope ; v] are
  the same); which dimension a projection splits over TP (the local spec shards even the down
  projections' outputs, TE keeps them whole) is read off the parameter's megatron attributes.
- MoE: the router and its ``expert_bias`` buffer map to ``mlp.gate``; the routed experts are
  slices of ct-model's 3D ``gate_up_proj`` / ``down_proj`` (global expert = EP rank x local
  experts + local index; SequentialMLP's ``experts.local_experts.{j}.linear_fc1.weight`` on CPU,
  TEGroupedMLP's ``experts.linear_fc1.weight{j}`` on GPU), split over the expert-TP group.
Layer indices: megatron's ``TransformerLayer.layer_number`` is global (1-based), so PP and virtual
stages need no bookkeeping here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch import nn

from ct_model import ModelConfig

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.(?:local_experts\.(\d+)\.(linear_fc[12])\.weight|(linear_fc[12])\.weight(\d+))$")
_MLA = {
    "self_attention.linear_q_proj.weight": "q_proj.weight",
    "self_attention.linear_q_down_proj.weight": "q_a_proj.weight",
    "self_attention.linear_q_up_proj.weight": "q_b_proj.weight",
    "self_attention.q_layernorm.weight": "q_a_layernorm.weight",
    "self_attention.linear_q_up_proj.layer_norm_weight": "q_a_layernorm.weight",
    "self_attention.linear_kv_down_proj.weight": "kv_a_proj_with_mqa.weight",
    "self_attention.linear_kv_up_proj.weight": "kv_b_proj.weight",
    "self_attention.kv_layernorm.weight": "kv_a_layernorm.weight",
    "self_attention.linear_kv_up_proj.layer_norm_weight": "kv_a_layernorm.weight",
}


@dataclass(frozen=True)
class Mapping:
    kind: str  # "plain" | "qkv" | "gated"
    ct_names: tuple[str, ...]
    tp_dim: int | None  # dimension split over TP ranks (None: replicated)
    # Routed experts: the index into ct-model's 3D expert tensor; split over the expert-TP group.
    expert: int | None = None


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
    layer = chunk.decoder.layers[int(m.group(1))]
    g = layer.layer_number - 1
    rest, p = m.group(2), f"layers.{g}."
    if rest in _MLA:
        return Mapping("plain", (p + "self_attn." + _MLA[rest],), _tp_dim(chunk.get_parameter(name)))
    if rest.startswith("mlp.") and hasattr(layer.mlp, "router"):
        return _moe_mapping(rest, layer.mlp, p)
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


def _tp_dim(param: nn.Parameter) -> int | None:
    """The dimension megatron's parallel linear split this weight along (None: whole on every rank)."""
    return param.partition_dim if getattr(param, "tensor_model_parallel", False) else None


def _moe_mapping(rest: str, moe: nn.Module, p: str) -> Mapping:
    if rest == "mlp.router.weight":
        return Mapping("plain", (p + "mlp.gate.weight",), None)
    if rest == "mlp.shared_experts.linear_fc1.weight":
        return Mapping("gated", (p + "mlp.shared_experts.gate_proj.weight", p + "mlp.shared_experts.up_proj.weight"), 0)
    if rest == "mlp.shared_experts.linear_fc2.weight":
        return Mapping("plain", (p + "mlp.shared_experts.down_proj.weight",), 1)
    m = _EXPERT.match(rest)
    if not m:
        raise KeyError(f"megatron MoE parameter {p}{rest!r} has no ct-model counterpart")
    local, which = (int(m.group(1)), m.group(2)) if m.group(1) is not None else (int(m.group(4)), m.group(3))
    expert = moe.local_expert_indices[local]
    if which == "linear_fc1":  # [gate ; up] of one expert: the TP shard takes [gate_r ; up_r]
        return Mapping("gated_expert", (p + "mlp.gate_up_proj",), 0, expert)
    return Mapping("plain", (p + "mlp.down_proj",), 1, expert)


def _router_buffers(chunk: nn.Module, config: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """(ct-model name, megatron buffer) of every router's expert bias in this chunk."""
    out = []
    if not config.is_moe:
        return out
    for layer in chunk.decoder.layers:
        router = getattr(layer.mlp, "router", None)
        if router is not None and getattr(router, "expert_bias", None) is not None:
            out.append((f"layers.{layer.layer_number - 1}.mlp.gate.expert_bias", router.expert_bias))
    return out


def optimizer_name(name: str, chunk: nn.Module, config: ModelConfig) -> str:
    """A ct-model-style name for a megatron parameter (what optimizer builders see)."""
    m = mapping(name, chunk, config)
    if m is None:
        return "lm_head.weight"
    if m.kind == "qkv":
        return m.ct_names[0].replace("q_proj", "qkv_proj")
    if m.kind == "gated":
        return m.ct_names[0].replace("gate_proj", "gate_up_proj")
    if m.expert is not None:
        return f"{m.ct_names[0]}.{m.expert}"
    return m.ct_names[0]


def _fuse_qkv(q, k, v, config: ModelConfig) -> torch.Tensor:
    g = config.num_query_groups
    return _fuse_groups(q, k, v, g, config.num_attention_heads // g, config.kv_channels)


def _fuse_groups(q, k, v, groups: int, per: int, d: int) -> torch.Tensor:
    """[q heads of g ; k_g ; v_g] for each of ``groups`` query groups (``per`` heads of width ``d``)."""
    hidden = q.shape[1]
    return torch.cat((q.view(groups, per * d, hidden), k.view(groups, d, hidden), v.view(groups, d, hidden)),
                     dim=1).reshape(-1, hidden)


def _split_qkv(fused, config: ModelConfig):
    g, d = config.num_query_groups, config.kv_channels
    per = config.num_attention_heads // g
    hidden = fused.shape[1]
    q, k, v = fused.view(g, (per + 2) * d, hidden).split((per * d, d, d), dim=1)
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def _row_share(source, name: str, rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous share of ``name``'s rows (``chunk`` semantics), read as just those rows."""
    rows = source.shape(name)[0]
    per = -(-rows // size)
    start = min(rank * per, rows)
    return source.rows(name, start, min(start + per, rows))


def shard(m: Mapping, source, config: ModelConfig, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's piece of the megatron tensor built from ct-model tensors, read from a weight
    source (ct_model.weights) as little as the layout allows: a row-split (column-parallel,
    fused QKV by whole query groups, gated [gate_r ; up_r]) reads only this rank's rows, a routed
    expert only its own rows of the 3D tensor; a column-split weight is read whole, then sliced."""
    if m.expert is None and m.kind in ("gated", "qkv") and tp_size > 1:
        # Whole query groups per rank: q, k and v rows of this rank's groups are contiguous in each.
        parts = [_row_share(source, n, tp_rank, tp_size) for n in m.ct_names]
        if m.kind == "gated":
            return torch.cat(parts, dim=0)
        groups = config.num_query_groups // tp_size
        return _fuse_groups(*parts, groups, config.num_attention_heads // config.num_query_groups,
                            config.kv_channels)
    if m.expert is None and m.kind == "plain" and m.tp_dim == 0 and tp_size > 1:
        return _row_share(source, m.ct_names[0], tp_rank, tp_size)
    if m.expert is not None:
        tensors = [source.rows(n, m.expert, m.expert + 1)[0] for n in m.ct_names]
    else:
        tensors = [source.full(n) for n in m.ct_names]
    if m.kind == "gated_expert":
        tensors = list(tensors[0].chunk(2, dim=0))
    if m.kind in ("gated", "gated_expert"):
        return torch.cat([t.chunk(tp_size, dim=0)[tp_rank] for t in tensors], dim=0)
    full = _fuse_qkv(*tensors, config) if m.kind == "qkv" else tensors[0]
    return full if m.tp_dim is None else full.chunk(tp_size, dim=m.tp_dim)[tp_rank]


def unshard(m: Mapping, pieces: list[torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """ct-model tensors from the TP pieces (in TP rank order) of one megatron tensor."""
    if m.tp_dim is None:
        return {m.ct_names[0]: pieces[0]}
    if m.kind in ("gated", "gated_expert"):
        halves = [p.chunk(2, dim=0) for p in pieces]
        gate, up = torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])
        if m.kind == "gated_expert":
            return {m.ct_names[0]: torch.cat((gate, up))}
        return {m.ct_names[0]: gate, m.ct_names[1]: up}
    full = torch.cat(pieces, dim=m.tp_dim)
    if m.kind == "qkv":
        return dict(zip(m.ct_names, _split_qkv(full, config)))
    return {m.ct_names[0]: full}


@torch.no_grad()
def load_ct_state_dict(chunks: list[nn.Module], weights, config: ModelConfig) -> None:
    """Fill this rank's megatron chunks from ct-model weights: a weight source (ct_model.weights:
    fresh initial values, an HF directory, a model's own tensors) or a full state dict. Each rank
    takes its TP shard of its PP layers, reading one ct-model tensor at a time (a routed expert:
    its own rows). Tied output layers on the last stage receive the embedding."""
    from ct_model.weights import as_source

    source = as_source(weights)
    tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    etp = ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()
    for chunk in map(unwrap, chunks):
        for name, param in chunk.named_parameters():
            m = mapping(name, chunk, config)
            if m is None:  # tied output layer on a later pipeline stage
                m = Mapping("plain", ("embed_tokens.weight",), 0)
            param.copy_(shard(m, source, config, *(etp if m.expert is not None else tp)).to(param.dtype))
        for ct_name, buffer in _router_buffers(chunk, config):
            buffer.copy_(source.full(ct_name))


def export_ct_state_dict(chunks: list[nn.Module], config: ModelConfig,
                         get: Callable[[nn.Parameter], torch.Tensor | None] = lambda p: p.data,
                         buffers: bool = True) -> dict[str, torch.Tensor] | None:
    """Gather a full ct-model state dict (of weights, or of whatever ``get`` reads, e.g. grads;
    ``buffers``: with the routers' expert bias) onto global rank 0; collective over all ranks,
    None elsewhere."""
    groups = {False: (ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()),
              True: (ps.get_expert_tensor_parallel_group(), ps.get_expert_tensor_parallel_world_size())}
    local: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, int], torch.Tensor] = {}
    for chunk in map(unwrap, chunks):
        for name, param in chunk.named_parameters():
            m = mapping(name, chunk, config)
            if m is None:
                continue
            value = get(param)
            value = torch.zeros_like(param) if value is None else value.detach().to(param.dtype)
            group, size = groups[m.expert is not None]
            if size > 1 and m.tp_dim is not None:
                pieces = [torch.empty_like(value) for _ in range(size)]
                dist.all_gather(pieces, value.contiguous(), group=group)
            else:
                pieces = [value]
            for k, v in unshard(m, pieces, config).items():
                if m.expert is None:
                    local[k] = v.cpu().clone()
                else:
                    experts[(k, m.expert)] = v.cpu().clone()
        if buffers:
            local.update({k: b.detach().cpu().clone() for k, b in _router_buffers(chunk, config)})
    # Every tensor from one holder: dense ones from DP/TP rank 0 of each stage, experts from
    # expert-DP/expert-TP rank 0 of each EP rank (their copies elsewhere are equal).
    dense_holder = ps.get_data_parallel_rank() == 0 and ps.get_tensor_model_parallel_rank() == 0
    expert_holder = ps.get_expert_data_parallel_rank() == 0 and ps.get_expert_tensor_parallel_rank() == 0
    mine = ({} if not dense_holder else local, {} if not expert_holder else experts)
    gathered: list | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    if dist.get_world_size() > 1:
        dist.gather_object(mine, gathered, dst=0)
    else:
        gathered = [mine]
    if dist.get_rank() != 0:
        return None
    full: dict[str, torch.Tensor] = {}
    slices: dict[tuple[str, int], torch.Tensor] = {}
    for dense, expert in gathered:
        full.update(dense)
        slices.update(expert)
    for name in {k for k, _ in slices}:
        count = 1 + max(e for k, e in slices if k == name)
        full[name] = torch.stack([slices[(name, e)] for e in range(count)])
    return {k: full[k] for k in sorted(full, key=_ct_order)}


def _ct_order(name: str):
    m = re.match(r"layers\.(\d+)\.", name)
    return (1, int(m.group(1)), name) if m else ((0, 0, name) if name.startswith("embed") else (2, 0, name))


# ----------------------------------------------------------------------------- streaming export


@dataclass(frozen=True)
class _Unit:
    """What one megatron tensor exports: its ct-model tensors (q/k/v of a fused qkv, gate/up of a
    fused fc1, else one; a routed expert: its slice ``expert`` of a 3D tensor), sent to rank 0
    by ``owner``, the TP rank 0 of the replica that exports it."""

    names: tuple[str, ...]
    expert: int | None
    owner: int
    dtype: torch.dtype

    @property
    def key(self) -> tuple[str, int | None]:
        return self.names[0], self.expert


def _local_units(chunks: list[nn.Module], config: ModelConfig) -> dict[tuple[str, int | None], tuple]:
    """This rank's part in the export: unit key -> (unit, mapping or None for a buffer, tensor),
    for the tensors of the one data-parallel replica that exports them (dense: DP rank 0; routed
    experts: expert-DP rank 0), whose TP (expert-TP) group gathers them."""
    me = dist.get_rank()
    dense = ps.get_data_parallel_rank() == 0
    expert = ps.get_expert_data_parallel_rank() == 0
    tp_rank, etp_rank = ps.get_tensor_model_parallel_rank(), ps.get_expert_tensor_parallel_rank()
    out = {}
    for chunk in map(unwrap, chunks):
        for name, param in chunk.named_parameters():
            m = mapping(name, chunk, config)
            if m is None or not (expert if m.expert is not None else dense):
                continue  # a tied output copy, or another replica's
            owner = (etp_rank if m.expert is not None else tp_rank) == 0
            unit = _Unit(m.ct_names, m.expert, me if owner else -1, param.dtype)
            out[unit.key] = (unit, m, param)
        for ct_name, buffer in _router_buffers(chunk, config) if dense else ():
            unit = _Unit((ct_name,), None, me if tp_rank == 0 else -1, buffer.dtype)
            out[unit.key] = (unit, None, buffer)
    return out


def _export_plan(local: dict) -> list[_Unit]:
    """Every rank's owned units, in ct-model order (experts of a tensor in expert order): the one
    sequence all ranks walk, so their collectives and messages pair up."""
    mine = [unit for unit, _, _ in local.values() if unit.owner >= 0]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    units = [u for part in everyone for u in part]
    if len({u.key for u in units}) != len(units):
        raise RuntimeError(f"megatron export: a tensor has two owners: {sorted(u.key for u in units)[:8]}")
    return sorted(units, key=lambda u: (_ct_order(u.names[0]), -1 if u.expert is None else u.expert))


def _gather_unit(m: Mapping | None, tensor: torch.Tensor, config: ModelConfig) -> list[torch.Tensor]:
    """The full ct-model tensor(s) of one megatron tensor, in ``m.ct_names`` order: its TP
    (expert-TP) pieces all-gathered within the group (collective there), unfused; a buffer as it is."""
    value = tensor.detach()
    if m is None:
        return [value]
    expert = m.expert is not None
    group = ps.get_expert_tensor_parallel_group() if expert else ps.get_tensor_model_parallel_group()
    size = ps.get_expert_tensor_parallel_world_size() if expert else ps.get_tensor_model_parallel_world_size()
    pieces = [value]
    if size > 1 and m.tp_dim is not None:
        pieces = [torch.empty_like(value) for _ in range(size)]
        dist.all_gather(pieces, value.contiguous(), group=group)
    return list(unshard(m, pieces, config).values())


@torch.no_grad()
def iter_ct_state(chunks: list[nn.Module], config: ModelConfig,
                  device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """(ct-model name, full tensor on CPU) of every parameter and router bias, one at a time, on
    global rank 0; collective over all ranks, which must all iterate to the end (nothing is
    yielded elsewhere). Per megatron tensor: its TP group all-gathers it, the owner (TP rank 0 of
    the exporting replica, on whatever pipeline stage or expert-parallel rank holds it) sends it
    to rank 0 point to point. Rank 0 holds one tensor at a time, a 3D routed-expert tensor while
    its experts arrive; other ranks at most one gathered tensor beyond their shards."""
    from ct_model import build_model

    me = dist.get_rank()
    local = _local_units(chunks, config)
    plan = _export_plan(local)
    shapes = {k: tuple(v.shape) for k, v in build_model(config, device="meta").state_dict().items()} if me == 0 else {}
    experts: dict[str, tuple[torch.Tensor, int]] = {}  # rank 0: 3D tensors being filled, experts so far
    for unit in plan:
        # The replica that exports this tensor gathers it over TP (every rank of that TP group).
        full = _gather_unit(*local[unit.key][1:], config) if unit.key in local else None
        if me != 0:
            for tensor in full if unit.owner == me else ():
                dist.send(tensor.contiguous(), dst=0)
            full = None
            continue
        for i, name in enumerate(unit.names):
            shape = shapes[name] if unit.expert is None else shapes[name][1:]
            value = full[i] if unit.owner == 0 else _recv(shape, unit.dtype, unit.owner, device)
            if unit.expert is None:
                yield name, value.cpu()
            elif (done := _add_expert(experts, name, unit, value, shapes[name])) is not None:
                yield name, done
            value = done = None
        full = None
    if experts:
        raise RuntimeError(f"megatron export: experts missing for {sorted(experts)}")


def _add_expert(experts: dict, name: str, unit: _Unit, value: torch.Tensor, shape: tuple[int, ...]):
    """File one routed expert's slice into its 3D tensor; the tensor once every expert is in."""
    whole, count = experts.pop(name, (None, 0))
    if whole is None:
        whole = torch.empty(shape, dtype=unit.dtype)
    whole[unit.expert].copy_(value)
    if count + 1 < shape[0]:
        experts[name] = (whole, count + 1)
        return None
    return whole


def _recv(shape: tuple[int, ...], dtype: torch.dtype, src: int, device: torch.device) -> torch.Tensor:
    buffer = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(buffer, src=src)
    return buffer
