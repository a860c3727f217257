"""KV-cache generation for evaluation: greedy or temperature / top-p sampling, batched prompts."""

from __future__ import annotations

import torch

from .layers import KVCache
from .masking import padded_causal_mask


def _sample(logits: torch.Tensor, temperature: float, top_p: float,
            generator: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always survives).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, eos_ids: set[int] | list[int] | None = None, pad_id: int = 0,
             generator: torch.Generator | None = None) -> list[list[int]]:
    """Continue each prompt; returns the new tokens of each (stopping after an EOS id).

    Prompts of different lengths are left-padded; pad keys are masked and positions count from
    each prompt's first real token, so every row equals generating it alone.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one non-empty prompt")
    device = model.output_weight.device
    eos = set(eos_ids or ())
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (longest - len(p)) + list(p) for p in prompts], device=device)
    key_valid = torch.tensor([[False] * (longest - len(p)) + [True] * len(p) for p in prompts],
                             device=device)
    positions = (key_valid.long().cumsum(-1) - 1).clamp(min=0)
    caches = [KVCache() for _ in range(model.config.effective_depth)]
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)  # on the host: one device sync per step (the .tolist()), not per row
    step_ids, step_pos = ids, positions
    for _ in range(max_new_tokens):
        mask = padded_causal_mask(key_valid, step_ids.shape[1])
        hidden = model.hidden_states(step_ids, step_pos, attention_mask=mask, caches=caches)
        next_ids = _sample(model.logits(hidden[:, -1]), temperature, top_p, generator)
        for row, token in enumerate(next_ids.tolist()):
            if not done[row]:
                outputs[row].append(token)
                done[row] = token in eos
        if all(done):
            break
        step_ids = next_ids[:, None]
        step_pos = step_pos[:, -1:] + 1
        key_valid = torch.cat((key_valid, torch.ones_like(key_valid[:, :1])), dim=1)
    return outputs
