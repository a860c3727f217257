"""Small models and samples shared by the ct-datamix tests."""

from __future__ import annotations

import torch

from ct_model import build_model, presets


def tiny(tied: bool):
    cfg = presets.get("mobilellm_tiny", num_layers=2, hidden_size=32, num_attention_heads=2, num_query_groups=1,
                      ffn_hidden_size=64, vocab_size=50, share_embeddings_and_output_weights=tied)
    return build_model(cfg, seed=0).double()


def samples(k=4):
    g = torch.Generator().manual_seed(0)
    # Different lengths (padding) and repeated tokens (rows that add up in the embedding gradient).
    return [torch.randint(0, 12, (n,), generator=g) for n in (9, 5, 7, 3)[:k]]
