"""AdamW over student + projectors (two param groups) and a warmup + cosine-to-floor schedule.

The paper's GPT-2 setting (and the official `distillation.py`): AdamW, weight decay 0.01, lr 5e-4
for the student, 1e-3 for the projectors, cosine annealing to 1e-7, no warmup by default.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn


def build_optimizer(
    student: nn.Module,
    projectors: nn.Module | None,
    *,
    lr: float,
    projector_lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """One AdamW, group 0 = trainable student params, group 1 = projector params (maybe empty).

    Both groups always exist so the optimizer state layout (and therefore a checkpoint) does not
    depend on the method; weight decay applies to every trainable tensor as in the official code.
    """
    groups = [
        {"name": "student", "params": _trainable(student.parameters()), "lr": lr,
         "initial_lr": lr, "weight_decay": weight_decay},
        {"name": "projectors",
         "params": _trainable(projectors.parameters()) if projectors is not None else [],
         "lr": projector_lr, "initial_lr": projector_lr, "weight_decay": weight_decay},
    ]
    if not groups[0]["params"]:
        raise ValueError("the student has no trainable parameters (all requires_grad=False)")
    # foreach=False: the single-tensor path is bit-stable across runs on CPU, which the resume
    # test (same final weights within 1e-6) relies on; the speed difference is small for our sizes.
    return torch.optim.AdamW(groups, betas=betas, eps=eps, foreach=False)


def _trainable(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in params:  # tied weights (GPT-2 wte/lm_head) appear once
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


@dataclass
class LRSchedule:
    """lr per optimizer step: linear warmup 0→peak, then cosine from peak to the floor (or constant).

    Each group anneals from its own peak (`initial_lr`) to the same absolute floor `min_lr`, as
    torch's CosineAnnealingLR(eta_min=lr_min) does in the official loop. Step `total_steps` and
    beyond stay at the floor. The state is only these numbers, so a checkpoint stores `asdict()`.
    """

    total_steps: int
    warmup_steps: int = 0
    min_lr: float = 1e-7
    kind: str = "cosine"  # "cosine" | "constant"

    def lr(self, peak: float, step: int) -> float:
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return peak * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return peak
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        floor = min(self.min_lr, peak)
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's lr for `step` (0-based); returns the student group's lr."""
        for group in optimizer.param_groups:
            group["lr"] = self.lr(group["initial_lr"], step)
        return optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> LRSchedule:
        return cls(**state)
