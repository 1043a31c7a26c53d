"""Sampled sparse targets (RS-KD): draw, store ragged, read back padded.

Per token row, N ids are drawn from the teacher's distribution at the cache's sampling
temperature; the cache keeps each distinct id once with its count. A row holds ~12 distinct ids
at N of a few dozen, so they are stored ragged (``sampled_n`` per row, then every row's ids and
counts one after another) rather than padded to N. The writer is handed, and the reader returns,
padded (rows, W) int32 arrays with count 0 as padding.

Why counts are enough: with x_1..x_N drawn from p, E[count_v / N] = p(v), so
Σ_v count_v / N · (-log q(v)) is an unbiased estimate of the cross-entropy H(p, q) and of the
gradient of KL(p ‖ q) (Anshumann et al., "Sparse Logit Sampling", ACL 2025).
"""

from __future__ import annotations

import numpy as np
import torch


def draw(weights: torch.Tensor, n_samples: int, generator: torch.Generator | None = None
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, V) non-negative weights (unnormalised probabilities) → (ids, counts), both (t, N)
    int32: each row's distinct drawn ids ascending in its first slots, count 0 after them."""
    t = weights.shape[0]
    if t == 0:
        z = torch.zeros(0, n_samples, dtype=torch.int32, device=weights.device)
        return z, z.clone()
    draws = torch.multinomial(weights, n_samples, replacement=True, generator=generator)
    s, _ = draws.sort(dim=1)  # (t, N)
    new = torch.ones_like(s, dtype=torch.bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    slot = new.long().cumsum(1) - 1  # slot of each draw's distinct id
    counts = torch.zeros_like(s).scatter_add_(1, slot, torch.ones_like(s))
    ids = torch.zeros_like(s).scatter_(1, slot, s)  # every draw of a run writes the same id
    return ids.to(torch.int32), counts.to(torch.int32)


def encode(ids: np.ndarray, counts: np.ndarray, id_dtype: np.dtype, count_dtype: np.dtype
           ) -> dict[str, np.ndarray]:
    """Padded (rows, W) ids and counts → the ragged stored arrays."""
    keep = counts > 0
    return {"sampled_n": keep.sum(1).astype(count_dtype),
            "sampled_ids": ids[keep].astype(id_dtype),  # row-major: rows one after another
            "sampled_counts": counts[keep].astype(count_dtype)}


def decode(n: np.ndarray, ids: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ragged stored arrays of consecutive rows (n per row; ids/counts: exactly those rows'
    entries) → padded (rows, max n) int32 ids and counts, count 0 as padding."""
    n = np.asarray(n).astype(np.int64)
    width = int(n.max()) if n.size else 0
    rows = np.repeat(np.arange(n.size), n)
    starts = np.concatenate([[0], np.cumsum(n)[:-1]]) if n.size else np.zeros(0, np.int64)
    cols = np.arange(rows.size) - np.repeat(starts, n)
    out_ids = np.zeros((n.size, width), np.int32)
    out_counts = np.zeros((n.size, width), np.int32)
    out_ids[rows, cols] = ids
    out_counts[rows, cols] = counts
    return out_ids, out_counts
