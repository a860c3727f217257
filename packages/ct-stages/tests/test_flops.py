"""Training FLOPs per document (causal half of each document's square) and the GPU peak table,
against hand computations; no GPU needed (torch.cuda's queries are monkeypatched)."""

import json
import math

import pytest
import torch

import ct_model
from ct_parallel import build_native_engine
from ct_stages import CheckpointManager, Objective, StageConfig, Trainer, TrainerConfig, build_loss
from ct_stages.metrics import (Documents, MetricsLog, ModelFlops, PeakFlops, Reporter, Throughput, documents,
                               flops_per_token, segment_lengths)
from ct_stages.optim import OptimizerConfig, ScheduleConfig, build_optimizer, build_scheduler

# mobilellm_tiny: 4 layers, hidden 256, 4 heads of 64, 2 query groups, ffn 768, vocab 8192.
TINY_BLOCK = 256 * 64 * (2 * 4 + 2 * 2) + 3 * 256 * 768
TINY_MATMUL = 6 * (4 * TINY_BLOCK + 8192 * 256)  # per token
TINY_PAIR = 6 * 4 * 4 * (64 + 64)  # one query x one key, all layers and heads, forward + backward

# mobilellm_950m: 22 layers, hidden 1536, 24 heads of 64, 6 query groups, ffn 6144, vocab 128,256.
M950_MATMUL = 6 * (22 * (1536 * 64 * (2 * 24 + 2 * 6) + 3 * 1536 * 6144) + 128_256 * 1536)
M950_PAIR = 6 * 22 * 24 * (64 + 64)


def test_segments_come_from_document_ids_else_position_restarts_else_rows():
    ids = torch.zeros(2, 8, dtype=torch.long)
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, -1, -1]])  # -1: padding
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 0, 1]])
    assert segment_lengths(ids, docs).tolist() == [3, 5, 6, 2]
    assert segment_lengths(ids, position_ids=pos).tolist() == [3, 5, 6, 2]
    assert segment_lengths(ids, docs, pos).tolist() == [3, 5, 6, 2]
    assert segment_lengths(ids).tolist() == [8, 8]
    # document_ids win: a document may restart its positions (a long document split in pieces).
    assert segment_lengths(ids[:1], docs[:1] * 0, pos[:1]).tolist() == [8]


def test_documents_of_microbatches_sum_rows_and_squares():
    ids = torch.zeros(3, 16, dtype=torch.long)
    docs = torch.tensor([[0] * 5 + [1] * 11, [0] * 16, [0] * 4 + [1] * 4 + [2] * 8])
    mbs = [{"input_ids": ids[:2], "document_ids": docs[:2]}, {"input_ids": ids[2:], "document_ids": docs[2:]}]
    expected = Documents(48, 5**2 + 11**2 + 16**2 + 4**2 + 4**2 + 8**2)
    assert documents(mbs) == expected == documents({"input_ids": ids, "document_ids": docs})


def test_step_flops_by_hand():
    c = ct_model.presets.get("mobilellm_tiny")
    flops = ModelFlops.of(c)
    assert (flops.matmul_per_token, flops.attention_per_pair) == (TINY_MATMUL, TINY_PAIR)
    # Two rows of 16: documents of 5 and 11, and one of 16. Attention: the causal half, n^2 / 2
    # pairs per document, none across documents.
    assert flops.step(32, 5**2 + 11**2 + 16**2) == TINY_MATMUL * 32 + TINY_PAIR * (25 + 121 + 256) / 2
    # One document per row: half of the full-square (PaLM / torchtitan) attention term, per token.
    assert flops.per_token(128) == TINY_MATMUL + TINY_PAIR * 128 / 2
    assert flops_per_token(c, 128) - TINY_MATMUL == 2 * (flops.per_token(128) - TINY_MATMUL)


def test_a_32k_row_of_8_documents_counts_2_9x_less_than_the_full_square():
    c = ct_model.presets.get("mobilellm_950m", max_position_embeddings=32_768)
    row = {"input_ids": torch.zeros(1, 32_768, dtype=torch.long),
           "document_ids": (torch.arange(32_768) // 4096)[None]}
    meter = Throughput.for_model(c, 32_768, PeakFlops(1e15, "stated"))
    per_token = meter.step_flops_per_token(documents(row))
    assert per_token == M950_MATMUL + M950_PAIR * 8 * 4096**2 / 2 / 32_768 == 6_528_172_032
    assert flops_per_token(c, 32_768) == M950_MATMUL + M950_PAIR * 32_768 == 18_985_254_912
    assert flops_per_token(c, 32_768) / per_token == pytest.approx(2.908, abs=1e-3)


def test_mla_and_moe_use_their_head_dims_and_active_experts():
    c = ct_model.presets.get("deepseek_v3_671b")
    flops = ModelFlops.of(c)
    assert flops.attention_per_pair == 6 * 61 * 128 * (192 + 128)  # qk 128 + rope 64, v 128
    active = ct_model.param_count.matmul_parameters(c, active=True) + c.vocab_size * c.hidden_size
    assert flops.matmul_per_token == 6 * active
    assert active < ct_model.param_count.matmul_parameters(c) / 10  # 8 of 256 routed experts


def test_throughput_mfu_uses_the_steps_documents():
    c = ct_model.presets.get("mobilellm_tiny")
    meter = Throughput.for_model(c, 16, PeakFlops(1e15, "stated"), world_size=2)
    docs = Documents(tokens=32, squared_lengths=5**2 + 11**2 + 16**2)
    record = meter.measure(input_tokens=64, seconds=2.0, documents=docs)  # 2 ranks of 32 tokens
    per_token = TINY_MATMUL + TINY_PAIR * (25 + 121 + 256) / 2 / 32
    assert record["flops_per_token"] == per_token
    assert record["mfu"] == pytest.approx(64 / 2.0 / 2 * per_token / 1e15)
    # Without the documents: a row of one whole document, the start record's figure.
    assert meter.measure(64, 2.0)["flops_per_token"] == meter.describe()["flops_per_token"] == \
        TINY_MATMUL + TINY_PAIR * 16 / 2


def test_the_trainer_passes_each_steps_documents(tmp_path):
    config = ct_model.presets.get("mobilellm_tiny", num_layers=2, hidden_size=32, num_attention_heads=2,
                                  num_query_groups=1, ffn_hidden_size=48, vocab_size=50, kv_channels=16)
    engine = build_native_engine(ct_model.build_model(config, seed=0))
    engine.setup_optimizer(lambda named: build_optimizer(named, OptimizerConfig(lr=1e-3)))
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    doc_ids = [torch.tensor([[0] * 12, [0] * 12]), torch.tensor([[0] * 4 + [1] * 8, [0] * 3 + [1] * 3 + [2] * 6])]
    batches = [{"input_ids": ids, "labels": ids.roll(-1, 1), "document_ids": d} for d in doc_ids]
    reporter = Reporter(MetricsLog(tmp_path / "m.jsonl", True),
                        Throughput.for_model(config, 12, PeakFlops(1e18, "stated")), torch.device("cpu"),
                        show_progress=False)
    trainer = Trainer(TrainerConfig(max_steps=2, global_batch_size=2, micro_batch_size=1, checkpoint_every=100),
                      engine, Objective(build_loss(StageConfig())), iter_batches(batches),
                      build_scheduler(engine.optimizer, 2, ScheduleConfig(warmup_steps=1)),
                      CheckpointManager(tmp_path / "ckpt"), reporter)
    trainer.fit()
    steps = [r for r in map(json.loads, (tmp_path / "m.jsonl").read_text().splitlines()) if r["event"] == "train"]
    matmul = 6 * (2 * (32 * 16 * (2 * 2 + 2 * 1) + 3 * 32 * 48) + 50 * 32)
    pair = 6 * 2 * 2 * (16 + 16)
    assert [r["flops_per_token"] for r in steps] == [matmul + pair * (144 + 144) / 2 / 24,
                                                     matmul + pair * (16 + 64 + 9 + 9 + 36) / 2 / 24]
    for r in steps:
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"] / 1e18)


class iter_batches:
    """The loader protocol over two fixed batches, in turn."""

    def __init__(self, batches):
        self.batches, self.position = batches, 0

    def __iter__(self):
        while True:
            self.position += 1
            yield self.batches[(self.position - 1) % len(self.batches)]

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def _fake_gpu(monkeypatch, name: str, sms: int) -> PeakFlops:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: type("Props", (), {"multi_processor_count": sms})())
    return PeakFlops.for_device(torch.device("cuda", 0))


@pytest.mark.parametrize("name, sms, tflops", [
    ("NVIDIA H100 80GB HBM3", 132, 989.5),  # SXM5
    ("NVIDIA H100 PCIe", 114, 756.5),  # read the SXM figure (989) before
    ("NVIDIA H100 NVL", 132, 835.5),
    ("NVIDIA H200", 132, 989.5),
    ("NVIDIA H200 NVL", 132, 835.5),
    ("NVIDIA H800", 132, 989.5),  # one name, two boards: the SM count tells them apart
    ("NVIDIA H800", 114, 756.5),
    ("NVIDIA A100-SXM4-80GB", 108, 312.0),
    ("NVIDIA A100-PCIE-40GB", 108, 312.0),
    ("NVIDIA B200", 148, 2250.0),
    ("NVIDIA L40S", 142, 362.05),
    ("NVIDIA L4", 58, 121.0),
    ("NVIDIA GeForce RTX 4090", 128, 165.2),
])
def test_peak_of_exact_device_names(monkeypatch, name, sms, tflops):
    peak = _fake_gpu(monkeypatch, name, sms)
    assert peak.value == tflops * 1e12
    assert name in peak.source and f"{sms} SMs" in peak.source and "NVIDIA" in peak.source.split(":", 1)[1]


@pytest.mark.parametrize("name, sms", [
    ("NVIDIA A10G", 80),  # AWS-only: no NVIDIA data sheet
    ("Tesla V100-SXM2-32GB", 80),  # no bf16 tensor cores
    ("NVIDIA H100 80GB HBM3", 114),  # a known name with an SM count that is not that card's
    ("NVIDIA GeForce RTX 4090 D", 114),  # no substring matches any more
])
def test_unknown_cards_get_no_peak_and_say_how_to_set_one(monkeypatch, name, sms):
    peak = _fake_gpu(monkeypatch, name, sms)
    assert math.isnan(peak.value) and "set logging.peak_flops" in peak.source and name in peak.source
    record = Throughput(1e9, peak).measure(1000, 1.0)
    assert record["mfu"] is None and "logging.peak_flops" in record["mfu_note"]


def test_a_mig_slice_gets_its_share_of_the_sms_and_an_override_wins(monkeypatch):
    peak = _fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3 MIG 3g.40gb", 60)
    assert peak.value == pytest.approx(989.5e12 * 60 / 132) and "60 of 132 SMs" in peak.source
    assert PeakFlops.for_device(torch.device("cuda", 0), override=5e14).value == 5e14
