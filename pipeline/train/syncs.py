"""Count device→host syncs without a GPU: the calls that would block on one.

On a GPU, `.item()`, `.tolist()`, `bool(t)`, `nonzero` and boolean-mask indexing wait for every
queued kernel, because the host needs a value (or an output shape) that only the device knows.
On the CPU they cost nothing, so a profiler there cannot see them; this counter records the
calls themselves (a `TorchFunctionMode`), which is what the loss and loop tests and
benchmarks/sync_count.py assert and report.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

# Calls whose result (a Python value, or an output shape) depends on tensor data.
SYNC_CALLS = frozenset({"item", "tolist", "__bool__", "__int__", "__float__", "nonzero",
                        "masked_select", "unique", "unique_consecutive", "numpy"})


def _has_bool_index(idx: Any) -> bool:
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class SyncCounter(TorchFunctionMode):
    """`with SyncCounter() as c: ...` then `c.total` / `c.calls` (name → count)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNC_CALLS:
            self.calls[name] += 1
        elif name in ("__getitem__", "__setitem__") and len(args) > 1 and _has_bool_index(args[1]):
            self.calls[f"{name}[bool]"] += 1
        return func(*args, **(kwargs or {}))
