"""MegatronEngine: ct-model trained as a megatron-core GPTModel (TP, SP, PP 1F1B / interleaved,
megatron DDP and distributed optimizer), behind the same Engine interface as NativeEngine.

The ct-model Decoder the trainer built is the source of the weights (copied in through the
bridge, so every layout starts from the same numbers); afterwards megatron's chunks are the model.
Loss convention as in engine.py: loss_fn returns the SUM of token losses of a microbatch; the
engine scales by 1/(scored tokens of the global batch) so megatron sums (not averages) over
microbatches and data-parallel ranks (``calculate_per_token_loss`` + ``average_in_collective=False``).
"""

from __future__ import annotations

import contextlib
import os
from functools import partial
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params, FP32Optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.process_groups_config import ProcessGroupCollection
from torch import nn
from torch.distributed.checkpoint.state_dict import _init_optim_state

from ct_model import ModelConfig
from ct_model.weights import ModuleWeights
from ct_model.masking import document_causal_mask

from ..config import DistributedConfig
from ct_model.loss import EngineTeacher, Loss, LossInput, as_loss

from ..engine import LossFn, Microbatch, StepResult, global_token_counts, scored_tokens
from ..vocab import vocab_shard
from . import bridge
from .model import build_gpt_chunks, transformer_config
from .packed import flatten_rows, packed_seq_params, unflatten_rows
from .transformer_impl import use_transformer_engine
from .write_queue import install_write_results_queue


def _init_state(optimizer: torch.optim.Optimizer, config=None) -> None:
    """Materialise optimizer state (zero-grad step at lr 0) so checkpoints can be loaded into it."""
    _init_optim_state(optimizer)


def _attention_mask(mb: Microbatch) -> torch.Tensor:
    """Megatron's convention: True = masked out. Block-diagonal causal over documents."""
    ids = mb["input_ids"]
    doc = mb.get("document_ids")
    if doc is None:
        doc = torch.zeros_like(ids)
    return ~document_causal_mask(doc)


def _loss_on_logits(loss: Loss, mb: Microbatch, logits: torch.Tensor) -> torch.Tensor:
    """``loss`` on this rank's vocabulary shard of the logits [B, T, vocab / TP] (all of it at TP=1).

    A loss that takes vocabulary shards gets this rank's, at every TP size (at TP=1 the one shard
    is the whole vocabulary), with megatron's vocab-parallel cross-entropy as the shard's CE
    kernel: as GPTModel's own loss, it upcasts the (bf16) shard to fp32 once, in place of the
    softmax it keeps for backward, and only per-token max and sum-exp are all-reduced over TP.
    Any other loss gets the full vocabulary, gathered (differentiably) over TP. Losses upcast
    themselves where they need to."""
    tp = ps.get_tensor_model_parallel_world_size()
    if loss.supports(LossInput.VOCAB_SHARDS):
        local = logits.shape[-1]
        start = ps.get_tensor_model_parallel_rank() * local
        shard = vocab_shard(ps.get_tensor_model_parallel_group(), start, start + local,
                            cross_entropy=tensor_parallel.vocab_parallel_cross_entropy)
        return loss.from_vocab_shards(mb, logits, shard)
    if tp > 1:
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    return loss.from_logits(mb, logits)


def _position_ids(mb: Microbatch) -> torch.Tensor:
    pos = mb.get("position_ids")
    if pos is None:
        ids = mb["input_ids"]
        pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    return pos


def model_inputs(mb: Microbatch, thd: bool) -> tuple[tuple, dict]:
    """GPTModel's (args, kwargs) for a microbatch [B, T]: the dense document mask, or (``thd``)
    the batch flattened to one packed row [1, B * T] with its ``PackedSeqParams`` and no mask."""
    ids, pos = mb["input_ids"], _position_ids(mb)
    if not thd:
        return (ids, pos, _attention_mask(mb)), {}
    return (flatten_rows(ids), flatten_rows(pos), None), {"packed_seq_params": packed_seq_params(mb)}


def model_logits(logits: torch.Tensor, batch_size: int, thd: bool) -> torch.Tensor:
    """The loss's [B, T, V] logits from GPTModel's output (THD: the packed row unflattened)."""
    return unflatten_rows(logits, batch_size) if thd else logits


def _count_experts_once_in_grad_norm(mopt, ep: int) -> None:
    """The global grad norm under expert parallelism, from one torch optimizer over all params.

    megatron proper keeps experts in a separate optimizer whose norm reduces over the expert
    model-parallel group (expert TP x EP x PP). Here the norm reduces over that group for all
    grads; the dense grads, equal on the EP ranks (which are data-parallel ranks for them), enter
    scaled by 1/sqrt(EP) so that their squares are counted once in the sum."""
    def grads_for_norm(grad_norm_group=None):
        params = mopt.get_parameters()
        dense = mopt._filter_grads_for_norm(params, param_filter=lambda p: getattr(p, "allreduce", True))
        experts = mopt._filter_grads_for_norm(params, param_filter=lambda p: not getattr(p, "allreduce", True))
        return [g / ep**0.5 for g in dense] + experts

    mopt.get_grads_for_grad_norm = grads_for_norm
    mopt.grad_stats_parallel_group = ps.get_expert_tensor_model_pipeline_parallel_group()


class MegatronEngine:
    def __init__(self, model: nn.Module, dist_config: DistributedConfig, *, autocast_dtype: torch.dtype | None = None,
                 recompute: dict | None = None, fp8: dict | None = None, weights=None,
                 engine_teacher: EngineTeacher | None = None):
        """``engine_teacher`` (the ``engine_teacher`` of the loss this engine will train): its
        ct-model Decoder is the teacher the student is converted into nvidia-modelopt's
        DistillationModel around (modelopt_kd.py); a loss with an ``engine_teacher`` then gets
        modelopt's KD term (its ``kind`` at its ``temperature``) added."""
        # First: on CUDA without Transformer Engine this refuses (transformer_impl.py) before any work.
        self.te = use_transformer_engine(dist_config)
        if not ps.model_parallel_is_initialized():
            raise RuntimeError("megatron parallel state is not initialised; call ct_parallel.init_distributed first")
        if autocast_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(f"megatron engine supports fp32 or bf16, got autocast_dtype={autocast_dtype}")
        self.model_config: ModelConfig = model.config
        self.dist_config = dist_config
        self.bf16 = autocast_dtype == torch.bfloat16
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        # Built in the precision it runs in: bf16 sets params_dtype and pipeline_dtype (the p2p
        # buffers stage 0 fills with bf16 activations) and makes the local attention softmax
        # upcast (FusedScaleMaskSoftmax reads config.bf16 when it is built, not later).
        self.config = transformer_config(self.model_config, dist_config, bf16=self.bf16, recompute=recompute, fp8=fp8)
        chunks = build_gpt_chunks(self.model_config, self.config, self.te, thd=self.thd)
        # Each rank fills only its own chunks, one ct-model tensor at a time: from the weight source
        # (a meta model: fresh initial values or an HF directory), or from the model's own tensors.
        bridge.load_ct_state_dict(chunks, weights if weights is not None else ModuleWeights(model),
                                  self.model_config)
        self.kd_model = None  # modelopt's DistillationModel (the student chunk itself, converted)
        if engine_teacher is not None:
            chunks = [self._convert_for_modelopt(chunks, engine_teacher, recompute)]
        chunks = [c.to(self.device) for c in chunks]
        if self.bf16:
            from megatron.core.transformer.module import Float16Module
            # The chunks already hold bf16 weights (params_dtype; the bridge rounded the fp32
            # ct-model weights into them); Float16Module casts what else is floating (buffers,
            # a modelopt teacher) and the first stage's inputs.
            chunks = [Float16Module(self.config, c) for c in chunks]
        self.ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=dist_config.overlap_grad_reduce,
            use_distributed_optimizer=dist_config.use_distributed_optimizer,
            average_in_collective=False,
        )
        self.chunks = [
            DistributedDataParallel(self.config, self.ddp_config, chunk, disable_bucketing=i > 0)
            for i, chunk in enumerate(chunks)
        ]
        for chunk in self.chunks:
            chunk.broadcast_params()
        self.config.no_sync_func = [c.no_sync for c in self.chunks] if len(self.chunks) > 1 else self.chunks[0].no_sync
        if dist_config.overlap_grad_reduce:
            self.config.grad_sync_func = ([c.start_grad_sync for c in self.chunks] if len(self.chunks) > 1
                                          else self.chunks[0].start_grad_sync)
        # Our loss already carries 1/(global tokens): finalize without megatron's token scaling.
        self.config.finalize_model_grads_func = self._finalize_grads
        self._expert_loads: dict[str, torch.Tensor] = {}  # per MoE layer, of the last backward
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_size = ps.get_data_parallel_world_size()
        self.optimizer: torch.optim.Optimizer | None = None  # the trainer's torch optimizer
        self.megatron_optimizer = None
        self._grads_ready = False
        self.model = model  # the ct-model the weights came from (not trained by this engine)

    @property
    def thd(self) -> bool:
        """Packed documents as THD (cu_seqlens, no T x T mask) where attention can take it: with TE.
        megatron's local DotProductAttention asserts ``packed_seq_params is None``
        (megatron/core/transformer/dot_product_attention.py: "Packed sequence is not supported by
        DotProductAttention. Please use TEDotProductAttention instead."), so the local spec (CPU)
        keeps the dense [B, 1, T, T] mask."""
        return self.te

    def _finalize_grads(self, model, num_tokens, **kw):
        # Our loss already carries 1/(global tokens): finalize without megatron's token scaling.
        # The routers' token counts are read first: finalize updates the expert bias from them
        # and zeroes them.
        self._read_expert_loads()
        finalize_model_grads(model, None, **kw)

    def _routers(self) -> list[tuple[str, nn.Module]]:
        """(``moe/layers.{i}``, megatron router) of this rank's MoE layers with an expert bias."""
        out = []
        if not self.model_config.is_moe:
            return out
        for chunk in self.chunks:
            for layer in bridge.unwrap(chunk).decoder.layers:
                router = getattr(layer.mlp, "router", None)
                if router is not None and getattr(router, "local_tokens_per_expert", None) is not None:
                    out.append((f"moe/layers.{layer.layer_number - 1}", router))
        return out

    @torch.no_grad()
    def _read_expert_loads(self) -> None:
        routers = self._routers()
        if not routers:
            return
        loads = torch.stack([r.local_tokens_per_expert for _, r in routers]).clone()
        # The group megatron sums them over for its bias update: exact totals (MoE under TP
        # needs SP, so each TP rank counts its own part of the sequence).
        dist.all_reduce(loads, group=ps.get_tensor_and_data_parallel_group(with_context_parallel=True))
        self._expert_loads = {name: load for (name, _), load in zip(routers, loads)}

    def update_expert_bias(self) -> dict[str, float]:
        """Per-layer load figures of the last step, as the native engine logs them
        (``moe/layers.{i}.load_max`` / ``load_min`` / ``bias_range``). The bias itself was already
        moved by megatron in finalize_model_grads, by ct-model's rule (see model.py); under PP
        the figures of all stages are gathered so every rank reports every layer."""
        metrics: dict[str, float] = {}
        for name, router in self._routers():
            load = self._expert_loads.get(name)
            if load is None:
                continue
            share = load / load.sum().clamp(min=1)
            bias = router.expert_bias
            metrics.update({f"{name}.load_max": share.max().item(), f"{name}.load_min": share.min().item(),
                            f"{name}.bias_range": (bias.max() - bias.min()).item()})
        self._expert_loads = {}
        if ps.get_pipeline_model_parallel_world_size() > 1 and self.model_config.is_moe:
            parts: list = [None] * ps.get_pipeline_model_parallel_world_size()
            dist.all_gather_object(parts, metrics, group=ps.get_pipeline_model_parallel_group())
            metrics = {k: v for part in parts for k, v in part.items()}
        return metrics

    def _convert_for_modelopt(self, chunks, engine_teacher: EngineTeacher, recompute) -> nn.Module:
        from . import modelopt_kd

        modelopt_kd.check_layout(self.dist_config)
        teacher, temperature = engine_teacher.model, engine_teacher.temperature
        teacher_config: ModelConfig = teacher.config
        if teacher_config.vocab_size != self.model_config.vocab_size:
            raise ValueError(f"stage.distill.backend=modelopt: the teacher's vocab_size {teacher_config.vocab_size} "
                             f"differs from the student's {self.model_config.vocab_size} (model.vocab_size)")
        # The teacher runs inside the student's Float16Module: the same precision fields.
        tconfig = transformer_config(teacher_config, self.dist_config, bf16=self.bf16, recompute=recompute)
        (teacher_chunk,) = build_gpt_chunks(teacher_config, tconfig, self.te, thd=self.thd)
        bridge.load_ct_state_dict([teacher_chunk], ModuleWeights(teacher), teacher_config)
        (student,) = chunks
        self.kd_model = modelopt_kd.convert(student, teacher_chunk, temperature, engine_teacher.kind)
        self.kd_temperature = temperature
        return self.kd_model

    def _student_only(self):
        """Hide the teacher from state dicts, checkpoints and exports (the student is what trains)."""
        return self.kd_model.hide_teacher_model() if self.kd_model is not None else contextlib.nullcontext()

    def _forward_context(self, loss: Loss):
        """A loss without an engine teacher (the evaluation CE) runs the student alone."""
        if self.kd_model is None:
            if loss.engine_teacher is not None:
                raise ValueError(f"{loss!r} needs the megatron engine built with its teacher: "
                                 "build_engine(..., loss=that loss)")
            return contextlib.nullcontext
        return contextlib.nullcontext if loss.engine_teacher is not None else self._student_forward

    @contextlib.contextmanager
    def _student_forward(self):
        with self.kd_model.only_student_forward():
            yield
        # modelopt's capture hooks (on the model itself, or its output_layer under TP) kept the
        # student's logits for a KD loss that will not come; drop them so the next KD step starts clean.
        for student_layer, _ in self.kd_model._layers_to_loss:
            student_layer._intermediate_output = None

    def _loss_sum(self, loss: Loss, mb: Microbatch, logits: torch.Tensor) -> torch.Tensor:
        loss_sum = _loss_on_logits(loss, mb, logits)
        if self.kd_model is not None and loss.engine_teacher is not None:
            from .modelopt_kd import kd_loss_sum

            loss_sum = loss_sum + kd_loss_sum(self.kd_model, mb["labels"], self.kd_temperature)
        return loss_sum

    # -- optimizer -------------------------------------------------------------------------------
    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """This rank's trainable parameters with ct-model-style names (fused ones: qkv_proj,
        gate_up_proj; a tied output copy on the last stage: lm_head.weight)."""
        out = []
        for chunk in self.chunks:
            inner = bridge.unwrap(chunk)
            for name, p in inner.named_parameters():
                if p.requires_grad:
                    out.append((bridge.optimizer_name(name, inner, self.model_config), p))
        return out

    def setup_optimizer(self, build: Callable[[list[tuple[str, nn.Parameter]]], torch.optim.Optimizer]):
        self.optimizer = build(self.named_parameters())
        config = OptimizerConfig(optimizer="adam", lr=self.optimizer.defaults.get("lr", 0.0), clip_grad=0.0,
                                 bf16=self.bf16, use_distributed_optimizer=self.dist_config.use_distributed_optimizer,
                                 params_dtype=torch.float32)
        groups = ProcessGroupCollection.setup_process_groups_for_optimizer(None, self.chunks, True)
        if self.dist_config.use_distributed_optimizer:
            mopt = DistributedOptimizer(
                self.optimizer, config, None, _init_state,
                model_chunks=self.chunks,
                per_model_buffers={i: c.buffers for i, c in enumerate(self.chunks)},
                data_parallel_group=groups["dp_cp_group"],
                data_parallel_group_gloo=groups["intra_dp_cp_group_gloo"],
                data_parallel_group_idx=dist.get_rank(groups["mp_group"]),
                distributed_optimizer_instance_id=0,
            )
            mopt.grad_stats_parallel_group = groups["intra_dist_opt_group"]
        elif self.bf16:
            # bf16 model weights (Float16Module), fp32 main copies stepped by the torch optimizer;
            # bf16 needs no loss scaler (grad_scaler=None).
            mopt = Float16OptimizerWithFloat16Params(self.optimizer, config, None, _init_state)
            mopt.grad_stats_parallel_group = groups["mp_group"]
        else:
            mopt = FP32Optimizer(self.optimizer, config, _init_state)
            mopt.grad_stats_parallel_group = groups["mp_group"]
        mopt.tp_group = ps.get_tensor_model_parallel_group()
        mopt.expert_tp_group = ps.get_expert_tensor_parallel_group()
        if self.dist_config.expert_model_parallel_size > 1:
            _count_experts_once_in_grad_norm(mopt, self.dist_config.expert_model_parallel_size)
        # megatron pairs saved and current param groups by their override keys (max_lr, wd_mult,
        # ...), which our groups (decay, no decay) leave unset: both would map to one saved group.
        # Every layout builds the groups in the same order, so pair them by position instead.
        mopt._filter_and_reorder_param_groups = lambda current, saved: saved
        self.megatron_optimizer = mopt
        return self.optimizer

    # -- steps -----------------------------------------------------------------------------------
    def _run(self, microbatches: list[Microbatch], loss_fn: LossFn, forward_only: bool) -> StepResult:
        loss = as_loss(loss_fn)
        global_tokens, input_tokens = global_token_counts(microbatches, self.dp_size, ps.get_data_parallel_group(),
                                                          self.device)
        scale = 1.0 / max(global_tokens, 1.0)
        mbs = [{k: v.to(self.device) for k, v in mb.items()} for mb in microbatches]
        b, t = mbs[0]["input_ids"].shape

        forward_context = self._forward_context(loss)

        def loss_func(mb, logits):
            # bf16 logits under bf16: each loss upcasts where it needs to (megatron's CE one
            # vocabulary shard at a time), rather than one fp32 copy of [B, T, V / TP] up front.
            logits = model_logits(logits, b, self.thd)
            loss_sum = self._loss_sum(loss, mb, logits)
            return loss_sum * scale, scored_tokens(mb).to(torch.int), {"loss_sum": loss_sum.detach().to(torch.float64)}

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            args, kwargs = model_inputs(mb, self.thd)
            if self.bf16:
                kwargs["fp32_output"] = False  # Float16Module: keep the last stage's logits in bf16
            with forward_context():
                return model(*args, **kwargs), partial(loss_func, mb)

        for chunk in self.chunks:
            chunk.train(not forward_only)
        iters = [iter(mbs) for _ in self.chunks]
        out = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iters if len(iters) > 1 else iters[0],
            model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
            num_microbatches=len(mbs),
            # Pipeline messages are [seq, micro batch, hidden]: THD sends one packed row.
            seq_length=b * t if self.thd else t,
            micro_batch_size=1 if self.thd else b,
            forward_only=forward_only,
        )
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            for item in out:
                total += item["loss_sum"]
        # Last stage holds the loss: sum over PP (others add 0) and over DP.
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
        if self.dp_size > 1:
            dist.all_reduce(total, group=ps.get_data_parallel_group())
        if not forward_only:
            self._grads_ready = False
        return StepResult(total.item() / max(global_tokens, 1.0), int(global_tokens), int(input_tokens))

    def forward_backward(self, microbatches: list[Microbatch], loss_fn: LossFn) -> StepResult:
        return self._run(microbatches, loss_fn, forward_only=False)

    @torch.no_grad()
    def forward_only(self, microbatches: list[Microbatch], loss_fn: LossFn) -> StepResult:
        result = self._run(microbatches, loss_fn, forward_only=True)
        for chunk in self.chunks:
            chunk.train()
        return result

    def _prepare(self) -> None:
        if not self._grads_ready:
            self.megatron_optimizer.prepare_grads()
            self._grads_ready = True

    def clip_grad_norm(self, max_norm: float | None) -> float:
        """Global gradient norm before clipping (over TP/PP/DP, shared weights counted once)."""
        self._prepare()
        if max_norm:
            return float(self.megatron_optimizer.clip_grad_norm(max_norm))
        return float(self.megatron_optimizer.get_grad_norm())

    def optimizer_step(self) -> None:
        self._prepare()
        self.megatron_optimizer.step_with_ready_grads()
        self._grads_ready = False

    def zero_grad(self) -> None:
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.megatron_optimizer.zero_grad(set_to_none=True)
        self._grads_ready = False

    # -- checkpoints -----------------------------------------------------------------------------
    def _sharded_state(self, with_optimizer: bool, is_loading: bool) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for i, chunk in enumerate(self.chunks):
            with self._student_only():
                state[f"model{i}" if len(self.chunks) > 1 else "model"] = bridge.unwrap(chunk).sharded_state_dict()
        if with_optimizer and self.megatron_optimizer is not None:
            state["optimizer"] = self.megatron_optimizer.sharded_state_dict(state, is_loading=is_loading)
        return state

    def save_checkpoint(self, path: str, *, asynchronous: bool = False) -> "AsyncSave | None":  # noqa: F821
        """megatron dist_checkpointing directory: loads at another TP/PP split of the same world
        (model and plain optimizer; the distributed optimizer's state is GPU-verified only).

        ``asynchronous``: plan the save (collective), copy this rank's state to host memory and
        return an AsyncSave whose thread writes the files; the caller (CheckpointManager) calls
        its ``finalize`` on every rank once all have written, which writes the metadata."""
        os.makedirs(path, exist_ok=True)
        install_write_results_queue()  # its writer process must not outlive a killed rank
        dist.barrier()
        if not asynchronous:
            dist_checkpointing.save(self._sharded_state(True, False), str(path))
            return None
        from .write_queue import AsyncSave

        # "mcore": megatron's built-in async writer (the default, "nvrx", needs nvidia-resiliency-ext).
        request = dist_checkpointing.save(self._sharded_state(True, False), str(path), async_sharded_save=True,
                                          async_strategy="mcore")
        return AsyncSave(request)

    def load_checkpoint(self, path: str, *, load_optimizer: bool = True) -> None:
        state = _load_strict(self._sharded_state(load_optimizer, True), str(path))
        for i, chunk in enumerate(self.chunks):
            with self._student_only():
                bridge.unwrap(chunk).load_state_dict(state[f"model{i}" if len(self.chunks) > 1 else "model"])
        if load_optimizer and "optimizer" in state:
            self.megatron_optimizer.load_state_dict(state["optimizer"])

    def full_state_items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(ct-model name, full tensor on CPU) of every parameter and router bias, one at a time,
        on global rank 0; collective: every rank must iterate it to the end (it yields nothing
        elsewhere). One megatron tensor at a time is all-gathered over its TP group and sent to
        rank 0 by its pipeline stage / expert-parallel rank (bridge.iter_ct_state), so no process
        holds more than one full parameter beyond its shards (rank 0: one 3D expert tensor)."""
        with self._student_only():
            yield from bridge.iter_ct_state(self.chunks, self.model_config, self.device)

    def full_model_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full ct-model state dict (TP gathered, PP stages joined) on global rank 0, else None."""
        state = dict(self.full_state_items())
        return state if dist.get_rank() == 0 else None

    def full_grad_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Gradients in ct-model names on rank 0 (after forward_backward; not with the
        distributed optimizer, whose buffers hold only this rank's reduced shard)."""
        with self._student_only():
            return bridge.export_ct_state_dict(self.chunks, self.model_config,
                                               get=lambda p: getattr(p, "main_grad", p.grad), buffers=False)


def _load_strict(sharded_state: dict, path: str) -> dict:
    """dist_checkpointing.load of a checkpoint written for this model, else a refusal before
    anything is loaded (megatron's default loads the tensors asked for and ignores the rest: a
    partial load). Its own strict modes read the metadata through a torch API this torch no
    longer has (``torch.empty(strides=)``), so the model's tensors are compared here, by key and
    global shape (layers are stacked: a layer count shows in the shape), against the DCP
    metadata; keys are gathered over ranks first (a pipeline stage asks for its own only)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from torch.distributed.checkpoint import FileSystemReader

    from ..native import CheckpointModelMismatch, describe_mismatch

    # A factory (e.g. a GLU weight saved as two tensors) saves under keys it derives: its tensors
    # are left to megatron's own checks and only plain sharded tensors are compared.
    wanted: dict[str, tuple] = {}
    factories: set[str] = set()
    for key, part in sharded_state.items():
        if key.startswith("model"):
            for value in nested_values(part):
                if isinstance(value, ShardedTensor):
                    wanted[value.key] = tuple(value.global_shape)
                elif hasattr(value, "key"):
                    factories.add(value.key)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (wanted, factories))
    wanted = {k: v for per_rank, _ in everyone for k, v in per_rank.items() if "_extra_state" not in k}
    factories = set().union(*(f for _, f in everyone))
    saved = {key: tuple(meta.size) for key, meta in FileSystemReader(path).read_metadata().state_dict_metadata.items()
             if hasattr(meta, "size") and not key.startswith("optimizer.") and "_extra_state" not in key
             and not any(key.startswith(f) for f in factories)}
    found = describe_mismatch(saved, wanted)
    if found:
        raise CheckpointModelMismatch(f"{path}: written for another model ({found}); nothing was loaded. Resume "
                                      "with the model it was written for, or start a new run_dir")
    return dist_checkpointing.load(sharded_state, path)
