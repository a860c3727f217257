"""ct-train with a cached teacher written by every process: a cache written by 2 processes equals
the one written by 1 (read back in global order), trains to the same losses, is read by a run of
another world size, and a cache of another teacher, with a truncated shard, with an index pointing
past the end of its shards or of the version-1 format is refused before step 1 naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cli_support import TINY, ct, events, train_losses

STEPS = 3


def _args(run_dir: Path, sample_dir: Path, student: Path, *extra: str) -> list[str]:
    # Self-distillation from the reference run's export, top-16 at T = 2 (a KD term far from 0).
    return ["--phase", "midtrain_phase1", f"run_dir={run_dir}", f"sample_data.dir={sample_dir}",
            f"init_from={student}", *TINY, f"trainer.max_steps={STEPS}", "trainer.checkpoint_every=100",
            "stage.distill.top_k=16", "stage.distill.temperature=2.0", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sample_dir, reference_run) -> dict[str, Path]:
    """The same mid-training run with the cache written by 1 process, by 2 (DDP), and the online
    teacher (the independent reference)."""
    root = tmp_path_factory.mktemp("teacher_cache")
    student = reference_run / "hf"
    ct("train", *_args(root / "one", sample_dir, student, "stage.distill.teacher=cached"))
    ct("train", "--nproc-per-node", "2", "distributed=ddp",
       *_args(root / "two", sample_dir, student, "stage.distill.teacher=cached"))
    ct("train", *_args(root / "online", sample_dir, student, "stage.distill.teacher=online"))
    return {"one": root / "one", "two": root / "two", "online": root / "online", "student": student, "root": root}


def _reader(run: Path):
    from ct_distill import TeacherCacheReader

    return TeacherCacheReader(run / "teacher_cache")


@pytest.mark.slow
@pytest.mark.dist
def test_cache_written_by_two_processes_equals_the_one_process_cache(runs):
    one, two = _reader(runs["one"]), _reader(runs["two"])
    assert [p["rows"] for p in one.index["parts"]] == [[0, 4]]
    assert [p["rows"] for p in two.index["parts"]] == [[0, 2], [2, 4]]  # each rank its own rows
    assert one.num_seqs == two.num_seqs == STEPS * 4
    seqs = range(one.num_seqs)
    a, b = one.get(seqs), two.get(seqs)
    assert torch.equal(a.ids, b.ids)
    assert torch.equal(a.logprobs.view(torch.int32), b.logprobs.view(torch.int32))  # bitwise
    assert torch.equal(one.hashes(seqs), two.hashes(seqs))
    assert one.index["bytes_per_entry"] == 4 and 4 * 16 < one.index["bytes_per_token"] < 4 * 16 + 3  # + hashes, headers
    assert (runs["two"] / "teacher_cache" / "write_stats.json").is_file()


@pytest.mark.slow
@pytest.mark.dist
def test_two_process_cached_run_has_the_one_process_and_online_losses(runs):
    one, two, online = (train_losses(runs[name]) for name in ("one", "two", "online"))
    assert sorted(one) == sorted(two) == sorted(online) == list(range(1, STEPS + 1))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5)  # DDP vs one process, as for pretraining
        assert abs(one[step] - online[step]) < 2e-3  # float16 log-probs vs the teacher's float32


@pytest.mark.slow
@pytest.mark.dist
def test_a_two_process_cache_trains_a_one_process_run(runs, sample_dir, tmp_path):
    """Reading does not depend on how many processes wrote: the 2-process cache, read by 1."""
    cache = runs["two"] / "teacher_cache"
    ct("train", *_args(tmp_path / "run", sample_dir, runs["student"], "stage.distill.teacher=cached",
                       f"stage.distill.cache_dir={cache}"))
    # the same process count on bitwise the same targets: the same losses, exactly
    assert train_losses(tmp_path / "run") == train_losses(runs["one"])
    assert not (tmp_path / "run" / "teacher_cache").exists()


def _refused_before_step_1(run_dir: Path, result, *needles: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr[-3000:])
    if (run_dir / "metrics.jsonl").is_file():
        assert not [e for e in events(run_dir) if e["event"] == "train"]


@pytest.mark.slow
@pytest.mark.dist
def test_a_bad_cache_is_refused_before_step_1_naming_the_file(runs, sample_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    # another teacher: the student's export with one weight changed
    other = tmp_path / "other_teacher"
    shutil.copytree(runs["student"], other)
    weights = load_file(str(other / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name] = weights[name] + 0.01
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    cache = runs["one"] / "teacher_cache"
    result = ct("train", *_args(tmp_path / "a", sample_dir, runs["student"], "stage.distill.teacher=cached",
                                f"stage.distill.cache_dir={cache}", f"stage.distill.teacher_path={other}"),
                check=False)
    _refused_before_step_1(tmp_path / "a", result, f"{cache / 'index.json'}: teacher fingerprint")

    # a truncated shard, as a copy interrupted on the way to another file system leaves it
    broken = tmp_path / "broken_cache"
    shutil.copytree(cache, broken)
    shard = next(broken.glob("rows-*/shard-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-64])
    result = ct("train", *_args(tmp_path / "b", sample_dir, runs["student"], "stage.distill.teacher=cached",
                                f"stage.distill.cache_dir={broken}"), check=False)
    _refused_before_step_1(tmp_path / "b", result, f"{shard}: ", "truncated")

    # an index that promises one step more than its shards hold
    past = tmp_path / "past_cache"
    shutil.copytree(cache, past)
    index = json.loads((past / "index.json").read_text())
    index["num_seqs"] += 4
    (past / "index.json").write_text(json.dumps(index))
    result = ct("train", *_args(tmp_path / "c", sample_dir, runs["student"], "stage.distill.teacher=cached",
                                f"stage.distill.cache_dir={past}"), check=False)
    _refused_before_step_1(tmp_path / "c", result, f"{past / 'index.json'}: num_seqs={STEPS * 4 + 4} but its parts hold")

    # a version-1 cache (an older ct-distill's): refused, saying to delete it; never written over
    old = tmp_path / "v1_cache"
    old.mkdir()
    (old / "shard-000000.safetensors").write_bytes(b"v1")
    (old / "index.json").write_text(json.dumps({"format": "ct-distill/teacher-topk-cache", "version": 1,
                                                "shards": [{"file": "shard-000000.safetensors"}]}))
    result = ct("train", *_args(tmp_path / "d", sample_dir, runs["student"], "stage.distill.teacher=cached",
                                f"stage.distill.cache_dir={old}"), check=False)
    _refused_before_step_1(tmp_path / "d", result, f"{old / 'index.json'}: format", "v1 is not", "delete it")
    assert sorted(p.name for p in old.iterdir()) == ["index.json", "shard-000000.safetensors"]
