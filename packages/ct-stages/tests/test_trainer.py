"""The loop against independent references: a hand-written training loop, and batch-split invariance."""

import json

import pytest
import torch
import torch.nn.functional as F

import ct_model
from ct_parallel import build_native_engine
from ct_stages import CheckpointManager, Objective, StageConfig, Trainer, TrainerConfig, TrainingStopped, build_loss
from ct_stages.metrics import MetricsLog, PeakFlops, Reporter, Throughput, flops_per_token
from ct_stages.optim import OptimizerConfig, ScheduleConfig, build_optimizer, build_scheduler

VOCAB = 50


def tiny_model(seed=0):
    config = ct_model.presets.get("mobilellm_tiny", num_layers=2, hidden_size=32, num_attention_heads=2,
                                  num_query_groups=1, ffn_hidden_size=48, vocab_size=VOCAB, kv_channels=16)
    return ct_model.build_model(config, seed=seed)


class ListLoader:
    """A loader over fixed batches with the state protocol of ct_data loaders."""

    def __init__(self, batches):
        self.batches, self.position = batches, 0

    def __iter__(self):
        while True:
            batch = self.batches[self.position % len(self.batches)]
            self.position += 1
            yield batch

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def make_batches(steps, rows, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (rows, seq), generator=g)
        labels = ids.roll(-1, 1)
        labels[:, -1] = -100
        labels[0, :3] = -100  # uneven scored-token counts across microbatches
        out.append({"input_ids": ids, "labels": labels})
    return out


def build_trainer(tmp_path, batches, gbs, mbs, steps, stage=None, max_nonfinite=5):
    model = tiny_model()
    engine = build_native_engine(model)
    optim_cfg = OptimizerConfig(lr=1e-2, clip_grad=1.0)
    engine.setup_optimizer(lambda named: build_optimizer(named, optim_cfg))
    scheduler = build_scheduler(engine.optimizer, steps, ScheduleConfig(warmup_steps=1))
    cfg = TrainerConfig(max_steps=steps, global_batch_size=gbs, micro_batch_size=mbs, checkpoint_every=100,
                        max_nonfinite_steps=max_nonfinite)
    reporter = Reporter(MetricsLog(tmp_path / "m.jsonl", True), Throughput(1.0, PeakFlops(1e12, "test")),
                        torch.device("cpu"), show_progress=False)
    trainer = Trainer(cfg, engine, stage or Objective(build_loss(StageConfig())), ListLoader(batches), scheduler,
                      CheckpointManager(tmp_path / "ckpt"), reporter, clip_grad=1.0)
    return trainer, model, scheduler


def reference_losses(batches, steps):
    """A plain loop: mean token loss over the whole batch, AdamW with the same groups, clip, schedule."""
    model = tiny_model()
    optim_cfg = OptimizerConfig(lr=1e-2, clip_grad=1.0)
    opt = build_optimizer(model.named_parameters(), optim_cfg)
    sched = build_scheduler(opt, steps, ScheduleConfig(warmup_steps=1))
    losses = []
    for step in range(steps):
        b = batches[step]
        loss = F.cross_entropy(model(b["input_ids"]).flatten(0, 1), b["labels"].flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses, model


@pytest.mark.parametrize("mbs", [8, 2])
def test_trainer_matches_a_hand_written_loop_whatever_the_accumulation(tmp_path, mbs):
    batches = make_batches(5, 8)
    trainer, model, _ = build_trainer(tmp_path, batches, gbs=8, mbs=mbs, steps=5)
    trainer.fit()
    logged = [json.loads(l) for l in (tmp_path / "m.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logged if r["event"] == "train"]
    expected, ref_model = reference_losses(batches, 5)
    assert losses == pytest.approx(expected, rel=1e-5, abs=1e-6)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        # Adam turns fp32 summation-order noise in near-zero gradients into ~1e-5 moves at lr 1e-2.
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)


def test_nonfinite_steps_are_skipped_then_training_stops_with_a_checkpoint(tmp_path):
    batches = make_batches(6, 4)
    calls = {"n": 0}

    def poisoned(mb, logits):
        calls["n"] += 1
        loss = F.cross_entropy(logits.flatten(0, 1), mb["labels"].flatten(), reduction="sum")
        return loss * float("nan") if calls["n"] >= 3 else loss

    stage = Objective(poisoned)
    trainer, model, scheduler = build_trainer(tmp_path, batches, gbs=4, mbs=4, steps=6, stage=stage,
                                              max_nonfinite=2)
    with pytest.raises(TrainingStopped, match="max_nonfinite_steps=2"):
        trainer.fit()
    assert trainer.state.skipped_steps == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())  # NaN grads never applied
    latest = CheckpointManager(tmp_path / "ckpt").latest()
    assert latest is not None and latest.name == "step_00000005"
    saved = torch.load(latest / "trainer_rank0.pt", weights_only=False)
    # The saved schedule stands where the saved step does (it used to be one step behind).
    assert saved["step"] == 5 and saved["scheduler"]["last_epoch"] == 5 == scheduler.last_epoch


def test_rerunning_a_finished_run_rewrites_no_checkpoint(tmp_path):
    batches = make_batches(3, 4)
    trainer, _, _ = build_trainer(tmp_path, batches, gbs=4, mbs=4, steps=3)
    trainer.fit()
    final = CheckpointManager(tmp_path / "ckpt").latest()
    written = (final / "meta.json").stat().st_mtime_ns
    again, _, _ = build_trainer(tmp_path, batches, gbs=4, mbs=4, steps=3)
    assert again.resume_if_possible() and again.state.step == 3
    again.fit()
    assert (final / "meta.json").stat().st_mtime_ns == written
    assert [e["event"] for e in map(json.loads, (tmp_path / "m.jsonl").read_text().splitlines())].count("checkpoint") == 1


def test_mfu_is_per_device_and_never_above_one():
    peak = PeakFlops(100.0, "stated")
    meter = Throughput(flops_per_token=10.0, peak=peak, world_size=4)
    record = meter.measure(input_tokens=8, seconds=1.0)  # 8 tok/s over 4 devices, 20 FLOP/s each
    assert record["tokens_per_s"] == 8 and record["tokens_per_s_per_device"] == 2
    assert record["mfu"] == pytest.approx(0.2)
    beaten = meter.measure(input_tokens=400, seconds=1.0)  # 1000 FLOP/s per device > a stated 100
    assert beaten["mfu"] is None and "above the peak" in beaten["mfu_note"]


def test_a_measured_peak_is_measured_again_when_a_step_beats_it(monkeypatch):
    import ct_stages.metrics as metrics

    monkeypatch.setattr(metrics, "measure_cpu_peak_flops", lambda: 1000.0)
    peak = PeakFlops(10.0, "measured", measured=True)  # a busy start-up measured it too low
    record = Throughput(1.0, peak).measure(input_tokens=500, seconds=1.0)
    assert peak.value == 1000.0 and record["mfu"] == pytest.approx(0.5)


def test_flops_per_token_by_hand():
    c = ct_model.presets.get("mobilellm_tiny")  # 4 layers, h=256, 4 heads, 2 groups, d=64, ffn 768, V=8192
    block = 256 * 64 * (2 * 4 + 2 * 2) + 3 * 256 * 768
    expected = 6 * (4 * block + 8192 * 256) + 12 * 4 * 4 * 64 * 128
    assert flops_per_token(c, 128) == expected
    shared = c.replace(layer_sharing=True)
    assert flops_per_token(shared, 128) == 6 * (8 * block + 8192 * 256) + 12 * 8 * 4 * 64 * 128


def test_trainer_config_errors_name_the_field():
    with pytest.raises(ValueError, match="trainer.global_batch_size"):
        TrainerConfig(global_batch_size=10, micro_batch_size=4)
    with pytest.raises(ValueError, match="trainer.max_steps"):
        TrainerConfig(max_steps=0)
    with pytest.raises(ValueError, match="data-parallel"):
        TrainerConfig(global_batch_size=8, micro_batch_size=8).check_layout(2)


def test_the_watchdog_reports_a_step_far_slower_than_the_median(tmp_path, caplog):
    # Step durations are fed in directly: wall-clock sleeps are at the mercy of a loaded machine.
    trainer, _, _ = build_trainer(tmp_path, make_batches(1, 4), gbs=4, mbs=4, steps=1)
    with caplog.at_level("WARNING", logger="ct_stages"):
        for step, seconds in enumerate([0.1, 0.12, 0.09, 0.11, 0.1, 0.1, 0.8, 0.4, 0.1], start=1):
            trainer.state.step = step
            trainer._watch(seconds)
    slow = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    slow = [e for e in slow if e["event"] == "slow_step"]
    # 0.8 s is 8x the median 0.1 s (above the default factor 5); 0.4 s is 4x: not reported.
    assert [e["step"] for e in slow] == [7] and slow[0]["median_seconds"] == pytest.approx(0.1)
    assert "the median step" in caplog.text


def _ctrl_c_at(call: int, times: int = 1):
    """A loss function that presses Ctrl-C ``times`` times during its ``call``-th call."""
    import os
    import signal

    calls = {"n": 0}

    def loss_fn(mb, logits):
        calls["n"] += 1
        if calls["n"] == call:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return F.cross_entropy(logits.flatten(0, 1), mb["labels"].flatten(), reduction="sum")

    return loss_fn


def test_ctrl_c_finishes_the_step_checkpoints_and_exits_130(tmp_path):
    from ct_stages import Preempted

    stage = Objective(_ctrl_c_at(2))
    trainer, _, _ = build_trainer(tmp_path, make_batches(6, 4), gbs=4, mbs=4, steps=6, stage=stage)
    with pytest.raises(Preempted, match="stopped by SIGINT after step 2") as stopped:
        trainer.fit()
    assert stopped.value.exit_status == 130
    assert CheckpointManager(tmp_path / "ckpt").latest().name == "step_00000002"


def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(tmp_path):
    stage = Objective(_ctrl_c_at(2, times=2))
    trainer, _, _ = build_trainer(tmp_path, make_batches(6, 4), gbs=4, mbs=4, steps=6, stage=stage)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert CheckpointManager(tmp_path / "ckpt").latest() is None


def test_metrics_are_strict_json(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl", enabled=True)
    log.write({"event": "train", "step": 1, "loss": float("nan"), "mfu": float("inf")})
    record = json.loads((tmp_path / "m.jsonl").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert record["loss"] is None and record["mfu"] is None
