"""lm-evaluation-harness, in process, on a ct-model (an HF export loaded by ct_model.hf).

``CTModelLM`` implements the harness's three request types on our own model and tokenizer (no
``transformers``/``accelerate`` model class in between, so what is scored is exactly what we
train): ``loglikelihood`` (multiple choice), ``loglikelihood_rolling`` (perplexity tasks) and
``generate_until`` (greedy, batched with the KV cache, cut at the task's stop strings).
``run_harness`` evaluates task names (hub tasks need network; local task YAMLs with
``dataset_path: json`` work offline) and returns the harness's results dict.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import ct_model


def _lm_base():
    try:
        from lm_eval.api.model import LM
    except ImportError as err:  # the optional extra
        raise ImportError("lm-evaluation-harness is not installed: install ct-stages[lm-eval]") from err
    return LM


class CTModelLM(_lm_base()):
    def __init__(self, model, tokenizer, *, batch_size: int = 8, max_gen_toks: int = 256):
        super().__init__()
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_gen_toks = batch_size, max_gen_toks
        self.generations: list[str] = []  # every generate_until answer, in request order

    # -- scoring ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _logprob(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        device = self.model.output_weight.device
        ids = torch.tensor([context + continuation], device=device)
        logits = self.model(ids[:, :-1]).float()[0, len(context) - 1:]
        logprobs = F.log_softmax(logits, dim=-1)
        target = torch.tensor(continuation, device=device)
        total = logprobs.gather(-1, target[:, None]).sum().item()
        return total, bool((logprobs.argmax(-1) == target).all())

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        out = []
        for request in requests:
            context, continuation = request.args
            ctx = [self.tokenizer.bos_id] + self.tokenizer.encode(context)
            out.append(self._logprob(ctx, self.tokenizer.encode(continuation)))
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        return [self._logprob([self.tokenizer.bos_id], self.tokenizer.encode(r.args[0]))[0] for r in requests]

    # -- generation ------------------------------------------------------------------------------
    def generate_until(self, requests) -> list[str]:
        out = []
        for first in range(0, len(requests), self.batch_size):
            chunk = requests[first:first + self.batch_size]
            prompts = [[self.tokenizer.bos_id] + self.tokenizer.encode(r.args[0]) for r in chunk]
            kwargs = chunk[0].args[1] if len(chunk[0].args) > 1 else {}
            limit = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = ct_model.generate(self.model, prompts, limit, eos_ids=self.tokenizer.stop_ids,
                                    pad_id=self.tokenizer.pad_id or 0)
            for request, tokens in zip(chunk, ids):
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                until = (request.args[1] if len(request.args) > 1 else {}).get("until") or []
                for stop in [until] if isinstance(until, str) else until:
                    text = text.split(stop)[0]
                out.append(text)
        self.generations.extend(out)
        return out


def run_harness(hf_dir: str | Path, tasks: list[str], *, include: str | Path | None = None,
                limit: int | None = None, batch_size: int = 8, out_path: str | Path | None = None,
                seed: int = 0) -> dict[str, Any]:
    """The harness's results for ``tasks`` on the HF model in ``hf_dir``; also written to
    ``out_path`` as JSON (samples included) when given."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from .evaluate import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(hf_dir)
    lm = CTModelLM(model, tokenizer, batch_size=batch_size)
    # Local task directories alone index in a second; the built-in task index takes ~45 s.
    manager = TaskManager(include_path=str(include), include_defaults=False) if include else None
    if manager is not None and not all(t in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=str(include))
    results = simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager or TaskManager(),
                              log_samples=True, random_seed=seed, numpy_random_seed=seed,
                              torch_random_seed=seed, fewshot_random_seed=seed)
    if out_path is not None:
        Path(out_path).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return results
