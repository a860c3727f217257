"""Evaluation: held-out perplexity and reasoning accuracy by greedy generation.

Reasoning accuracy: each problem is asked in the LLaMA-3 chat format with the recipe's math system
prompt; the model answers greedily; the last ``\\boxed{...}`` of the answer must equal the reference
answer exactly (after light normalisation: spaces, thousands separators, trailing ".0").
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

import ct_model
from ct_model.errors import UserError

from ct_model.loss import cross_entropy_sum

MATH_SYSTEM_PROMPT = "Please reason step-by-step and put your final answer within \\boxed{}."


class ProblemsFormatError(UserError):
    """A problems file that is not jsonl of objects with the question and answer fields."""


def load_problems(path: str | Path, question_field: str = "question", answer_field: str = "answer",
                  limit: int | None = None) -> list[dict[str, str]]:
    """Question/answer pairs from a jsonl file; GSM8K-style answers ('... #### 42') are reduced
    to their final answer. Raises ProblemsFormatError naming the file, the line and the fields a
    row has when it lacks one of the two fields (or is not a JSON object)."""
    from ct_data import extract_gsm8k_answer

    problems = []
    path = Path(path)
    with path.open(encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ProblemsFormatError(f"{path}:{line_no}: not JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ProblemsFormatError(f"{path}:{line_no}: a JSON {type(row).__name__}, not an object "
                                          f"with fields {question_field!r} and {answer_field!r}")
            for field in (question_field, answer_field):
                if field not in row:
                    raise ProblemsFormatError(f"{path}:{line_no}: field {field!r} is missing (the row has "
                                              f"fields {sorted(row)})")
            answer = str(row[answer_field])
            if "####" in answer:
                answer = extract_gsm8k_answer(answer) or answer
            problems.append({"question": str(row[question_field]), "answer": answer})
            if limit is not None and len(problems) >= limit:
                break
    return problems


def _prompts(tokenizer, problems: list[dict[str, Any]], system_prompt: str) -> list[list[int]]:
    return [tokenizer.encode_chat([{"role": "system", "content": system_prompt},
                                   {"role": "user", "content": p["question"]}], add_generation_prompt=True)
            for p in problems]


@torch.no_grad()
def reasoning_accuracy(model, tokenizer, problems: list[dict[str, Any]], *, max_new_tokens: int = 96,
                       batch_size: int = 32, system_prompt: str = MATH_SYSTEM_PROMPT) -> dict[str, Any]:
    """Greedy accuracy: the last ``\\boxed{}`` of each answer against the reference."""
    from ct_data import answers_match, extract_boxed_answer

    model.eval()
    correct, samples, generated, start = 0, [], 0, time.perf_counter()
    for first in range(0, len(problems), batch_size):
        chunk = problems[first:first + batch_size]
        outputs = ct_model.generate(model, _prompts(tokenizer, chunk, system_prompt), max_new_tokens,
                                    eos_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id or 0)
        for problem, out in zip(chunk, outputs):
            generated += len(out)
            text = tokenizer.decode(out, skip_special_tokens=True)
            ok = answers_match(extract_boxed_answer(text), str(problem["answer"]))
            correct += ok
            if len(samples) < 3:
                samples.append({"question": problem["question"], "output": text, "answer": problem["answer"],
                                "correct": bool(ok)})
    n = len(problems)
    return {"accuracy": correct / max(n, 1), "correct": correct, "problems": n, "samples": samples,
            "generated_tokens_per_s": generated / max(time.perf_counter() - start, 1e-9)}


@torch.no_grad()
def sampled_accuracy(model, tokenizer, problems: list[dict[str, Any]], *, samples: int, temperature: float,
                     top_p: float = 1.0, seed: int = 0, max_new_tokens: int = 96, batch_size: int = 32,
                     system_prompt: str = MATH_SYSTEM_PROMPT) -> dict[str, Any]:
    """Reasoning accuracy as the paper reports it: ``samples`` completions per problem (seeded),
    pass@1 = the mean correctness over all of them, maj@n = the majority answer is correct,
    pass@n = at least one is."""
    from ct_data import answers_match, extract_boxed_answer

    if samples < 1 or not temperature > 0:
        raise ValueError(f"sampling needs samples >= 1 and temperature > 0, got {samples} and {temperature}")
    model.eval()
    generator = torch.Generator(device=model.output_weight.device).manual_seed(seed)
    per_problem: list[list[tuple[str | None, bool]]] = [[] for _ in problems]
    for _ in range(samples):
        for first in range(0, len(problems), batch_size):
            chunk = problems[first:first + batch_size]
            outputs = ct_model.generate(model, _prompts(tokenizer, chunk, system_prompt), max_new_tokens,
                                        temperature=temperature, top_p=top_p, eos_ids=tokenizer.stop_ids,
                                        pad_id=tokenizer.pad_id or 0, generator=generator)
            for i, (problem, out) in enumerate(zip(chunk, outputs)):
                answer = extract_boxed_answer(tokenizer.decode(out, skip_special_tokens=True))
                per_problem[first + i].append((answer, answers_match(answer, str(problem["answer"]))))
    n = max(len(problems), 1)
    pass1 = sum(ok for draws in per_problem for _, ok in draws) / (n * samples)
    majority = 0
    for draws in per_problem:
        # Votes are grouped by value where the answer is a number (0.5 and \\frac{1}{2} agree).
        keyed = [(_vote_key(a), ok) for a, ok in draws if a is not None]
        votes = Counter(key for key, _ in keyed)
        if votes:
            top = votes.most_common(1)[0][0]
            majority += any(ok for key, ok in keyed if key == top)
    return {"pass@1": pass1, f"maj@{samples}": majority / n,
            f"pass@{samples}": sum(any(ok for _, ok in d) for d in per_problem) / n,
            "samples_per_problem": samples, "temperature": temperature, "top_p": top_p, "seed": seed}


def _vote_key(answer: str):
    from ct_data import normalize_answer
    from ct_data.answers import numeric_value

    value = numeric_value(answer)
    return value if value is not None else normalize_answer(answer)


def default_device() -> torch.device:
    """Where evaluation runs unless told: the current GPU when there is one, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def load_model_and_tokenizer(hf_dir: str | Path, device: str | torch.device | None = None):
    """The exported model (fp32 weights) on ``device`` (default: ``default_device()``) and its tokenizer."""
    import ct_data

    model, _ = ct_model.hf.load_hf(hf_dir, device=device if device is not None else default_device())
    return model.eval(), ct_data.load_tokenizer(str(hf_dir))


def sample_eval_problems(sample_dir: str | Path, seed: int, limit: int | None,
                         scale: float = 1.0) -> list[dict[str, Any]]:
    from ct_data import sample

    sample.build(sample_dir, seed=seed, scale=scale)
    problems = sample.load_math_eval(sample_dir)
    return problems[:limit] if limit else problems


@torch.no_grad()
def text_perplexity(model, tokenizer, texts: list[str], seq_len: int = 512, batch_size: int = 16) -> dict[str, float]:
    """Perplexity of ``texts`` (each its own sequence, BOS first, cut at ``seq_len``)."""
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(texts), batch_size):
        encoded = [([tokenizer.bos_id] + tokenizer.encode(t))[:seq_len] for t in texts[start:start + batch_size]]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), tokenizer.pad_id or 0)
        labels = torch.full((len(encoded), width), -100)
        for row, seq in enumerate(encoded):
            ids[row, :len(seq)] = torch.tensor(seq)
            labels[row, :len(seq) - 1] = torch.tensor(seq[1:])
        device = model.output_weight.device
        ids, labels = ids.to(device), labels.to(device)
        logits = model(ids)  # causal: right padding never influences real positions
        total += float(cross_entropy_sum({"labels": labels}, logits))
        tokens += int((labels != -100).sum())
    loss = total / max(tokens, 1)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "eval_tokens": tokens}
