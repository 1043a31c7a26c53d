"""Batch layout of the official DSKD collate, for student and teacher sequences separately.

A sequence `s` (prompt + response + EOS) becomes input `s[:-1]` and labels `s[1:]` with the first
`prompt_len - 1` labels -100. Right padding: input = pad id, label = -100, attention 0, position
0. Positions are explicit 0..len-1 on real tokens (GPT-2 needs them with right padding).
Per-token teacher rows (n-1 per example, indexed by model-input position) pad with zeros.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

IGNORE_INDEX = -100


def collate_tokens(seqs: Sequence[Sequence[int]], prompt_lens: Sequence[int], pad_id: int,
                   *, pad_to: int | None = None,
                   masked: Sequence[bool] | None = None) -> dict[str, torch.Tensor]:
    """input_ids, labels, attention_mask, position_ids, each (B, T) with T = max(len(s)) - 1,
    and label_index (n,): the flat positions b * T + t that carry a label.

    `pad_to` forces a (larger) T, as ULD needs student and teacher padded to one length.
    `masked[b]` sets every label of row b to -100 (a padding row that must not count).
    """
    B = len(seqs)
    T = max(len(s) - 1 for s in seqs)
    if pad_to is not None:
        if pad_to < T:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest sequence ({T})")
        T = pad_to
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    for b, (s, p) in enumerate(zip(seqs, prompt_lens)):
        n = len(s) - 1
        s_t = torch.as_tensor(s, dtype=torch.long)
        input_ids[b, :n] = s_t[:-1]
        attn[b, :n] = 1
        pos[b, :n] = torch.arange(n)
        if masked is None or not masked[b]:
            labels[b, :n] = s_t[1:]
            labels[b, : max(0, p - 1)] = IGNORE_INDEX
    # The labelled rows as flat indices, found here on the CPU so the loss needs no device→host
    # sync to select them (common.map_rows).
    label_index = labels.reshape(-1).ne(IGNORE_INDEX).nonzero().squeeze(1)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attn, "position_ids": pos,
            "label_index": label_index}


def pad_rows(rows: Sequence[np.ndarray | torch.Tensor], T: int, fill: float = 0.0,
             dtype: torch.dtype | None = None) -> torch.Tensor:
    """Stack per-example (n_b, ...) arrays into (B, T, ...), filling rows n_b..T-1 with `fill`;
    trailing axes that differ between examples (sampled targets' width) are padded to the widest.

    Copies into one new buffer, so read-only inputs (memory-mapped cache rows) are fine.
    """
    rows = [r.numpy() if isinstance(r, torch.Tensor) else np.asarray(r) for r in rows]
    np_dtype = rows[0].dtype if dtype is None else torch.empty(0, dtype=dtype).numpy().dtype
    trailing = tuple(max(r.shape[i] for r in rows) for i in range(1, rows[0].ndim))
    out = np.full((len(rows), T, *trailing), fill, dtype=np_dtype)
    for b, r in enumerate(rows):
        out[(b, slice(0, r.shape[0]), *(slice(0, w) for w in r.shape[1:]))] = r
    return torch.from_numpy(out)
