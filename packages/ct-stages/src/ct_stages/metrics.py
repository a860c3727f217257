"""What the user sees: FLOPs and MFU, memory, a JSONL log, optional wandb, a loss-curve PNG."""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ct_model import ModelConfig
from ct_model.model import matmul_parameters

log = logging.getLogger("ct_stages")

# Dense peak TFLOP/s (bf16 tensor cores unless noted), per GPU, from vendor data sheets.
GPU_PEAK_TFLOPS = {
    "H200": 989.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0, "B200": 2250.0,
    "A100": 312.0, "A800": 312.0, "A10G": 125.0, "A10": 125.0, "L40S": 362.0, "L4": 121.0,
    "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0, "T4": 65.0,
}


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul weights per pass + attention scores (PaLM, app. B).

    Matmul weights: every block run (shared blocks count twice) and the output layer; the input
    embedding is a lookup. The attention term 12 * depth * heads * head_dim * seq_len counts the
    full T x T score and value products (the usual convention; causal and document masks skip
    part of that work, so MFU is slightly flattering, as everywhere).
    """
    c = config
    # Active weights only: a MoE token multiplies with its top-k experts, not all of them.
    repeats = 2 if c.layer_sharing else 1
    matmul = repeats * matmul_parameters(c, active=True) + c.vocab_size * c.hidden_size
    qk, v = c.kv_channels, c.kv_channels
    if c.multi_latent_attention:
        qk, v = c.qk_head_dim + c.qk_pos_emb_head_dim, c.v_head_dim
    attention = 6 * c.effective_depth * c.num_attention_heads * (qk + v) * seq_len
    return 6.0 * matmul + attention


def measure_cpu_peak_flops(sizes: tuple[int, ...] = (1024, 2048), repeats: int = 12) -> float:
    """fp32 matmul FLOP/s this process achieves with its threads (the CPU 'peak' for MFU).

    The best of many runs at two sizes: a busy moment on the machine only lowers some runs, and
    the larger size reaches the throughput that a training step's big matmuls reach."""
    best = 0.0
    for size in sizes:
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b  # warm-up: thread pool and caches
        for _ in range(repeats if size <= 1024 else max(repeats // 4, 2)):
            start = time.perf_counter()
            a @ b
            best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


class PeakFlops:
    """Peak FLOP/s of one device and where the number came from. A measured (CPU) peak is
    measured again when a step beats it, and the better figure kept."""

    MAX_REMEASURES = 3  # a machine whose load keeps changing does not pay for it every step

    def __init__(self, value: float, source: str, measured: bool = False):
        self.value, self.source, self.measured = value, source, measured
        self.remeasures = 0

    @classmethod
    def for_device(cls, device: torch.device, override: float | None = None) -> "PeakFlops":
        if override:
            return cls(float(override), "logging.peak_flops")
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            for key, tflops in GPU_PEAK_TFLOPS.items():
                if key in name:
                    return cls(tflops * 1e12, f"{name} data sheet (bf16 dense)")
            return cls(float("nan"), f"{name}: unknown peak (set logging.peak_flops)")
        return cls(measure_cpu_peak_flops(), f"measured fp32 matmul, {torch.get_num_threads()} threads",
                   measured=True)

    def remeasure(self) -> None:
        if self.measured and self.remeasures < self.MAX_REMEASURES:
            self.remeasures += 1
            self.value = max(self.value, measure_cpu_peak_flops())


class Throughput:
    """Tokens/s (global and per device) and MFU per device, as torchtitan and nanochat report it.

    Per device: the global batch's tokens over all devices of the run (data, tensor and pipeline
    ranks together), so MFU = tokens/s per device x FLOPs per token / one device's peak. MFU is
    never reported above 100%: when a step seems to beat the peak, a measured peak is measured
    again; if it still does, MFU is null with the reason in ``mfu_note``."""

    def __init__(self, flops_per_token: float, peak: PeakFlops, world_size: int = 1):
        self.flops_per_token = flops_per_token
        self.peak = peak
        self.world_size = world_size

    def measure(self, input_tokens: int, seconds: float) -> dict[str, float | str | None]:
        tokens_per_s = input_tokens / seconds
        per_device = tokens_per_s / self.world_size
        achieved = per_device * self.flops_per_token
        if achieved > self.peak.value:
            self.peak.remeasure()
        record: dict[str, float | str | None] = {
            "tokens_per_s": tokens_per_s, "tokens_per_s_per_device": per_device, "mfu": None,
            "peak_flops": self.peak.value}
        mfu = achieved / self.peak.value
        if mfu != mfu:
            record["mfu_note"] = f"no peak FLOP/s known ({self.peak.source})"
        elif mfu > 1.0:
            record["mfu_note"] = (f"step reached {achieved / 1e9:.1f} GFLOP/s per device, above the peak "
                                  f"{self.peak.value / 1e9:.1f} ({self.peak.source})")
        else:
            record["mfu"] = mfu
        return record

    def describe(self) -> dict[str, float | str | int]:
        return {"flops_per_token": self.flops_per_token, "peak_flops": self.peak.value,
                "peak_source": self.peak.source, "world_size": self.world_size}


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsLog:
    """Appends one JSON object per event to ``metrics.jsonl``; mirrors to wandb when enabled.

    ``wandb``: an object with ``enabled``, ``mode``, ``project`` and ``name`` (ct_stages.config's
    WandbConfig), or None."""

    def __init__(self, path: Path, enabled: bool, wandb=None, run_config: dict | None = None):
        self.path = path
        self.enabled = enabled
        self.wandb = None
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            if wandb is not None and wandb.enabled:
                self.wandb = _start_wandb(path.parent, wandb, run_config)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {**record, "time": round(time.time(), 3)}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "time"},
                           step=record.get("step"))

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _start_wandb(run_dir: Path, config, run_config: dict | None):
    import wandb  # lazily: it is slow to import and optional

    os.environ.setdefault("WANDB_MODE", config.mode)
    return wandb.init(project=config.project, name=config.name, dir=str(run_dir), config=run_config,
                      resume="allow")


@dataclass
class Reporter:
    """Where the trainer's figures go: the JSONL log (rank 0), throughput/MFU, the progress bar."""

    metrics: MetricsLog
    throughput: Throughput
    device: torch.device
    is_main: bool = True
    show_progress: bool = True
    title: str = "train"


def read_losses(path: Path) -> dict[int, float]:
    """The last logged training loss of every step (a resumed run logs replayed steps again)."""
    losses: dict[int, float] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("event") == "train":
                losses[record["step"]] = record["loss"]
    return losses


def plot_loss_curve(metrics_path: Path, out_path: Path, title: str) -> Path | None:
    losses = read_losses(metrics_path)
    if not losses:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(losses)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [losses[s] for s in steps], linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
