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
over DP, and adds the gathered parameters in the compute dtype: two blocks (current + prefetched)
and the root's (embedding, output layer, final norm), which ct's FSDP2 keeps gathered. The native
engines' weights are fp32 whatever the precision (bf16 runs under autocast or FSDP2's policy).

Activations, by engine, as ct-train runs them on ``Workload.device`` (cuda, what a plan is
usually for, or cpu). Megatron: Korthikanti et al. 2022 ("Reducing Activation Recomputation in
Large Transformer Models", sec. 4), term by term, per layer and microbatch of T = s x b tokens,
in the run's activation dtype (``layer_activation_bytes``); core attention as the engine's spec
keeps it: nothing T x T with Transformer Engine's fused attention (what ``transformer_impl: auto``
builds on CUDA), the local spec's unfused softmax otherwise. Native engines (single, DDP, FSDP2):
what ct-model's eager block actually saves, op by op, in its dtypes
(``native_layer_activation_bytes``: fp32 norms, the per-linear autocast copies, SiLU's input and
output; flash/flex/varlen attention keeps no scores; the CPU's dense-mask SDPA keeps a float
[B, 1, T, T] mask per layer), the chunked loss's buffers (``native_output_bytes``) and what the
engine holds around them (autocast's weight copies, FSDP2's gathered parameters and unsharded
gradient accumulation), checked against CPU measurements in tests/test_plan.py and
tools/bench_plan_vs_measured.py; selective and full checkpointing as ct_precision applies them.

Peak. Megatron keeps its gradient buffers for the whole run, so a stage's peak is the sum of its
parts. The native engines free gradients between steps (``zero_grad(set_to_none=True)``): the
peak is the larger of the last microbatch's forward (activations, plus the gradients accumulated
over the earlier microbatches) and the optimizer step (all gradients, plus the step's working
memory: on CPU torch's per-tensor AdamW keeps two temporaries of the largest parameter; on CUDA
the fused kernel none)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ct_model.attention import DENSE_MASK_MAX_TOKENS
from ct_model.config import ModelConfig
from ct_model.errors import UserError
from ct_model.param_count import block_parameters

from .config import DistributedConfig

GIB = 2**30
PRECISIONS = ("bf16", "fp32")
RECOMPUTE_MODES = ("none", "selective", "full")
# (param, grad, optimizer) bytes per parameter; optimizer = fp32 master (bf16 only) + two fp32 moments.
BYTES_PER_PARAM = {"bf16": (2, 4, 12), "fp32": (4, 4, 8)}
ZERO3_BYTES = (4, 4, 8)  # FSDP2 keeps fp32 sharded params and grads whatever the compute dtype
COMPUTE_BYTES = {"bf16": 2, "fp32": 4}
DEVICES = ("cuda", "cpu")
# Megatron's local spec keeps, per attention score (row, head, query, key), the softmax's fp32
# output and the bf16 probabilities under bf16 (measured: ct_parallel.megatron.transformer_impl
# LOCAL_ATTENTION_BYTES_PER_SCORE, checked equal in tests/test_plan.py); under fp32 they are one
# fp32 tensor.
LOCAL_ATTENTION_BYTES_PER_SCORE = {"bf16": 6, "fp32": 4}


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
    # Where ct-train would run it: attention kernels, megatron's spec and the optimizer kernel follow.
    device: str = "cuda"
    # optimizer.name: "muon" keeps one momentum buffer for the blocks' matrices (muon_state_saving).
    optimizer: str = "adamw"

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
        if self.device not in DEVICES:
            raise PlanError(f"--device must be one of {DEVICES}, got {self.device!r}")

    @property
    def tokens(self) -> int:
        """Tokens of one microbatch."""
        return self.seq_len * self.micro_batch_size

    @property
    def microbatches_per_step(self) -> int:
        return self.num_microbatches if self.num_microbatches is not None else 1


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
    # Native: single, ddp or fsdp2 (DDP keeps a gradient bucket copy).
    strategy: str = "single"
    # Megatron: Transformer Engine's spec (fused attention) rather than the local one.
    transformer_engine: bool = True

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
    def from_distributed(cls, d: DistributedConfig, world_size: int, device: str = "cuda") -> "Layout":
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
                   last_stage_layers=d.num_layers_in_last_pipeline_stage, engine=d.engine, strategy=d.strategy,
                   # transformer_impl auto: Transformer Engine on CUDA, the local spec without CUDA.
                   transformer_engine=d.transformer_impl == "transformer_engine"
                   or (d.transformer_impl == "auto" and device == "cuda"))


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
    """ct-model's count of block ``index`` grouped by how megatron divides it: MLA's
    down-projections, the router and the norms stay whole on every TP rank."""
    b = block_parameters(c, index)
    return LayerParams(tp_split=b.attention + b.mlp, replicated=b.attention_down + b.router + b.norms,
                       experts=b.experts)


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
    """Bytes block ``index`` keeps for backward on the megatron engine, one microbatch, one GPU.

    Korthikanti et al. 2022, eq. (1)-(2), re-derived for these blocks (no dropout, RMSNorm, SwiGLU,
    GQA or MLA, MoE), per token, e bytes an element (the run's activation dtype: 2 under bf16, 4
    under fp32):
    - kept whole on every TP rank unless sequence parallel (then / TP): the inputs of both norms
      and of attention and MLP (4 e h); MLA's latents (q: 2 e q_lora, kv: e (kv_lora + rope)
      + e kv_lora); a MoE router's fp32 scores (4 E);
    - split over TP by heads/columns: Q, K, V (e d per head, GQA: K and V per group) and the
      attention output (e a d); MLA: Q and K e a (qk + rope) each, V and output e a v;
      SwiGLU: gate, up and their product 3 e f (dense MLP and shared expert);
    - core attention, unless recomputed (selective): Transformer Engine's fused attention keeps
      no scores; megatron's local spec keeps LOCAL_ATTENTION_BYTES_PER_SCORE per score, a s per
      token (the paper's 5 a s has a dropout mask and output too; ct runs attention_dropout=0);
    - routed experts, per token copy (top-k copies, balanced load: each GPU receives as many as
      it sends): dispatched input e h, SwiGLU 3 e f_e / expert-TP, expert output e h (kept for the
      routing weight's gradient).
    For the paper's GPT block (MHA, GeLU 4h MLP, two dropouts, e = 2, its 5 a s softmax) the same
    bookkeeping gives its 34 s b h + 5 a s^2 b.
    """
    t, h, a, e = lay.tp, c.hidden_size, c.num_attention_heads, COMPUTE_BYTES[work.precision]
    tokens = work.tokens
    tokens_whole = tokens / t if lay.sequence_parallel else tokens
    whole = 4 * e * h
    if c.multi_latent_attention:
        rope = c.qk_pos_emb_head_dim
        whole += e * 2 * (c.q_lora_rank or 0) + e * (c.kv_lora_rank + rope) + e * c.kv_lora_rank
        split = e * 2 * a * (c.qk_head_dim + rope) + e * 2 * a * c.v_head_dim
    else:
        split = e * c.kv_channels * (2 * a + 2 * c.num_query_groups)
    routed = 0.0
    if c.is_moe_layer(index):
        whole += 4 * c.num_moe_experts
        split += 3 * e * (c.moe_shared_expert_intermediate_size or 0)
        routed = c.moe_router_topk * tokens_whole * (e * h + 3 * e * c.moe_ffn_hidden_size / lay.etp + e * h)
    else:
        split += 3 * e * c.ffn_hidden_size
    if core_attention and not lay.transformer_engine:
        split += LOCAL_ATTENTION_BYTES_PER_SCORE[work.precision] * a * work.seq_len
    return tokens_whole * whole + tokens * split / t + routed


def output_activation_bytes(c: ModelConfig, lay: Layout, work: Workload) -> float:
    """The megatron last stage's extra (Korthikanti sec. 4.3): final-norm and output-layer inputs
    2 e h and the fp32 logits of the cross-entropy, 4 V / TP, per token."""
    tokens = work.tokens
    tokens_whole = tokens / lay.tp if lay.sequence_parallel else tokens
    return tokens_whole * 2 * COMPUTE_BYTES[work.precision] * c.hidden_size + tokens * 4 * c.vocab_size / lay.tp


def in_flight(lay: Layout, work: Workload, stage: int) -> int:
    """Microbatches whose activations stage ``stage`` holds at the peak of 1F1B: PP - stage
    (the first stage warms up with PP forwards before its first backward), at most the step's."""
    m = work.num_microbatches if work.num_microbatches is not None else lay.pp
    return min(lay.pp - stage, m)


def megatron_stage_activation_bytes(c: ModelConfig, lay: Layout, work: Workload, stage: int, layers: range,
                                    recompute: str) -> float:
    n = in_flight(lay, work, stage)
    tokens_whole = work.tokens / (lay.tp if lay.sequence_parallel else 1)
    layer_input = tokens_whole * COMPUTE_BYTES[work.precision] * c.hidden_size
    if recompute == "full":
        # Each recomputed block keeps only its input; in backward one block at a time is
        # recomputed from that input, so the largest block's other activations come on top, once.
        # every_n_blocks=N: megatron's block method recomputes the first ceil(L/N) layers.
        count = math.ceil(len(layers) / work.recompute_every_n_blocks)
        recomputed, plain = layers[:count], layers[count:]
        kept = n * len(recomputed) * layer_input
        kept += n * sum(layer_activation_bytes(c, i, lay, work, True) for i in plain)
        kept += max((layer_activation_bytes(c, i, lay, work, True) - layer_input for i in recomputed), default=0.0)
    else:
        kept = n * sum(layer_activation_bytes(c, i, lay, work, recompute == "none") for i in layers)
        if recompute == "selective":
            # Backward recomputes one layer's core attention at a time: its scores (the local
            # spec's; none with Transformer Engine) come on top, once.
            kept += max((layer_activation_bytes(c, i, lay, work, True) - layer_activation_bytes(c, i, lay, work, False)
                         for i in layers), default=0.0)
    if not lay.transformer_engine:
        # The local spec takes packed documents as a dense [B, 1, T, T] bool mask per microbatch.
        kept += n * work.micro_batch_size * work.seq_len ** 2
    if stage == lay.pp - 1:
        kept += output_activation_bytes(c, lay, work)  # one microbatch: the last stage runs F then B
    return kept


# ------------------------------------------------------------------------------ native engines


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


def native_attention_path(c: ModelConfig, work: Workload) -> str:
    """The kernel ct-model's attention runs on ``work.device`` for packed rows (several documents
    per row, as the loaders pack them; one document per row is plain causal flash SDPA, never
    more), following ct_model.attention's choice: "flex" (compiled block-mask kernel, no T x T
    tensor) and "varlen" (flash over cu_seqlens) on CUDA, "sdpa" with a dense [B, 1, T, T]
    document mask (the CPU's choice up to DENSE_MASK_MAX_TOKENS per row, or attention_backend=sdpa),
    "varlen_cpu" (the CPU's per-document loop of causal flash SDPA, beyond that length)."""
    backend = c.attention_backend
    if backend == "auto":
        if work.device == "cuda":
            return "flex"
        backend = "sdpa" if work.seq_len <= DENSE_MASK_MAX_TOKENS else "varlen"
    if backend == "varlen" and work.device == "cpu":
        return "varlen_cpu"
    return backend


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
    - attention (flash, flex or varlen kernels keep no scores): q, k, v and the output, C each,
      and an fp32 logsumexp per head; the CPU's varlen loop repeats K and V to every head first
      (2 C (q - k) more); SDPA with a dense document mask converts the bool [B, 1, T, T] mask to
      one of q's dtype in every layer, and the kernel keeps it: B T^2 C per layer (measured);
    - SwiGLU: gate, SiLU(gate) and up, 3·C·f.
    mobilellm_950m under bf16 autocast: 107,744 bytes (105.2 KiB) per token; measured on CPU.
    "selective" keeps what ct_precision's policy saves: every GEMM's output (q, k, v, o_proj, gate,
    up, down), the attention output and logsumexp, and the block input (R·h); the mask is
    recomputed. "full" keeps the block input. MoE and MLA blocks use the Korthikanti terms without
    core attention (not measured).
    """
    r, cb, autocast = native_dtypes(lay, work)
    tokens = work.tokens
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
    path = native_attention_path(c, work)
    if path == "varlen_cpu":
        attention += 2 * cb * (q - k)
    scores = work.micro_batch_size * work.seq_len ** 2 * cb if path == "sdpa" else 0
    return tokens * (norms + linear_inputs + attention + 3 * cb * f) + scores


def native_output_bytes(c: ModelConfig, lay: Layout, work: Workload) -> float:
    """The native engines' loss end at its peak, one microbatch (measured on CPU): what it keeps
    plus what it holds only while it runs (``native_loss_bytes``)."""
    return sum(native_loss_bytes(c, lay, work))


def native_loss_bytes(c: ModelConfig, lay: Layout, work: Workload) -> tuple[float, float]:
    """(kept until backward, transient) of the loss end, one microbatch. Kept: the final RMSNorm
    (8h + 4 per token, as above) and, chunked (ct_model.chunked_ce), the gradient of the hidden
    states (R·h per token) and the output weight's fp32 gradient sum (4·V·h). Transient: the
    chunks in flight (``chunk_peak_bytes``), or unchunked (loss.chunk_tokens=0) 12 bytes per token
    and vocabulary entry (the logits' fp32 copy, log-softmax's output, and in the loss's backward
    the NLL and log-softmax gradients). Fused CE kernels (cut-cross-entropy, Liger;
    loss.fused_kernel on CUDA) need less. Under autocast the output weight's bf16 copy is
    ``autocast_weight_bytes``'s."""
    r, _, _ = native_dtypes(lay, work)
    tokens = work.tokens
    h, v = c.hidden_size, c.vocab_size
    norm = tokens * (8 * h + 4)
    if work.loss_chunk_tokens == 0:
        return norm, tokens * 12 * v
    return norm + tokens * r * h + 4 * v * h, chunk_peak_bytes(c, lay, work)


def chunk_peak_bytes(c: ModelConfig, lay: Layout, work: Workload) -> float:
    """The chunked loss's working memory at its peak. A chunk of n tokens makes its fp32 logits and
    logsumexp's fp32 temporary, 8·n·V, whatever the compute dtype (the bf16 logits are freed
    before); the loop's softmax variable still holds the previous chunk's (4·n·V) while the next
    chunk's are made, so from the second chunk on 4·n_prev·V + 8·n·V. On a CPU under bf16 there is
    no bf16-in / fp32-out addmm: the chunk's bf16 weight-gradient product (2·V·h) is upcast (4·V·h)
    to add into the fp32 sum while its fp32 softmax and that softmax's bf16 copy (6·n·V) are alive.
    With bf16 parameters (FSDP2) the loss's backward casts the fp32 sum to a bf16 gradient (2·V·h)."""
    _, cb, _ = native_dtypes(lay, work)
    h, v, tokens, chunk = c.hidden_size, c.vocab_size, work.tokens, work.loss_chunk_tokens
    sizes = [chunk] * (tokens // chunk) + ([tokens % chunk] if tokens % chunk else [])
    peak = max([8 * sizes[0] * v] + [(4 * prev + 8 * n) * v for prev, n in zip(sizes, sizes[1:])])
    if cb == 2 and work.device == "cpu":
        peak = max(peak, 6 * sizes[0] * v + 6 * v * h)
    if lay.zero == 3 and work.precision == "bf16":
        peak = max(peak, 2 * v * h)
    return peak


def autocast_weight_bytes(c: ModelConfig, lay: Layout, work: Workload, layers: range) -> float:
    """Single/DDP under bf16 autocast: every linear's weight is cast to bf16 once per forward
    (autocast caches the cast of a parameter for the forward) and the copy is what the linear
    saves for backward: 2 bytes per linear parameter of the blocks and the output layer (norms
    and the embedding lookup stay fp32)."""
    if native_dtypes(lay, work)[2] is False:
        return 0.0
    linear = sum(block_parameters(c, i).matmul for i in layers)
    return 2 * (linear + c.vocab_size * c.hidden_size)


def native_stage_activation_bytes(c: ModelConfig, lay: Layout, work: Workload, layers: range,
                                  recompute: str) -> float:
    """Native engines (one stage, one microbatch in flight): each block's bytes as checkpointed
    or not (blocks 0, N, 2N, ...), the dense document mask (bool, one per microbatch, shared by
    the layers), autocast's weight copies and what the loss keeps; then the larger of two
    transients that never meet: the loss's chunks (forward) and, when any block is checkpointed,
    the recompute of one block in backward from what it kept (its input, or selective's saved
    outputs, reused), the largest block's remaining activations."""
    def checkpointed(i: int) -> bool:
        return recompute != "none" and i % work.recompute_every_n_blocks == 0

    def kept_by(i: int) -> float:
        return native_layer_activation_bytes(c, i, lay, work, recompute if checkpointed(i) else "none")

    kept = sum(kept_by(i) for i in layers)
    recomputed = max((native_layer_activation_bytes(c, i, lay, work, "none") - kept_by(i)
                      for i in layers if checkpointed(i)), default=0.0)
    mask = work.micro_batch_size * work.seq_len ** 2 if native_attention_path(c, work) == "sdpa" else 0
    loss_kept, loss_transient = native_loss_bytes(c, lay, work)
    return (kept + mask + autocast_weight_bytes(c, lay, work, layers) + loss_kept
            + max(loss_transient, recomputed))


def stage_activation_bytes(c: ModelConfig, lay: Layout, work: Workload, stage: int, layers: range,
                           recompute: str) -> float:
    if lay.engine == "native":
        return native_stage_activation_bytes(c, lay, work, layers, recompute)
    return megatron_stage_activation_bytes(c, lay, work, stage, layers, recompute)


def largest_parameter(c: ModelConfig) -> int:
    """Elements of the model's largest single parameter tensor (ct-model's shapes: the embedding or
    output matrix, a projection, or a MoE layer's stacked gate/up experts)."""
    h, a = c.hidden_size, c.num_attention_heads
    sizes = [c.vocab_size * h, c.ffn_hidden_size * h]
    if c.multi_latent_attention:
        sizes += [c.kv_lora_rank * a * (c.qk_head_dim + c.v_head_dim), a * c.v_head_dim * h,
                  (c.q_lora_rank or h) * a * (c.qk_head_dim + c.qk_pos_emb_head_dim)]
    else:
        sizes.append(a * c.kv_channels * h)
    if c.is_moe:
        sizes.append(c.num_moe_experts * 2 * c.moe_ffn_hidden_size * h)
    return max(sizes)


def native_gradient_bytes(c: ModelConfig, lay: Layout, work: Workload, params: float) -> tuple[float, float]:
    """(gradients at the optimizer step, gradients alive during the last microbatch's forward),
    per GPU, for the native engines, whose gradients are fp32 (fp32 master weights, and FSDP2's
    reduce dtype). The step's are freed between steps (zero_grad(set_to_none=True)), so the
    first microbatch's forward has none; with gradient accumulation the earlier microbatches'
    are there: the .grad tensors (single, DDP) or, under FSDP2, which reduce-scatters only on the
    last microbatch, the unsharded gradients of every parameter accumulated in fp32 (4 bytes a
    parameter on every rank, not 4 / DP). DDP's reducer also keeps its flat bucket copy of the
    gradients for the whole run (gradient_as_bucket_view is off)."""
    accumulating = work.microbatches_per_step > 1
    if lay.zero == 3:
        return 4 * params / lay.dp, 4 * params if accumulating else 0.0
    step = 4 * params
    bucket = 4 * params if lay.strategy == "ddp" else 0.0
    return step + bucket, bucket + (step if accumulating else 0.0)


def muon_parameters(c: ModelConfig, index: int) -> int:
    """Elements of block ``index`` that optimizer=muon steps with Muon (ct_stages.optim's
    is_muon_matrix): every weight matrix, experts included; not the norms (vectors) nor the router
    (AdamW). Megatron refuses muon, so this is the native engines' whole, unsplit block."""
    block = block_parameters(c, index)
    return block.matmul - block.router


def muon_state_saving(c: ModelConfig, lay: Layout, work: Workload, layers: range) -> float:
    """Optimizer bytes optimizer=muon saves per GPU against AdamW's two fp32 moments: Muon keeps
    one fp32 momentum buffer per matrix element (4 bytes, not 8); the embeddings, output layer,
    norms and routers keep AdamW's two. FSDP2 shards it as the rest of the state (/ DP). The step's
    working memory (one gathered matrix and its Newton-Schulz temporaries per rank at a time) is
    not counted: a few copies of one block matrix."""
    if work.optimizer != "muon":
        return 0.0
    matrices = sum(muon_parameters(c, i) for i in layers)
    return 4 * matrices / (lay.dp if lay.zero == 3 else 1)


def native_step_working_bytes(c: ModelConfig, lay: Layout, work: Workload) -> float:
    """The optimizer step's own memory: on CUDA ct-train's AdamW is the fused kernel (nothing);
    on CPU torch's per-tensor AdamW keeps two fp32 temporaries of one parameter at a time
    (sqrt of the second moment, then its bias-corrected copy), the largest one's at the peak
    (FSDP2: its local shard)."""
    if work.device == "cuda":
        return 0.0
    return 2 * 4 * largest_parameter(c) / (lay.dp if lay.zero == 3 else 1)


# ---------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class StageMemory:
    stage: int
    layers: list[int]  # first and last block index (inclusive); empty for a stage without blocks
    parameters: float  # per GPU
    parameter_bytes: float  # FSDP2: with the gathered (unsharded) parameters of the forward
    gradient_bytes: float  # at the optimizer step
    optimizer_bytes: float
    activation_bytes: float
    # Activations of this stage under each recompute mode, for comparison.
    activation_bytes_by_recompute: dict[str, float] = field(default_factory=dict)
    # What the run holds besides its own model on every GPU (an online KD teacher: Plan.extras).
    extra_bytes: float = 0.0
    # Gradients alive while the activations peak (the last microbatch's forward). Megatron keeps
    # its gradient buffers for the whole run: all of them. Native: see native_gradient_bytes.
    gradient_bytes_in_forward: float | None = None
    # The optimizer step's own working memory (native on CPU: per-tensor AdamW's temporaries).
    step_working_bytes: float = 0.0
    # FSDP2's unsharded parameters, in parameter_bytes, gathered only for forward and backward.
    gathered_bytes: float = 0.0

    @property
    def forward_peak_bytes(self) -> float:
        """Everything alive at the end of the last microbatch's forward (the loss in flight)."""
        grads = self.gradient_bytes if self.gradient_bytes_in_forward is None else self.gradient_bytes_in_forward
        return self.parameter_bytes + self.optimizer_bytes + self.extra_bytes + grads + self.activation_bytes

    @property
    def step_peak_bytes(self) -> float:
        """Everything alive during the optimizer step: activations gone, every gradient there."""
        return (self.parameter_bytes - self.gathered_bytes + self.optimizer_bytes + self.extra_bytes
                + self.gradient_bytes + self.step_working_bytes)

    @property
    def total_bytes(self) -> float:
        """The stage's peak: the larger of the two moments (for megatron, the plain sum)."""
        return max(self.forward_peak_bytes, self.step_peak_bytes)

    @property
    def peak_moment(self) -> str:
        return "forward" if self.forward_peak_bytes >= self.step_peak_bytes else "optimizer step"


def native_gathered_parameters(c: ModelConfig, lay: Layout, layers: range) -> float:
    """FSDP2's unsharded parameters while a block runs: the root's (embedding, output layer when
    untied, final norm), which ct's FSDP2 keeps gathered from the root's forward to the end of
    backward (reshard_after_forward=False), and two blocks (the running one and the prefetched
    next), in the compute dtype."""
    root = c.vocab_size * c.hidden_size * (1 if c.share_embeddings_and_output_weights else 2) + c.hidden_size
    blocks = 2 * max((sum(asdict(layer_params(c, i)).values()) for i in layers), default=0)
    return root + blocks


def stage_memory(c: ModelConfig, lay: Layout, work: Workload, stage: int, layers: range,
                 extra_bytes: float = 0.0) -> StageMemory:
    dense, expert = stage_params(c, lay, stage, layers)
    params = dense + expert
    gathered = step_working = 0.0
    grads_forward = None
    if lay.zero == 3:
        bp, _, bo = ZERO3_BYTES
        gathered = native_gathered_parameters(c, lay, layers) * COMPUTE_BYTES[work.precision]
        params_b, opt_b = params * bp / lay.dp + gathered, params * bo / lay.dp
    elif lay.engine == "native":
        # fp32 master weights (bf16 runs compute under autocast: its copies are activations),
        # fp32 gradients, two fp32 AdamW moments.
        params_b, opt_b = 4 * params, 8 * params
    else:
        bp, bg, bo = BYTES_PER_PARAM[work.precision]
        params_b = params * bp
        opt_b = dense * bo / lay.dp + expert * bo / lay.edp if lay.zero == 1 else params * bo
    if lay.engine == "native":
        grads_b, grads_forward = native_gradient_bytes(c, lay, work, params)
        step_working = native_step_working_bytes(c, lay, work)
        opt_b -= muon_state_saving(c, lay, work, layers)
    else:
        grads_b = params * BYTES_PER_PARAM[work.precision][1]
    by_mode = {m: stage_activation_bytes(c, lay, work, stage, layers, m) for m in RECOMPUTE_MODES}
    return StageMemory(stage=stage, layers=[layers.start, layers.stop - 1] if len(layers) else [],
                       parameters=params, parameter_bytes=params_b, gradient_bytes=grads_b,
                       optimizer_bytes=opt_b, activation_bytes=by_mode[work.recompute],
                       activation_bytes_by_recompute=by_mode, extra_bytes=extra_bytes,
                       gradient_bytes_in_forward=grads_forward, step_working_bytes=step_working,
                       gathered_bytes=gathered)


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
            "stages": [{**asdict(s), "total_bytes": s.total_bytes, "forward_peak_bytes": s.forward_peak_bytes,
                        "step_peak_bytes": s.step_peak_bytes, "peak_moment": s.peak_moment} for s in self.stages],
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
    lay = Layout.from_distributed(d, world_size, work.device)
    check_divides(c, lay, work)
    if work.optimizer == "muon" and lay.engine != "native":  # as ct-train refuses it
        raise PlanError("optimizer.name=muon: the megatron engine has no Muon here; use distributed=single, "
                        "ddp or fsdp2")
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
                     extras_for: Callable[[int], dict[str, float]] | None = None,
                     workload_for: Callable[[int], Workload] | None = None) -> Plan | None:
    """The smallest world size for the given TP, PP, EP and expert-TP whose worst stage fits:
    the search runs over data parallelism only (DP = k x the smallest valid DP), which under
    ZeRO-1/3 divides the optimizer state (and under ZeRO-3 everything) and changes nothing else.
    None when no DP fits (what stays per GPU as DP grows is already too big). ``extras_for``: the
    plan's extras at a world size (an online teacher's per-rank batch shrinks as DP grows);
    ``workload_for``: the workload at a world size (a fixed global batch has fewer microbatches
    per replica as DP grows), else ``work`` everywhere."""

    def at(world: int) -> Plan:
        return plan(c, d, world, workload_for(world) if workload_for else work, gpu_memory_gb=gpu_memory_gb,
                    gpus_per_node=gpus_per_node, extras=extras_for(world) if extras_for else None)

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
