"""Evaluate exported models (HF directories) side by side on the held-out sample problems."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .evaluate import load_model_and_tokenizer, reasoning_accuracy, sample_eval_problems


def evaluate_reasoning_dirs(models: dict[str, Path], sample_dir: str | Path, seed: int, *,
                            max_problems: int, max_new_tokens: int, scale: float = 1.0) -> dict[str, Any]:
    problems = sample_eval_problems(sample_dir, seed, max_problems, scale)
    out = {}
    for name, hf_dir in models.items():
        model, tokenizer = load_model_and_tokenizer(hf_dir)
        result = reasoning_accuracy(model, tokenizer, problems, max_new_tokens=max_new_tokens)
        out[name] = {"accuracy": result["accuracy"], "correct": result["correct"], "problems": result["problems"],
                     "hf_dir": str(hf_dir), "sample": result["samples"][:1]}
    return out
