"""What the commands write: the re-weighted data config, the report (markdown + PNG), the counts."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml

from .png import bar_chart

PERCENT_DIGITS = 4


def reweighted_config(raw: dict[str, Any], weights: dict[str, float], note: str) -> dict[str, Any]:
    """``raw`` (the data config as written, ``{sample_dir}`` kept) with weights in percent."""
    out = copy.deepcopy(raw)
    out["name"] = f"{raw.get('name', 'data')}_datamix"
    out["sources"] = [{**s, "weight": round(100 * weights.get(s["name"], 0.0), PERCENT_DIGITS)}
                      for s in raw["sources"]]
    out["notes"] = note
    return out


def write_yaml(data: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False, width=110))


def report_markdown(result) -> str:
    domains = list(result.rho_per_domain)
    head = "| source | samples | " + " | ".join(f"rho[{c}]" for c in domains) + " | rho (joint) | weight |"
    lines = [f"# Datamix report\n\nCheckpoints (in training order, alpha ~ t): "
             + ", ".join(f"`{c}`" for c in result.checkpoints),
             f"\nRule for negative rho: `{result.rule.negative}` (floor {result.rule.floor}, temperature "
             f"{result.rule.temperature}). Positive rho = helpful.\n", head,
             "|" + "---|" * (len(domains) + 4)]
    counts = result.summary()["samples"]
    for g in result.rho:
        cells = " | ".join(f"{result.rho_per_domain[c][g]:.4g}" for c in domains)
        lines.append(f"| {g} | {counts[g]} | {cells} | {result.rho[g]:.4g} | {100 * result.weights[g]:.2f}% |")
    if result.raised_to_floor:
        lines.append(f"\nRaised to the floor (rho below {result.rule.floor} x the best): "
                     + ", ".join(result.raised_to_floor))
    lines.append("\n![rho per domain (bars in the table's column order) and weight](" + "REPORT_PNG)")
    return "\n".join(lines) + "\n"


def write_report(result, out_yaml: Path) -> tuple[Path, Path]:
    md, png = out_yaml.with_suffix(".report.md"), out_yaml.with_suffix(".report.png")
    domains = list(result.rho_per_domain)
    # Per source: per-domain rho scaled to the largest |rho|, then the weight scaled to the largest weight.
    m = max(abs(result.rho_per_domain[c][g]) for c in domains for g in result.rho) or 1.0
    wmax = max(result.weights.values()) or 1.0
    bars = [[result.rho_per_domain[c][g] / m for c in domains] + [result.weights[g] / wmax] for g in result.rho]
    bar_chart(bars, png)
    md.write_text(report_markdown(result).replace("REPORT_PNG", png.name))
    return md, png


def write_filter_outputs(res, raw: dict[str, Any], out_dir: Path) -> Path:
    """data.yaml (kept shards as sources, new weights), counts.json and the report."""
    loader = raw.get("loader") or {}
    config = {"name": f"{raw.get('name', 'data')}_filtered", "kind": "pretrain", "loader": loader,
              "sources": [{"name": g, "path": str(Path(p).resolve()), "weight":
                           round(100 * res.influence.weights[g], PERCENT_DIGITS)} for g, p in res.shards.items()],
              "notes": "ct-datamix filter: samples with I_joint > 0, re-weighted by rho (dropped samples count 0)"}
    path = out_dir / "data.yaml"
    write_yaml(config, path)
    counts = {g: {"kept": res.kept[g], "dropped": res.dropped[g]} for g in res.kept}
    (out_dir / "counts.json").write_text(json.dumps({"counts": counts, **res.influence.summary()}, indent=2) + "\n")
    write_report(res.influence, path)
    return path
