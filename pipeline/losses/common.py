"""Pieces every loss shares: label masks, the head projection, token CE, and the row chunker.

Everything here is float32 math on tensors; nothing knows about models. The chunker is what
keeps V = 152k vocabularies in bounded memory: it runs a per-row function over token chunks
under activation checkpointing, so only one chunk's (rows, V) temporaries are alive at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100

# Bytes one (rows, V) float32 temporary may take before the chunker splits rows. A divergence
# keeps ~8 such temporaries alive per chunk, so the default bounds the working set to ~0.5 GiB.
DEFAULT_CHUNK_BYTES = 64 * 2**20


def label_mask(labels: Tensor) -> Tensor:
    """(…) bool: positions that carry a label (labels are already shifted, -100 = ignore)."""
    return labels.ne(IGNORE_INDEX)


def gather_labels(labels: Tensor) -> Tensor:
    """Labels safe for a gather: -100 becomes 0 (the result is masked out afterwards)."""
    return labels.masked_fill(labels.eq(IGNORE_INDEX), 0)


def head_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None = None,
                scale: float = 1.0) -> Tensor:
    """((…, D) @ (V, D).T + b)·scale -> (…, V) in float32: the one place a head is applied.

    scale is the constant logit scale some teachers apply (Cohere, Granite; cache `logit_scale`).
    """
    out = hidden.float() @ weight.float().T
    out = out + bias.float() if bias is not None else out
    return out * scale if scale != 1.0 else out


@dataclass
class HeadLogits:
    """Dense logits kept as hidden @ weight.T (+ bias) and computed lazily, chunk by chunk.

    hidden (…, D), weight (V, D), bias (V,) or None. Lets a (B, T, 152k) teacher logit
    tensor exist only one chunk at a time.
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None
    scale: float = 1.0

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def materialize(self) -> Tensor:
        return head_logits(self.hidden, self.weight, self.bias, self.scale)


def token_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-token -log_softmax(logits)[label], no temperature, unmasked (…,).

    Like the official CE helper, NaN/inf logits are read as 0 (it does so in place; we don't).
    """
    logits = logits.float()
    logits = torch.where(torch.isfinite(logits), logits, torch.zeros_like(logits))
    lprobs = torch.log_softmax(logits, -1)
    return -lprobs.gather(-1, gather_labels(labels).unsqueeze(-1)).squeeze(-1)


def token_hits(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-token float 1.0 where argmax(logits) == label (unmasked)."""
    return logits.argmax(-1).eq(labels).float()


def masked_sum(per_token: Tensor, mask: Tensor) -> Tensor:
    """Σ over positions where mask is true; masked positions never leak NaN/inf."""
    return torch.where(mask, per_token, torch.zeros_like(per_token)).sum()


def chunk_rows_for(vocab_size: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    return max(1, chunk_bytes // (4 * max(1, vocab_size)))


def map_rows(
    fn: Callable[..., Tensor],
    rows: Sequence[Tensor | None],
    *,
    select: Tensor | None = None,
    chunk_rows: int | None = None,
    vocab_size: int = 1,
) -> Tensor:
    """Apply fn to row-aligned tensors in token chunks; returns fn's (N, …) output for all rows.

    rows: tensors whose first dim is N (flattened tokens); None entries are passed through.
    select: which rows to compute, the others get 0 (saves the prompt rows): an (N,) bool mask,
    or the int64 indices of the selected rows. The selected rows are gathered once, before
    chunking, so the chunks need no index of their own: a mask costs one device→host sync
    (its `nonzero`) per call, indices from the loader (`label_index`) cost none; before, each
    chunk synced, and again when its checkpoint was recomputed. fn runs under non-reentrant
    activation checkpointing when grads are needed, so the backward recomputes one chunk at a
    time instead of keeping every chunk's temporaries. Chunks are `torch.split` views, so each
    chunk's input grad is chunk-sized.
    """
    if select is not None:
        idx = select_index(select)
        sub = [r.index_select(0, idx) if r is not None else None for r in rows]
        out = map_rows(fn, sub, chunk_rows=chunk_rows, vocab_size=vocab_size)
        n = next(r for r in rows if r is not None).shape[0]
        return out.new_zeros((n, *out.shape[1:])).index_copy(0, idx, out)
    present = [r for r in rows if r is not None]
    n = present[0].shape[0]
    chunk = chunk_rows or chunk_rows_for(vocab_size)
    need_grad = torch.is_grad_enabled() and any(r.requires_grad for r in present)
    splits = [r.split(chunk) if r is not None else None for r in rows]
    outs = []
    for i in range((n + chunk - 1) // chunk):
        args = [s[i] if s is not None else None for s in splits]
        out = checkpoint(fn, *args, use_reentrant=False) if need_grad else fn(*args)
        outs.append(out)
    if not outs:  # nothing selected: fn's output width is unknown without running it once
        return fn(*[r[:0] if r is not None else None for r in rows])
    return torch.cat(outs, 0)


def select_index(select: Tensor) -> Tensor:
    """(n_selected,) int64 row indices from a bool mask (one sync) or from indices (none)."""
    if select.dtype == torch.bool:
        return select.nonzero().squeeze(1)
    return select


def softmax_max(logits: Tensor) -> Tensor:
    """Per-token max probability (no temperature), used for the `max_t2s_prob` log."""
    return F.softmax(logits.float(), -1).max(-1).values
