"""The native engine: ct-model run in one process, under DDP, or (see fsdp.py) FSDP2."""

from __future__ import annotations

import contextlib
from concurrent.futures import Future
from functools import partial
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from ct_model import UserError
from ct_model import moe as ct_moe
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from .distributed import is_distributed as _dist_ready
from ct_model.loss import Loss, LossInput, as_loss

from .engine import LossFn, Microbatch, StepResult, global_token_counts, scored_tokens, to_device


class NativeEngine:
    """Runs a ct-model Decoder; ``wrapped`` is the module actually called (the model, DDP or FSDP).

    ``model`` is the unwrapped Decoder (same parameters). ``autocast_dtype`` turns on autocast for
    forward passes (bf16 on GPU and CPU); parameters and gradients stay in their own dtype.
    """

    def __init__(self, model: nn.Module, wrapped: nn.Module | None = None, *,
                 dp_group: dist.ProcessGroup | None = None, autocast_dtype: torch.dtype | None = None):
        self.model = model
        self.wrapped = wrapped if wrapped is not None else model
        self.dp_group = dp_group
        self.dp_size = dist.get_world_size(dp_group) if _dist_ready() else 1
        self.dp_rank = dist.get_rank(dp_group) if _dist_ready() else 0
        self.autocast_dtype = autocast_dtype
        self.optimizer: torch.optim.Optimizer | None = None
        self.device = next(model.parameters()).device
        self._async_group: dist.ProcessGroup | None = None

    # -- optimizer -------------------------------------------------------------------------------
    def setup_optimizer(self, build: Callable[[list[tuple[str, nn.Parameter]]], torch.optim.Optimizer]):
        self.optimizer = build(list(self.model.named_parameters()))
        return self.optimizer

    # -- steps -----------------------------------------------------------------------------------
    def _global_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.dp_size > 1:
            value = value.clone()
            dist.all_reduce(value, group=self.dp_group)
        return value

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _loss(self, mb: Microbatch, loss: Loss) -> torch.Tensor:
        """``loss`` on ``mb``. A loss that takes hidden states runs as the model's output head,
        inside the wrapped forward: under FSDP2 the (tied) output weight is unsharded only there,
        and no [micro x seq x vocab] logits are made unless the loss makes them."""
        args = (mb["input_ids"], mb.get("position_ids"), mb.get("document_ids"))
        with self._autocast():
            if loss.supports(LossInput.HIDDEN):
                return self.wrapped(*args, head=partial(loss.from_hidden, mb))
            logits = self.wrapped(*args)
        return loss.from_logits(mb, logits)

    def _checked(self, loss_fn: LossFn) -> Loss:
        loss = as_loss(loss_fn)
        if loss.engine_teacher is not None:
            raise ValueError(f"{loss!r} needs an engine that holds its teacher (stage.distill.backend=modelopt: "
                             "distributed.engine=megatron)")
        return loss

    def _loss_and_aux(self, mb: Microbatch, loss: Loss) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stage loss and, for MoE models with moe_aux_loss_coeff > 0, the balance term this
        microbatch's forward recorded, scaled to the loss's per-token-sum convention (x scored
        tokens), so after the engine's division it weighs as coeff x the balance loss."""
        ct_moe.take_aux_loss(self.model)  # drop terms left by a checkpointed block's recompute
        loss_sum = self._loss(mb, loss)
        aux = ct_moe.take_aux_loss(self.model)
        if aux is not None:
            aux = aux * scored_tokens(mb).to(aux.dtype)
        return loss_sum, aux

    def _totals(self, microbatches: list[Microbatch]) -> tuple[float, float]:
        return global_token_counts(microbatches, self.dp_size, self.dp_group, self.device)

    def _on_device(self, microbatches: list[Microbatch]) -> list[Microbatch]:
        """The loader's (host) microbatches on the model's device: all of them now, before the
        first forward, so their (asynchronous) copies overlap the compute that follows."""
        return [to_device(mb, self.device) for mb in microbatches]

    def _no_sync(self, last: bool):
        if not last and hasattr(self.wrapped, "no_sync"):
            return self.wrapped.no_sync()  # DDP: all-reduce gradients once, on the last microbatch
        return contextlib.nullcontext()

    def forward_backward(self, microbatches: list[Microbatch], loss_fn: LossFn) -> StepResult:
        self.wrapped.train()
        loss = self._checked(loss_fn)
        global_tokens, input_tokens = self._totals(microbatches)
        microbatches = self._on_device(microbatches)
        # Gradient reductions average over dp ranks; scaling by dp_size turns that into a sum, so
        # the result is the gradient of (sum of token losses) / (global scored tokens).
        scale = self.dp_size / max(global_tokens, 1.0)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        aux_total = None
        for i, mb in enumerate(microbatches):
            with self._no_sync(i == len(microbatches) - 1):
                loss_sum, aux = self._loss_and_aux(mb, loss)
                ((loss_sum if aux is None else loss_sum + aux) * scale).backward()
            total += loss_sum.detach().to(torch.float64)
            if aux is not None:
                aux_total = aux.detach().to(torch.float64) + (0 if aux_total is None else aux_total)
        mean = self._global_sum(total) / max(global_tokens, 1.0)
        result = StepResult(mean.item(), int(global_tokens), int(input_tokens))
        if aux_total is not None:  # the reported loss stays the objective's; the balance term on its own
            result.aux_loss = (self._global_sum(aux_total) / max(global_tokens, 1.0)).item()
        return result

    # -- MoE balancing ---------------------------------------------------------------------------
    def update_expert_bias(self) -> dict[str, float]:
        """Aux-loss-free balancing after an optimizer step: every router's token counts are
        summed over the data-parallel ranks first, so all ranks move the (replicated) bias buffers
        the same way; then ct_model.moe.update_expert_bias. Returns per-layer load metrics,
        ``moe/layers.{i}.load_max`` / ``load_min`` / ``bias_range`` (empty for dense models)."""
        routers = ct_moe.routers(self.model)
        if not routers:
            return {}
        if self.dp_size > 1:
            loads = torch.stack([r.load for _, r in routers])  # one collective for all layers
            dist.all_reduce(loads, group=self.dp_group)
            for (_, router), load in zip(routers, loads):
                router.load.copy_(load)
        metrics = ct_moe.update_expert_bias(self.model)
        return {"moe/" + name.replace(".mlp.gate.", "."): value for name, value in metrics.items()}

    @torch.no_grad()
    def forward_only(self, microbatches: list[Microbatch], loss_fn: LossFn) -> StepResult:
        self.wrapped.eval()
        loss = self._checked(loss_fn)
        global_tokens, input_tokens = self._totals(microbatches)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for mb in self._on_device(microbatches):
            total += self._loss(mb, loss).to(torch.float64)
        mean = self._global_sum(total) / max(global_tokens, 1.0)
        self.wrapped.train()
        return StepResult(mean.item(), int(global_tokens), int(input_tokens))

    def clip_grad_norm(self, max_norm: float | None) -> float:
        """Global gradient norm before clipping (clips when max_norm is set)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        limit = float("inf") if not max_norm else max_norm
        norm = torch.nn.utils.clip_grad_norm_(params, limit, foreach=True)
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
            norm = norm.full_tensor()
        return float(norm)

    def optimizer_step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # -- checkpoints -----------------------------------------------------------------------------
    def _checkpoint_state(self) -> dict[str, Any]:
        if self.optimizer is None:
            return {"model": get_model_state_dict(self.model), "optimizer": {}}
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optimizer": optim_sd}

    def _load_checkpoint_state(self, state: dict[str, Any]) -> None:
        if self.optimizer is None or not state.get("optimizer"):
            set_model_state_dict(self.model, state["model"])
            return
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])

    def save_checkpoint(self, path: str, *, asynchronous: bool = False) -> Future | None:
        """Model + optimizer to a torch.distributed.checkpoint directory (collective on all ranks).

        The directory loads at another world size or strategy (single <-> DDP <-> FSDP2).
        ``asynchronous``: copy the state to CPU memory now and write it in a background thread;
        returns the future of the write (done when every rank's files and DCP's metadata are on
        disk), so training goes on while the disk works."""
        if not asynchronous:
            dcp.save(self._checkpoint_state(), checkpoint_id=str(path))
            return None
        return dcp.async_save(self._checkpoint_state(), checkpoint_id=str(path),
                              process_group=self._checkpoint_group(), no_dist=not _dist_ready())

    def _checkpoint_group(self) -> dist.ProcessGroup | None:
        """A gloo group of its own for the background writes: their collectives must not
        interleave with the training step's on the same group (and async save needs a CPU backend)."""
        if not _dist_ready():
            return None
        if self._async_group is None:
            self._async_group = dist.new_group(backend="gloo")
        return self._async_group

    def load_checkpoint(self, path: str, *, load_optimizer: bool = True) -> None:
        """Restore what ``save_checkpoint`` wrote (resharding to this layout)."""
        state = self._checkpoint_state()
        if not load_optimizer:
            state = {"model": state["model"]}
        check_same_model(path, state["model"])
        dcp.load(state, checkpoint_id=str(path))
        self._load_checkpoint_state(state)

    def full_state_items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(ct-model name, full tensor on CPU) for every parameter and persistent buffer, one at a
        time, on data-parallel rank 0; collective: every rank must iterate it to the end (it
        yields nothing elsewhere). An FSDP2 shard is all-gathered for that one tensor only
        (``DTensor.full_tensor``), so no process holds more than one full parameter beyond its
        own shards and whatever the consumer keeps (the HF writer: one shard)."""
        main = self.dp_rank == 0
        # The sharded state dict: clean names (no checkpoint/compile wrappers), nothing gathered.
        for name, value in get_model_state_dict(self.model).items():
            full = value.full_tensor() if isinstance(value, DTensor) else value
            out = full.detach().cpu() if main else None
            del full
            if main:
                yield name, out
            del out

    def full_model_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Unsharded ct-model state dict on CPU, on data-parallel rank 0 (None elsewhere)."""
        state = dict(self.full_state_items())
        return state if self.dp_rank == 0 else None


def build_native_engine(model: nn.Module, *, strategy: str = "single",
                        autocast_dtype: torch.dtype | None = None) -> NativeEngine:
    """strategy: 'single' or 'ddp' (FSDP2 lives in fsdp.py; ``build_engine`` dispatches all three)."""
    if strategy == "single":
        return NativeEngine(model, autocast_dtype=autocast_dtype)
    if strategy == "ddp":
        if not _dist_ready():
            raise RuntimeError("strategy 'ddp' needs torch.distributed initialised (launch with torchrun)")
        device_ids = [model_device.index] if (model_device := next(model.parameters()).device).type == "cuda" else None
        # No buffer broadcast: the only buffers are MoE routers' (a bias kept equal on every rank
        # by update_expert_bias, and per-rank token counts that rank 0's copy must not overwrite).
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
        return NativeEngine(model, wrapped, autocast_dtype=autocast_dtype)
    raise ValueError(f"unknown native strategy {strategy!r}; expected 'single' or 'ddp'")


class CheckpointModelMismatch(UserError):
    """The checkpoint holds another model: DCP would load the tensors both share and leave the rest."""


def describe_mismatch(saved: dict[str, Any], wanted: dict[str, Any]) -> str:
    """'' when the checkpoint's tensors (``saved``: name -> shape or None) are the model's
    (``wanted``), else what differs, a few names of each kind."""
    missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
    shapes = sorted(n for n in set(saved) & set(wanted)
                    if saved[n] is not None and wanted[n] is not None and tuple(saved[n]) != tuple(wanted[n]))

    def few(names):
        return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")
    return "; ".join(part for part in (
        f"{len(missing)} tensors the model has and the checkpoint lacks: {few(missing)}" if missing else "",
        f"{len(extra)} tensors the checkpoint has and the model lacks: {few(extra)}" if extra else "",
        f"{len(shapes)} with other shapes: {few(shapes)}" if shapes else "") if part)


def check_same_model(path: str, model_state: dict[str, Any]) -> None:
    """Strict loading: the checkpoint's model tensors are exactly this model's, by name and shape
    (DCP alone loads the requested keys and ignores the checkpoint's others, a partial load)."""
    saved = {key[len("model."):]: getattr(meta, "size", None)
             for key, meta in dcp.FileSystemReader(path).read_metadata().state_dict_metadata.items()
             if key.startswith("model.")}
    wanted = {name: tuple(value.shape) for name, value in model_state.items() if isinstance(value, torch.Tensor)}
    if found := describe_mismatch(saved, wanted):
        raise CheckpointModelMismatch(f"{path}: written for another model ({found}); nothing was loaded. Resume "
                                      "with the model it was written for, or start a new run_dir")
