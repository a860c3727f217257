"""ct-datamix end to end: weights -> a data config that ct-train runs as it is; filter; bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from cli_support import ROOT, TINY, ct, train_losses

SMALL = ["--samples-per-source", "4", "--probe-samples", "4", "--max-tokens", "48", "--no-progress"]


@pytest.fixture(scope="module")
def export(reference_run):
    return reference_run / "hf"  # a trained tiny model (conftest's session run; read only)


@pytest.mark.slow
def test_weights_yaml_round_trips_into_ct_train(tmp_path, sample_dir, export):
    out = tmp_path / "mix.yaml"
    ct("datamix", "weights", "--data", "sample_midtrain", "--checkpoint", str(export), "--sample-dir", str(sample_dir),
       "--out", str(out), *SMALL)
    cfg = yaml.safe_load(out.read_text())
    assert [s["name"] for s in cfg["sources"]] == ["prose", "code", "math"]
    assert abs(sum(s["weight"] for s in cfg["sources"]) - 100) < 1e-2
    assert all("{sample_dir}" in s["path"] for s in cfg["sources"])  # still portable
    report = out.with_suffix(".report.md").read_text()
    assert "| prose |" in report and "rho[math]" in report
    assert out.with_suffix(".report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # ct-train takes it as a config-group option, unchanged.
    configs = tmp_path / "configs"
    shutil.copytree(ROOT / "configs", configs)
    shutil.copy(out, configs / "data" / "datamix_out.yaml")
    run = tmp_path / "run"
    ct("train", "--phase", "pretrain_phase1", "--config-dir", str(configs), "data=datamix_out", f"run_dir={run}",
       f"sample_data.dir={sample_dir}", *TINY)
    assert len(train_losses(run)) == 6


@pytest.mark.slow
def test_filter_writes_kept_shards_config_and_counts(tmp_path, sample_dir, export):
    out = tmp_path / "round1"
    ct("datamix", "filter", "--data", "sample_midtrain", "--checkpoint", str(export), "--sample-dir", str(sample_dir),
       "--out", str(out), *SMALL)
    counts = json.loads((out / "counts.json").read_text())["counts"]
    assert set(counts) == {"prose", "code", "math"}
    assert all(c["kept"] + c["dropped"] == 4 for c in counts.values())
    cfg = yaml.safe_load((out / "data.yaml").read_text())
    for s in cfg["sources"]:
        kept = (out / "shards" / f"{s['name']}.jsonl").read_text().splitlines()
        assert len(kept) == counts[s["name"]]["kept"] > 0
    import ct_data

    assert ct_data.load_data_config(out / "data.yaml").kind == "pretrain"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing_probe", "vocab", "zero_samples"])
def test_bad_input_exits_2_naming_it(tmp_path, sample_dir, export, case, capsys):
    args = ["--data", "sample_midtrain", "--checkpoint", str(export), "--sample-dir", str(sample_dir),
            "--out", str(tmp_path / "o.yaml"), *SMALL]
    if case == "missing_probe":
        args += ["--probe", f"math={tmp_path / 'nope.jsonl'}"]
        needle = "nope.jsonl"
    elif case == "vocab":
        from ct_data import sample

        small = sample.build_tokenizer(sample_dir, 4096, out_dir=tmp_path / "tok4k")
        args += ["--tokenizer", str(tmp_path / "tok4k")]
        needle = f"tokenizer's {small.vocab_size}"
    else:
        empty = tmp_path / "empty.yaml"
        (tmp_path / "blank.jsonl").write_text(json.dumps({"text": "  "}) + "\n")
        empty.write_text(yaml.safe_dump({"name": "e", "kind": "pretrain", "sources": [
            {"name": "blank", "path": str(tmp_path / "blank.jsonl")}]}))
        args[1] = str(empty)
        needle = "'blank'"
    # In process (ct-datamix's main with argv): the exit status and message are the CLI's, without
    # a fresh interpreter's ~12 s of imports per case; launching the CLI is tested above.
    from ct_cli import datamix

    status = datamix.main(["weights", *args])
    err = capsys.readouterr().err
    assert status == 2, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error:") and needle in last and "Traceback" not in err


@pytest.mark.slow
def test_recipe_datamix_reweights_midtrain_and_records_it(tmp_path, sample_dir, export):
    root = tmp_path / "pipe"
    shutil.copytree(export, root / "pretrain_phase2" / "hf")  # the model mid-training starts from
    ct("recipe", "--phases", "midtrain_phase1", "--datamix", "--datamix-samples", "4", "--skip-eval",
       f"run_dir={root}", f"sample_data.dir={sample_dir}", *TINY, "trainer.max_steps=2",
       f"stage.distill.teacher_path={root / 'pretrain_phase2' / 'hf'}")  # no embedded teacher to train
    record = json.loads((root / "recipe_summary.json").read_text())["datamix"]["midtrain_phase1"]
    assert abs(sum(record["weights"].values()) - 1) < 1e-9 and set(record["weights"]) == {"prose", "code", "math"}
    # The phase trained on the re-weighted mixture (its saved config holds the new weights, in percent).
    used = json.loads((root / "midtrain_phase1" / "config.json").read_text())["data"]["sources"]
    for s in used:
        assert s["weight"] == pytest.approx(100 * record["weights"][s["name"]], abs=1e-3)
    assert (root / "midtrain_phase1" / "hf" / "config.json").is_file()
