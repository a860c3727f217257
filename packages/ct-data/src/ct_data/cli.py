"""``ct-data``: prepare pretraining data as pre-tokenized indexed shards, and check them.

    ct-data tokenize configs/data/pretrain_phase1.yaml --tokenizer meta-llama/Llama-3.2-1B --out /data/p1
    ct-data tokenize sample_pretrain --sample-dir runs/sample --tokenizer runs/sample/tokenizer-8192 --out data/tok
    ct-data verify /data/p1/fineweb_edu          # every file's SHA-256 against the manifest
    ct-data inspect /data/p1/fineweb_edu         # documents, tokens, dtype, shards

``tokenize`` writes ``OUT/<source>/`` per pretraining source and ``OUT/<mixture>.yaml``: the same
mixture (weights, loader options) reading the prepared shards; copy it to configs/data/ and train
with ``data=<its name>``. Rerunning after a kill continues where it stopped. Exit status 2 on a
configuration or data error (the message names the file or field).

Importing this module needs only ct-data's own dependencies (no hydra, no megatron).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

EXIT_USER_ERROR = 2


def _config_path(name: str) -> Path:
    p = Path(name)
    if p.is_file():
        return p
    for root in filter(None, [os.environ.get("CT_CONFIG_DIR"), "configs"]):
        cand = Path(root) / "data" / f"{name.removesuffix('.yaml')}.yaml"
        if cand.is_file():
            return cand
    from ct_data.config import DataConfigError

    raise DataConfigError(f"data config {name!r}: no such file (nor configs/data/{name}.yaml)")


def cmd_tokenize(args) -> int:
    import yaml

    from ct_data.config import DataConfigError
    from ct_data.mixture import load_data_config
    from ct_data.prepare import prepared_mixture_dict, tokenize_sources
    from ct_data.tokenizer import load_tokenizer

    path = _config_path(args.config)
    mixture = load_data_config(path, sample_dir=args.sample_dir)
    if mixture.kind != "pretrain":
        raise DataConfigError(f"data config {str(path)!r}: kind {mixture.kind!r}; only pretraining mixtures are "
                              f"tokenized ahead (SFT data is formatted on the fly from its source)")
    tok_name = args.tokenizer or mixture.tokenizer
    if not tok_name:
        raise DataConfigError(f"data config {str(path)!r} names no tokenizer: pass --tokenizer")
    try:
        tokenizer = load_tokenizer(tok_name)
    except (OSError, ValueError) as e:
        raise DataConfigError(f"--tokenizer {tok_name}: cannot load a tokenizer ({type(e).__name__}: {e})") from e
    sources = [s for s in mixture.sources if s.weight > 0]
    if args.sources:
        want = args.sources.split(",")
        unknown = sorted(set(want) - {s.name for s in sources})
        if unknown:
            raise DataConfigError(f"--sources: {unknown} not in {str(path)!r} ({[s.name for s in sources]})")
        sources = [s for s in sources if s.name in want]
    sources = [s for s in sources if s.file_format != "indexed"]
    manifests = tokenize_sources(sources, tokenizer, args.out, workers=args.workers)
    for name, m in manifests.items():
        t = m["totals"]
        skipped = f", skipped {t['skipped']}" if t["skipped"] else ""
        print(f"{name}: {t['docs']:,} documents, {t['tokens']:,} tokens ({m['dtype']}, {t['bin_bytes'] / 2**20:,.1f} MiB "
              f"in {len(m['shards'])} shard(s)){skipped} -> {Path(args.out) / name}")
    out_yaml = Path(args.write_config) if args.write_config else Path(args.out) / f"{mixture.name or 'prepared'}.yaml"
    out_yaml.parent.mkdir(parents=True, exist_ok=True)
    out_yaml.write_text(yaml.safe_dump(prepared_mixture_dict(mixture, args.out, manifests), sort_keys=False))
    print(f"data config: {out_yaml}")
    return 0


def cmd_verify(args) -> int:
    from ct_data.prepared import PreparedSource, verify

    bad = 0
    for d in args.dirs:
        problems = verify(d)
        if not problems:
            src = PreparedSource(d)  # the structural checks too
            for k in range(len(src.prefixes)):
                src.shard(k)
        for p in problems:
            print(p, file=sys.stderr)
        bad += bool(problems)
        print(f"{d}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return EXIT_USER_ERROR if bad else 0


def cmd_inspect(args) -> int:
    from ct_data.prepared import PreparedSource

    src = PreparedSource(args.path)
    tokens = sum(int(src.shard(k).doc_lengths().sum()) for k in range(len(src.prefixes)))
    dtype = src.shard(0).dtype
    tok = (src.manifest or {}).get("tokenizer", {})
    print(f"{args.path}: {src.num_docs:,} documents, {tokens:,} tokens, {dtype}, {len(src.prefixes)} shard(s)"
          + (f", tokenizer {tok.get('name')!r} (sha256 {tok.get('sha256', '')[:12]}...)" if tok else
             ", no manifest (megatron data: the tokenizer is not recorded)"))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ct-data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tokenize", help="a pretraining data config -> pre-tokenized indexed shards")
    t.add_argument("config", help="data config YAML (or the name of one under configs/data/)")
    t.add_argument("--out", required=True, help="output directory (one subdirectory per source)")
    t.add_argument("--tokenizer", help="tokenizer directory or hub name (default: the config's `tokenizer:`)")
    t.add_argument("--sample-dir", help="what {sample_dir} in source paths stands for")
    t.add_argument("--workers", type=int, default=None, help="worker processes (default: CPU count; 0: in process)")
    t.add_argument("--sources", help="comma-separated source names (default: every source of weight > 0)")
    t.add_argument("--write-config", help="where to write the prepared data config (default: OUT/<name>.yaml)")
    t.set_defaults(fn=cmd_tokenize)
    v = sub.add_parser("verify", help="recompute every file's SHA-256 against the manifest")
    v.add_argument("dirs", nargs="+")
    v.set_defaults(fn=cmd_verify)
    i = sub.add_parser("inspect", help="documents, tokens, dtype of a prepared source or megatron prefix")
    i.add_argument("path")
    i.set_defaults(fn=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    from ct_model.errors import UserError

    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return args.fn(args)
    except UserError as e:
        print(f"ct-data {args.cmd}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"ct-data {args.cmd}: interrupted; run the same command again to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
