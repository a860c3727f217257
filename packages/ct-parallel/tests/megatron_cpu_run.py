"""TEST-ONLY entry script: install the megatron CPU shim, then run a module as __main__.

    torchrun --nproc-per-node 2 packages/ct-parallel/tests/megatron_cpu_run.py some.module [args...]
"""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import megatron_cpu_shim  # noqa: E402

if __name__ == "__main__":
    megatron_cpu_shim.install()
    target = sys.argv[1]
    sys.argv = sys.argv[1:]
    if target.endswith(".py"):
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
