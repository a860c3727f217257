"""ct-datamix test fixtures; puts this directory on sys.path for the shared helpers."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

SCALE = 0.1
TRAIN_STEPS = 40


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    from ct_data import sample

    out = tmp_path_factory.mktemp("sample")
    sample.build(out, seed=0, scale=SCALE)
    return out


@pytest.fixture(scope="session")
def tokenizer(sample_dir):
    from ct_data import sample

    return sample.build_tokenizer(sample_dir, 8192, split_digits=True)


@pytest.fixture(scope="session")
def trained_export(sample_dir, tokenizer, tmp_path_factory) -> Path:
    """A mobilellm_tiny-shaped (smaller) model after a few dozen AdamW steps on the sample mix, as an HF export."""
    from ct_data import sample
    from ct_model import build_model, presets
    from ct_model.hf import save_hf

    torch.manual_seed(0)
    cfg = presets.get("mobilellm_tiny", num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=256, vocab_size=tokenizer.vocab_size)
    model = build_model(cfg, seed=0)
    loader = __import__("ct_data").build_pretrain_loader(
        sample.pretrain_sources(sample_dir, {"prose": 0.34, "code": 0.33, "math": 0.33}), tokenizer,
        seq_len=128, batch_size=8, seed=0, prefetch=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _, batch in zip(range(TRAIN_STEPS), loader):
        logits = model(batch["input_ids"], batch["position_ids"], batch["document_ids"])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("export") / "hf"
    save_hf(model, out)
    tokenizer.save(out)
    return out


@pytest.fixture(scope="session")
def random_tokens_source(sample_dir, tokenizer, tmp_path_factory) -> Path:
    """A source of documents of uniformly random tokens, decoded to text."""
    g = torch.Generator().manual_seed(0)
    out = tmp_path_factory.mktemp("random") / "random.jsonl"
    lines = [json.dumps({"text": tokenizer.decode(torch.randint(300, 8000, (150,), generator=g).tolist())})
             for _ in range(40)]
    out.write_text("\n".join(lines) + "\n")
    return out
