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

import json
from collections.abc import Sequence
from pathlib import Path
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


def checkpoint_dtype(model_dir: str | Path) -> str | None:
    """The dtype a checkpoint's config.json says its weights are in (``torch_dtype``, or
    ``dtype`` in newer transformers), e.g. "float32"; None when it says nothing."""
    p = Path(model_dir) / "config.json"
    cfg = json.loads(p.read_text()) if p.is_file() else {}
    value = cfg.get("dtype") or cfg.get("torch_dtype")
    return str(value).removeprefix("torch.") if value else None


def resolve_dtype(requested: str, device: torch.device, ckpt_dtype: str | None = None,
                  bf16_supported: bool | None = None) -> str:
    """The teacher compute dtype for ``--teacher-dtype``, decided here so that neither backend
    interprets "auto" itself: float32 on CPU; on GPU bfloat16 where it is supported, else float16
    only for a float16 checkpoint, else float32. (vLLM's own "auto" turns a float32 checkpoint
    into float16, which costs ~1e-3 nats per log-prob and overflows on some models.)"""
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "float32"
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    if bf16_supported:
        return "bfloat16"
    return "float16" if ckpt_dtype == "float16" else "float32"
