"""DESIGN.md's dependency rules, checked statically (imports in the source) and dynamically
(ct-model and ct-data installed alone, in a fresh environment, import without the heavy stack)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Which ct packages each package may import (its declared workspace dependencies).
ALLOWED = {
    "ct_model": set(),
    "ct_data": {"ct_model"},  # the batch contract (ct_model.batch) only
    "ct_distill": {"ct_model"},
    "ct_precision": {"ct_model"},
    "ct_parallel": {"ct_model", "ct_precision"},  # engines interpret PrecisionConfig
    "ct_stages": {"ct_model", "ct_data", "ct_distill", "ct_parallel", "ct_precision"},
    "ct_datamix": {"ct_model", "ct_data"},
    "ct_cli": {"ct_model", "ct_data", "ct_distill", "ct_parallel", "ct_precision", "ct_stages", "ct_datamix"},
}
HEAVY = ("megatron", "modelopt", "wandb", "hydra")


def imported_top_levels(package_dir: Path) -> set[str]:
    names = set()
    for path in package_dir.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_source_imports_follow_the_layering(package):
    src = ROOT / "packages" / package.replace("_", "-") / "src" / package
    ct_imports = {n for n in imported_top_levels(src) if n.startswith("ct_")} - {package}
    assert ct_imports <= ALLOWED[package], f"{package} imports {sorted(ct_imports - ALLOWED[package])}"


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_declared_workspace_dependencies_match_the_layering(package):
    pyproject = tomllib.loads((ROOT / "packages" / package.replace("_", "-") / "pyproject.toml").read_text())
    deps = {d.split("[")[0].split(">")[0].split("=")[0].strip().replace("-", "_")
            for d in pyproject["project"]["dependencies"]}
    assert {d for d in deps if d.startswith("ct_")} <= ALLOWED[package]


def _uv() -> str | None:
    for candidate in (os.environ.get("UV"), shutil.which("uv")):
        if candidate and subprocess.run([candidate, "--version"], capture_output=True).returncode == 0:
            return candidate
    return None


@pytest.mark.slow
@pytest.mark.parametrize("package", ["ct-model", "ct-data"])
def test_package_imports_alone_in_a_fresh_environment(tmp_path, package):
    uv = _uv()
    if uv is None:
        pytest.skip("uv is not on PATH (run the tests through `uv run pytest`)")
    env_dir = tmp_path / "env"
    env = {**os.environ, "UV_PROJECT_ENVIRONMENT": str(env_dir), "UV_PYTHON": sys.executable}
    env.pop("VIRTUAL_ENV", None)
    subprocess.run([uv, "sync", "--frozen", "--no-dev", "--package", package, "--quiet"],
                   cwd=ROOT, env=env, check=True)
    module = package.replace("-", "_")
    probe = (
        "import importlib.util, sys\n"
        f"import {module}\n"
        f"heavy = {HEAVY!r}\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "installed = [h for h in heavy if importlib.util.find_spec(h)]\n"
        "assert not loaded, f'imported: {loaded}'\n"
        "assert not installed, f'installed: {installed}'\n"
        "print('ok')\n"
    )
    out = subprocess.run([str(env_dir / "bin" / "python"), "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
