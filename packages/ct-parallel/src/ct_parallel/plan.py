"""Per-GPU memory of a training layout, before renting the machine (the arithmetic behind ct-plan).

Pure arithmetic on a ModelConfig and a DistributedConfig: nothing is allocated, megatron-core is
not imported. Every figure is per GPU, for the pipeline stage that GPU holds; the worst stage is
what must fit. The rules, and where they come from (docs/ct-parallel.md, "Planning a layout"):

Parameters. Dense weights (attention, dense MLP, shared expert) divide over tensor parallelism;
norms, the MoE router and MLA's down-projections (megatron's Transformer Engine spec builds
q_down/kv_down "duplicated")
are replicated over TP; routed experts divide over expert parallelism x expert-TP. The embedding
is on the first stage, the output layer on the last (with tied embeddings and PP > 1 megatron
keeps a copy of the embedding there), the final norm on the last. Vocabulary splits over TP.

Bytes per parameter (megatron-core's distributed-optimizer table, bf16: 18 or 6 + 12/d, fp32: 16 or
8 + 8/d; docs.nvidia.com/megatron-core/developer-guide/latest/api-guide/dist_optimizer.html):
bf16 = bf16 param 2 + fp32 main grad 4 + fp32 master 4 + AdamW moments 4 + 4; fp32 = 4 + 4 + 8.
ZeRO-1 (megatron's distributed optimizer) divides the optimizer part (master + moments) over the
data-parallel ranks: dense weights over DP = world / (TP x PP), experts over the expert-data-parallel
ranks EDP = world / (expert-TP x EP x PP). ZeRO-3 (the native engine's FSDP2) divides all of it
over DP, and adds two blocks of gathered parameters in the compute dtype (current + prefetched).

Activations, by engine. Megatron: Korthikanti et al. 2022 ("Reducing Activation Recomputation in
Large Transformer Models", sec. 4), term by term, 16-bit tensors, per layer and microbatch of
T = s x b tokens: every tensor that backward needs, at 2 bytes an element
(``layer_activation_bytes``). Native engines (single, DDP, FSDP2): what ct-model's eager block
actually saves, op by op, in its dtypes (``native_layer_activation_bytes``: fp32 norms, the
per-linear autocast copies, SiLU's input and output; flash-style attention keeps no softmax),
checked against a CPU measurement in tests/test_plan.py; selective and full checkpointing as
ct_precision applies them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ct_model.config import ModelConfig
from ct_model.errors import UserError

from .config import DistributedConfig

GIB = 2**30
PRECISIONS = ("bf16", "fp32")
RECOMPUTE_MODES = ("none", "selective", "full")
# (param, grad, optimizer) bytes per parameter; optimizer = fp32 master (bf16 only) + two fp32 moments.
BYTES_PER_PARAM = {"bf16": (2, 4, 12), "fp32": (4, 4, 8)}
ZERO3_BYTES = (4, 4, 8)  # FSDP2 keeps fp32 sharded params and grads whatever the compute dtype
COMPUTE_BYTES = {"bf16": 2, "fp32": 4}


class PlanError(UserError):
    """A layout that does not divide the model, or a bad planning input; the message names the field."""


@dataclass(frozen=True)
class Workload:
    """What one optimizer step asks of each GPU, besides the layout."""

    micro_batch_size: int = 1
    seq_len: int = 4096
    precision: str = "bf16"
    recompute: str = "none"
    # Microbatches per step per data-parallel replica; None: at least PP (the 1F1B steady state).
    num_microbatches: int | None = None
    # Checkpoint blocks 0, N, 2N, ... (native engines; megatron's block method: the first ceil(L/N)).
    recompute_every_n_blocks: int = 1
    # Native engines: the loss projects this many tokens to logits at a time (loss.chunk_tokens;
    # 0: the full [tokens, vocab] logits). Megatron computes full (vocab-parallel) logits.
    loss_chunk_tokens: int = 0

    def __post_init__(self) -> None:
        # Named as ct-train and ct-plan's command line name them.
        _positive(self.micro_batch_size, "trainer.micro_batch_size")
        _positive(self.seq_len, "seq_len")
        _positive(self.recompute_every_n_blocks, "activation_checkpointing.every_n_blocks")
        if not isinstance(self.loss_chunk_tokens, int) or self.loss_chunk_tokens < 0:
            raise PlanError(f"loss.chunk_tokens must be an integer >= 0, got {self.loss_chunk_tokens!r}")
        if self.num_microbatches is not None:
            _positive(self.num_microbatches, "--num-microbatches")
        if self.precision not in PRECISIONS:
            raise PlanError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.recompute not in RECOMPUTE_MODES:
            raise PlanError(f"activation_checkpointing.mode must be one of {RECOMPUTE_MODES}, got {self.recompute!r}")


@dataclass(frozen=True)
class Layout:
    """A DistributedConfig on a world size: every parallel degree, checked against megatron's rules."""

    tp: int
    pp: int
    ep: int
    etp: int
    dp: int
    world_size: int
    sequence_parallel: bool
    zero: int  # 0: replicated optimizer, 1: megatron's distributed optimizer, 3: FSDP2
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None
    # "megatron" or "native": which activation bookkeeping applies.
    engine: str = "megatron"

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "ep", "etp", "dp", "world_size"):
            _positive(getattr(self, name), f"layout.{name}")
        if self.engine not in ("megatron", "native"):
            raise PlanError(f"layout.engine must be megatron or native, got {self.engine!r}")
        if self.zero not in (0, 1, 3):
            raise PlanError(f"layout.zero must be 0, 1 or 3, got {self.zero!r}")
        if self.world_size != self.tp * self.pp * self.dp:
            raise PlanError(f"layout.world_size={self.world_size} must be tp x pp x dp = {self.tp * self.pp * self.dp}")

    @property
    def edp(self) -> int:
        """Expert-data-parallel ranks: the copies of each expert (megatron's expert_data_parallel_size)."""
        return self.world_size // (self.etp * self.ep * self.pp)

    @classmethod
    def from_distributed(cls, d: DistributedConfig, world_size: int) -> "Layout":
        _positive(world_size, "world_size")
        tp, pp, ep = d.tensor_model_parallel_size, d.pipeline_model_parallel_size, d.expert_model_parallel_size
        etp = d.expert_tensor_parallel_size or tp
        if world_size % (tp * pp):
            raise PlanError(f"world_size={world_size} is not divisible by distributed.tensor_model_parallel_size x "
                            f"pipeline_model_parallel_size = {tp} x {pp}")
        # megatron-core (parallel_state.initialize_model_parallel, MoE "parallel folding"): the
        # experts are laid out over the same world as expert-TP x EP x expert-DP x PP.
        if world_size % (etp * ep * pp):
            raise PlanError(f"world_size={world_size} is not divisible by distributed.expert_tensor_parallel_size x "
                            f"expert_model_parallel_size x pipeline_model_parallel_size = {etp} x {ep} x {pp} "
                            "(megatron-core's rule for the expert grid)")
        zero = 1 if d.use_distributed_optimizer else 3 if d.strategy == "fsdp2" and d.engine == "native" else 0
        return cls(tp=tp, pp=pp, ep=ep, etp=etp, dp=world_size // (tp * pp), world_size=world_size,
                   sequence_parallel=d.sequence_parallel, zero=zero,
                   first_stage_layers=d.num_layers_in_first_pipeline_stage,
                   last_stage_layers=d.num_layers_in_last_pipeline_stage, engine=d.engine)


def _positive(value, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PlanError(f"{name} must be an integer >= 1, got {value!r}")


# ----------------------------------------------------------------------------------- dividing


def check_divides(c: ModelConfig, lay: Layout, work: Workload) -> None:
    """The model splits the way the layout asks (megatron asserts each of these at build time)."""
    tp_fields = [("num_attention_heads", c.num_attention_heads), ("vocab_size", c.vocab_size)]
    if not c.multi_latent_attention:
        tp_fields.append(("num_query_groups", c.num_query_groups))
    if any(not c.is_moe_layer(i) for i in range(c.num_layers)):
        tp_fields.append(("ffn_hidden_size", c.ffn_hidden_size))
    if c.is_moe and c.moe_shared_expert_intermediate_size:
        tp_fields.append(("moe_shared_expert_intermediate_size", c.moe_shared_expert_intermediate_size))
    for name, value in tp_fields:
        if value % lay.tp:
            raise PlanError(f"model.{name}={value} is not divisible by distributed.tensor_model_parallel_size={lay.tp}")
    if lay.ep > 1 and not c.is_moe:
        raise PlanError(f"distributed.expert_model_parallel_size={lay.ep} needs a MoE model (model.num_moe_experts)")
    if c.is_moe:
        if c.num_moe_experts % lay.ep:
            raise PlanError(f"model.num_moe_experts={c.num_moe_experts} is not divisible by "
                            f"distributed.expert_model_parallel_size={lay.ep}")
        if c.moe_ffn_hidden_size % lay.etp:
            raise PlanError(f"model.moe_ffn_hidden_size={c.moe_ffn_hidden_size} is not divisible by "
                            f"distributed.expert_tensor_parallel_size={lay.etp}")
    if lay.sequence_parallel and work.seq_len % lay.tp:
        raise PlanError(f"seq_len={work.seq_len} is not divisible by distributed.tensor_model_parallel_size="
                        f"{lay.tp} (sequence parallelism splits it)")
    stage_layer_counts(c, lay)  # raises on a pipeline split that does not add up


def stage_layer_counts(c: ModelConfig, lay: Layout) -> list[int]:
    """Blocks per pipeline stage: even, or megatron's num_layers_in_first/last_pipeline_stage with
    the rest divided evenly over the middle stages (TransformerConfig's rule)."""
    n, pp = c.num_layers, lay.pp
    first, last = lay.first_stage_layers, lay.last_stage_layers
    if first is None and last is None:
        if n % pp:
            raise PlanError(f"model.num_layers={n} is not divisible by distributed.pipeline_model_parallel_size={pp}; "
                            "set distributed.num_layers_in_first_pipeline_stage and/or "
                            "num_layers_in_last_pipeline_stage for an uneven split")
        return [n // pp] * pp
    middle_stages = pp - (first is not None) - (last is not None)
    middle_layers = n - (first or 0) - (last or 0)
    if middle_layers < 0 or (middle_stages == 0 and middle_layers != 0) or (
            middle_stages and (middle_layers % middle_stages or middle_layers == 0)):
        raise PlanError(f"model.num_layers={n} minus distributed.num_layers_in_first_pipeline_stage={first} and "
                        f"num_layers_in_last_pipeline_stage={last} leaves {middle_layers} layers, which do not "
                        f"divide evenly (at least one each) over the {middle_stages} middle stage(s)")
    per_middle = middle_layers // middle_stages if middle_stages else 0
    counts = [per_middle] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return counts


# ---------------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class LayerParams:
    """One block's weights by how they divide: over TP, not at all (replicated), over EP x expert-TP."""

    tp_split: int
    replicated: int
    experts: int


def layer_params(c: ModelConfig, index: int) -> LayerParams:
    h, a = c.hidden_size, c.num_attention_heads
    norms = 2 * h
    if c.multi_latent_attention:
        rope = c.qk_pos_emb_head_dim
        q_out = a * (c.qk_head_dim + rope)
        down = h * (c.kv_lora_rank + rope) + (h * c.q_lora_rank if c.q_lora_rank else 0)
        up = (c.q_lora_rank * q_out if c.q_lora_rank else h * q_out) + c.kv_lora_rank * a * (c.qk_head_dim + c.v_head_dim)
        split, replicated = up + a * c.v_head_dim * h, down
        norms += c.kv_lora_rank + (c.q_lora_rank or 0)
    else:
        split, replicated = h * c.kv_channels * (2 * a + 2 * c.num_query_groups), 0
    experts = 0
    if c.is_moe_layer(index):
        replicated += h * c.num_moe_experts  # the router: megatron keeps it whole on every TP rank
        split += 3 * h * (c.moe_shared_expert_intermediate_size or 0)
        experts = c.num_moe_experts * 3 * h * c.moe_ffn_hidden_size
    else:
        split += 3 * h * c.ffn_hidden_size  # SwiGLU: gate, up, down
    return LayerParams(tp_split=split, replicated=replicated + norms, experts=experts)


def stage_layer_ranges(c: ModelConfig, lay: Layout) -> list[range]:
    counts, start, out = stage_layer_counts(c, lay), 0, []
    for n in counts:
        out.append(range(start, start + n))
        start += n
    return out


def stage_params(c: ModelConfig, lay: Layout, stage: int, layers: range) -> tuple[float, float]:
    """(dense, expert) parameters one GPU of ``stage`` holds."""
    dense = expert = 0.0
    for i in layers:
        p = layer_params(c, i)
        dense += p.tp_split / lay.tp + p.replicated
        expert += p.experts / (lay.ep * lay.etp)
    vocab = c.vocab_size * c.hidden_size / lay.tp
    if stage == 0:
        dense += vocab
    if stage == lay.pp - 1:
        dense += c.hidden_size  # final norm
        if not c.share_embeddings_and_output_weights or lay.pp > 1:
            dense += vocab
    return dense, expert


# --------------------------------------------------------------------------------- activations


def layer_activation_bytes(c: ModelConfig, index: int, lay: Layout, work: Workload, core_attention: bool) -> float:
    """Bytes block ``index`` keeps for backward, one microbatch, one GPU (16-bit activations).

    Korthikanti et al. 2022, eq. (1)-(2), re-derived for these blocks (no dropout, RMSNorm, SwiGLU,
    GQA or MLA, MoE), per token, 2 bytes an element:
    - kept whole on every TP rank unless sequence parallel (then / TP): the inputs of both norms
      and of attention and MLP (4 x 2h); MLA's latents (q: 2 x 2 q_lora, kv: 2 (kv_lora + rope)
      + 2 kv_lora); a MoE router's fp32 scores (4 E);
    - split over TP by heads/columns: Q, K, V (2 d per head, GQA: K and V per group) and the
      attention output (2 a d); MLA: Q and K 2 a (qk + rope) each, V and output 2 a v;
      SwiGLU: gate, up and their product 3 x 2 f (dense MLP and shared expert);
    - core attention, unless recomputed (selective): the paper's 5 a s per token (softmax 2,
      dropout mask 1, dropout output 2; with fused/flash attention nothing of it is kept);
    - routed experts, per token copy (top-k copies, balanced load: each GPU receives as many as
      it sends): dispatched input 2h, SwiGLU 3 x 2 f_e / expert-TP, expert output 2h (kept for the
      routing weight's gradient).
    For the paper's GPT block (MHA, GeLU 4h MLP, two dropouts) the same bookkeeping gives its 34 s b h.
    """
    t, h, a = lay.tp, c.hidden_size, c.num_attention_heads
    tokens = work.seq_len * work.micro_batch_size
    tokens_whole = tokens / t if lay.sequence_parallel else tokens
    whole = 4 * 2 * h
    if c.multi_latent_attention:
        rope = c.qk_pos_emb_head_dim
        whole += 2 * 2 * (c.q_lora_rank or 0) + 2 * (c.kv_lora_rank + rope) + 2 * c.kv_lora_rank
        split = 2 * 2 * a * (c.qk_head_dim + rope) + 2 * 2 * a * c.v_head_dim
    else:
        split = 2 * c.kv_channels * (2 * a + 2 * c.num_query_groups)
    routed = 0.0
    if c.is_moe_layer(index):
        whole += 4 * c.num_moe_experts
        split += 3 * 2 * (c.moe_shared_expert_intermediate_size or 0)
        routed = c.moe_router_topk * tokens_whole * (2 * h + 3 * 2 * c.moe_ffn_hidden_size / lay.etp + 2 * h)
    else:
        split += 3 * 2 * c.ffn_hidden_size
    if core_attention:
        split += 5 * a * work.seq_len
    return tokens_whole * whole + tokens * split / t + routed


def native_dtypes(lay: Layout, work: Workload) -> tuple[int, int, bool]:
    """(residual-stream bytes, compute bytes, whether each linear casts its own input copy) of the
    native engines: fp32 everywhere; FSDP2 bf16 (MixedPrecisionPolicy: bf16 parameters, so a bf16
    residual stream and one input shared by q/k/v and by gate/up); single/DDP bf16 (fp32 weights
    under bf16 autocast: an fp32 residual stream, and autocast casts the input once per linear)."""
    if work.precision == "fp32":
        return 4, 4, False
    if lay.zero == 3:
        return 2, 2, False
    return 4, 2, True


def native_layer_activation_bytes(c: ModelConfig, index: int, lay: Layout, work: Workload, mode: str) -> float:
    """Bytes block ``index`` keeps for backward on a native engine, one microbatch (no TP or PP).

    ``mode`` "none": every tensor ct-model's eager block saves, per token (R residual, C compute
    bytes from ``native_dtypes``; h hidden, q = heads x head dim, k = groups x head dim, f ffn):
    - each of the two RMSNorms, 8h + 4: torch's composite rms_norm keeps its input and the
      normalised output in fp32, and an fp32 rstd (CUDA's fused kernel keeps the input and rstd
      only, so on a GPU this over-counts by up to 2 x 4h);
    - QK-norm (qk_layernorm): fp32 q and k, 4(q + k), and an rstd per head, 4(heads + groups);
    - linear inputs, C each: the attention input (three copies under autocast: q, k and v each
      cast it), o_proj's input q, the MLP input (two copies under autocast), down_proj's input f;
    - attention (flash-style: SDPA, varlen or flex, never the softmax): q, k, v and the output, C
      each, and an fp32 logsumexp per head;
    - SwiGLU: gate, SiLU(gate) and up, 3·C·f.
    mobilellm_950m under bf16 autocast: 107,744 bytes (105.2 KiB) per token; measured on CPU.
    "selective" keeps what ct_precision's policy saves: every GEMM's output (q, k, v, o_proj, gate,
    up, down), the attention output and logsumexp, and the block input (R·h). "full" keeps the
    block input. MoE and MLA blocks use the Korthikanti terms without core attention (not measured).
    """
    r, cb, autocast = native_dtypes(lay, work)
    tokens = work.seq_len * work.micro_batch_size
    h, a, g, d, f = c.hidden_size, c.num_attention_heads, c.num_query_groups, c.kv_channels, c.ffn_hidden_size
    if mode == "full":
        return tokens * r * h
    if c.multi_latent_attention or c.is_moe_layer(index):
        return layer_activation_bytes(c, index, lay, work, core_attention=False)
    q, k = a * d, g * d
    if mode == "selective":
        return tokens * (cb * (q + 2 * k + 2 * h + 2 * f) + cb * q + 4 * a + r * h)
    norms = 2 * (8 * h + 4) + ((4 * (q + k) + 4 * (a + g)) if c.qk_layernorm else 0)
    attn_copies, mlp_copies = (3, 2) if autocast else (1, 1)
    linear_inputs = cb * (attn_copies * h + q + mlp_copies * h + f)
    attention = cb * (2 * q + 2 * k) + 4 * a
    return tokens * (norms + linear_inputs + attention + 3 * cb * f)


def native_output_bytes(c: ModelConfig, lay: Layout, work: Workload) -> float:
    """The native engines' loss end, one microbatch: the final RMSNorm (8h + 4 per token, as
    above), then either the full logits (C·V, their fp32 copy and the log-softmax, 8·V per token)
    or, chunked (loss.chunk_tokens, ct_model.chunked_ce): the gradient of the hidden states (R·h
    per token), the output weight's fp32 gradient (4·V·h) and, while a chunk is in flight, its
    logits (C·V + 4·V per token of the chunk), the softmax cast back (C·V) and the chunk's fp32
    weight-gradient term (4·V·h). Fused CE kernels (cut-cross-entropy, Liger) need less."""
    r, cb, _ = native_dtypes(lay, work)
    tokens = work.seq_len * work.micro_batch_size
    h, v = c.hidden_size, c.vocab_size
    norm = tokens * (8 * h + 4)
    if work.loss_chunk_tokens == 0:
        return norm + tokens * (cb + 8) * v
    chunk = min(work.loss_chunk_tokens, tokens)
    return norm + tokens * r * h + 2 * 4 * v * h + chunk * v * (2 * cb + 4)


def output_activation_bytes(c: ModelConfig, lay: Layout, work: Workload) -> float:
    """The last stage's extra (Korthikanti sec. 4.3): final-norm and output-layer inputs 2 x 2h and
    the fp32 logits of the cross-entropy, 4 V / TP, per token."""
    tokens = work.seq_len * work.micro_batch_size
    tokens_whole = tokens / lay.tp if lay.sequence_parallel else tokens
    return tokens_whole * 4 * c.hidden_size + tokens * 4 * c.vocab_size / lay.tp


def in_flight(lay: Layout, work: Workload, stage: int) -> int:
    """Microbatches whose activations stage ``stage`` holds at the peak of 1F1B: PP - stage
    (the first stage warms up with PP forwards before its first backward), at most the step's."""
    m = work.num_microbatches if work.num_microbatches is not None else lay.pp
    return min(lay.pp - stage, m)


def native_stage_activation_bytes(c: ModelConfig, lay: Layout, work: Workload, layers: range,
                                  recompute: str) -> float:
    """Native engines (one stage, one microbatch in flight): each block's bytes as checkpointed
    or not (blocks 0, N, 2N, ...), plus, when any block is checkpointed, one block's full set once:
    backward recomputes a checkpointed block whole before running its backward."""
    def checkpointed(i: int) -> bool:
        return recompute != "none" and i % work.recompute_every_n_blocks == 0

    kept = sum(native_layer_activation_bytes(c, i, lay, work, recompute if checkpointed(i) else "none")
               for i in layers)
    recomputed = [native_layer_activation_bytes(c, i, lay, work, "none") for i in layers if checkpointed(i)]
    return kept + max(recomputed, default=0.0) + native_output_bytes(c, lay, work)


def stage_activation_bytes(c: ModelConfig, lay: Layout, work: Workload, stage: int, layers: range,
                           recompute: str) -> float:
    if lay.engine == "native":
        return native_stage_activation_bytes(c, lay, work, layers, recompute)
    n = in_flight(lay, work, stage)
    if recompute == "full":
        # Each recomputed block keeps only its input (2h per token); in backward one block at a
        # time is recomputed whole, so the largest block's activations come on top, once.
        # every_n_blocks=N: megatron's block method recomputes the first ceil(L/N) layers.
        count = math.ceil(len(layers) / work.recompute_every_n_blocks)
        recomputed, plain = layers[:count], layers[count:]
        tokens_whole = work.seq_len * work.micro_batch_size / (lay.tp if lay.sequence_parallel else 1)
        kept = n * len(recomputed) * tokens_whole * 2 * c.hidden_size
        kept += n * sum(layer_activation_bytes(c, i, lay, work, True) for i in plain)
        kept += max((layer_activation_bytes(c, i, lay, work, True) for i in recomputed), default=0.0)
    else:
        per_mb = sum(layer_activation_bytes(c, i, lay, work, recompute == "none") for i in layers)
        kept = n * per_mb
    if stage == lay.pp - 1:
        kept += output_activation_bytes(c, lay, work)  # one microbatch: the last stage runs F then B
    return kept


# ---------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class StageMemory:
    stage: int
    layers: list[int]  # first and last block index (inclusive); empty for a stage without blocks
    parameters: float  # per GPU
    parameter_bytes: float
    gradient_bytes: float
    optimizer_bytes: float
    activation_bytes: float
    # Activations of this stage under each recompute mode, for comparison.
    activation_bytes_by_recompute: dict[str, float] = field(default_factory=dict)
    # What the run holds besides its own model on every GPU (an online KD teacher: Plan.extras).
    extra_bytes: float = 0.0

    @property
    def total_bytes(self) -> float:
        return (self.parameter_bytes + self.gradient_bytes + self.optimizer_bytes + self.activation_bytes
                + self.extra_bytes)


def stage_memory(c: ModelConfig, lay: Layout, work: Workload, stage: int, layers: range,
                 extra_bytes: float = 0.0) -> StageMemory:
    dense, expert = stage_params(c, lay, stage, layers)
    if lay.zero == 3:
        bp, bg, bo = ZERO3_BYTES
        # FSDP2 gathers one block's parameters in the compute dtype, and prefetches the next.
        gathered = 2 * max((sum(asdict(layer_params(c, i)).values()) for i in layers), default=0)
        params_b = (dense + expert) * bp / lay.dp + gathered * COMPUTE_BYTES[work.precision]
        grads_b, opt_b = (dense + expert) * bg / lay.dp, (dense + expert) * bo / lay.dp
    else:
        bp, bg, bo = BYTES_PER_PARAM[work.precision]
        params_b, grads_b = (dense + expert) * bp, (dense + expert) * bg
        opt_b = dense * bo / lay.dp + expert * bo / lay.edp if lay.zero == 1 else (dense + expert) * bo
    by_mode = {m: stage_activation_bytes(c, lay, work, stage, layers, m) for m in RECOMPUTE_MODES}
    return StageMemory(stage=stage, layers=[layers.start, layers.stop - 1] if len(layers) else [],
                       parameters=dense + expert, parameter_bytes=params_b, gradient_bytes=grads_b,
                       optimizer_bytes=opt_b, activation_bytes=by_mode[work.recompute],
                       activation_bytes_by_recompute=by_mode, extra_bytes=extra_bytes)


@dataclass(frozen=True)
class Plan:
    model: str
    total_parameters: int
    active_parameters: int
    layout: Layout
    workload: Workload
    stages: list[StageMemory]
    capacity_bytes: float
    gpus_per_node: int
    # Interleaved 1F1B's model chunks per rank; planned as plain 1F1B, reported so the CLI can say so.
    virtual_stages: int = 1
    # Named per-GPU bytes outside the model (e.g. an online teacher), in every stage's total.
    extras: dict[str, float] = field(default_factory=dict)

    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total_bytes)

    @property
    def fits(self) -> bool:
        return self.worst.total_bytes <= self.capacity_bytes

    @property
    def nodes(self) -> int:
        return math.ceil(self.layout.world_size / self.gpus_per_node)

    def to_dict(self) -> dict:
        worst = self.worst
        return {
            "model": self.model, "total_parameters": self.total_parameters,
            "active_parameters": self.active_parameters,
            "layout": {**asdict(self.layout), "edp": self.layout.edp}, "workload": asdict(self.workload),
            "stages": [{**asdict(s), "total_bytes": s.total_bytes} for s in self.stages],
            "worst_stage": worst.stage, "worst_total_bytes": worst.total_bytes,
            "capacity_bytes": self.capacity_bytes, "fits": self.fits,
            "gpus_per_node": self.gpus_per_node, "nodes": self.nodes, "virtual_stages": self.virtual_stages,
            "extras": dict(self.extras),
        }


def plan(c: ModelConfig, d: DistributedConfig, world_size: int, work: Workload, *,
         gpu_memory_gb: float = 80.0, gpus_per_node: int = 8, extras: dict[str, float] | None = None) -> Plan:
    """Per-GPU memory of every pipeline stage of ``c`` laid out as ``d`` on ``world_size`` GPUs.
    ``extras``: named bytes every GPU holds besides the model (added to each stage's total)."""
    from ct_model import count_active_parameters, count_parameters

    if not gpu_memory_gb > 0:
        raise PlanError(f"gpu_memory_gb must be > 0, got {gpu_memory_gb!r}")
    _positive(gpus_per_node, "gpus_per_node")
    lay = Layout.from_distributed(d, world_size)
    check_divides(c, lay, work)
    extras = dict(extras or {})
    stages = [stage_memory(c, lay, work, s, r, sum(extras.values())) for s, r in enumerate(stage_layer_ranges(c, lay))]
    return Plan(model=c.name, total_parameters=count_parameters(c), active_parameters=count_active_parameters(c),
                layout=lay, workload=work, stages=stages, capacity_bytes=gpu_memory_gb * 1e9,
                gpus_per_node=gpus_per_node, virtual_stages=d.virtual_pipeline_model_parallel_size or 1,
                extras=extras)


def data_parallel_step(d: DistributedConfig) -> int:
    """The smallest DP for which the expert grid fits: TP x DP must be a multiple of expert-TP x EP."""
    tp = d.tensor_model_parallel_size
    ep_grid = (d.expert_tensor_parallel_size or tp) * d.expert_model_parallel_size
    return ep_grid // math.gcd(tp, ep_grid)


def smallest_fitting(c: ModelConfig, d: DistributedConfig, work: Workload, *, gpu_memory_gb: float = 80.0,
                     gpus_per_node: int = 8, max_world_size: int = 1 << 20,
                     extras_for: Callable[[int], dict[str, float]] | None = None) -> Plan | None:
    """The smallest world size for the given TP, PP, EP and expert-TP whose worst stage fits:
    the search runs over data parallelism only (DP = k x the smallest valid DP), which under
    ZeRO-1/3 divides the optimizer state (and under ZeRO-3 everything) and changes nothing else.
    None when no DP fits (what stays per GPU as DP grows is already too big). ``extras_for``: the
    plan's extras at a world size (an online teacher's per-rank batch shrinks as DP grows)."""

    def at(world: int) -> Plan:
        return plan(c, d, world, work, gpu_memory_gb=gpu_memory_gb, gpus_per_node=gpus_per_node,
                    extras=extras_for(world) if extras_for else None)

    step = data_parallel_step(d)
    mp = d.tensor_model_parallel_size * d.pipeline_model_parallel_size
    first = at(mp * step)
    if first.fits:
        return first
    if first.layout.zero == 0:
        return None  # nothing divides by DP
    k_hi = max_world_size // (mp * step)
    last = at(mp * step * k_hi)
    if not last.fits:
        return None
    lo, hi = 1, k_hi  # memory falls monotonically with DP: bisect for the smallest k that fits
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if at(mp * step * mid).fits:
            hi = mid
        else:
            lo = mid
    return at(mp * step * hi)
