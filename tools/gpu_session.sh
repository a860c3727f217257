#!/usr/bin/env bash
# One prepared GPU session: the gpu-marked tests, then tools/bench_gpu.py, everything under $OUT.
#
#   bash tools/gpu_session.sh            # on the GPU machine, from anywhere in the checkout
#   bash tools/gpu_session.sh wheels     # beforehand, on a machine with PyPI (see "Python" below)
#
# Time: the whole session stays under SESSION_S seconds (default 570, so that it fits a lent
# machine's 10-minute command; set SESSION_S=720 for 12 minutes elsewhere). `pytest -m gpu` gets at
# most TESTS_S (default 150); the bench gets what is left less a 30 s margin as its --budget-min
# (it skips the rows that would not fit, least important last) and is killed past it.
#
# Written under $OUT (default runs/gpu_session): env.txt (GPU, driver, torch, python), pytest.log,
# bench.log, bench.json (rewritten after every bench row, so a cut-off run keeps its rows) and
# status.txt (each step's exit status: pytest 0/1, bench 0 = every row ok or OOM/skipped,
# 1 = a row failed, 124 = killed at its time limit).
#
# Python: with uv on the PATH and PyPI reachable, `uv sync --frozen` (no extras: no package has a
# GPU-only extra today) and `uv run`. Otherwise (this workplace's lent machines: no network, no uv,
# PyTorch preinstalled as python3) the image's python3 with the workspace's src folders on
# PYTHONPATH, plus the wheels in .whl/ for what that image lacks: megatron-core (row f, the megatron
# tests) and torchao (FP8 rows d and e), at uv.lock's versions. `bash tools/gpu_session.sh wheels`
# downloads them (about 4 MB, hashes checked against uv.lock); keep them out of commits with
# `echo /.whl/ >> .git/info/exclude` and name `.whl` in the run's carry. The image's transformers
# and torch may differ from uv.lock's: env.txt records what ran.
set -uo pipefail
cd "$(dirname "$0")/.."

wheels() {
    python3 - <<'PY'
import hashlib, pathlib, tomllib, urllib.request

# The pure-Python torchao wheel: its compiled variant is built against one torch version.
WANTED = {"megatron-core": "cp312-cp312-manylinux_2_24_x86_64", "torchao": "py3-none-any"}
out = pathlib.Path(".whl")
out.mkdir(exist_ok=True)
for package in tomllib.loads(pathlib.Path("uv.lock").read_text())["package"]:
    tag = WANTED.get(package["name"])
    if tag is None:
        continue
    wheel = next(w for w in package["wheels"] if tag in w["url"])
    path = out / wheel["url"].rsplit("/", 1)[1]
    data = urllib.request.urlopen(wheel["url"]).read()
    if "sha256:" + hashlib.sha256(data).hexdigest() != wheel["hash"]:
        raise SystemExit(f"{path.name}: sha256 differs from uv.lock")
    path.write_bytes(data)
    print(f"{path} ({len(data) / 2**20:.1f} MiB)")
PY
}

if [[ "${1:-}" == "wheels" ]]; then
    wheels
    exit
fi

started=$SECONDS
SESSION_S=${SESSION_S:-570}
TESTS_S=${TESTS_S:-150}
OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if command -v uv >/dev/null && uv sync --frozen --compile-bytecode >"$OUT/sync.log" 2>&1; then
    python=(uv run --frozen --no-sync python)
else
    python=(python3)
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/ct_site .whl/*.whl
    fi
    sources=$(printf '%s:' "$PWD"/packages/*/src)
    export PYTHONPATH="${sources}/tmp/ct_site${PYTHONPATH:+:$PYTHONPATH}"
fi

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    "${python[@]}" -W ignore - <<'PY' 2>&1
import importlib, sys, torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {torch.cuda.get_device_name(0)!r}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB")
for name in ("transformers", "torchao", "megatron.core", "ct_stages"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "ok"))
    except Exception as err:
        print(name, "MISSING:", type(err).__name__, err)
PY
} >"$OUT/env.txt"
cat "$OUT/env.txt"

# The gpu tests only (all under packages/), one process: they share one GPU.
timeout "$TESTS_S" "${python[@]}" -m pytest -m gpu packages -q -n 0 -p no:cacheprovider \
    --continue-on-collection-errors --timeout 120 2>&1 | tee "$OUT/pytest.log"
tests=${PIPESTATUS[0]}

left=$((SESSION_S - (SECONDS - started) - 30))
if ((left < 60)); then
    echo "bench: only $left s left, not run" | tee "$OUT/bench.log"
    bench=124
else
    budget=$(awk -v s="$left" 'BEGIN { printf "%.1f", s / 60 }')
    echo "bench: $left s left, --budget-min $budget"
    timeout "$((left + 20))" "${python[@]}" tools/bench_gpu.py --json "$OUT/bench.json" --budget-min "$budget" \
        2>&1 | tee "$OUT/bench.log"
    bench=${PIPESTATUS[0]}
fi

printf 'pytest %s\nbench %s\nseconds %s\n' "$tests" "$bench" "$((SECONDS - started))" | tee "$OUT/status.txt"
[[ $tests == 0 && $bench == 0 ]]
