"""What the user sees: FLOPs and MFU, memory, a JSONL log, optional wandb, a loss-curve PNG."""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from ct_model import ModelConfig
from ct_model.param_count import matmul_parameters

log = logging.getLogger("ct_stages")

# Dense bf16 peak TFLOP/s per GPU (tensor cores, FP32 accumulate), keyed on the exact
# torch.cuda.get_device_name() string and the SM count (multi_processor_count), because one name
# can cover cards of different peaks (an "NVIDIA H800" is an SXM or a PCIe board). NVIDIA's data
# sheets print the figure with 2:4 sparsity and footnote that dense is half: the halves are here.
# An H200 NVL may report plain "NVIDIA H200" (same 132 SMs): it then reads the SXM peak, 18% too
# high (MFU too low); set logging.peak_flops on such a card. Cards with no NVIDIA data sheet (the
# AWS-only A10G) and cards without bf16 tensor cores (V100, T4) are left out: NaN, set the peak.
_H100_SHEET = "NVIDIA H100 data sheet, nvidia.com/en-us/data-center/h100 (1,979 / 1,513 / 1,671 sparse)"
_H200_SHEET = "NVIDIA H200 data sheet, nvidia.com/en-us/data-center/h200 (1,979 / 1,671 sparse)"
_H800_SHEET = "NVIDIA H800 SXM5 / PCIe product briefs (1,979 / 1,513 sparse: H100's compute)"
_GH200_SHEET = "NVIDIA GH200 Grace Hopper data sheet (1,979 sparse; the H100 GPU, 132 SMs)"
_A100_SHEET = "NVIDIA A100 data sheet, nvidia.com/en-us/data-center/a100 (BF16 312 dense / 624 sparse)"
_A800_SHEET = "NVIDIA A800 data sheet (BF16 312 dense / 624 sparse, as A100)"
_B200_SHEET = "NVIDIA Blackwell data sheet, nvdam.widen.net/s/wwnsxrhm2w (HGX B200: 4.5 PFLOPS sparse)"
_L40S_SHEET = "NVIDIA L40S data sheet, nvidia.com/en-us/data-center/l40s (362.05 dense / 733 sparse)"
_L4_SHEET = "NVIDIA L4 data sheet, nvidia.com/en-us/data-center/l4 (242 sparse)"
_A10_SHEET = "NVIDIA A10 data sheet, nvidia.com/en-us/data-center/products/a10-gpu (125 dense / 250 sparse)"
_ADA_PAPER = "NVIDIA Ada GPU architecture whitepaper, table 'RTX 4090' (BF16, FP32 accumulate: 165.2 dense)"
_AMPERE_PAPER = "NVIDIA Ampere GA102 GPU architecture whitepaper, RTX 3090 (BF16, FP32 accumulate: 71 dense)"
GPU_PEAK_TFLOPS: dict[tuple[str, int], tuple[float, str]] = {
    ("NVIDIA H100 80GB HBM3", 132): (989.5, _H100_SHEET),  # H100 SXM5
    ("NVIDIA H100 PCIe", 114): (756.5, _H100_SHEET),
    ("NVIDIA H100 NVL", 132): (835.5, _H100_SHEET),
    ("NVIDIA H200", 132): (989.5, _H200_SHEET),  # H200 SXM
    ("NVIDIA H200 NVL", 132): (835.5, _H200_SHEET),
    ("NVIDIA H800", 132): (989.5, _H800_SHEET),  # SXM5
    ("NVIDIA H800", 114): (756.5, _H800_SHEET),  # PCIe
    ("NVIDIA H800 80GB HBM3", 132): (989.5, _H800_SHEET),
    ("NVIDIA H800 PCIe", 114): (756.5, _H800_SHEET),
    ("NVIDIA GH200 480GB", 132): (989.5, _GH200_SHEET),
    ("NVIDIA A100-SXM4-80GB", 108): (312.0, _A100_SHEET),
    ("NVIDIA A100-SXM4-40GB", 108): (312.0, _A100_SHEET),
    ("NVIDIA A100 80GB PCIe", 108): (312.0, _A100_SHEET),
    ("NVIDIA A100-PCIE-40GB", 108): (312.0, _A100_SHEET),
    ("NVIDIA A800-SXM4-80GB", 108): (312.0, _A800_SHEET),
    ("NVIDIA A800 80GB PCIe", 108): (312.0, _A800_SHEET),
    ("NVIDIA B200", 148): (2250.0, _B200_SHEET),
    ("NVIDIA L40S", 142): (362.05, _L40S_SHEET),
    ("NVIDIA L4", 58): (121.0, _L4_SHEET),
    ("NVIDIA A10", 72): (125.0, _A10_SHEET),
    ("NVIDIA GeForce RTX 4090", 128): (165.2, _ADA_PAPER),
    ("NVIDIA GeForce RTX 3090", 82): (71.0, _AMPERE_PAPER),
}


def gpu_peak_tflops(name: str, sm_count: int) -> tuple[float, str] | None:
    """Dense bf16 TFLOP/s and its source for a card, or None when the table does not know it.

    A MIG slice ("NVIDIA H100 80GB HBM3 MIG 3g.40gb") gets its parent card's peak scaled by its
    share of the SMs: every SM runs the same tensor cores at the same clock."""
    if (name, sm_count) in GPU_PEAK_TFLOPS:
        return GPU_PEAK_TFLOPS[name, sm_count]
    parent, mig, _ = name.partition(" MIG ")
    if mig:
        for (card, full), (tflops, source) in GPU_PEAK_TFLOPS.items():
            if card == parent and sm_count < full:
                return tflops * sm_count / full, f"{source}; MIG slice, {sm_count} of {full} SMs"
    return None


@dataclass(frozen=True)
class ModelFlops:
    """A model's training FLOPs (forward + backward, no recomputation), split in the two parts
    that scale differently: ``matmul_per_token`` x tokens + ``attention_per_pair`` x (query, key)
    pairs attended.

    - Matmul: 6 x the matrix weights a token meets (2 FLOPs per multiply-add, x3 for forward,
      input gradient and weight gradient): every block run (shared blocks count twice), the output
      layer; the input embedding is a lookup. MoE tokens meet only their top-k experts.
    - Attention: one query against one key costs 2 x (d_qk + d_v) FLOPs per head forward (the
      q.k score and the weighted v), x3 with the backward: ``attention_per_pair`` =
      6 x depth x heads x (d_qk + d_v); MLA uses its own head dims (qk_head_dim + qk_pos_emb_head_dim
      and v_head_dim).

    Causal attention over a document of n tokens attends n^2 / 2 pairs, exactly half the n x n
    square, as Megatron-LM (``num_floating_point_operations``: "causal mask (only half of the mask
    is non-zero)"), NeMo's and Megatron-Bridge's performance FLOPs and FlashAttention's benchmarks
    count it (the n diagonal pairs are not added). Packed documents do not attend across each
    other, so a step's attention FLOPs are

        attention_per_pair x sum over rows of sum over documents of n^2 / 2
        = 3 x depth x heads x (d_qk + d_v) x sum n^2.

    PaLM (app. B), torchtitan and nanochat instead count the full T x T square of every row
    (12 x depth x heads x head_dim x T per token, "do not account for sparsity in causal
    attention"): ``flops_per_token`` below. That is 2x this count for one document per row, and
    for a 32k row of eight 4k documents 16x the attention and 2.9x the whole of mobilellm_950m's
    FLOPs: an MFU that credits work the masks skip."""

    matmul_per_token: float
    attention_per_pair: float

    @classmethod
    def of(cls, config: ModelConfig) -> "ModelFlops":
        c = config
        repeats = 2 if c.layer_sharing else 1
        matmul = repeats * matmul_parameters(c, active=True) + c.vocab_size * c.hidden_size
        qk, v = c.kv_channels, c.kv_channels
        if c.multi_latent_attention:
            qk, v = c.qk_head_dim + c.qk_pos_emb_head_dim, c.v_head_dim
        return cls(6.0 * matmul, 6.0 * c.effective_depth * c.num_attention_heads * (qk + v))

    def step(self, tokens: float, squared_lengths: float) -> float:
        """FLOPs of a step over ``tokens`` input tokens whose documents' squared lengths sum to
        ``squared_lengths`` (sum over rows of sum over documents of n^2)."""
        return self.matmul_per_token * tokens + self.attention_per_pair * squared_lengths / 2

    def per_token(self, seq_len: int) -> float:
        """FLOPs per token of rows that each hold one document of ``seq_len`` tokens."""
        return self.step(seq_len, seq_len**2) / seq_len


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token in PaLM's convention (app. B), as torchtitan and nanochat report
    MFU: 6 x matmul weights + 12 x depth x heads x head_dim x seq_len, the full T x T attention of
    every row, whatever its causal and document masks skip. Kept to compare with MFU figures
    published that way; the trainer's MFU counts per document (``ModelFlops``), which is less."""
    flops = ModelFlops.of(config)
    return flops.matmul_per_token + flops.attention_per_pair * seq_len


@dataclass(frozen=True)
class Documents:
    """What a step's attention FLOPs depend on, counted from the rows one process ran: its input
    tokens and the sum over rows of the sum over documents of length^2."""

    tokens: int
    squared_lengths: int


def segment_lengths(input_ids: torch.Tensor, document_ids: torch.Tensor | None = None,
                    position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Lengths of the attention segments of a [B, T] batch, row after row (1-D, int64).

    A segment starts where ``document_ids`` changes (padding, id -1, is a segment too: the
    kernels attend within it), else where ``position_ids`` restarts at 0, else at each row's
    start (a row without either is one document)."""
    rows, length = input_ids.shape
    if document_ids is None and position_ids is None:
        return torch.full((rows,), length, dtype=torch.int64)
    if document_ids is not None:
        ids = document_ids.expand(rows, length)
        starts = torch.ones(rows, length, dtype=torch.bool, device=ids.device)
        starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    else:
        starts = position_ids.expand(rows, length) == 0
        starts[:, 0] = True
    # Every row opens with a start, so the gaps between consecutive starts of the flattened
    # batch never run across a row boundary.
    index = starts.flatten().nonzero().squeeze(1).cpu()
    return torch.diff(index, append=torch.tensor([rows * length]))


def documents(batch: Mapping[str, torch.Tensor] | list[Mapping[str, torch.Tensor]]) -> Documents:
    """``Documents`` of a batch or a list of microbatches (``input_ids`` and optionally
    ``document_ids`` / ``position_ids``, [B, T]). Meant for the host copy of the batch, before
    it goes to a device: a few vector operations over the token ids, no device sync."""
    tokens = squares = 0
    for mb in batch if isinstance(batch, list) else [batch]:
        lengths = segment_lengths(mb["input_ids"], mb.get("document_ids"), mb.get("position_ids"))
        tokens += int(mb["input_ids"].numel())
        squares += int((lengths * lengths).sum())
    return Documents(tokens, squares)


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
            return cls.for_gpu(torch.cuda.get_device_name(device),
                               torch.cuda.get_device_properties(device).multi_processor_count)
        return cls(measure_cpu_peak_flops(), f"measured fp32 matmul, {torch.get_num_threads()} threads",
                   measured=True)

    @classmethod
    def for_gpu(cls, name: str, sm_count: int) -> "PeakFlops":
        known = gpu_peak_tflops(name, sm_count)
        if known is None:
            return cls(float("nan"), f"{name} ({sm_count} SMs): unknown peak (set logging.peak_flops)")
        tflops, source = known
        return cls(tflops * 1e12, f"{name}, {sm_count} SMs: bf16 dense, {source}")

    def remeasure(self) -> None:
        if self.measured and self.remeasures < self.MAX_REMEASURES:
            self.remeasures += 1
            self.value = max(self.value, measure_cpu_peak_flops())


class Throughput:
    """Tokens/s (global and per device) and MFU per device, as torchtitan and nanochat report it.

    Per device: the global batch's tokens over all devices of the run (data, tensor and pipeline
    ranks together), so MFU = tokens/s per device x FLOPs per token / one device's peak. FLOPs per
    token: with ``model`` (``ModelFlops``) and the step's ``Documents``, the step's own figure,
    attention counted per document (the documents of the rows this process ran stand for the
    global batch's: the other ranks' rows are not seen here); else the fixed ``flops_per_token``.
    MFU is never reported above 100%: when a step seems to beat the peak, a measured peak is
    measured again; if it still does, MFU is null with the reason in ``mfu_note``."""

    def __init__(self, flops_per_token: float, peak: PeakFlops, world_size: int = 1,
                 model: ModelFlops | None = None):
        self.flops_per_token = flops_per_token
        self.peak = peak
        self.world_size = world_size
        self.model = model

    @classmethod
    def for_model(cls, config: ModelConfig, seq_len: int, peak: PeakFlops, world_size: int = 1) -> "Throughput":
        """Per-document FLOPs for ``config``; ``flops_per_token`` (the start record's figure, and
        the fallback for a step measured without its documents) is a row of one whole document."""
        model = ModelFlops.of(config)
        return cls(model.per_token(seq_len), peak, world_size, model)

    def step_flops_per_token(self, documents: Documents | None = None) -> float:
        if self.model is None or documents is None or not documents.tokens:
            return self.flops_per_token
        return self.model.step(documents.tokens, documents.squared_lengths) / documents.tokens

    def measure(self, input_tokens: int, seconds: float,
                documents: Documents | None = None) -> dict[str, float | str | None]:
        tokens_per_s = input_tokens / seconds
        per_device = tokens_per_s / self.world_size
        flops_per_token = self.step_flops_per_token(documents)
        achieved = per_device * flops_per_token
        if achieved > self.peak.value:
            self.peak.remeasure()
        record: dict[str, float | str | None] = {
            "tokens_per_s": tokens_per_s, "tokens_per_s_per_device": per_device, "mfu": None,
            "peak_flops": self.peak.value, "flops_per_token": flops_per_token}
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


def finite_or_none(value):
    """``value`` with every non-finite float (NaN, inf) replaced by None, recursively: what strict
    JSON can hold (a NaN loss or an unknown peak FLOP/s is logged as null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def strict_json(value, **kwargs) -> str:
    """JSON that strict parsers accept (RFC 8259: no NaN/Infinity); other objects as ``str``."""
    return json.dumps(finite_or_none(value), allow_nan=False, default=str, **kwargs)


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
            f.write(strict_json(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "time"},
                           step=record.get("step"))

    def discard_after(self, step: int) -> int:
        """Keep one row per step: drop the records of steps after ``step`` (those a resume from the
        step-``step`` checkpoint trains again) and any torn last line; returns how many went."""
        if not self.enabled or not self.path.is_file():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line torn by a kill mid-write
                dropped += 1
                continue
            if isinstance(record.get("step"), int) and record["step"] > step:
                dropped += 1
                continue
            kept.append(line)
        if dropped:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        return dropped

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
    """The training loss of every step (the last row of a step, for logs written before resumes
    discarded the rows of the steps they train again)."""
    losses: dict[int, float] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("event") == "train":  # a skipped (non-finite) step's loss is logged as null
                losses[record["step"]] = float("nan") if record["loss"] is None else record["loss"]
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
