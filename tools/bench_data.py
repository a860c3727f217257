#!/usr/bin/env python
"""Throughput of the ct-data loading path, in tokens per second per core, against what GPUs need.

    .venv/bin/python tools/bench_data.py                          # everything, sample corpus, 8k BPE
    .venv/bin/python tools/bench_data.py --only shards,ranks --json out.json

Sections (``--only``, comma-separated; default all):
- raw:      the on-the-fly loader (read + tokenize + pack + batch, synchronous) for pretraining and
            reasoning SFT, and with its prefetch thread the mean time next() blocks per step;
- tokenize: ``ct-data tokenize`` of the sample pretraining sources, in this process on one core
            (Rust's own threads off), tokens/s per core;
- shards:   the loader on those shards (memory-mapped, no tokenizing), seq 2048 and 32,768, both
            packings: tokens/s per core, and the share of a GPU step the producing thread needs at
            the per-GPU rates of the recipe's models (950M ~75k, 140M ~400k tokens/s);
- ranks:    a simulated 128-rank job (rank r of 128, in this process): tokens/s of ranks 0, 64 and
            127 against a 1-rank loader with the same rows per process, and bytes each rank reads
            against what the whole global batch reads;
- resume:   cost of resuming at ~10 vs ~10^6 documents drawn (a synthetic 1.1M-document source),
            against the raw reader's skip to the same positions of a 1.1M-record jsonl file.
- cache:    the teacher cache's writer at k = 16/32/64 (V = 128,256, seq ``--seq-len``), top-k
            given (the teacher's forward is not in it: that is the model's cost): tokens/s per
            core for packing + hashing + safetensors + fsync (fastest of 5), bytes/token on disk and the storage
            per 100B tokens, for the current format (id + float16 log-prob in 32 bits) and the
            version-1 one (int32 ids + float16 planes; its writer loaded from git, commit
            ``CACHE_V1_COMMIT``); then reading it back by global sequence (tokens/s per core).

Per-core figures divide by the process's CPU time (``time.process_time``), so other jobs on a
shared machine slow the wall clock but not the figure; wall-clock rates are reported next to them.
Tokens counted are all positions of the produced batches (padding included; pretraining has none).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # per-core figures: one core for Rust too

GPU_NEEDS = {"mobilellm_950m": 75_000, "mobilellm_140m": 400_000}  # tokens/s per GPU (issue 25)
SECTIONS = ("raw", "tokenize", "shards", "ranks", "resume", "cache")
CACHE_V1_COMMIT = "341db60"  # the last commit with the version-1 teacher cache writer
CACHE_VOCAB = 128_256  # Llama-3's vocabulary: 17 id bits


def timed(fn):
    """(result, CPU seconds, wall seconds) of fn()."""
    c, w = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c, time.perf_counter() - w


def run_loader(loader, tokens: int) -> dict:
    first = next(loader)  # opening files, warm-up
    per_batch = first["input_ids"].numel()
    steps = max(1, tokens // per_batch)

    def go():
        for _ in range(steps):
            next(loader)

    _, cpu, wall = timed(go)
    n = steps * per_batch
    st = loader.stats()
    return {"steps": steps, "tokens": n, "cpu_s": round(cpu, 3), "wall_s": round(wall, 3),
            "tokens_per_s_per_core": round(n / cpu), "tokens_per_s_wall": round(n / wall),
            "packing_efficiency": round(st["packing_efficiency"], 4)}


def prefetch_wait(loader, steps: int, step_ms: float) -> dict:
    next(loader)
    waits = []
    for _ in range(steps):
        time.sleep(step_ms / 1000)
        t = time.perf_counter()
        next(loader)
        waits.append(time.perf_counter() - t)
    loader.close()
    return {"step_ms": step_ms, "mean_wait_ms": round(1000 * sum(waits) / len(waits), 3),
            "max_wait_ms": round(1000 * max(waits), 3)}


# ----------------------------------------------------------------------------- sections
def bench_raw(ctx, args) -> dict:
    from ct_data import build_pretrain_loader, build_sft_loader, sample

    tok, B, T = ctx["tok"], args.batch_size, args.seq_len
    pre = sample.pretrain_sources(args.sample_dir)
    return {
        "pretrain": run_loader(build_pretrain_loader(pre, tok, T, B, seed=0, prefetch=0), args.tokens),
        "sft": run_loader(build_sft_loader(sample.sft_sources(args.sample_dir, "reasoning"), tok, T, B, seed=0,
                                           prefetch=0), args.tokens),
        "prefetch": prefetch_wait(build_pretrain_loader(pre, tok, T, B, seed=0, prefetch=4), args.overlap_steps,
                                  args.step_ms),
    }


def bench_tokenize(ctx, args) -> dict:
    from ct_data import sample
    from ct_data.prepare import tokenize_sources

    out = Path(args.work_dir) / "shards"
    shutil.rmtree(out, ignore_errors=True)
    ms, cpu, wall = timed(lambda: tokenize_sources(sample.pretrain_sources(args.sample_dir), ctx["tok"], out,
                                                   workers=0, progress_stream=open(os.devnull, "w")))
    n = sum(m["totals"]["tokens"] for m in ms.values())
    return {"tokens": n, "docs": sum(m["totals"]["docs"] for m in ms.values()), "cpu_s": round(cpu, 3),
            "wall_s": round(wall, 3), "tokens_per_s_per_core": round(n / cpu), "tokens_per_s_wall": round(n / wall),
            "bytes": sum(m["totals"]["bin_bytes"] + m["totals"]["idx_bytes"] for m in ms.values())}


def prepared_sources(ctx, args):
    from ct_data import SourceConfig, sample
    from ct_data.prepare import tokenize_sources

    out = Path(args.work_dir) / "shards"
    srcs = sample.pretrain_sources(args.sample_dir)
    if not all((out / s.name / "manifest.json").is_file() for s in srcs):
        tokenize_sources(srcs, ctx["tok"], out, workers=0, progress_stream=open(os.devnull, "w"))
    return [SourceConfig(s.name, str(out / s.name), weight=s.weight) for s in srcs]


def bench_shards(ctx, args) -> dict:
    from ct_data import build_pretrain_loader

    prep = prepared_sources(ctx, args)
    out = {}
    for T in (2048, 32768):
        for packing in ("mixed", "per_source"):
            r = run_loader(build_pretrain_loader(prep, ctx["tok"], T, args.batch_size, seed=0, prefetch=0,
                                                 packing=packing), max(args.tokens, 4 * args.batch_size * T))
            # CPU time the producing thread spends per GPU step, as a share of that step.
            r["thread_share_of_gpu_step"] = {m: round(need / r["tokens_per_s_per_core"], 4)
                                             for m, need in GPU_NEEDS.items()}
            out[f"seq{T}_{packing}"] = r
    out["prefetch"] = prefetch_wait(build_pretrain_loader(prep, ctx["tok"], args.seq_len, args.batch_size, seed=0,
                                                          prefetch=4), args.overlap_steps, args.step_ms)
    return out


def bench_ranks(ctx, args) -> dict:
    from ct_data import build_pretrain_loader

    prep = prepared_sources(ctx, args)
    W, per_rank, T, steps = 128, args.batch_size, args.seq_len, args.rank_steps
    B = W * per_rank

    def read_bytes(loader):
        return sum(ds.bytes_read for ds in loader._datasets)

    def measure(rank, world, batch):
        loader = build_pretrain_loader(prep, ctx["tok"], T, batch, seed=0, rank=rank, world_size=world, prefetch=0)
        r = run_loader(loader, steps * (batch // world) * T)
        r["bytes_read"] = read_bytes(loader)
        return r

    one = measure(0, 1, per_rank)
    ranks = {r: measure(r, W, B) for r in (0, 64, 127)}
    whole = build_pretrain_loader(prep, ctx["tok"], T, B, seed=0, prefetch=0)
    for _ in range(steps + 1):  # the same steps as each rank (its warm-up batch included)
        next(whole)
    total = read_bytes(whole)
    return {"world_size": W, "global_batch": B, "rows_per_rank": per_rank, "seq_len": T, "steps": steps,
            "one_rank_loader": one,
            "ranks": {r: {**v, "share_of_global_bytes": round(v["bytes_read"] / total, 5),
                          "tokens_per_s_vs_one_rank": round(v["tokens_per_s_per_core"] / one["tokens_per_s_per_core"], 3)}
                      for r, v in ranks.items()},
            "global_batch_bytes_read": total}


def bench_resume(ctx, args) -> dict:
    import numpy as np

    from ct_data import SourceConfig, build_pretrain_loader
    from ct_data.indexed import IndexedWriter
    from ct_data.sources import iter_record_batches, open_dataset

    work = Path(args.work_dir) / "resume"
    work.mkdir(parents=True, exist_ok=True)
    n_docs = 1_100_000
    rng = np.random.default_rng(0)
    lengths = rng.integers(8, 40, n_docs)
    prefix = work / "big"
    if not (work / "big.idx").is_file():
        w = IndexedWriter(prefix, np.dtype(np.uint16))
        w.add_many(rng.integers(300, ctx["tok"].vocab_size, int(lengths.sum())), lengths.tolist())
        w.finish()
    src = [SourceConfig("big", str(prefix), file_format="indexed")]
    B, T = args.batch_size, args.seq_len

    def build():
        return build_pretrain_loader(src, ctx["tok"], T, B, seed=0, prefetch=0, packing="per_source")

    loader = build()
    states, drawn = {}, 0
    while drawn < 1_000_000:
        next(loader)
        st = loader.state_dict()
        drawn = sum(r["cursors"]["big"] for r in st["rows"].values())
        states.setdefault("early", (drawn, st))
        states["late"] = (drawn, st)

    def resume(st):
        fresh = build()
        fresh.load_state_dict(st)
        return next(fresh)

    out = {}
    for k, (d, st) in states.items():
        resume(st)  # warm the page cache, as a restarted job on the same node would have it
        _, cpu, wall = timed(lambda: resume(st))
        out[f"shards_{k}"] = {"docs_drawn": d, "cpu_ms": round(1000 * cpu, 1), "wall_ms": round(1000 * wall, 1),
                              "state_bytes": len(json.dumps(st))}
    # The raw reader re-opens a jsonl source at the smallest cursor and skips the records before it.
    jl = work / "big.jsonl"
    if not jl.is_file():
        with open(jl, "w") as f:
            for i in range(n_docs):
                f.write(json.dumps({"text": f"document {i}"}) + "\n")
    raw = SourceConfig("big", str(jl))
    ds = open_dataset(raw)
    for k, start in (("raw_early", 10), ("raw_late", 1_000_000)):
        _, cpu, wall = timed(lambda: next(iter(iter_record_batches(raw, ds, start, 256))))
        out[k] = {"docs_skipped": start, "cpu_ms": round(1000 * cpu, 1), "wall_ms": round(1000 * wall, 1)}
    return out


def _cache_v1_module(work: Path):
    """ct_distill's version-1 cache module, loaded from git as a submodule of today's package."""
    import importlib.util
    import subprocess

    src = subprocess.run(["git", "show", f"{CACHE_V1_COMMIT}:packages/ct-distill/src/ct_distill/cache.py"],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1]).stdout
    path = work / "cache_v1.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("ct_distill._bench_cache_v1", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _topk_batches(n_seqs: int, rows: int, T: int, k: int, seed: int):
    """Seeded top-k targets shaped like a teacher's: distinct ids per position are not needed by
    the writer; log-probs sorted decreasing, from about -0.1 down to about -25."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(0, n_seqs, rows):
        ids = torch.randint(0, CACHE_VOCAB, (rows, T, k), generator=g)
        lp = -(torch.rand(rows, T, k, generator=g) * 5).exp().sort(-1).values.clamp_max(25.0)
        out.append((torch.randint(0, CACHE_VOCAB, (rows, T), generator=g), ids, lp))
    return out


def cache_kd_difference(positions: int = 32, k: int = 64) -> dict:
    """KD loss on cached log-probs as the packed entry stores them, against float16 planes and the
    float32 log-probs, for vocabularies that pack losslessly (<= 2^17 ids) and those that round the
    log-prob to fewer bits (18 and 20 id bits). Seeded teacher/student logits (std 3)."""
    import torch
    from ct_distill import TopK, kd_loss
    from ct_distill.cache_entries import entry_layout, pack_entries, unpack_entries

    out = {}
    for vocab in (CACHE_VOCAB, 200_064, 2**20):
        g = torch.Generator().manual_seed(vocab)
        teacher = torch.randn(positions, vocab, generator=g) * 3
        student = torch.randn(positions, vocab, generator=g) * 3
        top = teacher.log_softmax(-1).topk(k, -1)
        ids, exact = top.indices, top.values
        _, packed = unpack_entries(pack_entries(ids, exact, vocab_size=vocab), vocab_size=vocab)
        stored = {"fp32": exact, "fp16": exact.half().float(), "packed": packed}
        row = {"id_bits": entry_layout(vocab)[0], "logprob_bits": entry_layout(vocab)[1]}
        for kind in ("forward_kl", "reverse_kl", "jsd"):
            for temperature in (1.0, 2.0):
                loss = {name: kd_loss(student, TopK(ids, lp), kind=kind, temperature=temperature, top_k=k).item()
                        for name, lp in stored.items()}
                row[f"{kind}_T{temperature:g}"] = {
                    "loss_fp32": round(loss["fp32"], 6),
                    "packed_vs_fp16_rel": float(f"{abs(loss['packed'] - loss['fp16']) / abs(loss['fp16']):.2g}"),
                    "packed_vs_fp32_rel": float(f"{abs(loss['packed'] - loss['fp32']) / abs(loss['fp32']):.2g}"),
                    "fp16_vs_fp32_rel": float(f"{abs(loss['fp16'] - loss['fp32']) / abs(loss['fp32']):.2g}")}
        out[f"V{vocab}"] = row
    return out


def bench_cache(ctx, args) -> dict:
    import torch
    from ct_distill import TeacherCacheReader, TeacherCacheWriter

    work = Path(args.work_dir) / "cache"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    v1 = _cache_v1_module(work)
    T, rows = args.seq_len, 8
    n_seqs = max(rows, -(-args.cache_tokens // T) // rows * rows)
    teacher = {"name": "bench", "fingerprint": "0"}
    out = {"vocab_size": CACHE_VOCAB, "seq_len": T, "tokens": n_seqs * T, "v1_commit": CACHE_V1_COMMIT}
    for k in (16, 32, 64):
        batches = _topk_batches(n_seqs, rows, T, k, seed=k)
        row = {}
        for name, make in (("v2_packed32", lambda root: TeacherCacheWriter(root, seq_len=T, k=k, vocab_size=CACHE_VOCAB,
                                                                        teacher=teacher)),
                           ("v1_int32_fp16", lambda root: v1.TeacherCacheWriter(root, seq_len=T, k=k, vocab_size=CACHE_VOCAB,
                                                                             teacher=teacher))):
            root = work / f"k{k}_{name}"

            def write():
                with make(root) as w:
                    for input_ids, ids, lp in batches:
                        w.add(input_ids, (ids, lp))

            runs = []
            for _ in range(5):  # the fastest of 5 writes: the least disturbed by a shared machine
                shutil.rmtree(root, ignore_errors=True)
                runs.append(timed(write)[1:])
            cpu, wall = min(runs)
            n = n_seqs * T
            size = sum(f.stat().st_size for f in root.rglob("*.safetensors"))
            row[name] = {"cpu_s": round(cpu, 3), "wall_s": round(wall, 3),
                         "write_tokens_per_s_per_core": round(n / cpu), "write_tokens_per_s_wall": round(n / wall),
                         "bytes_per_token": round(size / n, 3), "tb_per_100b_tokens": round(size / n * 1e11 / 1e12, 2)}
        reader = TeacherCacheReader(work / f"k{k}_v2_packed32")
        def read():
            return [reader.annotate({"input_ids": b[0]}, range(i * rows, (i + 1) * rows)) for i, b in enumerate(batches)]

        _, cpu, wall = min((timed(read) for _ in range(5)), key=lambda r: r[1])  # the fastest of 5
        row["v2_packed32"]["read_tokens_per_s_per_core"] = round(n_seqs * T / cpu)
        got = reader.get(range(rows))
        assert torch.equal(got.ids, batches[0][1]) and torch.equal(got.logprobs, batches[0][2].half().float())
        row["ratio_v1_over_v2"] = round(row["v1_int32_fp16"]["bytes_per_token"] / row["v2_packed32"]["bytes_per_token"], 3)
        out[f"k{k}"] = row
        shutil.rmtree(work / f"k{k}_v1_int32_fp16")
        shutil.rmtree(work / f"k{k}_v2_packed32")
    out["kd_loss"] = cache_kd_difference()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sample-dir", default=os.path.join(tempfile.gettempdir(), "ct_data_bench_sample"))
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "ct_data_bench_work"))
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory or hub name (default: a BPE trained on the sample)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8, help="global batch (rows per step); ranks: rows per rank")
    p.add_argument("--tokens", type=int, default=1_000_000, help="tokens to produce per measurement")
    p.add_argument("--rank-steps", type=int, default=100, help="steps per loader in the 128-rank simulation")
    p.add_argument("--step-ms", type=float, default=200.0, help="simulated training step for the prefetch test")
    p.add_argument("--overlap-steps", type=int, default=20)
    p.add_argument("--cache-tokens", type=int, default=262_144, help="tokens written per cache measurement")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    only = args.only.split(",")
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        p.error(f"--only: unknown section(s) {unknown}")

    from ct_data import load_tokenizer, sample

    build_s = tok_s = None
    tok = None
    if set(only) - {"cache"}:  # the cache section needs neither the sample corpus nor a tokenizer
        (_, _, build_s) = timed(lambda: sample.build(args.sample_dir, seed=0))
        tok, _, tok_s = timed(lambda: load_tokenizer(args.tokenizer) if args.tokenizer
                              else sample.build_tokenizer(args.sample_dir, args.vocab_size))
    ctx = {"tok": tok}
    results = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_average": os.getloadavg()},
        "config": {"seq_len": args.seq_len, "batch_size": args.batch_size,
                   "vocab_size": tok.vocab_size if tok else None, "tokens": args.tokens},
        "gpu_needs_tokens_per_s": GPU_NEEDS,
        "sample_build_s": None if build_s is None else round(build_s, 2),
        "tokenizer_s": None if tok_s is None else round(tok_s, 2),
    }
    for name in SECTIONS:
        if name in only:
            results[name] = globals()[f"bench_{name}"](ctx, args)
            print(f"{name}: done", file=sys.stderr)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
