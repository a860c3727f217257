"""Run under torchrun (2 processes, gloo) through megatron_cpu_run.py: the megatron engine's THD
path (packed documents as one flattened row with cu_seqlens) against the single-process ct-model.

Transformer Engine (the attention that takes THD) needs CUDA, and megatron's local attention
refuses THD, so this script swaps in a test-only core attention that does take THD: plain causal
SDPA per cu_seqlens segment (``VarlenAttention``). Everything else is the engine's own THD path:
PackedSeqParams from the document ids, flattening to [1, B * T], megatron's THD RoPE from the
flattened position ids, the pipeline's message shapes, and the logits unflattened for the loss.

    torchrun --nproc-per-node 2 megatron_cpu_run.py dist_megatron_thd_checks.py OUT_JSON
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention

import parallel_testlib as lib
from ct_model import build_model
from ct_parallel import DistributedConfig, build_engine, init_distributed
from ct_parallel.megatron import engine as engine_mod
from ct_parallel.megatron import model as model_mod

LAYOUTS = {
    "dp2": dict(),
    "pp2": dict(pipeline_model_parallel_size=2),
    "tp2_sp": dict(tensor_model_parallel_size=2, sequence_parallel=True),
}


class VarlenAttention(DotProductAttention):
    """TEST-ONLY: megatron's local core attention, extended to THD by attending causally within each
    cu_seqlens segment (the dense path, attention_mask given, is megatron's own)."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)
        assert attention_mask is None and packed_seq_params.qkv_format == "thd"
        cu = packed_seq_params.cu_seqlens_q.tolist()
        groups = query.shape[1] // key.shape[1]
        out = torch.empty_like(query)
        for start, end in zip(cu[:-1], cu[1:]):
            q = query[start:end].transpose(0, 1)  # [heads, L, d]
            k = key[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)
            v = value[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
            out[start:end] = o.transpose(0, 1)
        return out.reshape(out.shape[0], -1)


def force_thd_on_the_local_spec() -> None:
    original = model_mod.layer_spec

    def layer_spec(model_config, te, thd=None, moe=False):
        spec = original(model_config, te, thd, moe)
        core = VarlenAttention
        if model_config.qk_layernorm:
            core = model_mod.post_rope_qk_norm(VarlenAttention, model_config.layernorm_epsilon)
        spec.submodules.self_attention.submodules.core_attention = core
        return spec

    model_mod.layer_spec = layer_spec
    # THD without TE: an engine whose thd property says so (parallelize imports the class per call).
    engine_mod.MegatronEngine = type("ThdEngine", (engine_mod.MegatronEngine,), {"thd": True})


def packed_batch(config, n_micro: int = 4, b: int = 2, t: int = 16, seed: int = 0) -> list[dict]:
    """What ct_data's loader produces: several documents per row, a document continued from the
    previous sequence (positions not starting at 0), padding at a row's end (document id -1,
    positions 0.., labels -100), a row holding one document, and document ids restarting per row."""
    g = torch.Generator().manual_seed(seed)
    layouts = [  # per row: (length, first position) of each document; None = padding
        [[(3, 7), (6, 0), (7, 0)], [(16, 0)]],
        [[(10, 0), (6, None)], [(2, 4), (2, 0), (9, 0), (3, None)]],
        [[(1, 0), (15, 0)], [(5, 0), (5, 0), (6, 0)]],
        [[(16, 5)], [(4, 0), (12, None)]],
    ]
    out = []
    for i in range(n_micro):
        ids = torch.randint(0, config.vocab_size, (b, t + 1), generator=g)
        labels = ids[:, 1:].clone()
        doc = torch.empty(b, t, dtype=torch.long)
        pos = torch.empty(b, t, dtype=torch.long)
        for r, row in enumerate(layouts[i % len(layouts)][:b]):
            col = 0
            for d, (n, first) in enumerate(row):
                doc[r, col:col + n] = -1 if first is None else d
                pos[r, col:col + n] = torch.arange(n) + (first or 0)
                if first is None:
                    labels[r, col:col + n] = -100
                else:
                    labels[r, col + n - 1] = -100  # no target across a document boundary
                col += n
            assert col == t
        out.append({"input_ids": ids[:, :-1].contiguous(), "labels": labels, "position_ids": pos,
                    "document_ids": doc})
    return out


def check_layout(name, config, batch, ref, results):
    losses_ref, grads_ref, params_ref = ref
    t0 = time.perf_counter()
    dcfg = DistributedConfig(engine="megatron", **LAYOUTS[name])
    info = init_distributed(dcfg)
    engine = build_engine(build_model(config, seed=0), dcfg)
    assert engine.thd, "the THD path was not taken"
    losses, grads, params = lib.run_engine(engine, lib.shard_for_dp(batch, info.dp_rank, info.dp_size),
                                           grads_fn=engine.full_grad_state_dict)
    results[name] = {"loss": lib.compare_losses(f"{name} loss", losses, losses_ref),
                     "grad": lib.compare(f"{name} grads", grads, grads_ref),
                     "param": lib.compare(f"{name} params", params, params_ref, tol=lib.PARAM_TOL),
                     "seconds": time.perf_counter() - t0}


def main():
    out_path, *names = sys.argv[1:]
    config = lib.tiny_config()
    batch = packed_batch(config)
    ref = lib.reference(config, batch)
    force_thd_on_the_local_spec()
    results = {}
    for name in names or list(LAYOUTS):
        check_layout(name, config, batch, ref, results)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
