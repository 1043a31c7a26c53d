"""Dual-Space KD (same vocabulary) and DSKD with cross-model attention (different vocabularies).

Both share the two "spaces" (official `dual_space_kd.py`, `…_with_cross_model_attention.py`):
  student space: t2s_logits = t2s_hiddens @ sg(W_s).T;  t2s_ce = CE(t2s_logits, y);
                 t2s_kd = D(sg(t2s_logits) ‖ z_s) at τ   (CMA: × [argmax t2s_logits == y])
  teacher space: s2t_logits = s2t_hiddens @ sg(W_t).T (+b_t);  s2t_kd = FKL(z_t ‖ s2t_logits) at τ
  kd = t2s_kd + t2s_ce + s2t_kd;  loss = ((1-α)·CE(z_s, y) + α·kd) / batch_denom
They differ only in how t2s_hiddens (B, T_s, D_s) and s2t_hiddens (B, T_t, D_t) are made:
  DSKD: t2s(h_t), s2t(h_s) position by position;  CMA: attention between the two sequences.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dskd.pipeline.losses.common import (
    gather_labels,
    head_logits,
    map_rows,
    masked_sum,
    softmax_max,
    token_ce,
    token_hits,
)
from dskd.pipeline.losses.divergences import (
    DivergenceOptions,
    canonical_divergence,
    divergence,
    target_rows,
)
from dskd.pipeline.losses.pinv import init_linear_pinv
from dskd.pipeline.losses.signals import (
    DistillLoss,
    StudentBatch,
    TeacherSignal,
    _need,
    check_same_positions,
    stack_terms,
)

CMA_MASK_VALUE = -100000.0  # official additive mask (not -inf)


class DualSpaceLoss(DistillLoss):
    """Shared student-space and teacher-space terms; subclasses make the projected hiddens."""

    needs_teacher_hidden = True
    needs_teacher_head = True
    needs_student_hidden = True
    accuracy_filter = False  # CMA filters the student-space KD (official), DSKD does not
    use_teacher_temperature = False  # official: only CMA divides the target by tea_temp
    log_max_prob = False  # official: only CMA logs max_t2s_prob

    official_teacher_fkl = True  # v1: the teacher-space KD is always forward KL (official)

    def __init__(self, d_student: int, d_teacher: int, divergence_name: str = "fkl",
                 opts: DivergenceOptions | None = None, teacher_space_divergence: str = "official",
                 accuracy_filter: str = "official", *, bias: bool = True,
                 s2t_linear: bool = True, **kw) -> None:
        super().__init__(**kw)
        self.divergence = canonical_divergence(divergence_name)
        self.opts = opts or DivergenceOptions(temperature=2.0)
        if teacher_space_divergence not in ("official", "same"):
            raise ValueError("teacher_space_divergence must be 'official' (v1: always forward KL) "
                             f"or 'same' (the chosen divergence), got {teacher_space_divergence!r}")
        official_fkl = teacher_space_divergence == "official" and self.official_teacher_fkl
        self.teacher_divergence = "fkl" if official_fkl else self.divergence
        if accuracy_filter not in ("official", "on", "off"):
            raise ValueError("accuracy_filter must be 'official', 'on' or 'off', got "
                             f"{accuracy_filter!r}")
        if accuracy_filter != "official":  # official: the class default (CMA on, DSKD off)
            self.accuracy_filter = accuracy_filter == "on"
        # creation order s2t, t2s(, query) as in the official projector config; DSKDv2's
        # projectors have no bias, and its pinv s2t is a map rebuilt per step, not a Linear
        if s2t_linear:
            self.s2t = nn.Linear(d_student, d_teacher, bias=bias)
        self.t2s = nn.Linear(d_teacher, d_student, bias=bias)

    def projected_hiddens(self, student: StudentBatch, teacher: TeacherSignal
                          ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def init_projectors_pinv(self, student_head: Tensor, teacher_head: Tensor,
                             overlap: tuple[Tensor, Tensor] | None = None) -> None:
        """`--projector-init pinv`: t2s and s2t start at the DSKDv2 pseudo-inverse maps
        (pipeline/losses/pinv.py) over the shared tokens (overlap None = same vocabulary)."""
        init_linear_pinv(self.t2s, self.s2t, student_head, teacher_head, overlap)

    def compute(self, student: StudentBatch, teacher: TeacherSignal | None):
        t2s_h, s2t_h = self.projected_hiddens(student, teacher)
        self.keep(t2s_hiddens=t2s_h, s2t_hiddens=s2t_h)
        s = self._student_space(student, t2s_h)
        t = self._teacher_space(teacher, s2t_h)
        mask, tmask = student.mask.reshape(-1), teacher.mask.reshape(-1)
        ce = masked_sum(s[:, 0], mask)
        t2s_ce, t2s_kd = masked_sum(s[:, 1], mask), masked_sum(s[:, 2], mask)
        s2t_kd = masked_sum(t[:, 0], tmask)
        n_s, n_t = mask.sum(), tmask.sum()
        terms = {
            "t2s_ce_loss": t2s_ce,
            "t2s_kd_loss": t2s_kd,
            "s2t_kd_loss": s2t_kd,
            "accuracy": masked_sum(s[:, 3], mask).long(),
            "t2s_acc": masked_sum(s[:, 4], mask).long(),
            # official: rescaled to the student token count
            "s2t_acc": masked_sum(t[:, 1], tmask) * n_s / n_t.clamp(min=1),
        }
        if self.log_max_prob:
            terms["max_t2s_prob"] = masked_sum(s[:, 5], mask)
        return ce, t2s_kd + t2s_ce + s2t_kd, terms

    def _student_space(self, student: StudentBatch, t2s_h: Tensor,
                       t2s_labels: Tensor | None = None) -> Tensor:
        """Per student row: [ce, t2s_ce, t2s_kd (filtered if CMA), hit, t2s_hit, max_t2s_prob,
        t2s_hit vs the label, student argmax].

        t2s_labels (B, T_s): target of the t2s CE and of t2s_hit. v1: the labels; DSKDv2: the
        teacher's predictions (its "agreement" is t2s_hit).
        """
        rows, to_logits = student.logit_rows()
        w_s = _need(student.lm_head_weight, "student.lm_head_weight").detach()
        b_s = student.lm_head_bias.detach() if student.lm_head_bias is not None else None
        opts = self.opts
        if not self.use_teacher_temperature:
            opts = DivergenceOptions(opts.temperature, 1.0, opts.skew_lambda, opts.akl_alpha,
                                     opts.sparse_tail)

        def fn(x: Tensor, h: Tensor, y: Tensor, yt: Tensor) -> Tensor:
            z = to_logits(x)
            t2s_logits = head_logits(h, w_s, b_s)  # student head detached
            t2s_hit = token_hits(t2s_logits, yt)
            kd = divergence(self.divergence, z, t2s_logits.detach(), opts)
            if self.accuracy_filter:
                kd = torch.where(t2s_hit > 0, kd, torch.zeros_like(kd))
            return stack_terms(token_ce(z, y), token_ce(t2s_logits, yt), kd, token_hits(z, y),
                               t2s_hit, softmax_max(t2s_logits), token_hits(t2s_logits, y),
                               z.argmax(-1))

        y = student.labels.reshape(-1)
        yt = y if t2s_labels is None else t2s_labels.reshape(-1)
        h = t2s_h.reshape(-1, t2s_h.shape[-1])
        sel = None if self.keep_intermediates else (
            student.selection() if t2s_labels is None else y.ne(-100) | yt.ne(-100))
        out = map_rows(fn, [rows, h, y, yt], select=sel, chunk_rows=self.chunk_rows,
                       vocab_size=student.vocab_size)
        if self.keep_intermediates:
            shape = student.labels.shape
            self.keep(t2s_logits=head_logits(t2s_h, w_s, b_s),
                      t2s_kd_per_token=_unfiltered_kd(self, student, t2s_h, opts, w_s, b_s),
                      t2s_acc_mask=out[:, 4].reshape(shape).bool())
        return out

    def _teacher_space(self, teacher: TeacherSignal, s2t_h: Tensor) -> Tensor:
        """Per teacher row: [s2t_kd, s2t_hit, s2t argmax], s2t_logits through the frozen head."""
        w_t = _need(teacher.head_weight, "teacher.head_weight").detach()
        b_t = teacher.head_bias.detach() if teacher.head_bias is not None else None
        opts = DivergenceOptions(self.opts.temperature, 1.0, self.opts.skew_lambda,
                                 self.opts.akl_alpha, self.opts.sparse_tail)
        t_rows, rebuild = target_rows(teacher.dense_target(), 2)

        def fn(h: Tensor, y: Tensor, *tr: Tensor | None) -> Tensor:
            s2t_logits = head_logits(h, w_t, b_t, teacher.head_logit_scale)
            kd = divergence(self.teacher_divergence, s2t_logits, rebuild(tr), opts)
            return stack_terms(kd, token_hits(s2t_logits, y), s2t_logits.argmax(-1))

        y = teacher.labels.reshape(-1)
        h = s2t_h.reshape(-1, s2t_h.shape[-1])
        sel = None if self.keep_intermediates else teacher.selection()
        out = map_rows(fn, [h, y, *t_rows], select=sel, chunk_rows=self.chunk_rows,
                       vocab_size=w_t.shape[0])
        if self.keep_intermediates:
            self.keep(s2t_logits=head_logits(s2t_h, w_t, b_t, teacher.head_logit_scale),
                      s2t_kd_per_token=out[:, 0].reshape(teacher.labels.shape))
        return out


def _unfiltered_kd(loss: DualSpaceLoss, student: StudentBatch, t2s_h: Tensor,
                   opts: DivergenceOptions, w_s: Tensor, b_s: Tensor | None) -> Tensor:
    """Debug only: the student-space KD per token before the accuracy filter."""
    t2s_logits = head_logits(t2s_h, w_s, b_s).detach()
    return divergence(loss.divergence, student.full_logits(), t2s_logits, opts).detach()


class DSKD(DualSpaceLoss):
    """Same vocabulary: t2s_hiddens = t2s(h_t), s2t_hiddens = s2t(h_s), positions coincide."""

    method = "dskd"
    needs_same_vocab = True

    def __init__(self, d_student: int, d_teacher: int, *, unused_query_projector: bool = True,
                 **kw) -> None:
        super().__init__(d_student, d_teacher, **kw)
        if unused_query_projector:
            # The official Distiller builds `query` for every DSKD run; it never gets a gradient.
            self.query = nn.Linear(2 * d_student, 2 * d_teacher)

    def projected_hiddens(self, student: StudentBatch, teacher: TeacherSignal):
        check_same_positions(student, teacher, self.method)
        h_s = _need(student.hidden, "student.hidden")
        h_t = _need(teacher.hidden, "teacher.hidden").detach()
        return self.t2s(h_t), self.s2t(h_s)


class DSKDCMA(DualSpaceLoss):
    """Different vocabularies: cross-model attention aligns student rows with teacher rows.

    Q = query([E_s[x]; E_s[y]]) (B, T_s, 2D_t);  K = [E_t[x_t]; E_t[y_t]] / std (B, T_t, 2D_t);
    V_t = t2s(h_t/std(h_t) + E_t[y_t]/std(E_t[y_t])) (B, T_t, D_s);  V_s = s2t(h_s) (B, T_s, D_t);
    A = Q Kᵀ / √(2D_t) + (1 - m_s m_tᵀ)·(-1e5);  t2s_hiddens = softmax(A) V_t;
    s2t_hiddens = softmax(Aᵀ) V_s (same scores, not detached). Stds are scalar, unbiased, over
    the whole padded tensors (official; padded teacher rows are 0 in dskd, cache and online
    alike), or over the teacher's supervised rows only (norm="supervised"); ids outside the
    label mask read the embedding of token 0.
    """

    method = "dskd-cma"
    needs_teacher_embeddings = True
    use_teacher_temperature = True
    log_max_prob = True

    accuracy_filter = True  # official: student-space KD only where t2s predicts the label

    def __init__(self, d_student: int, d_teacher: int, *, norm: str = "official", **kw) -> None:
        super().__init__(d_student, d_teacher, **kw)
        self.query = nn.Linear(2 * d_student, 2 * d_teacher)
        if norm not in ("official", "supervised"):
            raise ValueError(f"cma_norm must be 'official' or 'supervised', got {norm!r}")
        self.norm = norm

    def projected_hiddens(self, student: StudentBatch, teacher: TeacherSignal):
        mask, tmask = student.mask, teacher.mask
        e_s = _need(student.embed_weight, "student.embed_weight").detach()
        e_t = _need(teacher.embed_weight, "teacher.embed_weight").detach()
        x_s = _need(student.input_ids, "student.input_ids").masked_fill(~mask, 0)
        x_t = _need(teacher.input_ids, "teacher.input_ids").masked_fill(~tmask, 0)
        y_s, y_t = gather_labels(student.labels), gather_labels(teacher.labels)
        h_s = _need(student.hidden, "student.hidden")
        h_t = _need(teacher.hidden, "teacher.hidden").detach().float()

        q_src = torch.cat([e_s[x_s], e_s[y_s]], -1).float()  # (B, T_s, 2D_s)
        k_src = torch.cat([e_t[x_t], e_t[y_t]], -1).float()  # (B, T_t, 2D_t)
        tgt_e = e_t[y_t].float()  # (B, T_t, D_t)
        q = self.query(q_src).float()
        std = _whole_std if self.norm == "official" else _rows_std(tmask)
        k = k_src / std(k_src)
        v_t = self.t2s(h_t / std(h_t) + tgt_e / std(tgt_e)).float()  # (B, T_t, D_s)
        v_s = self.s2t(h_s).float()  # (B, T_s, D_t)

        scores = q @ k.transpose(-1, -2) / math.sqrt(2 * h_t.shape[-1])  # (B, T_s, T_t)
        pair = mask.float().unsqueeze(-1) * tmask.float().unsqueeze(1)
        scores = scores + (1.0 - pair) * CMA_MASK_VALUE
        t2s_att = torch.softmax(scores, -1)
        s2t_att = torch.softmax(scores.transpose(-1, -2), -1)  # (B, T_t, T_s)
        self.keep(query_hiddens=q, tea_v_hiddens=v_t, stu_v_hiddens=v_s, align_scores=scores,
                  t2s_attention=t2s_att, s2t_attention=s2t_att)
        return t2s_att @ v_t, s2t_att @ v_s


def _whole_std(x: Tensor) -> Tensor:
    """Official: one unbiased std over the whole padded (B, T, D) tensor (padding included)."""
    return x.std()


def _rows_std(rows: Tensor):
    """One unbiased std over the (B, T) rows selected by `rows` only: no padding or prompt rows,
    so the value does not depend on how the batch was padded or composed."""
    def std(x: Tensor) -> Tensor:
        sel = x[rows]  # (R, D)
        return sel.std() if sel.numel() > 1 else x.std()  # no supervised row: nothing to scale
    return std
