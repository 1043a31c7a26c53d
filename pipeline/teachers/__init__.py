"""Teacher backends: for a batch of token-id sequences, the last-layer hidden state (the LM head's
input, post final norm) of every token. The head step (``head.py``) turns those into the cache's
sparse fields; the backends know nothing of the cache.

A backend is any object with this shape (``hf_backend.HFTeacher``; the vLLM adapter in
``vllm_backend.py`` plugs in the same way)::

    backend.device                      # where its hidden states live (torch.device)
    backend.hidden_size                 # D_t
    backend.hidden_states(seqs)         # list of (len(seq), D_t) float32 tensors or arrays
    backend.head()                      # head.Head: LM head weight/bias/scale, on backend.device
    backend.close()
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from .head import Head


@runtime_checkable
class TeacherBackend(Protocol):
    device: torch.device
    hidden_size: int

    def hidden_states(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor | np.ndarray]:
        """One (n_i, D_t) float32 array per sequence, row j = hidden state at position j."""
        ...

    def head(self) -> Head: ...

    def close(self) -> None: ...


def length_batches(lengths: Sequence[int], batch_tokens: int, max_batch: int = 1 << 30
                   ) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first, so that each padded batch
    (len(batch) * its longest sequence) stays within ``batch_tokens``. Deterministic: the same
    lengths always give the same batches (ties keep their input order)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        longest = lengths[cur[0]] if cur else lengths[i]
        if cur and ((len(cur) + 1) * longest > batch_tokens or len(cur) >= max_batch):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches
