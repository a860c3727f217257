"""lm-evaluation-harness, in process, on a ct-model (an HF export loaded by ct_model.hf).

``CTModelLM`` implements the harness's three request types on our own model and tokenizer (no
``transformers``/``accelerate`` model class in between, so what is scored is exactly what we
train): ``loglikelihood`` (multiple choice), ``loglikelihood_rolling`` (perplexity tasks) and
``generate_until`` (greedy, batched with the KV cache, cut at the task's stop strings).
``run_harness`` evaluates task names (hub tasks need network; local task YAMLs with
``dataset_path: json`` work offline) and returns the harness's results dict.

What reaches the model is what lm-eval's own ``HFLM`` would give a transformers model: the
context window is the model's ``max_position_embeddings`` (``max_length``); a generation prompt
(BOS + context) keeps its last ``max_length - max_gen_toks`` tokens (left truncation, as HFLM;
``max_gen_toks`` defaults to 256 as there), a scored context + continuation its last
``max_length + 1``, and a rolling (perplexity) text is scored in disjoint windows of
``max_length``; one warning per call says how many requests were truncated. The seeds are
lm-eval's own defaults (``simple_evaluate``: random 0, numpy 1234, torch 1234, few-shot 1234),
so few-shot prompts are those of a standard lm-eval run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import ct_model
from ct_model.errors import UserError

log = logging.getLogger(__name__)

# lm_eval.evaluator.simple_evaluate's defaults (lm_eval.defaults: DEFAULT_RANDOM_SEED = 0,
# DEFAULT_OTHER_SEED = 1234 for numpy, torch and the few-shot sampler).
LM_EVAL_SEEDS = {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234,
                 "fewshot_random_seed": 1234}
DEFAULT_MAX_GEN_TOKS = 256  # HFLM.max_gen_toks
DEFAULT_MAX_LENGTH = 2048  # HFLM's when the config names no context length


def _lm_base():
    try:
        from lm_eval.api.model import LM
    except ImportError as err:  # the optional extra
        raise ImportError("lm-evaluation-harness is not installed: install ct-stages[lm-eval]") from err
    return LM


class CTModelLM(_lm_base()):
    def __init__(self, model, tokenizer, *, batch_size: int = 8, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 max_length: int | None = None):
        super().__init__()
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_gen_toks = batch_size, max_gen_toks
        # HFLM: max_length given, else the config's context length, else 2048.
        self.max_length = int(max_length or getattr(model.config, "max_position_embeddings", None)
                              or DEFAULT_MAX_LENGTH)
        self.generations: list[str] = []  # every generate_until answer, in request order
        self.truncated: dict[str, int] = {}  # requests left-truncated, per request type

    def _warn_truncated(self, kind: str, count: int, total: int, kept: str) -> None:
        if count:
            self.truncated[kind] = self.truncated.get(kind, 0) + count
            log.warning("lm-eval %s: %d of %d requests were longer than the context and were left-truncated "
                        "to their last %s tokens (max_length %d, as lm-eval's HFLM does)",
                        kind, count, total, kept, self.max_length)

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
        out, truncated = [], 0
        keep = self.max_length + 1  # HFLM: (context + continuation)[-(max_length + 1):]
        for request in requests:
            context, continuation = request.args
            ctx = [self.tokenizer.bos_id] + self.tokenizer.encode(context)
            cont = self.tokenizer.encode(continuation)
            if len(ctx) + len(cont) > keep:
                truncated += 1
                whole = (ctx + cont)[-keep:]
                # The continuation is scored whole; one that alone fills the window loses its head.
                n = min(len(cont), keep - 1)
                ctx, cont = whole[:-n], whole[-n:]
            out.append(self._logprob(ctx, cont))
        self._warn_truncated("loglikelihood", truncated, len(requests), f"{keep}")
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        """As HFLM: a text longer than the context is scored in disjoint windows of ``max_length``
        tokens, each conditioned on the token before it (the first on BOS)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for request in requests:
            windows = map(make_disjoint_window, get_rolling_token_windows(
                token_list=self.tokenizer.encode(request.args[0]), prefix_token=self.tokenizer.bos_id,
                max_seq_len=self.max_length, context_len=1))
            out.append(sum(self._logprob(list(ctx), list(cont))[0] for ctx, cont in windows))
        return out

    # -- generation ------------------------------------------------------------------------------
    def generate_until(self, requests) -> list[str]:
        out, truncated, windows = [], 0, set()
        for first in range(0, len(requests), self.batch_size):
            chunk = requests[first:first + self.batch_size]
            kwargs = chunk[0].args[1] if len(chunk[0].args) > 1 else {}
            limit = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            window = self.max_length - limit  # HFLM: max_ctx_len, the prompt's share of max_length
            if window <= 0:
                raise UserError(f"lm-eval: max_gen_toks {limit} must be less than the model's context "
                                f"length {self.max_length} (max_position_embeddings)")
            prompts = [[self.tokenizer.bos_id] + self.tokenizer.encode(r.args[0]) for r in chunk]
            truncated += sum(len(p) > window for p in prompts)
            windows.add(window)
            prompts = [p[-window:] for p in prompts]
            ids = ct_model.generate(self.model, prompts, limit, eos_ids=self.tokenizer.stop_ids,
                                    pad_id=self.tokenizer.pad_id or 0)
            for request, tokens in zip(chunk, ids):
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                until = (request.args[1] if len(request.args) > 1 else {}).get("until") or []
                for stop in [until] if isinstance(until, str) else until:
                    text = text.split(stop)[0]
                out.append(text)
        self.generations.extend(out)
        self._warn_truncated("generate_until", truncated, len(requests),
                             "/".join(str(w) for w in sorted(windows)) + " (max_length - max_gen_toks)")
        return out


def run_harness(hf_dir: str | Path, tasks: list[str], *, include: str | Path | None = None,
                limit: int | None = None, batch_size: int = 8, out_path: str | Path | None = None,
                seeds: dict[str, int] | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                max_length: int | None = None) -> dict[str, Any]:
    """The harness's results for ``tasks`` on the HF model in ``hf_dir``; also written to
    ``out_path`` as JSON (samples included) when given.

    ``seeds``: any of ``random_seed``, ``numpy_random_seed``, ``torch_random_seed``,
    ``fewshot_random_seed`` (simple_evaluate's names); the others keep lm-eval's defaults
    (``LM_EVAL_SEEDS``). The seeds used are in the results' ``seeds`` (and lm-eval's ``config``)."""
    unknown = set(seeds or {}) - set(LM_EVAL_SEEDS)
    if unknown:
        raise ValueError(f"unknown seed names {sorted(unknown)}: use {sorted(LM_EVAL_SEEDS)}")
    used = {**LM_EVAL_SEEDS, **(seeds or {})}
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from .evaluate import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(hf_dir)
    lm = CTModelLM(model, tokenizer, batch_size=batch_size, max_gen_toks=max_gen_toks, max_length=max_length)
    # Local task directories alone index in a second; the built-in task index takes ~45 s.
    manager = TaskManager(include_path=str(include), include_defaults=False) if include else None
    if manager is not None and not all(t in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=str(include))
    results = simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager or TaskManager(),
                              log_samples=True, **used)
    results["seeds"] = used
    results["truncated_requests"] = dict(lm.truncated)
    if out_path is not None:
        Path(out_path).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return results
