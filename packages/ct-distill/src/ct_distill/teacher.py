"""Online teacher: a frozen ct-model Decoder (from a model, a state dict or an HF directory).

The teacher lives on its own device in its own dtype, in eval mode, without gradients. It serves
either full logits or a top-k truncation (ids + log-probs at temperature 1 over the full
vocabulary), the same form the cache writer stores, so online and cached KD are interchangeable.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

import ct_model
from ct_model import ModelConfig

from .losses import TopK, VocabMismatchError

TEACHER_LOGITS = "teacher_logits"
TEACHER_TOPK_IDS = "teacher_topk_ids"
TEACHER_TOPK_LOGPROBS = "teacher_topk_logprobs"
# Hidden mode: the teacher's final hidden states [B, T, H_t] and its output weight [V, H_t] (the
# same tensor in every microbatch, not a copy); the chunked KD loss projects them chunk by chunk.
TEACHER_HIDDEN = "teacher_hidden"
TEACHER_OUTPUT_WEIGHT = "teacher_output_weight"


def topk_logprobs(logits: torch.Tensor, k: int) -> TopK:
    """Top-k of ``logits`` [..., V]: ids (int64, by decreasing logit) and float32 log-softmax values.

    Selection is made on the float32 logits (not on the log-probs, nor divided by a temperature),
    exactly as ``kd_loss`` truncates full teacher logits, so both paths pick the same tokens.
    """
    logits = logits.float()
    values, ids = torch.topk(logits, k, dim=-1)
    return TopK(ids, values - torch.logsumexp(logits, dim=-1, keepdim=True))


def _vocab_of(student: int | ModelConfig | nn.Module) -> int:
    if isinstance(student, int):
        return student
    if isinstance(student, ModelConfig):
        return student.vocab_size
    config = getattr(student, "config", None)
    if config is not None and hasattr(config, "vocab_size"):
        return int(config.vocab_size)
    raise TypeError(f"cannot tell the vocabulary size of {type(student).__name__}")


class OnlineTeacher:
    """A frozen teacher model. ``model(input_ids, position_ids, document_ids)`` must give logits.

    ``chunk_size`` bounds the positions whose logits are held at once when serving top-k from a
    ct-model Decoder (it has ``hidden_states`` and ``output_weight``).
    """

    def __init__(self, model: nn.Module, *, dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None,
                 student_vocab_size: int | ModelConfig | nn.Module | None = None,
                 source: str = "model", chunk_size: int = 1024):
        if device is not None:
            model = model.to(device)
        if dtype is not None:
            model = model.to(dtype)
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.source = source
        self.chunk_size = chunk_size
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "vocab_size"):
            raise TypeError("the teacher model needs a .config with vocab_size (a ct-model Decoder)")
        self.config = config
        self.vocab_size = int(config.vocab_size)
        if student_vocab_size is not None:
            self.check_vocab(student_vocab_size)

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                device: str | torch.device = "cpu", **kwargs) -> "OnlineTeacher":
        """An HF model directory (Llama / Llama-4 text, config.json + safetensors)."""
        model, _ = ct_model.hf.load_hf(path, device=device, dtype=dtype)
        return cls(model, source=str(Path(path).resolve()), **kwargs)

    @classmethod
    def from_state_dict(cls, config: ModelConfig, state: Mapping[str, torch.Tensor] | str | os.PathLike,
                        *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                        **kwargs) -> "OnlineTeacher":
        """A ct-model checkpoint: a ModelConfig plus a ct-model state dict (a mapping, or a
        ``.safetensors`` / ``torch.save`` file of one)."""
        source = "state_dict"
        if not isinstance(state, Mapping):
            source = str(Path(state).resolve())
            if str(state).endswith(".safetensors"):
                from safetensors.torch import load_file

                state = load_file(str(state), device=str(device))
            else:
                state = torch.load(state, map_location=device, weights_only=True)
        model, _, _ = ct_model.model_from_state(config, state, device)
        return cls(model, dtype=dtype, source=source, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> "OnlineTeacher":
        """An HF directory (the format every phase exports)."""
        return cls.from_hf(path, **kwargs)

    # -- facts -----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def check_vocab(self, student: int | ModelConfig | nn.Module) -> None:
        student_vocab = _vocab_of(student)
        if student_vocab != self.vocab_size:
            raise VocabMismatchError(
                f"teacher vocabulary size {self.vocab_size} ({self.source}) != student vocabulary "
                f"size {student_vocab}: logit distillation needs the same tokenizer"
            )

    def identity(self, fingerprint: bool = True) -> dict[str, Any]:
        """What a cache records about its teacher: config, dtype, source and a weight fingerprint.

        The fingerprint hashes a fixed strided sample of every parameter (cheap, device
        independent for a given dtype), enough to tell two checkpoints apart.
        """
        config = self.config.to_dict() if hasattr(self.config, "to_dict") else vars(self.config)
        ident = {"config": config, "dtype": str(self.dtype).removeprefix("torch."),
                 "source": self.source}
        if fingerprint:
            digest = hashlib.sha256()
            for name, p in sorted(self.model.state_dict().items()):
                flat = p.detach().reshape(-1)
                sample = flat[:: max(1, flat.numel() // 256)][:256].float().cpu().tolist()
                digest.update(f"{name}{tuple(p.shape)}{sample}".encode())
            ident["fingerprint"] = digest.hexdigest()[:16]
        return ident

    # -- serving ---------------------------------------------------------------------------------
    def _inputs(self, input_ids, position_ids, document_ids):
        dev = self.device
        move = lambda x: None if x is None else x.to(dev)  # noqa: E731
        return move(input_ids), move(position_ids), move(document_ids)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
               document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] in the teacher's dtype, on the teacher's device."""
        return self.model(*self._inputs(input_ids, position_ids, document_ids))

    @torch.no_grad()
    def topk(self, input_ids: torch.Tensor, k: int, position_ids: torch.Tensor | None = None,
             document_ids: torch.Tensor | None = None) -> TopK:
        """Top-k ids [B, T, k] (int64) and log-probs (float32, T=1, full-vocabulary softmax)."""
        if not 1 <= k <= self.vocab_size:
            raise ValueError(f"k={k} must be in [1, vocab_size={self.vocab_size}]")
        args = self._inputs(input_ids, position_ids, document_ids)
        if not (hasattr(self.model, "hidden_states") and hasattr(self.model, "output_weight")):
            return topk_logprobs(self.model(*args), k)
        hidden = self.model.hidden_states(*args)
        b, t, width = hidden.shape
        flat = hidden.reshape(-1, width)
        ids = torch.empty(b * t, k, dtype=torch.long, device=flat.device)
        logprobs = torch.empty(b * t, k, dtype=torch.float32, device=flat.device)
        for start in range(0, b * t, self.chunk_size):
            part = topk_logprobs(F.linear(flat[start:start + self.chunk_size], self.model.output_weight), k)
            ids[start:start + self.chunk_size], logprobs[start:start + self.chunk_size] = part
        return TopK(ids.view(b, t, k), logprobs.view(b, t, k))

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits for a batch dict, on the batch's device (teacher dtype kept)."""
        ids = batch["input_ids"]
        return self.logits(ids, batch.get("position_ids"), batch.get("document_ids")).to(ids.device)

    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                      document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states [B, T, H_t] (teacher dtype and device); a ct-model Decoder only."""
        if not (hasattr(self.model, "hidden_states") and hasattr(self.model, "output_weight")):
            raise TypeError(f"{type(self.model).__name__} has no hidden_states/output_weight: "
                            "the hidden-state mode needs a ct-model Decoder teacher")
        return self.model.hidden_states(*self._inputs(input_ids, position_ids, document_ids))

    def annotate(self, batch: Mapping[str, torch.Tensor], top_k: int | None = None,
                 hidden: bool = False) -> dict:
        """A copy of ``batch`` with the teacher's targets added under the keys
        ``DistillationLoss`` reads (loss.py): "teacher_logits", or "teacher_topk_ids" /
        "teacher_topk_logprobs" when ``top_k`` is given, or (``hidden`` and no ``top_k``)
        "teacher_hidden" + "teacher_output_weight", which a chunked loss projects per chunk so
        the teacher's full logits never exist. The targets stay on the teacher's device (the
        training device): sending them to the batch's host memory, for the engine to send them
        back, would cost two [B, T, V] copies per microbatch."""
        ids = batch["input_ids"]
        out = dict(batch)
        args = (ids, batch.get("position_ids"), batch.get("document_ids"))
        if top_k is None and hidden:
            out[TEACHER_HIDDEN] = self.hidden_states(*args)
            out[TEACHER_OUTPUT_WEIGHT] = self.model.output_weight.detach()
        elif top_k is None:
            out[TEACHER_LOGITS] = self.logits(*args)
        else:
            cached = self.topk(ids, top_k, *args[1:])
            out[TEACHER_TOPK_IDS], out[TEACHER_TOPK_LOGPROBS] = cached.ids, cached.logprobs
        return out
