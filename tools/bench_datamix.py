"""Throughput and peak memory of `ct-datamix weights` (ct_datamix.influence_weights), and a FLOP
projection to 10k samples per source on mobilellm_950m.

    .venv/bin/python tools/bench_datamix.py [--samples-per-source 16] [--max-tokens 256] [--json out.json]

Model: mobilellm_tiny (random init: the cost does not depend on the weights), the embedded
sample_midtrain mix (3 sources) and the embedded code/math/knowledge probes. Baseline measured in
the same run: one ordinary forward+backward (all parameter gradients) per sample over the same
samples, i.e. what a training step on them costs (the faster of a run before and one after).
The datamix time is end to end: reading and tokenising the samples and probes, loading the
checkpoint, four passes. Peak memory: the process's peak RSS growth.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def flops_per_sample(cfg, T: int, domains: int) -> float:
    """Forward + activation backward (no weight gradients: ~2x forward) of the decoder, 4 passes
    (probes count once, amortised away for 10k samples), plus the factored-gradient algebra."""
    from ct_model import count_parameters

    N = count_parameters(cfg)
    V, h = cfg.vocab_size, cfg.hidden_size
    network = 3 * (2 * N * T + 4 * N * T)          # 3 passes over each training sample
    sqnorm = T * T * (V + 2 * h) * 2                # Gram of G and of D
    per_domain = 2 * T * V * h * 2 * 3              # output dot (pass A), accumulate (B), dot (C)
    return network + sqnorm + domains * per_domain


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples-per-source", type=int, default=16)
    ap.add_argument("--probe-samples", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--scale", type=float, default=0.1)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(0)
    import ct_data
    from ct_data import sample
    from ct_datamix import build_sample_probes, influence_weights
    from ct_datamix.grads import pad_batch, sample_losses
    from ct_datamix.samples import draw_samples
    from ct_model import build_model, presets
    from ct_model.hf import save_hf

    tmp = Path(tempfile.mkdtemp())
    sample.build(tmp / "s", seed=0, scale=args.scale)
    tok = sample.build_tokenizer(tmp / "s", 8192, split_digits=True)
    cfg = presets.get("mobilellm_tiny")
    model = build_model(cfg, seed=0)
    save_hf(model, tmp / "hf")
    tok.save(tmp / "hf")
    mix = ct_data.load_data_config(ROOT / "configs" / "data" / "sample_midtrain.yaml", sample_dir=tmp / "s")
    probes = {c: ct_data.SourceConfig(c, p) for c, p in build_sample_probes(tmp / "s", tmp / "p", n=args.probe_samples).items()}
    n = args.samples_per_source * len(mix.sources)

    # Baseline: a plain training backward over the same samples (batch 8).
    ids = [x.ids for s in mix.sources for x in draw_samples(s, tok, args.samples_per_source, args.max_tokens, 0)]
    def baseline() -> float:
        t0 = time.perf_counter()
        for i in range(0, len(ids), 8):
            x, y = pad_batch(ids[i: i + 8], tok.pad_id)
            model.zero_grad()
            sample_losses(model(x), y).sum().backward()
        return time.perf_counter() - t0

    rss0 = rss_mib()
    x, y = pad_batch(ids[:8], tok.pad_id)
    sample_losses(model(x), y).sum().backward()  # warm-up (thread pool, allocator)
    base_first = baseline()
    rss_base = rss_mib()

    t0 = time.perf_counter()
    res = influence_weights(mix, probes, [str(tmp / "hf")], tok, samples_per_source=args.samples_per_source,
                            probe_samples=args.probe_samples, max_tokens=args.max_tokens, progress=False)
    dm_s = time.perf_counter() - t0
    rss_dm = rss_mib()
    base_s = min(base_first, baseline())  # before and after: the shared cores' load varies
    T = int(sum(len(s.ids) for s in res.samples) / len(res.samples))
    f_tiny = flops_per_sample(cfg, T, len(probes))
    achieved = f_tiny * n / dm_s
    big = presets.get("mobilellm_950m")
    f_big = flops_per_sample(big, args.max_tokens, len(probes))
    sources_950 = 9  # the mid-training phase-1 mixture
    total_big = f_big * 10_000 * sources_950
    out = {
        "samples": n, "mean_tokens": T, "datamix_s": dm_s, "datamix_samples_per_s": n / dm_s,
        "baseline_backward_s": base_s, "baseline_samples_per_s": n / base_s, "time_ratio_vs_backward": dm_s / base_s,
        "peak_rss_mib": rss_dm, "rss_before_mib": rss0, "rss_after_baseline_mib": rss_base,
        "rss_growth_ratio_vs_baseline": (rss_dm - rss0) / max(rss_base - rss0, 1.0),
        "achieved_gflops": achieved / 1e9,
        "projection_950m": {"flops_per_sample": f_big, "samples": 10_000 * sources_950, "total_pflop": total_big / 1e15,
                            "hours_at_measured_cpu_rate": total_big / achieved / 3600,
                            "hours_at_300_tflops_gpu": total_big / 300e12 / 3600},
        "weights": res.weights,
    }
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
