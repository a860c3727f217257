"""ct-data installs and imports alone: no megatron, modelopt, wandb, hydra, or ct_* package other
than ct_model (the batch contract and the user-error base; torch and safetensors only)."""

import subprocess
import sys

FORBIDDEN = ("megatron", "modelopt", "wandb", "hydra", "omegaconf", "ct_distill", "ct_parallel",
             "ct_precision", "ct_stages", "ct_cli")

SCRIPT = """
import json, sys, tempfile, pathlib
import ct_data, ct_data.sample
d = pathlib.Path(tempfile.mkdtemp())
(d / "a.jsonl").write_text(json.dumps({"text": "hello world"}) + "\\n")
tok = ct_data.train_tokenizer(["hello world"] * 10, 300, d / "tok")
next(ct_data.build_pretrain_loader([ct_data.SourceConfig("a", str(d / "a.jsonl"))], tok, 8, 1, 0))
print(json.dumps(sorted(sys.modules)))
"""


def test_imports_alone():
    import json

    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
    mods = json.loads(out.stdout.strip().splitlines()[-1])
    bad = [m for m in mods if m.split(".")[0] in FORBIDDEN]
    assert not bad, bad


def test_declared_dependencies():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    deps = {d.split(">")[0].split("=")[0].split("[")[0].strip() for d in pyproject["project"]["dependencies"]}
    assert deps <= {"ct-model", "torch", "datasets", "tokenizers", "transformers", "pyarrow", "jinja2", "pyyaml", "numpy"}
    assert {d for d in deps if d.startswith("ct-")} == {"ct-model"}
