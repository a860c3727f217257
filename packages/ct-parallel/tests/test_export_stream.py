"""Engines stream their full parameters one tensor at a time (``full_state_items``) into the HF
writer: native FSDP2/DDP and megatron TP2, PP2 (interleaved too), EP2, TP2+SP, PP2 with MoE, in 2
gloo processes; each stream equals the engine's whole-state gather and the weights it was built
from, bit for bit, and its sharded HF export loads in transformers with ct-model's logits."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import parallel_testlib as lib  # noqa: E402

NATIVE = ("fsdp2", "fsdp2_moe", "ddp")
MEGATRON = ("tp2", "pp2", "pp2_interleaved", "ep2_moe", "tp2_sp_moe", "pp2_moe")


def check_exports(out: Path, layouts) -> None:
    transformers = pytest.importorskip("transformers")
    from ct_model import model_from_state
    from ct_model.hf import load_hf, read_hf_config

    for layout in layouts:
        result = json.loads((out / layout / "result.json").read_text())
        # Every tensor once, the same set as the whole-state gather and the source, equal bit for bit.
        assert sorted(result["names"]) == sorted(result["reference"]) == sorted(result["want"]), layout
        assert result["diff_reference"] == 0.0 and result["diff_source"] == 0.0, (layout, result)
        assert result["engine_full_state"], layout  # full_model_state_dict, now built on the stream
        hf = out / layout / "hf"
        assert len(list(hf.glob("model-*-of-*.safetensors"))) > 3, layout  # really sharded
        want = torch.load(out / layout / "state.pt")
        config, _ = read_hf_config(hf)
        ours, _, _ = model_from_state(config, want)
        again, _ = load_hf(hf)
        for name, tensor in want.items():
            assert torch.equal(again.state_dict()[name], tensor), (layout, name)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
        ids = torch.randint(0, config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            diff = (ours.eval()(ids) - theirs(input_ids=ids).logits).abs().max().item()
        assert diff <= 1e-4, (layout, diff)


@pytest.mark.dist
@pytest.mark.slow
def test_native_engines_stream_full_state_into_a_sharded_hf_export(tmp_path):
    lib.torchrun("dist_export_checks.py", str(tmp_path), "native", *NATIVE)
    check_exports(tmp_path, NATIVE)


@pytest.mark.dist
@pytest.mark.slow
def test_megatron_engine_streams_full_state_into_a_sharded_hf_export(tmp_path):
    lib.torchrun("dist_export_checks.py", str(tmp_path), "megatron", *MEGATRON, shim=True, timeout=480)
    check_exports(tmp_path, MEGATRON)
