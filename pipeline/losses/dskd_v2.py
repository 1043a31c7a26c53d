"""DSKDv2 (Zhang et al., arXiv 2504.11426; official code songmzhang/DSKDv2 at 5025279).

Both methods keep DSKD's two spaces (pipeline/losses/dskd.py supplies the per-row student- and
teacher-space terms); what changes, as in the official code:

* the t2s CE target is the teacher's own prediction t̂ = argmax z_t (hidden × head), not the label;
* the student-space KD only counts rows where argmax t2s_logits == t̂ (the "agreement" filter:
  official `t2s_agreement <= args.t2s_agreement` with the default 1.0 is always true);
* the teacher-space KD uses the chosen divergence (v1: always forward KL);
* projectors have no bias and start at the pseudo-inverse maps (pinv.py); the s2t map is
  M = sg(W_s).T[:, overlap] @ pinv(P_t), rebuilt from the current student head every step;
* normalisation: only the student CE is a sum over label tokens / batch_denom; the KD terms are
  means (over mapped / agreeing / s2t rows) and loss = (1-r)·CE/denom + r·kd is not divided again.

`dskd-v2` (same vocabulary, positions coincide):
  t2s_h = t2s(h_t); s2t_h = h_s @ M;  t2s_ce = Σ_tmask CE(t2s_logits, t̂)/denom;
  s2t_kd = Σ_tmask D(z_t ‖ s2t_logits)/denom;  t2s_kd = Σ agree·D(sg(t2s_logits) ‖ z_s)/Σ agree
`dskd-eta` (different vocabularies, Exact Token Alignment):
  pairs (i, j) from token_align; y_j = map(t̂_i) (exact token string; unk or dropped);
  t2s_h[j] = t2s(h_t)[i], s2t_h[i] = (h_s @ M)[j] for the kept pairs, 0 elsewhere;
  t2s_ce = mean over mapped rows of CE(t2s_logits, y); s2t_kd = mean over non-zero s2t rows.

Terms are returned × batch_denom (see DistillLoss.compute_needs_denom): terms / batch_denom are
the official logged values; counts (accuracy, t2s_acc, …) are plain counts as in v1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dskd.pipeline.losses.common import chunk_rows_for, masked_sum
from dskd.pipeline.losses.dskd import DualSpaceLoss
from dskd.pipeline.losses.pinv import S2TPinvMap
from dskd.pipeline.losses.signals import (
    StudentBatch,
    TeacherSignal,
    _need,
    check_same_positions,
)

# Student-space columns of DualSpaceLoss._student_space and teacher-space ones of _teacher_space
CE, T2S_CE, T2S_KD, HIT, T2S_HIT, _MAXP, T2S_HIT_LABEL, S_ARGMAX = range(8)
S2T_KD, _S2T_HIT, S2T_ARGMAX = range(3)


@torch.no_grad()
def teacher_predictions(teacher: TeacherSignal, chunk_rows: int | None = None) -> Tensor:
    """t̂ (B, T_t): argmax of the teacher logits at label rows, the label (-100) elsewhere."""
    y = teacher.labels.reshape(-1)
    idx = y.ne(-100).nonzero().squeeze(1)
    preds = y.clone()
    for part in idx.split(chunk_rows or chunk_rows_for(teacher.vocab())):
        preds[part] = teacher.dense_rows(part).argmax(-1)
    return preds.reshape(teacher.labels.shape)


class DualSpaceV2(DualSpaceLoss):
    """What both DSKDv2 losses share: bias-free projectors, the s2t map, the agreement rule."""

    needs_teacher_head = True
    official_teacher_fkl = False  # v2: the teacher space follows the chosen divergence
    compute_needs_denom = True

    def __init__(self, d_student: int, d_teacher: int, *, s2t_map: S2TPinvMap | None = None,
                 agreement_threshold: float = 1.0, **kw) -> None:
        super().__init__(d_student, d_teacher, bias=False, s2t_linear=s2t_map is None, **kw)
        self.s2t_map = s2t_map
        self.agreement_threshold = agreement_threshold

    def student_to_teacher(self, student: StudentBatch) -> Tensor:
        """h_s @ M (pinv map from the current student head), or the s2t Linear."""
        h_s = _need(student.hidden, "student.hidden")
        if self.s2t_map is None:
            return self.s2t(h_s)
        return self.s2t_map(h_s, _need(student.lm_head_weight, "student.lm_head_weight"))

    def filtered_kd(self, kd_rows: Tensor, agree: Tensor, supervised: Tensor,
                    agreement: Tensor, n_supervised: Tensor) -> Tensor:
        """Official: mean over agreeing rows while agreement ≤ threshold (always, at 1.0);
        otherwise Σ_supervised / n_supervised. torch.where: no device sync."""
        on = masked_sum(kd_rows, agree) / agree.sum().clamp(min=1e-3)
        off = masked_sum(kd_rows, supervised) / n_supervised
        return torch.where(agreement <= self.agreement_threshold, on, off)


class DSKDV2(DualSpaceV2):
    """`dskd-v2`: same vocabulary, student and teacher rows coincide."""

    method = "dskd-v2"
    needs_same_vocab = True

    def compute(self, student: StudentBatch, teacher: TeacherSignal, denom: Tensor | float):
        check_same_positions(student, teacher, self.method)
        h_t = _need(teacher.hidden, "teacher.hidden").detach()
        t_preds = teacher_predictions(teacher, self.chunk_rows)
        t2s_h, s2t_h = self.t2s(h_t), self.student_to_teacher(student)
        self.keep(t2s_hiddens=t2s_h, s2t_hiddens=s2t_h, t_preds=t_preds)
        s = self._student_space(student, t2s_h, t_preds)
        t = self._teacher_space(teacher, s2t_h)
        mask, tmask = student.mask.reshape(-1), teacher.mask.reshape(-1)
        agree = s[:, T2S_HIT].bool() & mask
        self.keep(t2s_agreement_mask=agree.reshape(student.labels.shape))
        t2s_agreement = agree.sum() / denom
        t2s_kd = self.filtered_kd(s[:, T2S_KD], agree, mask, t2s_agreement, denom)
        t2s_ce, s2t_kd = masked_sum(s[:, T2S_CE], tmask), masked_sum(t[:, S2T_KD], tmask)
        y = student.labels.reshape(-1)
        terms = {
            "t2s_ce_loss": t2s_ce,
            "t2s_kd_loss": t2s_kd * denom,
            "s2t_kd_loss": s2t_kd,
            "t2s_agreement": agree.sum(),
            "s2t_agreement": (mask & t[:, S2T_ARGMAX].eq(s[:, S_ARGMAX])).sum(),
            "t_acc": (mask & t_preds.reshape(-1).eq(y)).sum(),
            "t2s_acc": masked_sum(s[:, T2S_HIT_LABEL], mask).long(),
            "accuracy": masked_sum(s[:, HIT], mask).long(),
        }
        return masked_sum(s[:, CE], mask), t2s_kd * denom + t2s_ce + s2t_kd, terms


class DSKDETA(DualSpaceV2):
    """`dskd-eta`: different vocabularies, rows paired by Exact Token Alignment.

    pred_map (V_t,) int64: teacher id → student id, -1 = dropped (token_align.prediction_map).
    """

    method = "dskd-eta"
    needs_alignment = True

    def __init__(self, d_student: int, d_teacher: int, pred_map: Sequence[int] | Tensor,
                 **kw) -> None:
        super().__init__(d_student, d_teacher, **kw)
        self.register_buffer("pred_map", torch.as_tensor(pred_map, dtype=torch.long),
                             persistent=False)  # rebuilt from the tokenizers, never saved

    def compute(self, student: StudentBatch, teacher: TeacherSignal, denom: Tensor | float):
        if teacher.alignment is None:
            raise ValueError("dskd-eta needs the token alignment of each example "
                             "(TeacherSignal.alignment); the batch builder makes it")
        align_t, align_s = teacher.alignment  # (B, K) absolute rows, -1 = padding
        h_t = _need(teacher.hidden, "teacher.hidden").detach()
        B, T_s = student.labels.shape
        T_t = teacher.labels.shape[1]
        t_preds = teacher_predictions(teacher, self.chunk_rows)

        # map the teacher's prediction at each aligned row into the student vocabulary
        paired = align_t.ge(0) & align_s.ge(0)
        b_idx = torch.arange(B, device=align_t.device)[:, None].expand_as(align_t)
        pred = t_preds.gather(1, align_t.clamp(min=0))
        mapped = self.pred_map[pred.clamp(min=0)]
        used = paired & pred.ge(0) & mapped.ge(0)
        bi, ti, si = b_idx[used], align_t[used], align_s[used]
        t2s_labels = torch.full_like(student.labels, -100).index_put((bi, si), mapped[used])

        # copy projected rows to their partner's position; unaligned rows stay exactly 0
        tea_v = self.t2s(h_t)  # (B, T_t, D_s)
        stu_v = self.student_to_teacher(student)  # (B, T_s, D_t)
        t2s_h = tea_v.new_zeros(B, T_s, tea_v.shape[-1]).index_put((bi, si), tea_v[bi, ti])
        s2t_h = stu_v.new_zeros(B, T_t, stu_v.shape[-1]).index_put((bi, ti), stu_v[bi, si])
        s2t_rows = s2t_h.ne(0).any(-1)  # official: rows that are not all exactly zero
        self.keep(tea_v_hiddens=tea_v, stu_v_hiddens=stu_v, t_preds=t_preds,
                  t_preds_as_label=t2s_labels, t2s_hiddens=t2s_h, s2t_hiddens=s2t_h,
                  s2t_align_mask=s2t_rows, align_pair_used=used)

        s = self._student_space(student, t2s_h, t2s_labels)
        t = self._teacher_space(teacher, s2t_h)
        mask, y, yt = student.mask.reshape(-1), student.labels.reshape(-1), t2s_labels.reshape(-1)
        has_target = yt.ne(-100)
        n_map = has_target.sum().clamp(min=1e-3)
        agree = s[:, T2S_HIT].bool() & has_target
        self.keep(t2s_agreement_mask=agree.reshape(B, T_s))
        t2s_agreement = agree.sum() / n_map
        t2s_ce = masked_sum(s[:, T2S_CE], has_target) / n_map
        t2s_kd = self.filtered_kd(s[:, T2S_KD], agree, has_target, t2s_agreement, n_map)
        s2t_mask = s2t_rows.reshape(-1)
        s2t_kd = masked_sum(t[:, S2T_KD], s2t_mask) / s2t_mask.sum().clamp(min=1e-8)
        # per example: aligned pairs / student label tokens; 1.0 when nothing aligned (official).
        # Padding rows of an uneven last batch (no labels) are left out of the mean.
        n_pairs, n_labels = paired.sum(1), student.mask.sum(1)
        ratio = torch.where(n_pairs > 0, n_pairs / n_labels.clamp(min=1), 1.0)
        real = n_labels > 0
        ratio = torch.where(real.any(), masked_sum(ratio, real) / real.sum().clamp(min=1), 1.0)
        kd = t2s_kd + t2s_ce + s2t_kd
        t2s_acc = masked_sum(s[:, T2S_HIT_LABEL], mask).long()
        terms = {
            "t2s_ce_loss": t2s_ce * denom,
            "t2s_kd_loss": t2s_kd * denom,
            "s2t_kd_loss": s2t_kd * denom,
            "align_ratio": ratio * denom,
            "t2s_agreement": t2s_agreement * denom,
            "t_preds_as_label_acc": (has_target & yt.eq(y)).sum() / n_map * denom,
            "t2s_agreement_ratio": agree.sum(),
            "t2s_acc": t2s_acc,
            "t2s_acc_ratio": t2s_acc,
            "accuracy": masked_sum(s[:, HIT], mask).long(),
        }
        return masked_sum(s[:, CE], mask), kd * denom, terms
