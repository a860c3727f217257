"""Every layout builds on the meta device and materialises only its own part, and gets exactly the
weights one process builds whole with the same seed (or reads from an HF export): DDP, FSDP2,
megatron TP2 / PP2, and the DeepSeek-V3-shaped MoE model under FSDP2 and megatron EP2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import parallel_testlib as lib  # noqa: E402


@pytest.mark.dist
@pytest.mark.slow
def test_every_layout_materialises_the_weights_one_process_builds(tmp_path):
    import ct_model

    hf_dir = ct_model.hf.save_hf(ct_model.build_model(lib.tiny_config(), seed=11), tmp_path / "hf")
    out = tmp_path / "meta.json"
    lib.torchrun("dist_meta_build_checks.py", str(out), str(hf_dir), shim=True, timeout=400)
    results = json.loads(out.read_text())
    assert set(results) == {"ddp", "fsdp2", "megatron_tp2", "megatron_pp2", "moe_fsdp2", "moe_megatron_ep2",
                            "hf_fsdp2", "hf_megatron_tp2"}
    assert all(diff == 0.0 for diff in results.values()), results  # bit-equal


def test_a_meta_model_without_weights_is_refused():
    from ct_model import build_model
    from ct_parallel import DistributedConfig, build_engine

    with pytest.raises(ValueError, match="weight source"):
        build_engine(build_model(lib.tiny_config(), device="meta"), DistributedConfig())


def test_single_process_meta_build_trains_like_a_whole_build():
    from ct_model import build_model
    from ct_model.init import SeededInit
    from ct_parallel import DistributedConfig, build_engine

    config, batch = lib.tiny_config(), lib.global_batch(lib.tiny_config())
    losses = []
    for model, weights in ((build_model(config, seed=0), None), (meta := build_model(config, device="meta"),
                                                                SeededInit(meta, 0))):
        engine = build_engine(model, DistributedConfig(), weights=weights)
        losses.append(lib.run_engine(engine, batch)[0])
    assert losses[0] == losses[1]
