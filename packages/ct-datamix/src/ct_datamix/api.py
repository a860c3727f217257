"""The two entry points: ``influence_weights`` (source weights) and ``filter_by_influence`` (co-evolution)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ct_data import DataMixture, SourceConfig

from .checkpoints import expand_checkpoints, load_checkpoint
from .errors import DatamixError
from .influence import influence_scores
from .joint import joint_influence, rho
from .progress import Progress
from .rules import WeightRule
from .samples import Sample, draw_samples

log = logging.getLogger("ct_datamix")


@dataclass
class InfluenceResult:
    samples: list[Sample]
    joint: torch.Tensor                      # I_joint per sample (positive = helpful)
    per_domain: dict[str, torch.Tensor]      # its parts per probe domain
    rho: dict[str, float]                    # per source
    rho_per_domain: dict[str, dict[str, float]]
    weights: dict[str, float]                # normalised, after the negative-rho rule
    raised_to_floor: list[str] = field(default_factory=list)
    rule: WeightRule = field(default_factory=WeightRule)
    checkpoints: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"rho": self.rho, "weights": self.weights, "rho_per_domain": self.rho_per_domain,
                "raised_to_floor": self.raised_to_floor, "rule": vars(self.rule), "checkpoints": self.checkpoints,
                "samples": {g: sum(s.source == g for s in self.samples) for g in self.rho}}


def _score(mixture: DataMixture, probes: dict[str, SourceConfig], checkpoints: list[str], tokenizer,
           samples_per_source: int, probe_samples: int, max_tokens: int, seed: int, batch_size: int,
           device: str, progress: bool, cache_mib: float) -> tuple[list[Sample], torch.Tensor, dict[str, torch.Tensor], list[str]]:
    if mixture.kind != "pretrain":
        raise DatamixError(f"data config {mixture.name!r}: kind {mixture.kind!r} is not supported (pretrain text only)")
    if not probes:
        raise DatamixError("no probe set given (--probe NAME=PATH)")
    ckpts = expand_checkpoints([str(c) for c in checkpoints])
    sources = [s for s in mixture.sources if s.weight > 0]
    samples = [x for s in sources for x in draw_samples(s, tokenizer, samples_per_source, max_tokens, seed)]
    probe_ids = {c: [x.ids for x in draw_samples(p, tokenizer, probe_samples, max_tokens, seed, "probe")]
                 for c, p in probes.items()}
    bar = Progress(3 * len(samples) * len(ckpts), "datamix: scoring samples", enabled=progress)
    per_ckpt = []
    for path in ckpts:
        model = load_checkpoint(path, tokenizer, device)
        per_ckpt.append(influence_scores(model, [x.ids for x in samples], probe_ids, batch_size=batch_size,
                                         pad_id=tokenizer.pad_id, cache_mib=cache_mib, tick=bar.update))
        del model
    joint, parts = joint_influence(per_ckpt)
    return samples, joint, parts, [str(p) for p in ckpts]


def influence_weights(mixture: DataMixture, probes: dict[str, SourceConfig], checkpoints: list[str], tokenizer, *,
                      samples_per_source: int = 64, probe_samples: int = 64, max_tokens: int = 256, seed: int = 0,
                      rule: WeightRule | None = None, batch_size: int = 8, device: str = "cpu",
                      progress: bool = True, cache_mib: float = 2048) -> InfluenceResult:
    """Per-source rho and weights of ``mixture`` from influence on the ``probes`` {domain: source}.

    ``checkpoints``: HF export directories (or directories of them), in training order.
    ``cache_mib``: memory for gradient factors kept between passes (beyond it they are recomputed).
    """
    rule = rule or WeightRule()
    samples, joint, parts, ckpts = _score(mixture, probes, checkpoints, tokenizer, samples_per_source,
                                          probe_samples, max_tokens, seed, batch_size, device, progress, cache_mib)
    groups = [s.source for s in samples]
    lengths = torch.tensor([len(s.ids) for s in samples])
    r = rho(joint, lengths, groups)
    weights, raised = rule.apply(r)
    if raised:
        log.warning("sources with rho below the floor, raised to it (rule %s, floor %s): %s", rule.negative,
                    rule.floor, ", ".join(raised))
    by_domain = {c: rho(p, lengths, groups) for c, p in parts.items()}
    return InfluenceResult(samples, joint, parts, r, by_domain, weights, raised, rule, ckpts)


@dataclass
class FilterResult:
    influence: InfluenceResult
    kept: dict[str, int]
    dropped: dict[str, int]
    shards: dict[str, str]


def filter_by_influence(mixture: DataMixture, probes: dict[str, SourceConfig], checkpoints: list[str], tokenizer,
                        out_dir: str | Path, **kwargs) -> FilterResult:
    """One co-evolution round: score samples, keep those with I_joint > 0 as local shards
    (``out_dir/shards/<source>.jsonl``, field ``text``) and re-weight the sources with rho, the dropped
    samples counting zero. ``ct_datamix.outputs.write_filter_outputs`` writes the config and counts."""
    res = influence_weights(mixture, probes, checkpoints, tokenizer, **kwargs)
    out = Path(out_dir)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    kept, dropped, shards = {}, {}, {}
    for g in res.rho:
        idx = [i for i, s in enumerate(res.samples) if s.source == g]
        keep = [i for i in idx if res.joint[i] > 0]
        kept[g], dropped[g] = len(keep), len(idx) - len(keep)
        if keep:
            shards[g] = str(out / "shards" / f"{g}.jsonl")
            Path(shards[g]).write_text("".join(json.dumps({"text": res.samples[i].text}) + "\n" for i in keep))
    if not shards:
        raise DatamixError("every sample has I_joint <= 0: nothing to keep")
    # rho with the dropped samples counting zero: (1/N_g) sum over kept x of I_joint(x) len(x), N_g all
    # scored samples of g, so a source that lost most of its samples loses weight too.
    lengths = torch.tensor([len(s.ids) for s in res.samples], dtype=torch.float64)
    for g in res.rho:
        idx = [i for i, s in enumerate(res.samples) if s.source == g and res.joint[i] > 0]
        res.rho[g] = float((res.joint[idx] * lengths[idx]).sum()) / (kept[g] + dropped[g])
    res.weights = {g: (res.rho[g] / sum(res.rho.values())) for g in res.rho}
    return FilterResult(res, kept, dropped, shards)
