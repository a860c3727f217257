"""DeepSeek-V3 mixture-of-experts MLP: shared expert + routed experts, aux-loss-free balancing.

Routing (DeepSeek-V3 paper, sec. 2.1.2): sigmoid scores; a per-expert bias is added to the scores
for *selection only*; tokens first pick ``moe_router_group_topk`` groups (a group scores the sum
of its two best experts), then top-k experts inside them; the weights are the unbiased scores of
the chosen experts, normalised to sum 1 and multiplied by ``moe_router_topk_scaling_factor``.
Dropless: every token reaches all its k experts. Expert weights are stored as 3D tensors in HF's
layout (gate_up_proj [E, 2I, H], down_proj [E, H, I]). Experts run as a per-expert loop (CPU) or
as grouped GEMMs (``torch._grouped_mm``; CUDA bf16 on Hopper+ by default, see
``expert_implementation``), tested equal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import SwiGLU
from .matmul import compute_dtype


class Router(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        e = config.num_moe_experts
        self.weight = nn.Parameter(torch.empty(e, config.hidden_size))
        # A buffer, not a parameter: the optimizer never touches it (update_expert_bias does).
        self.register_buffer("expert_bias", torch.zeros(e, dtype=torch.float32))
        # Tokens routed to each expert since the last bias update (summed over micro-batches).
        self.register_buffer("load", torch.zeros(e, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weights [N, k], expert indices [N, k], scores [N, E]) for tokens x [N, H]."""
        c = self.config
        # Gating in fp32 even under autocast (DeepSeek-V3 keeps MoE gating in high precision,
        # sec. 3.3.1): bf16 scores would tie and flip top-k choices.
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if c.moe_router_score_function == "sigmoid" else logits.softmax(-1)
        choice = scores.detach()
        if c.moe_router_enable_expert_bias:
            choice = choice + self.expert_bias
        if c.moe_router_num_groups is not None:
            choice = _mask_to_top_groups(choice, c.moe_router_num_groups, c.moe_router_group_topk)
        indices = choice.topk(c.moe_router_topk, dim=-1, sorted=False).indices
        weights = scores.gather(1, indices)
        if c.moe_router_topk > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        if c.moe_router_topk_scaling_factor is not None:
            weights = weights * c.moe_router_topk_scaling_factor
        if self.training:
            self.load += torch.bincount(indices.flatten(), minlength=c.num_moe_experts).float()
        return weights, indices, scores


def _mask_to_top_groups(choice: torch.Tensor, groups: int, group_topk: int) -> torch.Tensor:
    n, e = choice.shape
    grouped = choice.view(n, groups, e // groups)
    group_scores = grouped.topk(min(2, e // groups), dim=-1).values.sum(-1)
    keep = torch.zeros_like(group_scores, dtype=torch.bool)
    keep.scatter_(1, group_scores.topk(group_topk, dim=-1, sorted=False).indices, True)
    return grouped.masked_fill(~keep[..., None], float("-inf")).view(n, e)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        e, h, i = config.num_moe_experts, config.hidden_size, config.moe_ffn_hidden_size
        self.gate = Router(config)
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))
        shared = config.moe_shared_expert_intermediate_size
        self.shared_experts = None if shared is None else SwiGLU(config.replace(ffn_hidden_size=shared))
        # Weighted sequence-wise balance terms of the forwards since the last take_aux_loss
        # (training with moe_aux_loss_coeff > 0 only); a list because a shared block runs twice.
        self.aux_losses: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        weights, indices, scores = self.gate(tokens)
        if self.training and self.config.moe_aux_loss_coeff > 0:
            rows = shape[0] if x.dim() == 3 else 1
            self.aux_losses.append(self.config.moe_aux_loss_coeff
                                   * sequence_balance_loss(scores, indices, rows))
        routed = self._routed_grouped if use_grouped_gemm(tokens, self) else self._routed
        out = routed(tokens, weights.to(x.dtype), indices)
        if self.shared_experts is not None:
            out = out + self.shared_experts(tokens)
        return out.view(shape)

    def _routed(self, tokens, weights, indices) -> torch.Tensor:
        """Per-expert loop: gather each expert's tokens, SwiGLU, scatter-add weighted outputs."""
        out = torch.zeros_like(tokens)
        for expert in indices.unique().tolist():
            token_idx, slot = torch.where(indices == expert)
            gate, up = F.linear(tokens[token_idx], self.gate_up_proj[expert]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[expert])
            out.index_add_(0, token_idx, y * weights[token_idx, slot, None])
        return out

    def _routed_grouped(self, tokens, weights, indices) -> torch.Tensor:
        """Grouped GEMM: the (token, slot) pairs sorted by expert, two ``torch._grouped_mm`` calls
        over per-expert row ranges (``offs``: cumulative counts; empty experts are empty ranges),
        weighted outputs scattered back. No host sync (no ``.tolist()``), one kernel per matrix."""
        k = indices.shape[-1]
        flat = indices.flatten()
        order = flat.argsort(stable=True)
        token_idx = order // k
        offs = torch.bincount(flat, minlength=self.config.num_moe_experts).cumsum(0).to(torch.int32)
        # autocast does not cover _grouped_mm: cast to the compute dtype here, as it would.
        dtype = compute_dtype(tokens)
        x = tokens[token_idx].to(dtype)
        gate_up, down = self.gate_up_proj.to(dtype), self.down_proj.to(dtype)
        gate, up = torch._grouped_mm(x, gate_up.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
        y = torch._grouped_mm(F.silu(gate) * up, down.transpose(-2, -1), offs=offs)
        y = (y * weights.flatten()[order, None].to(dtype)).to(tokens.dtype)
        return torch.zeros_like(tokens).index_add(0, token_idx, y)


# "auto": grouped GEMM where it is fast (CUDA, bf16, Hopper or newer, 16-byte-aligned widths),
# the per-expert loop elsewhere; "grouped" / "loop" force one (tests compare the two).
EXPERT_IMPLEMENTATIONS = ("auto", "grouped", "loop")
expert_implementation = "auto"


def use_grouped_gemm(tokens: torch.Tensor, moe: MoE) -> bool:
    """The compute dtype decides, not ``tokens.dtype``: under autocast the RMSNorm before the MoE
    hands over fp32 tokens while every GEMM runs in bf16."""
    if expert_implementation != "auto":
        return expert_implementation == "grouped"
    if not (hasattr(torch, "_grouped_mm") and compute_dtype(tokens) == torch.bfloat16):
        return False
    aligned = moe.config.hidden_size % 8 == 0 and moe.config.moe_ffn_hidden_size % 8 == 0
    return aligned and fast_grouped_gemm_device(tokens.device)


def fast_grouped_gemm_device(device: torch.device) -> bool:
    """CUDA, Hopper or newer: where torch's grouped GEMM kernels beat the per-expert loop."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, rows: int) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss (eqs. 17-20), unweighted.

    Per sequence of T tokens: sum_i f_i P_i with f_i = E / (k T) * (tokens that chose expert i)
    and P_i = mean over the tokens of s_i / sum_j s_j (scores normalised over all experts). A
    sequence is one row of the batch (packed documents share their row's term); rows averaged.
    ``scores`` [rows * T, E], ``indices`` [rows * T, k].
    """
    n, e = scores.shape
    t, k = n // rows, indices.shape[-1]
    probs = (scores / scores.sum(-1, keepdim=True)).view(rows, t, e).mean(1)
    counts = torch.zeros(rows, e, device=scores.device, dtype=scores.dtype)
    counts.scatter_add_(1, indices.view(rows, t * k), torch.ones_like(counts[:, :1]).expand(rows, t * k))
    return ((counts * e / (k * t)) * probs).sum(-1).mean()


def take_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the weighted balance terms recorded since the last call (None when there are none),
    and forget them. Engines add it to the loss of the microbatch whose forward recorded it."""
    terms = []
    for module in model.modules():
        if isinstance(module, MoE) and module.aux_losses:
            terms.extend(module.aux_losses)
            module.aux_losses = []
    return torch.stack(terms).sum() if terms else None


def routers(model: nn.Module) -> list[tuple[str, Router]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Router)]


@torch.no_grad()
def reset_router_load(model: nn.Module) -> None:
    """Zero every router's token counts (they are not in the state dict)."""
    for _, router in routers(model):
        router.load.zero_()


@torch.no_grad()
def update_expert_bias(model: nn.Module) -> dict[str, float]:
    """Aux-loss-free balancing step; call once after each optimizer step.

    Each router's bias moves by ``moe_router_bias_update_rate`` towards balance: up for experts
    that got fewer tokens than the mean since the last call, down for those that got more
    (DeepSeek-V3's sign rule). Resets the load counters. Returns per-layer load metrics (max and
    min share of routed tokens, bias range) for the log. Under data parallelism the loads must be
    all-reduced before this call so every rank applies the same update.
    """
    metrics: dict[str, float] = {}
    for name, router in routers(model):
        load = router.load
        if router.config.moe_router_enable_expert_bias and load.sum() > 0:
            router.expert_bias += router.config.moe_router_bias_update_rate * torch.sign(load.mean() - load)
        share = load / load.sum().clamp(min=1)
        metrics[f"{name}.load_max"] = share.max().item()
        metrics[f"{name}.load_min"] = share.min().item()
        metrics[f"{name}.bias_range"] = (router.expert_bias.max() - router.expert_bias.min()).item()
        load.zero_()
    return metrics
