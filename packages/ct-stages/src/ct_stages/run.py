"""Run one phase from a RunConfig: ``setup`` builds everything, ``Trainer.fit`` trains, ``finish``
exports, and ``close`` releases what setup took (loader threads, wandb, process groups).

A rerun of a finished run returns its summary before setup (nothing is written). setup order:
refuse unsupported layouts -> process groups -> device defaults (precision=auto, TF32, fp8 ->
compile; decided once, logged) -> peak FLOP/s (before any other work) -> the model's config ->
run directory (rank 0: lock it, compare with the run saved there, then write config.json; see
rundir.py) -> sample data and tokenizer -> model (fresh or from the previous phase's HF export)
-> data -> objective (loss + teacher) -> engine, optimizer, schedule -> trainer -> resume.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import ct_model
from ct_model import UserError
from ct_parallel import (DistInfo, barrier, build_engine, check_settings,
                         init_distributed, is_distributed)
from ct_parallel import main_first, megatron_can_run, shutdown_distributed
from ct_precision import apply_tf32

from .checkpoint import CheckpointManager
from .config import RunConfig
from .metrics import MetricsLog, PeakFlops, Reporter, Throughput, plot_loss_curve
from .optim import build_optimizer, build_scheduler
from .rundir import (NoLock, RunDirError, RunDirLock, check_saved_run, finished_summary, make_run_dir,
                     write_json)
from .objective import Objective
from .stages import StageConfig, build_loss
from .trainer import LoopState, Trainer

log = logging.getLogger("ct_stages")


@dataclass
class PhaseResult:
    run_dir: Path
    hf_dir: Path
    final_loss: float
    steps: int
    summary: dict[str, Any]


@dataclass
class Phase:
    """What setup built and train/finish use."""

    run: RunConfig
    info: DistInfo
    tokenizer: Any
    model_config: ct_model.ModelConfig
    engine: Any
    loader: Any
    trainer: Trainer
    reporter: Reporter
    owns_process_group: bool
    lock: Any = None  # RunDirLock on global rank 0, released by close


def run_phase(config: RunConfig | Mapping[str, Any]) -> PhaseResult:
    run = config if isinstance(config, RunConfig) else RunConfig.from_dict(config)
    done = finished_run(run)
    if done is not None:
        return done
    phase = setup(run)
    try:
        state = phase.trainer.fit()
        return finish(phase, state)
    finally:
        close(phase)


# ------------------------------------------------------------------------------------- checks


def check_process_count(run: RunConfig, processes: int) -> None:
    """distributed=single runs one process: refused (one line) before a launch of several, and in
    each rank before its process group exists."""
    d = run.distributed
    if processes > 1 and d.engine != "megatron" and d.strategy == "single":
        raise UserError(f"distributed.strategy=single runs one process, but {processes} were asked for "
                        "(--nproc-per-node / torchrun); use distributed=ddp or distributed=fsdp2, or one process")


def check_supported(run: RunConfig) -> None:
    """Refuse, before any work, layouts this machine or this version cannot run."""
    d = run.distributed
    if d.engine == "megatron" and run.optimizer.name == "muon":
        # megatron's optimizer wrappers hold TP-sharded, fused (interleaved qkv) matrices and
        # flattened distributed-optimizer shards: our Muon would orthogonalise the wrong matrices.
        raise UserError("optimizer.name=muon is not supported on distributed.engine=megatron; use the native "
                        "engine (distributed=single, ddp or fsdp2) or optimizer=adamw")
    check_process_count(run, int(os.environ.get("WORLD_SIZE", "1")))
    try:  # before the CUDA check: the answer does not depend on the machine
        # a layout this version cannot run, or a precision, checkpointing or compile x layout
        # pair that cannot run: named, both keys, now
        check_settings(d, run.precision, run.activation_checkpointing, run.compile)
    except ValueError as err:
        raise UserError(str(err)) from None
    if d.engine == "megatron" and not megatron_can_run():
        raise UserError("distributed.engine=megatron needs CUDA (megatron-core calls it unconditionally) and "
                        "this machine has none; on CPU use distributed=single, ddp or fsdp2 (the native engine)")
    if d.engine == "megatron":
        # Before data and model work: Transformer Engine missing on a GPU is refused naming the key.
        from ct_parallel.megatron.transformer_impl import use_transformer_engine

        use_transformer_engine(d)
    if run.stage.kind == "midtrain" and run.stage.distill.backend == "modelopt":
        if d.engine != "megatron":
            raise UserError(f"stage.distill.backend=modelopt with distributed.engine={d.engine}: modelopt distils "
                            "megatron GPTModels; use distributed.engine=megatron or stage.distill.backend=ct")
        from ct_parallel.megatron.modelopt_kd import check_layout  # megatron is about to be imported anyway

        try:
            check_layout(d)
        except ValueError as err:
            raise UserError(str(err)) from None


def resolve_init_from(run: RunConfig) -> Path | None:
    path = run.init_path
    if path is not None and (err := ct_model.hf.run_directory_error(path)) is not None:
        raise UserError(f"init_from={run.init_from}: {err}")
    if path is not None and not (path / "config.json").is_file():
        raise UserError(f"init_from={run.init_from}: no HF checkpoint there (config.json missing); run the "
                        "previous phase first or point init_from at an HF model directory")
    return path


# ------------------------------------------------------------------------------------- pieces


def prepare_sample_data(run: RunConfig, is_main: bool) -> Path | None:
    if not run.sample_data.dir:
        return None
    from ct_data import sample as sample_mod

    out = Path(run.sample_data.dir)
    main_first(is_main, lambda: sample_mod.build(out, seed=run.sample_data.seed, scale=run.sample_data.scale))
    return out


def prepare_tokenizer(run: RunConfig, init_from: Path | None, sample_dir: Path | None, is_main: bool):
    import ct_data

    tok = run.tokenizer
    if tok.path:
        try:
            return ct_data.load_tokenizer(tok.path)
        except (OSError, ValueError) as err:
            raise UserError(f"tokenizer.path={tok.path}: cannot load a tokenizer there "
                            f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from err
    if init_from is not None and (init_from / "tokenizer.json").is_file():
        return ct_data.load_tokenizer(str(init_from))
    if sample_dir is None:
        raise UserError("tokenizer.path is not set and there is no sample data to train one on (sample_data.dir)")
    from ct_data import sample as sample_mod

    sources = (run.data or {}).get("sources") or []
    own = [str(s.get("name")) for s in sources if isinstance(s, dict) and "{sample_dir}" not in str(s.get("path"))]
    (log.warning if own else log.info)(
        "tokenizer: a byte-level BPE of %d tokens trained on the sample corpus (tokenizer.path is not set)%s",
        tok.vocab_size, f"; it was not trained on your data ({', '.join(own)}): for real text set "
        "tokenizer.path=DIR (a directory holding tokenizer.json, e.g. Llama-3.2's) and model.vocab_size "
        "to at least its vocabulary" if own else "")
    # Trained once per sample-data directory (under run_dir by default) and reused from there.
    return main_first(is_main, lambda: sample_mod.build_tokenizer(sample_dir, tok.vocab_size,
                                                                  split_digits=tok.split_digits))


def phase_model_config(run: RunConfig, init_from: Path | None, warn: bool = False) -> ct_model.ModelConfig:
    """The model this phase trains (the preset, or init_from's config.json), with the context and
    RoPE base the run asks for. Reads only: a rerun compares it with the saved run first."""
    config = ct_model.hf.read_hf_config(init_from)[0] if init_from is not None else run.model.resolve()
    changes = {}
    if run.seq_len > config.max_position_embeddings:
        changes["max_position_embeddings"] = run.seq_len
        if warn:  # RoPE extrapolates past the positions the model was built (or trained) for
            log.warning("seq_len=%d exceeds the model's max_position_embeddings=%d: raised to %d; positions past "
                        "%d were never seen in training (lower seq_len, or set rope_theta_scale for a long "
                        "context)", run.seq_len, config.max_position_embeddings, run.seq_len,
                        config.max_position_embeddings)
    if run.rope_theta_scale != 1.0:
        changes["rotary_base"] = config.rotary_base * run.rope_theta_scale
    # RoPE is computed from the config at every call, so changing it needs no weight surgery.
    return config.replace(**changes) if changes else config


def build_phase_model(run: RunConfig, init_from: Path | None, config: ct_model.ModelConfig):
    """The phase's model (``config``) on the ``meta`` device (nothing allocated) and the weight
    source the parallelize step fills this rank's shards from: the previous phase's HF export
    (read lazily, a slice at a time) or fresh layout-independent initial values."""
    from ct_model.init import SeededInit

    model = ct_model.build_model(config, device="meta")
    if init_from is None:
        return model, SeededInit(model, run.trainer.seed)
    log.info("initialised from %s", init_from)
    return model, ct_model.hf.HFWeights(init_from)


def build_objective(run: RunConfig, model_config, info: DistInfo, loader_factory) -> Objective:
    """The phase's loss and, for mid-training with ct-distill, the teacher that annotates its
    microbatches. ``loader_factory(rank, world)`` builds the loader of rank ``rank`` of ``world``:
    a cached teacher is written by every process over its own loader's rows."""
    d = run.stage.distill
    if run.stage.kind != "midtrain":
        return Objective(build_loss(run.stage, run.loss))
    if d.backend == "modelopt":  # the teacher runs inside the engine's model, not over the batches
        teacher = _modelopt_teacher(d, model_config, info.device)
        return Objective(build_loss(run.stage, run.loss, engine_teacher=teacher))
    from .distill import build_teacher_annotator, cache_share

    t = run.trainer
    total_sequences = t.max_steps * t.global_batch_size
    # A chunked loss takes an online teacher's hidden states and projects them per chunk. The cache
    # runs the teacher a micro-batch at a time, as the online teacher does, whatever the layout.
    annotate = build_teacher_annotator(d, model_config, run.run_path, info.device,
                                       total_sequences, cache_share(info, t.global_batch_size, loader_factory),
                                       hidden=run.loss.chunk_tokens > 0,
                                       compute_dtype=run.precision.autocast_dtype,
                                       rows_per_forward=t.micro_batch_size)
    return Objective(build_loss(run.stage, run.loss), annotate)


def _modelopt_teacher(distill, model_config, device: torch.device) -> torch.nn.Module:
    """backend=modelopt: the teacher ct-model the megatron engine converts the student around."""
    from .distill import load_teacher

    try:
        return load_teacher(distill, model_config, device).model
    except ValueError as err:  # e.g. a vocabulary that differs from the student's
        raise UserError(str(err)) from err


def fixed_batch_evaluator(engine, mixture, tokenizer, run: RunConfig, info: DistInfo):
    """Next-token loss on ``trainer.eval_batches`` global batches drawn once from the phase's mixture
    with another seed: a fixed monitor set (not a held-out split; ct-eval scores held-out data)."""
    t = run.trainer
    loader = mixture.build_loader(tokenizer, run.seq_len, t.global_batch_size, t.seed + 1,
                                  info.dp_rank, info.dp_size, prefetch=0, workers=0)
    batches = [next(loader) for _ in range(t.eval_batches)]
    plain = Objective(build_loss(StageConfig(), run.loss))  # plain CE and no teacher, whatever the phase's stage

    def evaluate() -> dict[str, float]:
        micro = [mb for b in batches for mb in plain.microbatches(b, t.micro_batch_size)]
        result = engine.forward_only(micro, plain.loss)
        return {"eval_loss": result.loss, "eval_tokens": result.tokens}

    return evaluate


def export_hf(weights, model_config, tokenizer, hf_dir: Path) -> None:
    """The phase's HF export: ``weights`` is (ct-model name, full tensor) pairs, one at a time (an
    engine's ``full_state_items()``), or a state dict; streamed into safetensors shards
    (ct_model.hf.write_hf: at most one shard in memory), then the tokenizer beside them."""
    items = weights.items() if isinstance(weights, dict) else weights
    ids = ct_model.hf.token_ids(tokenizer.bos_id, tokenizer.stop_ids, tokenizer.pad_id)
    ct_model.hf.write_hf(items, model_config, hf_dir, token_ids=ids)
    tokenizer.save(str(hf_dir))


# ------------------------------------------------------------------------------------- phase


def _start_run_dir(run: RunConfig, info: DistInfo, model_config) -> tuple[Path, RunDirLock | NoLock]:
    """Claim ``run_dir`` before anything is written there: a path that is a file or cannot be
    written, a saved run with another configuration, or another process holding it, exits 2 on
    every rank. Only global rank 0 checks, locks and writes; the others learn its verdict."""
    run_dir = run.run_path
    lock = NoLock()
    error = None
    if info.is_main:
        try:
            make_run_dir(run_dir)
            lock = RunDirLock(run_dir).acquire()
            check_saved_run(run_dir, run.to_dict(), model_config.to_dict())  # reads only
            write_json(run_dir / "config.json", run.to_dict())
        except UserError as err:
            lock.release()
            error = err
    verdict = _from_main(None if error is None else str(error))
    if error is not None:
        raise error
    if verdict is not None:
        raise RunDirError(verdict)
    return run_dir, lock


def _from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a barrier besides)."""
    if not is_distributed():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def finished_run(run: RunConfig) -> PhaseResult | None:
    """A rerun of a run that reached trainer.max_steps: said, and nothing written (not even the
    lock). A rerun with another configuration is refused as a resume would be."""
    summary = finished_summary(run.run_path, run.trainer.max_steps) if run.run_path.is_dir() else None
    if summary is None:
        return None
    init_from = resolve_init_from(run)
    check_saved_run(run.run_path, run.to_dict(), phase_model_config(run, init_from).to_dict())
    log.info("run_dir=%s: finished at step %d (summary.json); nothing to do. Raise trainer.max_steps to train "
             "further, or choose a new run_dir= for a new run", run.run_path, summary["steps"])
    hf_dir = Path(summary.get("hf_dir") or run.run_path / "hf")
    loss = summary.get("final_loss")
    return PhaseResult(run.run_path, hf_dir, float("nan") if loss is None else loss, summary["steps"], summary)


def resolve_device_settings(run: RunConfig, info: DistInfo) -> RunConfig:
    """The run as this process's device runs it: precision.dtype=auto -> bf16 on CUDA / fp32 on
    CPU, compile on for fp8 on CUDA (native engines), and CUDA's TF32 mode set for the process.
    The main rank logs each choice and its reason. Everything after setup sees only the result."""
    resolved, notes = run.resolved_for(info.device)
    tf32 = apply_tf32(resolved.precision, info.device)
    if tf32 is not None:
        notes.append((logging.INFO, tf32))
    if info.is_main:
        for level, line in notes:
            log.log(level, line)
    return resolved


def setup(run: RunConfig) -> Phase:
    check_supported(run)
    init_from = resolve_init_from(run)
    owns_process_group = not is_distributed()
    info = init_distributed(run.distributed)
    try:
        run = resolve_device_settings(run, info)
        # Measured first, before data building or prefetch threads compete for the cores.
        peak = PeakFlops.for_device(info.device, run.logging.peak_flops)
        try:
            run.trainer.check_layout(info.dp_size)
        except ValueError as err:
            raise UserError(str(err)) from err
        model_config = phase_model_config(run, init_from, warn=info.is_main)
        run_dir, lock = _start_run_dir(run, info, model_config)
        try:
            return _build(run, info, init_from, model_config, peak, owns_process_group, lock)
        except BaseException:
            lock.release()
            raise
    except BaseException:
        if owns_process_group:
            shutdown_distributed(run.distributed)
        raise


def _build(run: RunConfig, info: DistInfo, init_from: Path | None, model_config, peak: PeakFlops, owns: bool,
           lock) -> Phase:
    import ct_data

    run_dir = run.run_path
    torch.manual_seed(run.trainer.seed)
    sample_dir = prepare_sample_data(run, info.is_main)
    tokenizer = prepare_tokenizer(run, init_from, sample_dir, info.is_main)
    check_vocab(tokenizer.vocab_size, model_config.vocab_size, warn=info.is_main)
    model, weights = build_phase_model(run, init_from, model_config)
    if info.is_main:
        write_json(run_dir / "model_config.json", model_config.to_dict())

    mixture = ct_data.load_data_config(run.data, sample_dir=sample_dir)
    t = run.trainer

    def loader_factory(rank: int = info.dp_rank, world: int = info.dp_size):
        return mixture.build_loader(tokenizer, run.seq_len, t.global_batch_size, t.seed, rank, world)

    # A cached teacher is written by every process, each over its own loader's rows.
    objective = build_objective(run, model_config, info, loader_factory)
    # The parallelize step: each rank materialises only what it holds, from the weight source.
    engine = build_engine(model, run.distributed, precision=run.precision,
                          activation_checkpointing=run.activation_checkpointing, compile=run.compile,
                          weights=weights, device=info.device, loss=objective.loss)
    engine.setup_optimizer(lambda named: build_optimizer(named, run.optimizer))
    scheduler = build_scheduler(engine.optimizer, t.max_steps, run.schedule)
    loader = loader_factory()
    evaluate = fixed_batch_evaluator(engine, mixture, tokenizer, run, info) if t.eval_every else None

    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=info.is_main, wandb=run.logging.wandb,
                         run_config=run.to_dict())
    throughput = Throughput.for_model(model_config, run.seq_len, peak, info.world_size)
    reporter = Reporter(metrics, throughput, info.device, info.is_main, run.logging.progress, run.phase.name)
    layout = {"engine": run.distributed.engine, "layout": run.distributed.to_dict()}
    checkpoints = CheckpointManager(run_dir / "checkpoints", t.keep_last_checkpoints, metadata=layout)
    trainer = Trainer(t, engine, objective, loader, scheduler, checkpoints, reporter,
                      clip_grad=run.optimizer.clip_grad, evaluate=evaluate)
    resumed = trainer.resume_if_possible()
    # One row per step: the rows of steps after the checkpoint (logged by the run that stopped)
    # are dropped, since this run trains those steps again and logs them anew.
    metrics.discard_after(trainer.state.step)
    metrics.write({"event": "start", "step": trainer.state.step, "optimizer": type(engine.optimizer).__name__,
                   **throughput.describe()})
    if info.is_main:
        log.info("phase %s: %s params, %s x %d, peak %.1f GFLOP/s per device (%s)%s", run.phase.name,
                 f"{ct_model.count_parameters(model_config):,}", info.device, info.world_size, peak.value / 1e9,
                 peak.source, f", resumed at step {trainer.state.step}" if resumed else "")
    return Phase(run, info, tokenizer, model_config, engine, loader, trainer, reporter, owns, lock)


# A tokenizer this much smaller than the embedding leaves most of its rows untrained.
SMALL_VOCAB_FRACTION = 0.5


def check_vocab(tokenizer_size: int, model_size: int, warn: bool = True) -> None:
    if tokenizer_size > model_size:
        raise UserError(f"the tokenizer has {tokenizer_size} tokens but model.vocab_size is {model_size}; "
                        "raise model.vocab_size or use a smaller tokenizer")
    if warn and tokenizer_size < SMALL_VOCAB_FRACTION * model_size:
        log.warning("the tokenizer has %d tokens but model.vocab_size is %d: %d embedding rows will never be "
                    "used; set model.vocab_size=%d (or a multiple of 64 above it)", tokenizer_size, model_size,
                    model_size - tokenizer_size, tokenizer_size)


def finish(phase: Phase, state: LoopState) -> PhaseResult:
    """HF export, loss curve and summary.json (what the next phase and ct-recipe read)."""
    run, info = phase.run, phase.info
    run_dir, hf_dir = run.run_path, run.run_path / "hf"
    peak = phase.reporter.throughput.peak
    summary = {"phase": run.phase.name, "steps": state.step, "final_loss": state.last_loss,
               "consumed_tokens": state.consumed_tokens, "skipped_steps": state.skipped_steps,
               "optimizer": type(phase.engine.optimizer).__name__, "peak_flops": peak.value,
               "peak_source": peak.source, "data": data_summary(phase.loader), "hf_dir": str(hf_dir)}
    # Collective: the engine gathers one full tensor at a time and the main rank writes it; the
    # other ranks walk the same stream to take part in the gathers (it yields nothing there).
    items = phase.engine.full_state_items()
    if not info.is_main:
        for _ in items:
            pass
    else:
        export_hf(items, phase.model_config, phase.tokenizer, hf_dir)
        plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png", f"{run.phase.name} loss")
        write_json(run_dir / "summary.json", summary)  # strict JSON: a NaN loss is null
    barrier()
    return PhaseResult(run_dir, hf_dir, state.last_loss, state.step, summary)


def data_summary(loader) -> dict[str, Any]:
    """This rank's documents used and skipped (by reason) per source: nothing is dropped silently."""
    if not hasattr(loader, "stats"):
        return {}
    stats = loader.stats()
    return {"packing_efficiency": stats["packing_efficiency"],
            "sources": {name: {"docs": s["docs"], "skipped": s["skipped"], "epoch": s["epoch"]}
                        for name, s in stats["sources"].items()}}


def close(phase: Phase) -> None:
    if hasattr(phase.loader, "close"):
        phase.loader.close()
    phase.reporter.metrics.close()
    if phase.lock is not None:
        phase.lock.release()
    if phase.owns_process_group:
        shutdown_distributed(phase.run.distributed)
