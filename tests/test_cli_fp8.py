"""ct-train precision=fp8 end to end (torchao, emulated on CPU): it logs that CPU FP8 is emulated,
checkpoints and the HF export hold plain tensors under the usual keys, and resuming from a
checkpoint continues the run exactly."""

from __future__ import annotations

import pytest
import torch

from cli_support import TINY, ct, events, train_losses

# mobilellm_tiny at two layers; the size rule off so every block linear is FP8 at this size.
FP8 = ["precision=fp8", "precision.fp8_min_matmul_elements=0", "model.num_layers=2"]


def _train(run, sample_dir, steps, *extra):
    return ct("train", "--phase", "pretrain_phase1", f"run_dir={run}", f"sample_data.dir={sample_dir}", *TINY,
              *FP8, f"trainer.max_steps={steps}", *extra)


@pytest.mark.slow
def test_fp8_run_resumes_exactly_and_exports_plain_tensors(tmp_path, sample_dir):
    straight = tmp_path / "straight"
    result = _train(straight, sample_dir, 6)
    assert "FP8 on CPU is emulated (slow); numerics only" in result.stderr
    expected = train_losses(straight)
    assert sorted(expected) == list(range(1, 7))

    split = tmp_path / "split"
    _train(split, sample_dir, 4)  # checkpoints at steps 2 and 4
    _train(split, sample_dir, 6)  # resumes from step 4
    resumed = [e for e in events(split) if e["event"] == "resume"]
    assert [e["step"] for e in resumed] == [4]
    assert train_losses(split) == expected  # every step, bit for bit

    # The export is a plain ct-model checkpoint: it loads into an unconverted model.
    from safetensors import safe_open

    import ct_model

    with safe_open(str(straight / "hf" / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes <= {torch.float32, torch.bfloat16}
    model, _ = ct_model.hf.load_hf(straight / "hf")
    plain = ct_model.build_model(model.config, seed=0)
    assert list(model.state_dict()) == list(plain.state_dict())
    assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))
