"""ct-datamix: influence-based data-mixture weights and the co-evolution filter (MobileLLM-R1 Datamix).

    ct-datamix weights --data sample_midtrain --checkpoint runs/pretrain_phase2/hf --out mix.yaml
    ct-datamix weights --data configs/data/x.yaml --probe math=probes/math.jsonl --probe code=c.parquet#content \\
        --checkpoint runs/a/hf --checkpoint runs/b/hf --samples-per-source 256 --out mix.yaml
    ct-datamix filter --data sample_midtrain --checkpoint runs/pretrain_phase2/hf --out runs/round1

Without --probe, code / math / knowledge probes are built from held-out sample data. A data config
that reads {sample_dir} uses --sample-dir (built there when missing). The output YAML is a data
config: copy it to configs/data/NAME.yaml and run `ct-train data=NAME`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .common import UserFacingError, config_dir, run_guarded, setup_logging


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="a configs/data name or a data-config YAML path")
    p.add_argument("--probe", action="append", default=[], metavar="NAME=PATH[#FIELD]",
                   help="a probe set per domain (repeatable); default: embedded code/math/knowledge")
    p.add_argument("--checkpoint", action="append", required=True, metavar="DIR",
                   help="HF export directory, or a directory of them, in training order (repeatable)")
    p.add_argument("--samples-per-source", type=int, default=64)
    p.add_argument("--probe-samples", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per sample (BOS included)")
    p.add_argument("--tokenizer", help="tokenizer directory or hub name (default: the first checkpoint's)")
    p.add_argument("--sample-dir", default="runs/datamix/sample_data", help="embedded sample data (built if missing)")
    p.add_argument("--sample-scale", type=float, default=1.0)
    p.add_argument("--negative", choices=["clip", "softmax"], default="clip", help="rule for negative rho")
    p.add_argument("--floor", type=float, default=0.01, help="clip: minimum share relative to the best source")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax: temperature relative to max |rho|")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--config-dir")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ct-datamix", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("weights", help="per-source rho and weights -> a data config + report")
    _common(w)
    w.add_argument("--out", required=True, help="the data config to write (FILE.yaml)")
    f = sub.add_parser("filter", help="co-evolution round: keep samples with I_joint > 0, re-weight")
    _common(f)
    f.add_argument("--out", required=True, help="output directory (shards, data.yaml, counts.json)")
    return p


def read_data_config(data: str, directory: Path) -> tuple[Path, dict[str, Any]]:
    import yaml

    path = Path(data)
    if not (path.suffix in (".yaml", ".yml") or path.exists()):
        path = directory / "data" / f"{data}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (directory / "data").glob("*.yaml"))
        raise UserFacingError(f"data config {data!r} not found (a YAML path or one of: {', '.join(known)})")
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict) or not isinstance(raw.get("sources"), list):
        raise UserFacingError(f"data config {str(path)!r}: expected a mapping with a 'sources' list")
    return path, raw


def prepare(args, raw: dict[str, Any]):
    """(mixture, probes, tokenizer) from the arguments; builds sample data only when needed."""
    import ct_data
    from ct_datamix import build_sample_probes, parse_probe

    needs_sample = not args.probe or any("{sample_dir}" in str(s.get("path", "")) for s in raw["sources"])
    sample_dir = None
    if needs_sample:
        from ct_data import sample

        sample_dir = Path(args.sample_dir)
        sample.build(sample_dir, seed=0, scale=args.sample_scale)
    mixture = ct_data.load_data_config(raw, sample_dir=sample_dir)
    if args.probe:
        probes = {p.name: p for p in map(parse_probe, args.probe)}
    else:
        paths = build_sample_probes(sample_dir, sample_dir / "probes", n=args.probe_samples)
        probes = {c: ct_data.SourceConfig(c, p) for c, p in paths.items()}
    from ct_datamix.checkpoints import expand_checkpoints

    tok_path = args.tokenizer or str(expand_checkpoints(args.checkpoint)[0])
    tokenizer = ct_data.load_tokenizer(tok_path)
    return mixture, probes, tokenizer


def run_command(args) -> int:
    from ct_datamix import WeightRule, filter_by_influence, influence_weights
    from ct_datamix.outputs import reweighted_config, write_filter_outputs, write_report, write_yaml

    directory = config_dir(args.config_dir)
    path, raw = read_data_config(args.data, directory)
    mixture, probes, tokenizer = prepare(args, raw)
    kwargs = dict(samples_per_source=args.samples_per_source, probe_samples=args.probe_samples,
                  max_tokens=args.max_tokens, seed=args.seed, batch_size=args.batch_size, device=args.device,
                  rule=WeightRule(args.negative, args.floor, args.temperature), progress=not args.no_progress)
    if args.command == "weights":
        res = influence_weights(mixture, probes, args.checkpoint, tokenizer, **kwargs)
        out = Path(args.out)
        write_yaml(reweighted_config(raw, res.weights, f"ct-datamix weights of {path.name}: rho {res.rho}"), out)
        md, png = write_report(res, out)
        print(f"wrote {out}, {md}, {png}")
    else:
        out = Path(args.out)
        res = filter_by_influence(mixture, probes, args.checkpoint, tokenizer, out, **kwargs)
        config = write_filter_outputs(res, raw, out)
        print(f"wrote {config}; kept/dropped: " + ", ".join(f"{g} {res.kept[g]}/{res.dropped[g]}" for g in res.kept))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()

    def run() -> int:
        from ct_datamix import DatamixError

        try:
            return run_command(args)
        except DatamixError as err:  # ct-datamix's own bad-input errors, reported like the others
            raise UserFacingError(str(err)) from err

    return run_guarded(run)


if __name__ == "__main__":
    sys.exit(main())


# ----------------------------------------------------------------------------- ct-recipe --datamix
PIPELINE_MAX_TOKENS = 256


def reweight_phase(cfg: dict[str, Any], out_dir: Path, samples: int = 32, progress: bool = True) -> tuple[dict[str, Any], dict]:
    """One re-weighting round for a (mid-training) phase: its data mixture scored with the model it
    starts from (``init_from``) on the embedded probes. Returns (new data config, record for the
    summary); cached in ``out_dir`` so a resumed recipe run reuses it."""
    import json

    import yaml

    record_path, data_path = out_dir / "datamix.json", out_dir / "data.yaml"
    if record_path.is_file() and data_path.is_file():
        return yaml.safe_load(data_path.read_text()), json.loads(record_path.read_text())
    import ct_data
    from ct_datamix import build_sample_probes, influence_weights
    from ct_datamix.outputs import reweighted_config, write_report, write_yaml

    if not cfg.get("init_from"):
        raise UserFacingError(f"--datamix: phase {cfg['phase']['name']!r} has no init_from checkpoint to score with")
    sample_dir = Path(cfg["sample_data"]["dir"])
    mixture = ct_data.load_data_config(cfg["data"], sample_dir=sample_dir)
    paths = build_sample_probes(sample_dir, out_dir / "probes", n=samples)
    probes = {c: ct_data.SourceConfig(c, p) for c, p in paths.items()}
    tokenizer = ct_data.load_tokenizer(cfg["init_from"])
    res = influence_weights(mixture, probes, [cfg["init_from"]], tokenizer, seed=int(cfg["trainer"]["seed"]),
                            progress=progress, samples_per_source=samples,
                            probe_samples=samples, max_tokens=PIPELINE_MAX_TOKENS)
    data = reweighted_config(cfg["data"], res.weights, f"ct-recipe --datamix: rho {res.rho}")
    write_yaml(data, data_path)
    write_report(res, data_path)
    record = {"rho": res.rho, "weights": res.weights, "raised_to_floor": res.raised_to_floor,
              "checkpoint": cfg["init_from"], "data": str(data_path), "samples": samples}
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return data, record
