"""ct-distill depends on ct-model, torch and safetensors only."""

import subprocess
import sys
import tomllib
from pathlib import Path

FORBIDDEN = ("ct_data", "ct_stages", "ct_parallel", "ct_precision", "ct_cli", "megatron", "wandb",
             "hydra", "modelopt", "transformers")


def test_import_pulls_in_nothing_forbidden():
    code = ("import sys, ct_distill; bad = [m for m in sys.modules if m.split('.')[0] in "
            f"{FORBIDDEN!r}]; print(','.join(sorted(bad)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_declared_dependencies():
    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    names = {d.split(">")[0].split("=")[0].split("[")[0].strip() for d in meta["project"]["dependencies"]}
    # numpy: safetensors.torch.save_file needs it to write the teacher cache.
    assert names == {"ct-model", "torch", "safetensors", "numpy"}
