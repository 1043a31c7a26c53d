"""Baselines: SFT (CE only), vanilla KD (same vocabulary, any divergence), ULD.

Official sources: `cross_entropy_loss.py`, `various_divergence.py`,
`universal_logit_distillation.py` (songmzhang/DSKD @ 077337a).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dskd.pipeline.losses.common import (
    map_rows,
    masked_sum,
    token_ce,
    token_hits,
)
from dskd.pipeline.losses.divergences import (
    DivergenceOptions,
    canonical_divergence,
    divergence,
    target_rows,
)
from dskd.pipeline.losses.signals import (
    DistillLoss,
    StudentBatch,
    TeacherSignal,
    check_same_positions,
    stack_terms,
)


class SFTLoss(DistillLoss):
    """CE on response tokens: loss = Σ_mask CE / batch_denom (kd_rate is ignored)."""

    method = "sft"
    needs_teacher = False

    def compute(self, student: StudentBatch, teacher: TeacherSignal | None):
        rows, to_logits = student.logit_rows()
        y = student.labels.reshape(-1)

        def fn(x: Tensor, yy: Tensor) -> Tensor:
            z = to_logits(x)
            return stack_terms(token_ce(z, yy), token_hits(z, yy))

        out = map_rows(fn, [rows, y], select=student.selection(),
                       chunk_rows=self.chunk_rows, vocab_size=student.vocab_size)
        return out[:, 0].sum(), None, {"accuracy": out[:, 1].sum().long()}


class VanillaKD(DistillLoss):
    """(1-α)·CE + α·Σ_mask D(teacher ‖ student) at τ, over the same vocabulary and positions.

    The teacher may be dense logits, hidden + head, or the sparse top-k cache (`teacher_target`).
    """

    method = "kd"
    needs_same_vocab = True

    def __init__(self, divergence_name: str = "fkl", opts: DivergenceOptions | None = None,
                 teacher_target: str = "auto", **kw) -> None:
        super().__init__(**kw)
        self.divergence = canonical_divergence(divergence_name)
        self.opts = opts or DivergenceOptions(temperature=2.0)
        self.teacher_target = teacher_target
        self.needs_teacher_tail = self.opts.sparse_tail == "bucket"  # renorm drops the tail

    def compute(self, student: StudentBatch, teacher: TeacherSignal | None):
        check_same_positions(student, teacher, self.method)
        rows, to_logits = student.logit_rows()
        t_rows, rebuild = target_rows(teacher.target(self.teacher_target), 2)
        y = student.labels.reshape(-1)

        def fn(x: Tensor, yy: Tensor, *tr: Tensor | None) -> Tensor:
            z = to_logits(x)
            kd = divergence(self.divergence, z, rebuild(tr), self.opts)
            return stack_terms(token_ce(z, yy), kd, token_hits(z, yy))

        sel = None if self.keep_intermediates else student.selection()
        out = map_rows(fn, [rows, y, *t_rows], select=sel, chunk_rows=self.chunk_rows,
                       vocab_size=student.vocab_size)
        mask = student.mask.reshape(-1)
        self.keep(kd_per_token=out[:, 1].reshape(student.labels.shape))
        ce, kd = masked_sum(out[:, 0], mask), masked_sum(out[:, 1], mask)
        return ce, kd, {"accuracy": masked_sum(out[:, 2], mask).long()}


class ULDLoss(DistillLoss):
    """Universal Logit Distillation: L1 between sorted probability vectors (no temperature).

    Pairing is by position from each side's first supervised row (the official per-sample
    roll): student row a_b + j pairs with teacher row c_b + j, both rows must be supervised.
    Unequal padded lengths are fine (the official needs equal ones; rolled pairs that wrap
    around are always unsupervised, so dropping them is the same thing).
    The shorter vocabulary's sorted vector is zero-padded.
    """

    method = "uld"

    def compute(self, student: StudentBatch, teacher: TeacherSignal | None):
        rows, to_logits = student.logit_rows()
        y = student.labels.reshape(-1)
        partner = uld_partners(student.labels, teacher.labels)  # (B*T_s,) teacher flat row
        v_t = teacher.vocab()

        def fn(x: Tensor, yy: Tensor, part: Tensor) -> Tensor:
            z = to_logits(x)
            zt = teacher.dense_rows(part.clamp(min=0))
            d = sorted_prob_l1(z, zt)
            return stack_terms(token_ce(z, yy), d * part.ge(0), token_hits(z, yy))

        mask = student.mask.reshape(-1)
        sel = mask | partner.ge(0)
        out = map_rows(fn, [rows, y, partner], select=sel, chunk_rows=self.chunk_rows,
                       vocab_size=max(student.vocab_size, v_t))
        self.keep(uld_per_row=out[:, 1].reshape(student.labels.shape),
                  uld_pair_mask=partner.ge(0).reshape(student.labels.shape))
        uld = out[:, 1].sum()
        terms = {"uld_loss": uld, "accuracy": masked_sum(out[:, 2], mask).long()}
        return masked_sum(out[:, 0], mask), uld, terms


def uld_partners(labels: Tensor, teacher_labels: Tensor) -> Tensor:
    """(B*T_s,) flat teacher row paired with each student row, -1 where there is none."""
    b, t_s = labels.shape
    t_t = teacher_labels.shape[1]
    s_mask, t_mask = labels.ne(-100), teacher_labels.ne(-100)
    a = _first_true(s_mask)  # (B,)
    c = _first_true(t_mask)
    k = torch.arange(t_s, device=labels.device).expand(b, t_s)
    j = k - a[:, None] + c[:, None]  # teacher row of the same offset from the response start
    ok = s_mask & (k >= a[:, None]) & (j >= 0) & (j < t_t)
    j_safe = j.clamp(0, t_t - 1)
    ok = ok & t_mask.gather(1, j_safe)
    flat = j_safe + torch.arange(b, device=labels.device)[:, None] * t_t
    return torch.where(ok, flat, torch.full_like(flat, -1)).reshape(-1)


def _first_true(m: Tensor) -> Tensor:
    idx = torch.arange(m.shape[1], device=m.device).expand_as(m)
    return torch.where(m, idx, torch.full_like(idx, m.shape[1])).min(1).values


def sorted_prob_l1(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Σ_v |sort↓ softmax(z_s) − sort↓ softmax(z_t)|, shorter vocabulary zero-padded (…,)."""
    p = torch.softmax(student_logits.float(), -1).sort(-1, descending=True).values
    q = torch.softmax(teacher_logits.float(), -1).sort(-1, descending=True).values
    gap = p.shape[-1] - q.shape[-1]
    if gap > 0:
        q = torch.nn.functional.pad(q, (0, gap))
    elif gap < 0:
        p = torch.nn.functional.pad(p, (0, -gap))
    return (p - q).abs().sum(-1)


__all__ = ["SFTLoss", "ULDLoss", "VanillaKD", "sorted_prob_l1", "uld_partners"]
