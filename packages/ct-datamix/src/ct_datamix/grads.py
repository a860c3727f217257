"""Per-sample gradients of the embedding and output layers, kept factored.

For a decoder with logits = h W_out^T and x0 = W_emb[ids], one sample's gradients are

    output layer:    G^T H      (G = dL/dlogits [T, V], H = final hidden states [T, h])
    embedding layer: sum_t e_{ids_t} D_t^T   (D = dL/dx0 [T, h], scattered onto the rows it read)

Both are kept as their factors, so a batch never holds a [V, h] matrix per sample; dot products,
squared norms and weighted sums are computed from the factors. One batched backward pass of the
summed per-sample losses gives every sample's factors exactly (samples do not interact in a
forward pass), which is what ``torch.func.vmap(grad)`` would compute, at the cost of one backward.

Tied embeddings (MobileLLM-R1): the shared matrix's gradient is the sum of the two roles. We keep
the roles as two separate DataInf "layers" (block-diagonal Hessian over {embedding role, output
role}), as the paper names embedding and output layers separately; see docs/ct-datamix.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100
ROLES = ("embedding", "output")


@dataclass
class OutputGrads:
    """Output-layer gradients of B samples: sum_t G[b, t]^T H[b, t]."""

    G: torch.Tensor  # [B, T, V]
    H: torch.Tensor  # [B, T, h]

    def sqnorm(self) -> torch.Tensor:
        return (torch.einsum("btv,bsv->bts", self.G, self.G) * torch.einsum("bth,bsh->bts", self.H, self.H)).sum((1, 2))

    def dot(self, M: torch.Tensor) -> torch.Tensor:
        """<g_b, M> for M [V, h]."""
        return (self.G * (self.H @ M.T)).sum((1, 2))

    def accumulate(self, M: torch.Tensor, coef: torch.Tensor) -> None:
        """M += sum_b coef_b g_b."""
        M += torch.einsum("btv,bth->vh", self.G * coef[:, None, None], self.H)

    def dense(self) -> torch.Tensor:
        return torch.einsum("btv,bth->bvh", self.G, self.H)


@dataclass
class EmbeddingGrads:
    """Embedding-layer gradients of B samples: rows ids[b, t] receive D[b, t]."""

    D: torch.Tensor    # [B, T, h]
    ids: torch.Tensor  # [B, T]
    vocab_size: int

    def sqnorm(self) -> torch.Tensor:
        same = (self.ids[:, :, None] == self.ids[:, None, :]).to(self.D.dtype)  # repeated tokens add up
        return (torch.einsum("bth,bsh->bts", self.D, self.D) * same).sum((1, 2))

    def dot(self, M: torch.Tensor) -> torch.Tensor:
        return (self.D * M[self.ids]).sum((1, 2))

    def accumulate(self, M: torch.Tensor, coef: torch.Tensor) -> None:
        M.index_add_(0, self.ids.reshape(-1), (self.D * coef[:, None, None]).reshape(-1, self.D.shape[-1]))

    def dense(self) -> torch.Tensor:
        B, T, h = self.D.shape
        out = torch.zeros(B, self.vocab_size, h, dtype=self.D.dtype, device=self.D.device)
        for b in range(B):
            out[b].index_add_(0, self.ids[b], self.D[b])
        return out


def pad_batch(samples: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and next-token labels [B, T] of 1-D token tensors (BOS included), right-padded."""
    T = max(len(s) for s in samples)
    ids = torch.full((len(samples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), T), IGNORE, dtype=torch.long)
    for b, s in enumerate(samples):
        ids[b, : len(s)] = s
        labels[b, : len(s) - 1] = s[1:]
    return ids, labels


def sample_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of each sample [B] (labels already shifted)."""
    per_token = F.cross_entropy(logits.transpose(1, 2).float(), labels, ignore_index=IGNORE, reduction="none")
    counts = (labels != IGNORE).sum(1).clamp(min=1)
    return per_token.sum(1) / counts


def per_sample_grads(model, samples: list[torch.Tensor], pad_id: int = 0
                     ) -> tuple[dict[str, OutputGrads | EmbeddingGrads], torch.Tensor]:
    """Factored per-sample gradients {role: grads} and losses [B] for a batch of samples."""
    device = model.output_weight.device
    ids, labels = pad_batch(samples, pad_id)
    ids, labels = ids.to(device), labels.to(device)
    stash = {}

    def hook(_module, _inputs, out):
        # A fresh leaf: the backward pass stops here, and no parameter gradient is computed.
        stash["x0"] = out.detach().requires_grad_(True)
        return stash["x0"]

    was = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    handle = model.embed_tokens.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            hidden = model.hidden_states(ids)
            logits = model.logits(hidden)
            losses = sample_losses(logits, labels)
            d_x0, d_logits = torch.autograd.grad(losses.sum(), [stash["x0"], logits])
    finally:
        handle.remove()
        for p, w in zip(model.parameters(), was):
            p.requires_grad_(w)
    V = model.config.vocab_size
    grads = {"embedding": EmbeddingGrads(d_x0.float(), ids, V),
             "output": OutputGrads(d_logits.float(), hidden.detach().float())}
    return grads, losses.detach()
