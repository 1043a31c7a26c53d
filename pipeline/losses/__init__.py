"""Loss library: divergences (dense + sparse), DSKD, DSKD-CMA, SFT, KD, ULD, MinED; one registry.

See docs/methods.md for every formula, default and official-vs-paper option.
"""

from dskd.pipeline.losses.divergences import (
    DivergenceOptions,
    SparseTarget,
    canonical_divergence,
    divergence,
    divergence_rows,
)
from dskd.pipeline.losses.registry import DIVERGENCES, METHODS, LossOptions, build_loss
from dskd.pipeline.losses.signals import DistillLoss, LossOutput, StudentBatch, TeacherSignal

__all__ = [
    "DIVERGENCES",
    "METHODS",
    "DistillLoss",
    "DivergenceOptions",
    "LossOptions",
    "LossOutput",
    "SparseTarget",
    "StudentBatch",
    "TeacherSignal",
    "build_loss",
    "canonical_divergence",
    "divergence",
    "divergence_rows",
]
