"""ct-plan against hand computations: every number below is worked out here from the published
shapes (MobileLLM-R1 950M, DeepSeek-V3 671B), not by calling the planner's helpers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ct_model
from ct_cli import plan as plan_cli
from ct_parallel import DistributedConfig
from ct_parallel.plan import PlanError, Workload, plan, smallest_fitting

ROOT = Path(__file__).resolve().parents[1]


def ct_plan_json(capsys, *args: str) -> dict:
    assert plan_cli.main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# ------------------------------------------------------------------------------ mobilellm_950m
# 22 layers, hidden 1536, 24 heads, 6 KV groups of head dim 64, SwiGLU 6144, vocab 128256, tied.
EMBEDDING_950M = 128_256 * 1536
LAYER_950M = (1536 * 1536 + 2 * 1536 * 384 + 1536 * 1536) + 3 * 1536 * 6144 + 2 * 1536  # attn + MLP + norms
PARAMS_950M = EMBEDDING_950M + 22 * LAYER_950M + 1536  # + final norm
TOKENS_950M = 4 * 2048  # micro-batch 4 x 2048


def test_mobilellm_950m_on_8_gpus_with_the_distributed_optimizer(capsys):
    assert PARAMS_950M == 949_685_760 == ct_model.count_parameters(ct_model.presets.get("mobilellm_950m"))
    out = ct_plan_json(capsys, "model=mobilellm_950m", "distributed=megatron_dp_distopt", "--world-size", "8",
                       "seq_len=2048", "trainer.micro_batch_size=4")
    (stage,) = out["stages"]
    assert out["layout"]["dp"] == 8 and stage["parameters"] == PARAMS_950M
    # Composed as ct-train composes it (pretrain_phase1 at recipe size: 2048 rows a step, so 2048 /
    # (8 x 4) = 64 microbatches per replica); precision=auto is bf16 on the CUDA a plan is for.
    w = out["workload"]
    assert (w["num_microbatches"], w["precision"], w["recompute"], w["device"]) == (64, "bf16", "none", "cuda")
    # bf16 params (2 bytes), fp32 main grads (4), fp32 master + two moments (12) over DP 8.
    assert stage["parameter_bytes"] == 2 * PARAMS_950M
    assert stage["gradient_bytes"] == 4 * PARAMS_950M
    assert stage["optimizer_bytes"] == pytest.approx(12 * PARAMS_950M / 8)
    # Activations per token of one layer, 2 bytes an element: norm and sublayer inputs 4 x 2h; Q, O
    # 2 x 2 x 24 x 64 and K, V 2 x 2 x 6 x 64; SwiGLU gate, up, product 3 x 2 x 6144. On CUDA
    # ct-train's megatron engine builds Transformer Engine's spec, whose fused attention keeps no
    # T x T scores: the paper's 5 a s softmax term (245,760 bytes per token, counted here before)
    # is not kept, and selective recompute (core attention) has nothing left to save.
    whole, split = 8 * 1536, 2 * 2 * 24 * 64 + 2 * 2 * 6 * 64 + 6 * 6144
    assert (whole, split) == (12_288, 44_544)
    output = TOKENS_950M * (4 * 1536 + 4 * 128_256)  # final-norm/output inputs, fp32 logits
    none = 22 * TOKENS_950M * (whole + split) + output
    # Full: each layer keeps its input, and backward recomputes one layer at a time from that
    # input (reused, so not counted twice: the previous count added the input again).
    full = 22 * TOKENS_950M * 2 * 1536 + TOKENS_950M * (whole + split - 2 * 1536) + output
    assert stage["activation_bytes_by_recompute"] == pytest.approx({"none": none, "selective": none, "full": full})
    assert none == 14_495_514_624  # 13.50 GiB: with 2 + 4 + 1.5 bytes/param, 20.1 GiB in all
    assert stage["total_bytes"] == pytest.approx(7.5 * PARAMS_950M + none)
    assert out["fits"] is True and out["capacity_bytes"] == 80e9


def test_megatron_local_spec_keeps_its_softmax_and_mask(capsys):
    """transformer_impl=local (what auto builds without CUDA): the softmax's fp32 output and the
    bf16 probabilities, 6 bytes per score (measured in the engine), a x s per token and layer, and
    the dense [4, 1, 2048, 2048] bool document mask of the microbatch."""
    from ct_parallel.megatron import transformer_impl
    from ct_parallel.plan import LOCAL_ATTENTION_BYTES_PER_SCORE

    assert LOCAL_ATTENTION_BYTES_PER_SCORE["bf16"] == transformer_impl.LOCAL_ATTENTION_BYTES_PER_SCORE == 6
    out = ct_plan_json(capsys, "model=mobilellm_950m", "distributed=megatron_dp_distopt", "--world-size", "8",
                       "seq_len=2048", "trainer.micro_batch_size=4", "distributed.transformer_impl=local")
    (stage,) = out["stages"]
    whole, split, scores = 12_288, 44_544, 6 * 24 * 2048
    mask, output = 4 * 2048 * 2048, TOKENS_950M * (4 * 1536 + 4 * 128_256)
    none = 22 * TOKENS_950M * (whole + split + scores) + mask + output
    # Selective: no layer keeps its scores, but backward recomputes one layer's at a time.
    selective = 22 * TOKENS_950M * (whole + split) + TOKENS_950M * scores + mask + output
    assert stage["activation_bytes_by_recompute"]["none"] == pytest.approx(none)
    assert stage["activation_bytes_by_recompute"]["selective"] == pytest.approx(selective)


def test_mobilellm_950m_under_fsdp2_shards_everything(capsys):
    out = ct_plan_json(capsys, "model=mobilellm_950m", "distributed=fsdp2", "--world-size", "8", "seq_len=2048",
                       "trainer.micro_batch_size=4", "activation_checkpointing.mode=selective")
    (stage,) = out["stages"]
    assert out["layout"]["zero"] == 3
    # fp32 sharded params, grads and moments (4 + 4 + 8 over 8), plus, gathered in bf16: two blocks
    # and the root's embedding (tied: also the output layer) and final norm, which ct's FSDP2 keeps
    # unsharded from the forward to the end of backward (reshard_after_forward=False).
    assert stage["parameter_bytes"] == pytest.approx(4 * PARAMS_950M / 8 + 2 * (2 * LAYER_950M + EMBEDDING_950M + 1536))
    assert stage["gradient_bytes"] == pytest.approx(4 * PARAMS_950M / 8)
    assert stage["optimizer_bytes"] == pytest.approx(8 * PARAMS_950M / 8)
    # 64 microbatches a step: FSDP2 reduce-scatters on the last one only, so the earlier ones'
    # unsharded gradients accumulate in fp32 on every rank, all of them, during the last forward.
    assert stage["gradient_bytes_in_forward"] == pytest.approx(4 * PARAMS_950M)


# ---------------------------------------------------------------------------- deepseek_v3_671b
# 61 layers (3 dense), hidden 7168, 128 heads, MLA (q_lora 1536, kv_lora 512, qk 128 + rope 64,
# v 128), dense MLP 18432, 256 routed experts of 2048 + one shared of 2048, top-8, vocab 129280.
MLA_REPLICATED = 7168 * 1536 + 7168 * (512 + 64)  # q_down, kv_down: whole on every TP rank
MLA_SPLIT = 1536 * 128 * (128 + 64) + 512 * 128 * (128 + 128) + 128 * 128 * 7168  # q_up, kv_up, o
NORMS = 2 * 7168 + 1536 + 512
DENSE_LAYER = MLA_REPLICATED + MLA_SPLIT + NORMS + 3 * 7168 * 18_432
MOE_LAYER_NON_EXPERT = MLA_REPLICATED + MLA_SPLIT + NORMS + 7168 * 256 + 3 * 7168 * 2048  # + router, shared
EXPERTS_PER_GPU = 256 * 3 * 7168 * 2048 // 64  # EP 64: 4 experts per GPU per layer
EMBEDDING_671B = 129_280 * 7168
TOKENS_671B = 4096  # micro-batch 1 x 4096


def deepseek_layout(**fields) -> DistributedConfig:
    import yaml

    values = yaml.safe_load((ROOT / "configs/distributed/deepseek_v3_671b.yaml").read_text())
    return DistributedConfig.from_dict({**values, **fields})


def test_the_hand_count_is_the_released_671b():
    total = 3 * DENSE_LAYER + 58 * (MOE_LAYER_NON_EXPERT + 64 * EXPERTS_PER_GPU) + 2 * EMBEDDING_671B + 7168
    assert total == 671_026_404_352


# DeepSeek-V3's own batch (report sec. 4.2: 15,360 sequences of 4,096 tokens after the ramp-up),
# micro-batch 1: 120 microbatches per replica at DP 128, so 1F1B's first stage holds 16 in flight.
DEEPSEEK_BATCH = ("seq_len=4096", "trainer.micro_batch_size=1", "trainer.global_batch_size=15360")


def test_deepseek_v3_on_the_published_layout(capsys):
    out = ct_plan_json(capsys, "model=deepseek_v3_671b", "distributed=deepseek_v3_671b", "--world-size", "2048",
                       *DEEPSEEK_BATCH, "activation_checkpointing.mode=full")
    lay = out["layout"]
    assert (lay["tp"], lay["pp"], lay["ep"], lay["dp"], lay["edp"], lay["zero"]) == (1, 16, 64, 128, 2, 1)
    assert out["workload"]["num_microbatches"] == 15_360 // 128
    stages = out["stages"]
    assert [s["layers"] for s in (stages[0], stages[1], stages[15])] == [[0, 2], [3, 6], [59, 60]]

    # Stage 0: embedding + the 3 dense layers, all data-parallel over 128; 16 microbatches in flight.
    s0_params = EMBEDDING_671B + 3 * DENSE_LAYER
    assert s0_params == 2_677_129_216 and stages[0]["parameters"] == s0_params
    # Stage 1: 4 MoE layers; experts' optimizer state over expert-DP 2 = 2048 / (64 x 16).
    s1_dense, s1_experts = 4 * MOE_LAYER_NON_EXPERT, 4 * EXPERTS_PER_GPU
    assert stages[1]["parameters"] == s1_dense + s1_experts == 1_636_630_528
    assert stages[1]["optimizer_bytes"] == pytest.approx(12 * s1_dense / 128 + 12 * s1_experts / 2)
    assert stages[0]["optimizer_bytes"] == pytest.approx(12 * s0_params / 128)
    # Last stage: 2 MoE layers + output layer + final norm.
    assert stages[15]["parameters"] == 2 * (MOE_LAYER_NON_EXPERT + EXPERTS_PER_GPU) + EMBEDDING_671B + 7168

    # Activations per token of one layer (16-bit): norm/sublayer inputs 8h, MLA latents
    # 2 x 2 x 1536 + 2 x (512 + 64) + 2 x 512, Q and K 2 x 2 x 128 x 192, V and O 2 x 2 x 128 x 128;
    # dense SwiGLU 6 x 18432; MoE: router fp32 4 x 256, shared 6 x 2048, 8 routed copies of
    # (2h in + 6 x 2048 + 2h out). No softmax term: Transformer Engine's fused attention, what
    # ct-train's megatron engine builds on CUDA, keeps no scores (the paper's 5 a s, 2.5 MiB per
    # token at a = 128, s = 4096, was counted here before).
    attn_whole = 8 * 7168 + 4 * 1536 + 2 * 576 + 2 * 512
    attn_split = 4 * 128 * 192 + 4 * 128 * 128
    dense_layer = TOKENS_671B * (attn_whole + attn_split + 6 * 18_432)
    moe_layer = TOKENS_671B * (attn_whole + 4 * 256 + attn_split + 6 * 2048 + 8 * (4 * 7168 + 6 * 2048))
    layer_input = TOKENS_671B * 2 * 7168
    # Full recompute: each layer keeps its input; backward recomputes one layer at a time from it.
    s0_act = 16 * 3 * layer_input + dense_layer - layer_input
    s1_act = 15 * 4 * layer_input + moe_layer - layer_input
    s15_act = 1 * 2 * layer_input + moe_layer - layer_input + TOKENS_671B * (4 * 7168 + 4 * 129_280)
    assert stages[0]["activation_bytes"] == pytest.approx(s0_act)
    assert stages[1]["activation_bytes"] == pytest.approx(s1_act)
    assert stages[15]["activation_bytes"] == pytest.approx(s15_act)
    assert stages[1]["activation_bytes_by_recompute"]["selective"] == pytest.approx(15 * 4 * moe_layer)
    assert stages[1]["activation_bytes_by_recompute"]["none"] == pytest.approx(15 * 4 * moe_layer)

    s0_total = 6 * s0_params + 12 * s0_params / 128 + s0_act
    assert s0_total == pytest.approx(20_466_641_408)  # 19.06 GiB: the worst stage, it fits 80 GB
    assert out["worst_stage"] == 0 and out["worst_total_bytes"] == pytest.approx(s0_total)
    assert out["fits"] is True and out["nodes"] == 256


def test_without_recompute_the_published_layout_does_not_fit(capsys):
    out = ct_plan_json(capsys, "model=deepseek_v3_671b", "distributed=deepseek_v3_671b", "--world-size", "2048",
                       *DEEPSEEK_BATCH)
    assert out["fits"] is False and out["worst_stage"] == 1  # 15 microbatches x 4 MoE layers


def test_ct_train_refuses_what_ct_plan_plans(capsys):
    """Both compose the same RunConfig; ct-train's engine-support check (the megatron engine
    splits layers evenly for now) refuses DeepSeek-V3's published layout, ct-plan plans it."""
    from ct_cli.common import config_dir, run_config
    from ct_model.errors import UserError
    from ct_stages.run import check_supported

    overrides = ["size=recipe", "model=deepseek_v3_671b", "distributed=deepseek_v3_671b", *DEEPSEEK_BATCH]
    run = run_config("pretrain_phase1", overrides, config_dir(None))
    with pytest.raises(UserError, match="distributed.num_layers_in_first_pipeline_stage=3"):
        check_supported(run)
    out = ct_plan_json(capsys, *overrides[1:], "--world-size", "2048")
    assert out["layout"]["first_stage_layers"] == 3 and out["workload"]["seq_len"] == run.seq_len == 4096


def test_smallest_world_size_searches_data_parallelism():
    model = ct_model.presets.get("deepseek_v3_671b")
    full = Workload(seq_len=4096, recompute="full")
    found = smallest_fitting(model, deepseek_layout(), full)
    # DP must be a multiple of EP 64 (TP 1): 16 x 64 = 1024 GPUs, expert-DP 1, and that fits.
    assert found.layout.world_size == 1024 and found.layout.edp == 1 and found.fits
    selective = Workload(seq_len=4096, recompute="selective")
    assert smallest_fitting(model, deepseek_layout(), selective) is None  # activations alone exceed 80 GB
    # A search that has to climb: the 950M model fp32 on one GPU of 16 GB, ZeRO-1; DP grows until
    # the optimizer share fits, and one step less does not.
    small = ct_model.presets.get("mobilellm_950m")
    distopt = DistributedConfig(engine="megatron", use_distributed_optimizer=True)
    work = Workload(seq_len=256, precision="fp32", recompute="full")
    found = smallest_fitting(small, distopt, work, gpu_memory_gb=9)
    n = found.layout.world_size
    assert n > 1 and found.fits
    assert not plan(small, distopt, n - 1, work, gpu_memory_gb=9).fits


# ------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("fields, world, needle", [
    (dict(num_layers_in_first_pipeline_stage=None, num_layers_in_last_pipeline_stage=None), 2048,
     "model.num_layers=61 is not divisible by distributed.pipeline_model_parallel_size=16"),
    (dict(num_layers_in_last_pipeline_stage=3), 2048, "leaves 55 layers"),
    (dict(expert_model_parallel_size=48), 16 * 48, "model.num_moe_experts=256 is not divisible by "
     "distributed.expert_model_parallel_size=48"),
    (dict(), 16 * 96, "expert_model_parallel_size x pipeline_model_parallel_size"),
    (dict(tensor_model_parallel_size=3, sequence_parallel=True), 16 * 192,
     "model.num_attention_heads=128 is not divisible by distributed.tensor_model_parallel_size=3"),
    (dict(), 2047, "world_size=2047"),
])
def test_layouts_that_do_not_divide_the_model_name_the_field(fields, world, needle):
    with pytest.raises(PlanError, match=needle.replace("(", r"\(")):
        plan(ct_model.presets.get("deepseek_v3_671b"), deepseek_layout(**fields), world, Workload())


def test_dense_model_errors_name_the_field():
    small = ct_model.presets.get("mobilellm_950m")
    with pytest.raises(PlanError, match="model.num_query_groups=6 is not divisible by "
                                        "distributed.tensor_model_parallel_size=4"):
        plan(small, DistributedConfig(engine="megatron", tensor_model_parallel_size=4), 4, Workload())
    with pytest.raises(PlanError, match="needs a MoE model"):
        plan(small, DistributedConfig(engine="megatron", expert_model_parallel_size=2), 2, Workload())
    with pytest.raises(PlanError, match="activation_checkpointing.mode"):
        Workload(recompute="some")


# The composition is ct-train's, so are its messages (each names the key): Hydra's for a group
# option or key that does not exist, RunConfig's for a bad value.
@pytest.mark.parametrize("args, needle", [
    (["model=deepseek_v3_671b", "distributed=deepseek_v3_671b",
      "distributed.num_layers_in_first_pipeline_stage=null", "distributed.num_layers_in_last_pipeline_stage=null"],
     "model.num_layers=61 is not divisible by distributed.pipeline_model_parallel_size=16"),
    (["model=mobilellm_950m", "distributed.engine=megatron", "distributed.tensor_model_parallel_size=5"],
     "model.num_attention_heads=24 is not divisible by distributed.tensor_model_parallel_size=5"),
    (["model=gpt5"], "Could not find 'model/gpt5'"),
    (["model=mobilellm_950m", "precision=fp16"], "Could not find 'precision/fp16'"),
    (["model=mobilellm_950m", "distributed.bogus=1"], "distributed.bogus"),
    (["model=mobilellm_950m", "trainer.bogus=3"], "trainer.bogus"),
    (["model=mobilellm_950m", "model.num_attention_heads=5"], "model: num_attention_heads=5"),
    (["model=mobilellm_950m", "seq_len=long"], "seq_len must be an integer, got 'long'"),
    (["model=mobilellm_950m", "trainer.micro_batch_size=0"], "trainer.micro_batch_size must be an integer >= 1"),
    (["model=mobilellm_950m", "distributed=fsdp2", "distributed.expert_model_parallel_size=64"],
     "distributed.expert_model_parallel_size"),
    (["model=mobilellm_950m", "distributed=fsdp2", "trainer.global_batch_size=24", "--world-size", "8"],
     "trainer.global_batch_size=24 is not divisible by data-parallel size x trainer.micro_batch_size = 8 x 8"),
])
def test_the_cli_exits_2_with_one_line(capsys, args, needle):
    assert plan_cli.main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines


def test_the_console_script_is_installed():
    """Through the installed entry point (uv sync registers it): bad input is one line, exit 2."""
    script = Path(sys.executable).parent / "ct-plan"
    proc = subprocess.run([str(script), "model=mobilellm_950m", "distributed.engine=megatron",
                           "distributed.pipeline_model_parallel_size=4"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("error: model.num_layers=22 is not divisible by distributed.pipeline_model_parallel_size=4; "
                                   "set distributed.num_layers_in_first_pipeline_stage and/or "
                                   "num_layers_in_last_pipeline_stage for an uneven split"), proc.stderr


def test_the_table_names_the_worst_stage_and_the_verdict(capsys):
    assert plan_cli.main(["model=deepseek_v3_671b", "distributed=deepseek_v3_671b", "--world-size", "2048",
                          *DEEPSEEK_BATCH, "activation_checkpointing.mode=full", "--min-gpus"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("run       ct-train --phase pretrain_phase1 size=recipe model=deepseek_v3_671b ")
    assert "worst stage 0: 19.06 GiB per GPU; an 80 GB card (74.51 GiB): fits" in text
    assert "smallest GPU count that fits on 80 GB cards (over DP at TP 1, PP 16, EP 64, expert-TP 1): 1024" in text


# ------------------------------------------------------------------ one composition, ct-train's


def test_every_mode_plans_the_run_ct_train_composes(capsys):
    """No phase given: ct-train's default phase (pretrain_phase1) at recipe size, composed by
    ct-train's own run_config; the workload is that RunConfig's, precision resolved for CUDA."""
    import torch

    from ct_cli.common import config_dir, run_config

    overrides = ["model=mobilellm_360m", "distributed=fsdp2", "activation_checkpointing.mode=selective",
                 "loss.chunk_tokens=512"]
    run = run_config("pretrain_phase1", ["size=recipe", *overrides], config_dir(None))
    resolved = run.resolved_for(torch.device("cuda"))[0]
    out = ct_plan_json(capsys, *overrides, "--world-size", "16")
    w = out["workload"]
    assert (w["micro_batch_size"], w["seq_len"], w["recompute"], w["loss_chunk_tokens"], w["precision"]) == (
        run.trainer.micro_batch_size, run.seq_len, "selective", 512, resolved.precision.dtype)
    assert w["num_microbatches"] == run.trainer.global_batch_size // (16 * run.trainer.micro_batch_size)
    assert out["run"] == "ct-train --phase pretrain_phase1 size=recipe " + " ".join(overrides) + " (on cuda)"
    # A size chosen on the command line wins (ct-plan adds size=recipe only when none is given),
    # and --device cpu resolves precision=auto to fp32 as ct-train's setup does on a CPU.
    cpu = ct_plan_json(capsys, "size=cpu", *overrides, "--device", "cpu", "--world-size", "2")
    assert (cpu["workload"]["seq_len"], cpu["workload"]["precision"]) == (256, "fp32")


@pytest.mark.parametrize("name", ct_model.presets.names())
def test_recompute_never_keeps_more_than_less_recompute(name):
    """full <= selective <= none, activations and totals, for every preset, engine, device,
    precision and checkpoint frequency the planner distinguishes: backward recomputes a
    checkpointed block from what it kept, so a mode that keeps less never peaks higher."""
    model = ct_model.presets.get(name)
    layouts = [(DistributedConfig(), 1), (DistributedConfig(strategy="ddp"), 2),
               (DistributedConfig(strategy="fsdp2"), 8), (DistributedConfig(engine="megatron"), 1)]
    for dist, world in layouts:
        for device in ("cuda", "cpu"):
            for precision in ("bf16", "fp32"):
                for every in ((1, 2) if dist.engine == "native" else (1,)):
                    work = {mode: Workload(micro_batch_size=2, seq_len=min(2048, model.max_position_embeddings),
                                           precision=precision, recompute=mode, recompute_every_n_blocks=every,
                                           num_microbatches=2, loss_chunk_tokens=1024 if dist.engine == "native" else 0,
                                           device=device)
                            for mode in ("none", "selective", "full")}
                    plans = {mode: plan(model, dist, world, w) for mode, w in work.items()}
                    where = (name, dist.engine, dist.strategy, device, precision, every)
                    for s_none, s_sel, s_full in zip(*(plans[m].stages for m in ("none", "selective", "full"))):
                        assert s_full.activation_bytes <= s_sel.activation_bytes <= s_none.activation_bytes, where
                        assert s_full.total_bytes <= s_sel.total_bytes <= s_none.total_bytes, where


def test_a_native_step_peaks_where_the_gradients_meet_the_activations():
    """mobilellm_140m, one process, fp32 on CPU, seq 512, selective checkpointing (measured by
    tools/bench_plan_vs_measured.py: 2835 MB and 3311 MB, ratio 1.000). One microbatch a step: the
    gradients come in backward as the activations go, and the peak is the optimizer step: fp32
    params, grads and two moments (16 bytes a parameter) and torch's per-tensor AdamW's two fp32
    temporaries of the largest parameter (the tied 128,256 x 576 embedding). Two microbatches: the
    first one's gradients are there during the second forward, the peak."""
    c = ct_model.presets.get("mobilellm_140m")
    params, embedding = 140_248_512, 128_256 * 576
    one = Workload(micro_batch_size=1, seq_len=512, precision="fp32", recompute="selective", num_microbatches=1,
                   loss_chunk_tokens=1024, device="cpu")
    (stage,) = plan(c, DistributedConfig(), 1, one).stages
    assert stage.peak_moment == "optimizer step" and stage.gradient_bytes_in_forward == 0
    assert stage.total_bytes == 16 * params + 2 * 4 * embedding
    (stage,) = plan(c, DistributedConfig(), 1, Workload(**{**one.__dict__, "num_microbatches": 2})).stages
    assert stage.peak_moment == "forward"
    assert stage.total_bytes == 16 * params + stage.activation_bytes
    # On CUDA ct-train's AdamW is the fused kernel: no temporaries.
    (stage,) = plan(c, DistributedConfig(), 1, Workload(**{**one.__dict__, "device": "cuda"})).stages
    assert stage.step_working_bytes == 0


# ------------------------------------------------------------- native engines: what eager saves
# Hand terms per token of one mobilellm_950m block (h 1536, q = 24 x 64, k = 6 x 64, f 6144, 24
# heads, 6 groups), in bytes: two RMSNorms (torch's composite keeps the fp32 input and normalised
# output, and an fp32 rstd), QK-norm (fp32 q, k and a rstd per head), the linears' inputs, SDPA's
# q, k, v, output and fp32 logsumexp, SwiGLU's gate, SiLU(gate) and up.
NORMS_950M = 2 * (8 * 1536 + 4) + 4 * (1536 + 384) + 4 * (24 + 6)
ATTN_950M = 2 * (1536 + 384 + 384 + 1536) + 4 * 24
MLP_950M = 3 * 2 * 6144
# bf16 autocast over fp32 weights (single / DDP): q, k, v and gate, up each cast their own input.
AUTOCAST_950M = NORMS_950M + 2 * (3 * 1536 + 1536 + 2 * 1536 + 6144) + ATTN_950M + MLP_950M
# FSDP2 bf16 parameters: one input shared by q, k, v and one by gate, up.
FSDP2_950M = NORMS_950M + 2 * (1536 + 1536 + 1536 + 6144) + ATTN_950M + MLP_950M
# Selective: the GEMM outputs (q, k, v, o, gate, up, down), attention output + logsumexp, block input.
SELECTIVE_FSDP2_950M = 2 * (1536 + 384 + 384 + 1536 + 6144 + 6144 + 1536) + 2 * 1536 + 4 * 24 + 2 * 1536


def test_native_bytes_per_token_are_the_hand_terms():
    from ct_parallel.plan import Layout, native_layer_activation_bytes

    c = ct_model.presets.get("mobilellm_950m")
    assert AUTOCAST_950M == 107_744  # 105.2 KiB: issue 23's measured 105 KiB per token per block
    assert (FSDP2_950M, SELECTIVE_FSDP2_950M) == (98_528, 41_568)
    work = Workload(micro_batch_size=1, seq_len=1, precision="bf16")
    for strategy, none, selective, full in (("single", AUTOCAST_950M, SELECTIVE_FSDP2_950M + 2 * 1536, 4 * 1536),
                                            ("fsdp2", FSDP2_950M, SELECTIVE_FSDP2_950M, 2 * 1536)):
        lay = Layout.from_distributed(DistributedConfig(strategy=strategy), 1 if strategy == "single" else 8)
        got = {m: native_layer_activation_bytes(c, 0, lay, work, m) for m in ("none", "selective", "full")}
        assert got == {"none": none, "selective": selective, "full": full}, strategy


def _net_forward_bytes(config, mode: str, ac: str, runs: list[tuple[int, int]],
                       backend: str | None = None) -> list[int]:
    """Bytes left allocated by a forward of ``layers`` blocks over ``tokens`` tokens, for each
    (tokens, layers) of ``runs``: the torch profiler's net CPU allocations inside a labelled region
    (one profiler session: starting one costs about a second). ``backend``: None is one document
    per row (plain causal attention); else four packed documents through that attention backend
    (the mask object is built outside the region, once per microbatch, as the model builds it)."""
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    from ct_model.attention import build_mask_info
    from ct_model.rope import rope_angles
    from ct_parallel import ActivationCheckpointConfig, apply_activation_checkpointing

    dtype = torch.bfloat16 if mode == "bf16_params" else torch.float32
    alive = []  # nothing from one region is freed inside another
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for index, (tokens, layers) in enumerate(runs):
            model = ct_model.build_model(config.replace(num_layers=layers), seed=0)
            apply_activation_checkpointing(model, ActivationCheckpointConfig(mode=ac))
            blocks = model.layers.to(dtype)
            x = torch.randn(1, tokens, config.hidden_size, dtype=dtype, requires_grad=True)
            rope = rope_angles(torch.arange(tokens)[None], config.kv_channels, config.rotary_base)
            documents = (torch.arange(tokens) * 4 // tokens)[None]
            mask = build_mask_info(None if backend is None else documents, backend or "auto")
            with record_function(f"ct_forward_{index}"):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
                    y = x
                    for block in blocks:
                        y = block(y, rope, mask)
            alive.append((model, x, y, rope))
    net = {e.name: e.cpu_memory_usage for e in prof.events() if e.name.startswith("ct_forward_")}
    return [net[f"ct_forward_{i}"] for i in range(len(runs))]


@pytest.mark.parametrize("mode, strategy, precision, ac, qk_norm, backend", [
    ("autocast", "single", "bf16", "none", True, None), ("autocast", "single", "bf16", "selective", True, None),
    ("autocast", "single", "bf16", "full", True, None), ("bf16_params", "fsdp2", "bf16", "none", True, None),
    ("bf16_params", "fsdp2", "bf16", "selective", True, None), ("fp32", "single", "fp32", "none", True, None),
    ("autocast", "single", "bf16", "none", False, None),
    # Packed documents on CPU: SDPA with the dense document mask (what auto picks up to 4,096
    # tokens a row) keeps a mask of q's dtype per layer, T^2 C bytes; the varlen loop keeps K
    # and V repeated to every head. Selective recomputes the mask.
    ("fp32", "single", "fp32", "none", True, "sdpa"), ("autocast", "single", "bf16", "none", True, "sdpa"),
    ("bf16_params", "fsdp2", "bf16", "none", True, "sdpa"), ("fp32", "single", "fp32", "selective", True, "sdpa"),
    ("fp32", "single", "fp32", "none", True, "varlen"),
])
def test_native_activation_count_is_what_the_eager_block_keeps(mode, strategy, precision, ac, qk_norm, backend):
    """The reference is a measurement: one more block in the chain (2 blocks minus 1) at two
    lengths (the difference drops the per-block weight casts), the bytes left allocated after
    forward, on CPU; against the planned bytes of one block at the same two lengths. The 950M
    model's block shape (GQA 4:1, SwiGLU 4h) at a quarter of its widths, so that it runs in
    seconds; test_native_bytes_per_token_are_the_hand_terms has the 950M figures.
    ``bf16_params`` is FSDP2's MixedPrecisionPolicy (bf16 weights, no autocast). One document
    per row is planned as the CUDA path (no T x T tensor), packed ones as the CPU's."""
    from ct_parallel.plan import Layout, native_layer_activation_bytes

    c = ct_model.presets.get("mobilellm_950m", hidden_size=384, num_attention_heads=6, num_query_groups=2,
                             kv_channels=64, ffn_hidden_size=1536, vocab_size=256, qk_layernorm=qk_norm,
                             attention_backend="auto" if backend in (None, "sdpa") else backend)
    t1, t2 = 64, 192
    one_1, two_1, one_2, two_2 = _net_forward_bytes(c, mode, ac, [(t1, 1), (t1, 2), (t2, 1), (t2, 2)], backend)
    measured = (two_2 - one_2) - (two_1 - one_1)
    lay = Layout.from_distributed(DistributedConfig(strategy=strategy), 1 if strategy == "single" else 8)

    def planned(tokens: int) -> float:
        work = Workload(micro_batch_size=1, seq_len=tokens, precision=precision,
                        device="cuda" if backend is None else "cpu")
        return native_layer_activation_bytes(c, 0, lay, work, ac)

    assert measured == pytest.approx(planned(t2) - planned(t1), rel=0.005), (measured, planned(t2) - planned(t1))


def _peak_bytes(fn) -> int:
    """The largest running total of CPU allocations while ``fn`` runs (torch profiler, one thread)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("weights, autocast, chunk", [
    ("fp32", False, 96), ("fp32", True, 96), ("bf16", False, 96), ("fp32", False, 0), ("bf16", False, 0),
])
def test_the_loss_end_is_what_the_chunked_loss_allocates(weights, autocast, chunk):
    """ct-plan's loss end against the peak the stage's loss reaches on CPU, forward and backward
    from the final hidden states (hidden 64, vocabulary 4,000, 160 tokens): d hidden, the fp32
    weight-gradient sum (4Vh), one chunk's fp32 logits and logsumexp temporary (8nV) or, under
    bf16 on a CPU, the upcast bf16 weight-gradient product (6nV + 6Vh), plus, from the second chunk
    on, the previous chunk's softmax (4 n_prev V); unchunked, 12 bytes per logit (the weight's
    gradient comes after the peak, and is ct-plan's gradient column anyway). The final norm is
    the block test's (not run here). Under autocast the weight's bf16 copy (2Vh) is ct-plan's
    autocast term."""
    from ct_model.chunked_ce import linear_cross_entropy
    from ct_parallel.plan import Layout, native_output_bytes

    h, v, tokens = 64, 4000, 160  # two chunks of 96 and 64: the first's softmax is alive as the second starts
    dtype = torch.bfloat16 if weights == "bf16" else torch.float32
    w = torch.nn.Parameter(torch.randn(v, h, dtype=dtype) * 0.02)
    x = torch.randn(1, tokens, h, dtype=dtype, requires_grad=True)
    y = torch.randint(0, v, (1, tokens))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = linear_cross_entropy(x, w, y, chunk_tokens=chunk, fused="off")
        loss.backward()

    measured = _peak_bytes(step)
    c = ct_model.presets.get("mobilellm_tiny", hidden_size=h, vocab_size=v)
    strategy = "fsdp2" if weights == "bf16" else "single"
    lay = Layout.from_distributed(DistributedConfig(strategy=strategy), 1 if strategy == "single" else 8)
    work = Workload(seq_len=tokens, precision="fp32" if weights == "fp32" and not autocast else "bf16",
                    loss_chunk_tokens=chunk, device="cpu")
    planned = native_output_bytes(c, lay, work) - tokens * (8 * h + 4)  # no final norm here
    planned += 2 * v * h if autocast else 0  # the output weight's cached bf16 cast
    assert measured == pytest.approx(planned, rel=0.02), (measured, planned)


# ---------------------------------------------------------------- the recipe fits an 80 GB GPU
RECIPE = ["size=recipe", "model=mobilellm_950m", "distributed=fsdp2", "precision=bf16"]  # the README's command
# ct-plan's 80 GB is 74.5 GiB of the card's ~79.6; it does not count backward's activation
# gradients, the CUDA context, NCCL buffers or fragmentation: a phase must leave 15% of it free.
HEADROOM = 0.85


def phase_plan(capsys, phase: str, *overrides: str) -> dict:
    return ct_plan_json(capsys, "--phase", phase, *RECIPE, *overrides, "--world-size", "8")


@pytest.mark.parametrize("phase", ["pretrain_phase1", "pretrain_phase2", "teacher", "midtrain_phase1",
                                   "midtrain_phase2", "posttrain_general", "posttrain_reasoning"])
def test_every_recipe_phase_fits_an_80gb_gpu_as_composed(capsys, phase):
    from ct_cli.common import config_dir, phases, run_config

    assert phase in phases(config_dir(None))
    run = run_config(phase, RECIPE, config_dir(None))
    out = phase_plan(capsys, phase)
    w = out["workload"]
    # The plan is of exactly the composed run: its micro-batch, context, checkpointing, loss
    # chunks, microbatches per step.
    assert (w["micro_batch_size"], w["seq_len"], w["recompute"], w["recompute_every_n_blocks"],
            w["loss_chunk_tokens"], w["precision"], w["num_microbatches"]) == (
        run.trainer.micro_batch_size, run.seq_len, run.activation_checkpointing.mode,
        run.activation_checkpointing.every_n_blocks, run.loss.chunk_tokens, "bf16",
        run.trainer.global_batch_size // (8 * run.trainer.micro_batch_size))
    assert out["layout"]["zero"] == 3 and out["layout"]["engine"] == "native" and out["layout"]["dp"] == 8
    assert out["fits"] and out["worst_total_bytes"] <= HEADROOM * out["capacity_bytes"], out["worst_total_bytes"] / 2**30


@pytest.mark.parametrize("phase, override", [("pretrain_phase1", "trainer.micro_batch_size=16"),
                                             ("posttrain_reasoning", "activation_checkpointing.mode=none")])
def test_the_previous_recipe_values_leave_no_headroom(capsys, phase, override):
    """What the configs said before: 16 rows x 2048 tokens without checkpointing, and one
    32,768-token row without it: ~71 GiB per GPU, over the headroom (issue 23's ~72 GiB)."""
    out = phase_plan(capsys, phase, override)
    assert out["worst_total_bytes"] > HEADROOM * out["capacity_bytes"]
    assert out["stages"][0]["activation_bytes"] >= 22 * 32_768 * FSDP2_950M


def test_the_recipe_pretraining_plan_by_hand(capsys):
    """pretrain_phase1 at recipe size under FSDP2 on 8 GPUs, every term worked out here."""
    out = phase_plan(capsys, "pretrain_phase1")
    (stage,) = out["stages"]
    tokens, v, h = 8 * 2048, 128_256, 1536
    assert out["workload"]["num_microbatches"] == 2048 // (8 * 8)
    # Final norm, the hidden-state gradient (bf16), the output weight's fp32 gradient sum, and
    # 1024-token chunks: one chunk's fp32 logits and logsumexp's fp32 temporary (8 bytes per
    # logit) while the previous chunk's fp32 softmax is still held (4). (Counted before as 2 x 4Vh
    # and 2 + 4 + 2 bytes per logit of one chunk: the measured loss keeps one fp32 sum, and its
    # bf16 logits are gone before the fp32 temporary comes.)
    output = tokens * (8 * h + 4) + tokens * 2 * h + 4 * v * h + 1024 * v * (4 + 8)
    assert stage["activation_bytes"] == pytest.approx(22 * tokens * FSDP2_950M + output)
    # Sharded fp32 parameters, and in bf16 two gathered blocks and the root's embedding and norm.
    gathered = 2 * (2 * LAYER_950M + EMBEDDING_950M + h)
    assert stage["parameter_bytes"] == pytest.approx(4 * PARAMS_950M / 8 + gathered)
    # 32 microbatches a step: the 31 before the last leave FSDP2's unsharded fp32 gradients
    # (4 bytes a parameter, every rank) in place during the last forward, the peak.
    assert stage["peak_moment"] == "forward"
    assert stage["total_bytes"] == pytest.approx(12 * PARAMS_950M / 8 + gathered + 4 * PARAMS_950M
                                                 + 22 * tokens * FSDP2_950M + output)
    assert out["worst_total_bytes"] / 2**30 == pytest.approx(40.87, abs=0.01)


def test_a_midtrain_plan_counts_the_online_teacher(capsys):
    out = phase_plan(capsys, "midtrain_phase1")
    # Self-distillation by default (teacher_path is init_from): the student's shape in fp32 (ct's
    # exports), the final hidden states of the rank's 512 / 8 = 64 rows of 4096 tokens, and one
    # 1024-token chunk's fp32 teacher logits and gradient.
    assert sorted(out["extras"].values()) == sorted([PARAMS_950M * 4, 64 * 4096 * 1536 * 4, 1024 * 128_256 * 8])
    assert out["stages"][0]["extra_bytes"] == pytest.approx(sum(out["extras"].values()))


def test_a_teacher_is_sized_from_its_config_json(capsys, tmp_path):
    """Llama-3.1-8B's published config (bf16): 8,030,261,248 parameters, hand-counted here."""
    meta = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128_256,
            "max_position_embeddings": 131_072, "rms_norm_eps": 1e-5, "rope_theta": 500_000.0,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(meta))
    layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14_336 + 2 * 4096
    params = 2 * 128_256 * 4096 + 32 * layer + 4096
    assert params == 8_030_261_248
    out = phase_plan(capsys, "midtrain_phase1", f"stage.distill.teacher_path={tmp_path}")
    assert sorted(out["extras"].values()) == sorted([params * 2, 64 * 4096 * 4096 * 2, 1024 * 128_256 * 8])
    assert out["fits"] and out["worst_total_bytes"] <= HEADROOM * out["capacity_bytes"]
    assert plan_cli.main(["--phase", "midtrain_phase1", *RECIPE, f"stage.distill.teacher_path={tmp_path / 'none'}",
                          "--world-size", "8"]) == 2
    assert "stage.distill.teacher_path=" in capsys.readouterr().err
