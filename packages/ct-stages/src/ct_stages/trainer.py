"""The training loop, top to bottom in one place.

engine.forward_backward(microbatches) -> clip -> optimizer step -> scheduler -> metrics ->
checkpoint -> eval. The engine hides the parallel layout; the objective supplies microbatches and the
loss; the loader yields this rank's share of each global batch, each row carrying its global
sequence index (``sequence_index``), so nothing here re-derives the loader's sharding.
"""

from __future__ import annotations

import logging
import collections
import math
import os
import statistics
import random
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from ct_parallel import is_distributed

from .checkpoint import CheckpointError, CheckpointManager
from .metrics import Reporter, documents, memory_gib
from .progress import Progress
from .objective import Objective

log = logging.getLogger("ct_stages")


@dataclass(frozen=True)
class TrainerConfig:
    max_steps: int = 200
    global_batch_size: int = 16  # sequences per optimizer step, all ranks together
    micro_batch_size: int = 8  # sequences per forward/backward on one rank
    seed: int = 1234
    log_every: int = 10
    checkpoint_every: int = 100
    keep_last_checkpoints: int = 2
    eval_every: int = 0  # 0: no eval during training (ct-eval scores the exports)
    eval_batches: int = 8  # fixed monitor batches (global batches) for eval_every
    max_nonfinite_steps: int = 5  # skipped steps tolerated before stopping with a checkpoint
    # Watchdog: warn when a step takes this many times the median step (0: off). A true hang is
    # ended by the collective timeout (distributed.timeout_minutes) instead.
    slow_step_factor: float = 5.0
    # Write checkpoints in the background (every engine): the loop is blocked only while the
    # state is copied to memory; a checkpoint counts once its files and manifest are on disk.
    async_checkpoint: bool = False

    def __post_init__(self) -> None:
        for name in ("max_steps", "global_batch_size", "micro_batch_size", "log_every", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"trainer.{name} must be an integer >= 1, got {value!r}")
        if self.slow_step_factor != 0 and self.slow_step_factor <= 1:
            raise ValueError(f"trainer.slow_step_factor must be 0 (off) or > 1, got {self.slow_step_factor}")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"trainer.global_batch_size={self.global_batch_size} must be a multiple of "
                             f"trainer.micro_batch_size={self.micro_batch_size}")

    def check_layout(self, dp_size: int) -> None:
        if self.global_batch_size % (self.micro_batch_size * dp_size):
            raise ValueError(
                f"trainer.global_batch_size={self.global_batch_size} must be divisible by "
                f"trainer.micro_batch_size x data-parallel size = {self.micro_batch_size} x {dp_size}")


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (too many non-finite steps); a checkpoint was written."""


class Preempted(TrainingStopped):
    """SIGTERM (what SLURM sends before it kills or requeues a job) or SIGINT (Ctrl-C): the step in
    flight finished, a checkpoint was written, and the entry point exits with 128 + the signal
    (143, 130)."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + int(self.signum)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _StopFlag:
    """Set by SIGTERM or SIGINT; every rank learns of it after the same step (one tiny all-reduce
    a step under several processes), so all of them save the same checkpoint together.

    A second Ctrl-C stops at once (KeyboardInterrupt, no checkpoint). Under torch's elastic
    launcher a Ctrl-C reaches each worker twice, from the terminal and relayed by the launcher,
    within moments: a repeat inside ``repeat_window_s`` is that same Ctrl-C."""

    def __init__(self, device: torch.device, repeat_window_s: float | None = None):
        self.signum: int | None = None
        self.device = device
        self.repeat_window_s = (1.0 if "TORCHELASTIC_RUN_ID" in os.environ else 0.0) \
            if repeat_window_s is None else repeat_window_s
        self._first = 0.0
        self._previous: dict[int, Any] = {}

    @property
    def raised(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "_StopFlag":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            repeated = signum == signal.SIGINT and time.monotonic() - self._first > self.repeat_window_s
            if repeated:
                log.warning("second Ctrl-C: stopping now, without a checkpoint")
                raise KeyboardInterrupt
            return
        self.signum, self._first = signum, time.monotonic()
        again = "; Ctrl-C again to stop at once, without one" if signum == signal.SIGINT else ""
        log.warning("%s: finishing this step, then writing a checkpoint and stopping%s",
                    signal.Signals(signum).name, again)

    def agreed(self) -> int | None:
        """The signal that stops the run, agreed by every rank (None: go on)."""
        if not is_distributed():
            return self.signum
        flag = torch.tensor([float(self.signum or 0)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class LoopState:
    step: int = 0
    consumed_tokens: int = 0
    skipped_steps: int = 0
    last_loss: float = float("nan")


class Trainer:
    """Runs ``config.max_steps`` optimizer steps of ``objective`` on ``engine`` over ``loader``.

    ``checkpoints`` saves and finds resumable states, ``reporter`` takes the figures, ``evaluate``
    (optional) returns monitor metrics every ``config.eval_every`` steps."""

    def __init__(self, config: TrainerConfig, engine, objective: Objective, loader, scheduler,
                 checkpoints: CheckpointManager, reporter: Reporter, *, clip_grad: float | None = None,
                 evaluate: Callable[[], dict[str, float]] | None = None):
        self.config = config
        self.engine = engine
        self.objective = objective
        self.loader = loader
        self.scheduler = scheduler
        self.checkpoints = checkpoints
        self.reporter = reporter
        self.metrics = reporter.metrics
        self.clip_grad = clip_grad
        self.evaluate = evaluate
        self.state = LoopState()
        self._saved_step: int | None = None  # step of the newest checkpoint on disk
        self._step_times: collections.deque[float] = collections.deque(maxlen=50)

    # -- checkpoint state ------------------------------------------------------------------------
    def _trainer_state(self) -> dict[str, Any]:
        return {"step": self.state.step, "consumed_tokens": self.state.consumed_tokens,
                "skipped_steps": self.state.skipped_steps, "scheduler": self.scheduler.state_dict(),
                "loader": self.loader.state_dict(), "rng": rng_state(),
                # which share of the data this rank's loader state is (a resume at another layout merges them)
                "dp_rank": self.engine.dp_rank, "dp_size": self.engine.dp_size}

    def save(self) -> None:
        start = time.perf_counter()
        asynchronous = self.config.async_checkpoint
        path = self.checkpoints.save(self.state.step, self.engine, self._trainer_state(), asynchronous=asynchronous)
        self._saved_step = self.state.step
        # blocked_s: how long the training loop waited (for an async save: the copy to memory).
        self.metrics.write({"event": "checkpoint", "step": self.state.step, "path": str(path),
                            "async": asynchronous, "blocked_s": time.perf_counter() - start})
        if not asynchronous:
            self.metrics.write({"event": "checkpoint_complete", "step": self.state.step, "path": str(path)})

    def _checkpoint_written(self, path) -> None:
        if path is not None:
            self.metrics.write({"event": "checkpoint_complete", "step": int(path.name.split("_")[-1]),
                                "path": str(path)})

    def wait_for_checkpoint(self) -> None:
        """Block until an async checkpoint in flight is complete (before any exit)."""
        self._checkpoint_written(self.checkpoints.wait())

    def resume_if_possible(self) -> bool:
        latest = self.checkpoints.latest_verified()
        if latest is None:
            return False
        saved = self.checkpoints.load(latest, self.engine)
        self.scheduler.load_state_dict(saved["scheduler"])
        try:
            self.loader.load_state_dict(saved["loader"])
        except ValueError as err:  # the data, batch, context or seed differ from the saved run's
            raise CheckpointError(f"{latest}: its data-loader state does not fit this run ({err}); rerun with "
                                  "the run's saved configuration (config.json beside checkpoints/), or choose "
                                  "a new run_dir") from err
        set_rng_state(saved["rng"])
        self.state.step = saved["step"]
        self.state.consumed_tokens = saved["consumed_tokens"]
        self.state.skipped_steps = saved["skipped_steps"]
        self._saved_step = self.state.step
        log.info("resumed from %s (step %d)", latest, self.state.step)
        self.metrics.write({"event": "resume", "step": self.state.step, "path": str(latest)})
        return True

    # -- the loop --------------------------------------------------------------------------------
    def fit(self) -> LoopState:
        cfg, out = self.config, self.reporter
        batches: Iterator = iter(self.loader)
        progress = Progress(cfg.max_steps, self.state.step, enabled=out.show_progress and out.is_main,
                            title=out.title)
        with progress, _StopFlag(out.device) as stop:
            while self.state.step < cfg.max_steps:
                record = self._train_step(next(batches))
                progress.update(self.state.step, record)
                if self.state.step % cfg.log_every == 0 or self.state.step == cfg.max_steps:
                    if out.is_main and not progress.interactive:
                        log.info(_format(record))
                if self.state.step % cfg.checkpoint_every == 0 and self.state.step < cfg.max_steps:
                    self.save()
                if cfg.eval_every and self.state.step % cfg.eval_every == 0 and self.evaluate:
                    self.metrics.write({"event": "eval", "step": self.state.step, **self.evaluate()})
                self._checkpoint_written(self.checkpoints.poll())
                signum = stop.agreed()
                if signum and self.state.step < cfg.max_steps:
                    self._stop_preempted(signum)
        if self._saved_step != self.state.step:  # a rerun of a finished run rewrites nothing
            self.save()
        self.wait_for_checkpoint()
        return self.state

    def _train_step(self, batch) -> dict[str, Any]:
        # Attention FLOPs (for MFU) follow the document lengths: counted on the host batch,
        # before any device sees it, and outside the timed step.
        docs = documents(batch)
        start = time.perf_counter()
        microbatches = self.objective.microbatches(batch, self.config.micro_batch_size)
        self.engine.zero_grad()
        result = self.engine.forward_backward(microbatches, self.objective.loss)
        grad_norm = self.engine.clip_grad_norm(self.clip_grad)
        finite = math.isfinite(result.loss) and math.isfinite(grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        moe: dict[str, float] = {}
        if finite:
            self.engine.optimizer_step()
            moe = self._balance_experts()
        else:
            self._skip(result.loss, grad_norm)
        # The schedule is a function of the step count, skipped steps included.
        self.scheduler.step()
        self.state.step += 1
        self.state.consumed_tokens += result.input_tokens
        self.state.last_loss = result.loss
        if not finite and self.state.skipped_steps > self.config.max_nonfinite_steps:
            self._stop_nonfinite()
        seconds = time.perf_counter() - start
        record = {
            "event": "train", "step": self.state.step, "loss": result.loss, "lr": lr,
            "grad_norm": grad_norm, **self.reporter.throughput.measure(result.input_tokens, seconds, docs),
            "step_time_s": seconds, "consumed_tokens": self.state.consumed_tokens,
            "memory_gib": memory_gib(self.reporter.device), "skipped_steps": self.state.skipped_steps,
            **({} if result.aux_loss is None else {"aux_loss": result.aux_loss}), **moe,
        }
        self.metrics.write(record)
        self._watch(seconds)
        return record

    def _balance_experts(self) -> dict[str, float]:
        """MoE models: the expert-bias update (aux-loss-free balancing, outside the optimizer) and
        its per-layer load figures for the log. Engines without it give nothing; megatron's
        routers move their own bias (by the same rule) and its engine reports the figures only. A skipped step's token
        counts roll into the next update."""
        update = getattr(self.engine, "update_expert_bias", None)
        return update() if update is not None else {}

    def _watch(self, seconds: float) -> None:
        """Warn about a step far slower than the recent median (a straggler, a stalled disk)."""
        factor, times = self.config.slow_step_factor, self._step_times
        if factor and len(times) >= 5:
            median = statistics.median(times)
            if seconds > factor * median:
                log.warning("step %d took %.2f s, %.1fx the median step (%.2f s)", self.state.step, seconds,
                            seconds / median, median)
                self.metrics.write({"event": "slow_step", "step": self.state.step, "seconds": seconds,
                                    "median_seconds": median})
        times.append(seconds)

    def _skip(self, loss: float, grad_norm: float) -> None:
        self.engine.zero_grad()
        self.state.skipped_steps += 1
        log.warning("step %d: non-finite loss %s / grad norm %s: step skipped (%d so far)",
                    self.state.step + 1, loss, grad_norm, self.state.skipped_steps)

    def _stop_preempted(self, signum: int = signal.SIGTERM) -> None:
        if self._saved_step != self.state.step:
            self.save()
        self.wait_for_checkpoint()
        name = signal.Signals(signum).name
        self.metrics.write({"event": "preempted", "step": self.state.step, "signal": name})
        raise Preempted(f"stopped by {name} after step {self.state.step} with a checkpoint; "
                        "run the same command again to resume", signum)

    def _stop_nonfinite(self) -> None:
        # Saved after the scheduler and the step count moved on together, so a resume continues
        # with the LR of the next step.
        self.save()
        self.wait_for_checkpoint()
        raise TrainingStopped(
            f"{self.state.skipped_steps} non-finite steps (limit trainer.max_nonfinite_steps="
            f"{self.config.max_nonfinite_steps}); stopped at step {self.state.step} with a checkpoint. "
            "Lower optimizer.lr, enable optimizer.clip_grad, or check the data.")


def _format(record: dict[str, Any]) -> str:
    mfu = "n/a" if record["mfu"] is None else f"{record['mfu']:.1%}"
    return (f"step {record['step']:>6}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
            f"gnorm {record['grad_norm']:.3f}  {record['tokens_per_s_per_device']:,.0f} tok/s/device  "
            f"mfu {mfu}  mem {record['memory_gib']:.2f} GiB")
