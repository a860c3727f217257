"""Run one phase from a resolved configuration (a plain dict, e.g. a composed Hydra config).

Order: process groups -> run directory -> sample data and tokenizer -> model (fresh or from the
previous phase's HF export) -> engine -> optimizer and schedule -> loader -> resume -> train ->
evaluate -> HF export (+ tokenizer) -> loss curve.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import ct_model
from ct_parallel import DistributedConfig, build_engine, check_combination, init_distributed
from ct_precision import PrecisionConfig

from .checkpoint import CheckpointManager
from .metrics import MetricsLog, flops_per_token, peak_flops, plot_loss_curve
from .optim import OptimizerConfig, ScheduleConfig, build_optimizer, build_scheduler
from .stages import Stage, StageConfig, cross_entropy_sum
from .trainer import Trainer, TrainerConfig

log = logging.getLogger("ct_stages")


class UserError(ValueError):
    """Bad configuration or missing input: reported without a traceback (exit status 2)."""


def _dataclass_from(cls, values: dict | None, section: str):
    values = dict(values or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"{section}: unknown key(s) {unknown}; known: {sorted(known)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise UserError(f"{section}: {err}") from err


@dataclass
class PhaseResult:
    run_dir: Path
    hf_dir: Path
    final_loss: float
    steps: int
    summary: dict[str, Any]


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _main_first(is_main: bool, fn):
    """Run ``fn`` on rank 0, then on the others (which then find its cached output)."""
    result = fn() if is_main else None
    _barrier()
    return result if is_main else fn()


# ------------------------------------------------------------------------------------- pieces


def model_config_from(cfg: dict) -> ct_model.ModelConfig:
    values = dict(cfg["model"])
    values.pop("preset", None)
    try:
        return ct_model.ModelConfig.from_dict(values)
    except ValueError as err:
        raise UserError(f"model: {err}") from err


def resolve_init_from(cfg: dict) -> Path | None:
    init_from = cfg.get("init_from")
    if not init_from:
        return None
    # Lexical normalisation: "run/../prev/hf" must work before "run" exists.
    path = Path(os.path.normpath(init_from))
    if not (path / "config.json").is_file():
        raise UserError(f"init_from={init_from}: no HF checkpoint there (config.json missing); run the "
                        "previous phase first or point init_from at an HF model directory")
    return path


def prepare_sample_data(cfg: dict, is_main: bool) -> Path | None:
    sample = cfg.get("sample_data") or {}
    if not sample.get("dir"):
        return None
    from ct_data import sample as sample_mod

    out = Path(sample["dir"])
    _main_first(is_main, lambda: sample_mod.build(out, seed=int(sample.get("seed", 0)),
                                                  scale=float(sample.get("scale", 1.0))))
    return out


def prepare_tokenizer(cfg: dict, init_from: Path | None, sample_dir: Path | None,
                      is_main: bool):
    import ct_data

    tok_cfg = cfg.get("tokenizer") or {}
    if tok_cfg.get("path"):
        return ct_data.load_tokenizer(tok_cfg["path"])
    if init_from is not None and (init_from / "tokenizer.json").is_file():
        return ct_data.load_tokenizer(str(init_from))
    if sample_dir is None:
        raise UserError("tokenizer.path is not set and there is no sample data to train one on")
    from ct_data import sample as sample_mod

    # Trained once per sample-data directory (under run_dir by default) and reused from there.
    vocab = int(tok_cfg.get("vocab_size", 8192))
    digits = bool(tok_cfg.get("split_digits", False))
    return _main_first(is_main, lambda: sample_mod.build_tokenizer(sample_dir, vocab, split_digits=digits))


def build_phase_model(cfg: dict, init_from: Path | None, seq_len: int, seed: int):
    rope_scale = float(cfg.get("rope_theta_scale", 1.0))
    if init_from is not None:
        model, config = ct_model.hf.load_hf(init_from)
        log.info("initialised from %s", init_from)
    else:
        config = model_config_from(cfg)
        model = ct_model.build_model(config, seed=seed)
    changes = {}
    if seq_len > config.max_position_embeddings:
        changes["max_position_embeddings"] = seq_len
    if rope_scale != 1.0:
        changes["rotary_base"] = config.rotary_base * rope_scale
    if changes:
        # RoPE is computed from the config at every call, so changing it needs no weight surgery.
        config = config.replace(**changes)
        model.config = config
        for module in model.modules():
            if hasattr(module, "config"):
                module.config = config
    return model, config


def build_stage(cfg: dict, model_config, run_dir: Path, device: torch.device, total_sequences: int,
                cache_loader_factory) -> Stage:
    stage_cfg = _dataclass_from(StageConfig, cfg.get("stage"), "stage")
    if stage_cfg.kind != "midtrain":
        return Stage(stage_cfg)
    from .distill import build_teacher_annotator

    annotate = build_teacher_annotator(stage_cfg.distill, model_config, run_dir, device,
                                       total_sequences, cache_loader_factory)
    return Stage(stage_cfg, annotate)


# ------------------------------------------------------------------------------------- phase


def run_phase(cfg: dict) -> PhaseResult:
    dist_cfg = _dataclass_from(DistributedConfig, cfg.get("distributed"), "distributed")
    trainer_cfg = _dataclass_from(TrainerConfig, cfg.get("trainer"), "trainer")
    optim_cfg = _dataclass_from(OptimizerConfig, cfg.get("optimizer"), "optimizer")
    sched_cfg = _dataclass_from(ScheduleConfig, cfg.get("schedule"), "schedule")
    precision = _dataclass_from(PrecisionConfig, cfg.get("precision"), "precision")
    try:  # a precision x layout pair that cannot run is a user error (exit 2), caught before heavy work
        check_combination(precision, dist_cfg)
    except ValueError as err:
        raise UserError(str(err)) from None
    _dataclass_from(StageConfig, cfg.get("stage"), "stage")  # validate before any heavy work
    seq_len = int(cfg["seq_len"])
    if seq_len < 2:
        raise UserError(f"seq_len must be >= 2, got {seq_len}")
    phase_name = (cfg.get("phase") or {}).get("name", "train")
    run_dir = Path(cfg["run_dir"])
    init_from = resolve_init_from(cfg)

    info = init_distributed(dist_cfg)
    trainer_cfg.check_layout(info.dp_size)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n")
    _barrier()
    torch.manual_seed(trainer_cfg.seed)

    sample_dir = prepare_sample_data(cfg, info.is_main)
    tokenizer = prepare_tokenizer(cfg, init_from, sample_dir, info.is_main)
    model, model_config = build_phase_model(cfg, init_from, seq_len, trainer_cfg.seed)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise UserError(f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                        f"{model_config.vocab_size}; raise model.vocab_size or use a smaller tokenizer")
    model.to(info.device)
    if info.is_main:
        (run_dir / "model_config.json").write_text(json.dumps(model_config.to_dict(), indent=2) + "\n")

    import ct_data

    mixture = ct_data.load_data_config(cfg["data"], sample_dir=sample_dir)

    def loader_factory(rank: int = info.dp_rank, world: int = info.dp_size):
        return mixture.build_loader(tokenizer, seq_len, trainer_cfg.global_batch_size, trainer_cfg.seed,
                                    rank, world)

    total_sequences = trainer_cfg.max_steps * trainer_cfg.global_batch_size
    # The teacher cache is written in the global order: a 1-process loader yields it.
    stage = build_stage(cfg, model_config, run_dir, info.device, total_sequences,
                        lambda: loader_factory(0, 1))
    engine = build_engine(model, dist_cfg, precision=precision)
    engine.setup_optimizer(lambda named: build_optimizer(named, optim_cfg))
    scheduler = build_scheduler(engine.optimizer, trainer_cfg.max_steps, sched_cfg)
    loader = loader_factory()

    evaluate = None
    if trainer_cfg.eval_every:
        evaluate = fixed_batch_evaluator(engine, mixture, tokenizer, seq_len, trainer_cfg, info)
    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=info.is_main,
                         wandb_config=(cfg.get("logging") or {}).get("wandb"), run_config=cfg)
    peak, peak_source = peak_flops(info.device, (cfg.get("logging") or {}).get("peak_flops"))
    trainer = Trainer(
        trainer_cfg, engine, stage, loader, scheduler, CheckpointManager(run_dir / "checkpoints",
                                                                         trainer_cfg.keep_last_checkpoints),
        metrics, clip_grad=optim_cfg.clip_grad, flops_per_token=flops_per_token(model_config, seq_len),
        peak_flops=peak, device=info.device, evaluate=evaluate, is_main=info.is_main,
        show_progress=bool((cfg.get("logging") or {}).get("progress", True)), phase=phase_name,
    )
    resumed = trainer.resume_if_possible()
    if info.is_main:
        log.info("phase %s: %s params, %s, peak %.1f GFLOP/s (%s)%s", phase_name,
                 f"{ct_model.count_parameters(model_config):,}", info.device, peak / 1e9, peak_source,
                 f", resumed at step {trainer.state.step}" if resumed else "")
    state = trainer.fit()

    hf_dir = run_dir / "hf"
    full_state = engine.full_model_state_dict()
    if info.is_main:
        export_hf(full_state, model_config, tokenizer, hf_dir)
        plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png", f"{phase_name} loss")
    summary = {"phase": phase_name, "steps": state.step, "final_loss": state.last_loss,
               "consumed_tokens": state.consumed_tokens, "skipped_steps": state.skipped_steps,
               "peak_flops": peak, "peak_source": peak_source, "hf_dir": str(hf_dir)}
    if info.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    metrics.close()
    _barrier()
    return PhaseResult(run_dir, hf_dir, state.last_loss, state.step, summary)


def fixed_batch_evaluator(engine, mixture, tokenizer, seq_len: int, trainer_cfg: TrainerConfig, info):
    """Next-token loss on ``trainer.eval_batches`` global batches drawn once from the phase's mixture
    with another seed: a fixed monitor set (not a held-out split; ct-eval scores held-out data)."""
    loader = mixture.build_loader(tokenizer, seq_len, trainer_cfg.global_batch_size, trainer_cfg.seed + 1,
                                  info.dp_rank, info.dp_size, prefetch=0)
    batches = [next(loader) for _ in range(trainer_cfg.eval_batches)]
    splitter = Stage(StageConfig())  # plain CE and no teacher, whatever the phase's stage

    def evaluate() -> dict[str, float]:
        micro = [mb for b in batches for mb in splitter.microbatches(b, trainer_cfg.micro_batch_size, 0)]
        result = engine.forward_only(micro, cross_entropy_sum)
        return {"eval_loss": result.loss, "eval_tokens": result.tokens}

    return evaluate


def export_hf(full_state: dict, model_config, tokenizer, hf_dir: Path) -> None:
    model = ct_model.build_model(model_config, device="meta")
    model.to_empty(device="cpu")
    model.load_state_dict(full_state)
    arch = "llama4" if model_config.qk_layernorm or model_config.rope_style == "interleaved" else "llama"
    ct_model.hf.save_hf(model, hf_dir, arch=arch)
    tokenizer.save(str(hf_dir))
