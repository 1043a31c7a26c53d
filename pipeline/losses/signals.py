"""What a loss consumes and returns: tensors only, never models (so losses run from the cache).

Shapes: B batch, T_s/T_t student/teacher padded length, V_s/V_t vocabularies, D_s/D_t hidden
sizes, k top-k. Labels are already shifted (label[b, k] is the target of row k), -100 = ignore.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dskd.pipeline.losses.common import HeadLogits, head_logits, label_mask
from dskd.pipeline.losses.divergences import SampledTarget, SparseTarget, Target


class _Labelled:
    """The label mask and labelled rows of one side (both dataclasses have these fields)."""

    labels: Tensor  # (B, T) int64, -100 = ignore
    label_index: Tensor | None  # (n,) flat rows with a label, from the loader (no sync)

    @property
    def mask(self) -> Tensor:
        return label_mask(self.labels)

    def selection(self) -> Tensor:
        """The labelled rows for `map_rows(select=...)`: the loader's indices if it sent them."""
        return self.label_index if self.label_index is not None else self.mask.reshape(-1)


@dataclass
class StudentBatch(_Labelled):
    labels: Tensor  # (B, T_s) int64
    logits: Tensor | None = None  # (B, T_s, V_s); computed from hidden @ lm_head.T if absent
    hidden: Tensor | None = None  # (B, T_s, D_s) input of the LM head (post final norm)
    lm_head_weight: Tensor | None = None  # (V_s, D_s)
    lm_head_bias: Tensor | None = None  # (V_s,)
    input_ids: Tensor | None = None  # (B, T_s): CMA queries, MinED alignment
    embed_weight: Tensor | None = None  # (V_s, D_s) input embeddings: CMA queries
    label_index: Tensor | None = None  # (n,) flat rows with a label, from the loader (no sync)
    aligned_rows: Tensor | None = None  # (B*T_s,) MinED teacher partner rows, from the loader

    @property
    def vocab_size(self) -> int:
        if self.logits is not None:
            return self.logits.shape[-1]
        return _need(self.lm_head_weight, "student.lm_head_weight").shape[0]

    def logit_rows(self) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """(N, V_s) logits, or (N, D_s) hidden rows plus the head to apply per chunk."""
        if self.logits is not None:
            return self.logits.reshape(-1, self.logits.shape[-1]), lambda x: x
        h = _need(self.hidden, "student.hidden (or student.logits)")
        w = _need(self.lm_head_weight, "student.lm_head_weight")
        return h.reshape(-1, h.shape[-1]), lambda x: head_logits(x, w, self.lm_head_bias)

    def full_logits(self) -> Tensor:
        rows, to_logits = self.logit_rows()
        return to_logits(rows).reshape(*self.labels.shape, -1)


@dataclass
class TeacherSignal(_Labelled):
    labels: Tensor  # (B, T_t) int64
    input_ids: Tensor | None = None  # (B, T_t)
    logits: Tensor | None = None  # (B, T_t, V_t) dense
    hidden: Tensor | None = None  # (B, T_t, D_t)
    head_weight: Tensor | None = None  # (V_t, D_t)
    head_bias: Tensor | None = None  # (V_t,)
    head_logit_scale: float = 1.0  # logits = (hidden @ head.T + b) * scale (cache logit_scale)
    embed_weight: Tensor | None = None  # (V_t, D_t) input embeddings: CMA keys
    # ETA: (teacher rows, student rows), each (B, K) int64, -1 = padding (token_align.Aligner)
    alignment: tuple[Tensor, Tensor] | None = None
    topk_ids: Tensor | None = None  # (B, T_t, k)
    topk_logprobs: Tensor | None = None  # (B, T_t, k) log_softmax at τ=1, full vocabulary
    tail_logprob: Tensor | None = None  # (B, T_t) log(1 - Σ top-k probs)
    vocab_size: int | None = None  # V_t; defaults to the head / logits size
    sampled_ids: Tensor | None = None  # (B, T_t, W) distinct ids drawn from the teacher
    sampled_counts: Tensor | None = None  # (B, T_t, W) their counts (0 = padding)
    sample_temperature: float | None = None  # temperature of the draws (cache layout)
    label_index: Tensor | None = None  # (n,) flat rows with a label, from the loader (no sync)

    @property
    def has_dense(self) -> bool:
        return self.logits is not None or (self.hidden is not None and self.head_weight is not None)

    @property
    def has_sparse(self) -> bool:
        return self.topk_ids is not None and self.topk_logprobs is not None

    @property
    def has_sampled(self) -> bool:
        return self.sampled_ids is not None and self.sampled_counts is not None

    def vocab(self) -> int:
        if self.vocab_size is not None:
            return self.vocab_size
        if self.logits is not None:
            return self.logits.shape[-1]
        return _need(self.head_weight, "teacher.vocab_size or teacher.head_weight").shape[0]

    def dense_target(self) -> Target:
        """Dense teacher logits: given logits, else hidden @ head.T (+b), computed per chunk."""
        if self.logits is not None:
            return self.logits
        h = _need(self.hidden, "teacher.logits or teacher.hidden")
        w = _need(self.head_weight, "teacher.head_weight")
        return HeadLogits(h, w, self.head_bias, self.head_logit_scale)

    def dense_rows(self, flat_idx: Tensor) -> Tensor:
        """(n, V_t) float32 teacher logits of the given flattened rows (b * T_t + t), no grad."""
        with torch.no_grad():
            if self.logits is not None:
                return self.logits.reshape(-1, self.logits.shape[-1]).index_select(0, flat_idx).float()
            h = _need(self.hidden, "teacher.logits or teacher.hidden")
            rows = h.reshape(-1, h.shape[-1]).index_select(0, flat_idx)
            w = _need(self.head_weight, "teacher.head_weight")
            return head_logits(rows, w, self.head_bias, self.head_logit_scale)

    def sparse_target(self) -> SparseTarget:
        ids = _need(self.topk_ids, "teacher.topk_ids").long()  # the cache stores int32
        lp = _need(self.topk_logprobs, "teacher.topk_logprobs")
        return SparseTarget(ids, lp, self.vocab(), self.tail_logprob)

    def sampled_target(self) -> SampledTarget:
        return SampledTarget(_need(self.sampled_ids, "teacher.sampled_ids").long(),
                             _need(self.sampled_counts, "teacher.sampled_counts"),
                             self.sample_temperature)

    def target(self, prefer: str = "auto") -> Target:
        """prefer: 'dense', 'sparse', 'sampled' or 'auto' (dense when available, else the
        sampled targets, else the top-k cache)."""
        if prefer == "dense" or (prefer == "auto" and self.has_dense):
            return self.dense_target()
        if prefer == "sampled" or (prefer == "auto" and self.has_sampled):
            return self.sampled_target()
        if prefer in ("sparse", "auto"):
            return self.sparse_target()
        raise ValueError(f"teacher_target must be auto, dense, sparse or sampled, got {prefer!r}")


@dataclass
class LossOutput:
    """loss: what to backpropagate (loss_sum / batch_denom). terms: un-normalised sums and
    counts named as in the official logs (divide by batch_denom to log them the official
    way). intermediates: only filled when the loss has keep_intermediates=True (tests/debug)."""

    loss: Tensor
    terms: dict[str, Tensor]
    intermediates: dict[str, Tensor] = field(default_factory=dict)


class DistillLoss(nn.Module):
    """Base of every loss: holds trainable projectors (if any) and declares its needs.

    Subclasses implement `compute(student, teacher) -> (ce_sum, kd_sum, terms)`; the base
    combines them the official way: loss = ((1-kd_rate)·ce + kd_rate·kd) / batch_denom.
    """

    method: str = ""
    needs_teacher: bool = True
    needs_teacher_hidden: bool = False
    needs_teacher_head: bool = False
    needs_teacher_embeddings: bool = False
    needs_student_hidden: bool = False
    needs_same_vocab: bool = False
    needs_dense_teacher_logits: bool = False
    needs_tokenizers: bool = False
    needs_alignment: bool = False  # ETA: TeacherSignal.alignment (pipeline/token_align.py)
    # top-k signal: the cached tail_logprob (the `renorm` tail rule and MinED never read it)
    needs_teacher_tail: bool = True
    # compute(student, teacher, batch_denom): a loss whose official terms are not plain sums
    # (DSKDv2 means) returns them × batch_denom, so terms / batch_denom stay the official logs
    compute_needs_denom: bool = False

    def __init__(self, kd_rate: float = 0.5, chunk_rows: int | None = None) -> None:
        super().__init__()
        self.kd_rate = kd_rate
        self.chunk_rows = chunk_rows
        self.keep_intermediates = False
        self._inter: dict[str, Tensor] = {}

    def compute(
        self, student: StudentBatch, teacher: TeacherSignal | None
    ) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        raise NotImplementedError

    def forward(
        self,
        student: StudentBatch,
        teacher: TeacherSignal | None = None,
        batch_denom: float | Tensor | None = None,
    ) -> LossOutput:
        if self.needs_teacher and teacher is None:
            raise ValueError(f"loss {self.method!r} needs a teacher signal")
        self._inter = {}
        if batch_denom is None:  # local count of student label tokens (never 0)
            batch_denom = student.mask.sum().clamp(min=1).float()
        if self.compute_needs_denom:  # DSKDv2: its KD terms are means, kd is scaled back here
            ce, kd, terms = self.compute(student, teacher, batch_denom)
        else:
            ce, kd, terms = self.compute(student, teacher)
        loss_sum = ce if kd is None else (1.0 - self.kd_rate) * ce + self.kd_rate * kd
        terms = {"ce_loss": ce, **terms, "loss_sum": loss_sum}
        if kd is not None:
            terms["kd_loss"] = kd
        return LossOutput(loss_sum / batch_denom, terms, self._inter)

    def keep(self, **tensors: Tensor) -> None:
        if self.keep_intermediates:
            self._inter.update(tensors)


def _need(t, what: str):
    if t is None:
        raise ValueError(f"missing input {what}: the chosen loss needs it")
    return t


def check_same_positions(student: StudentBatch, teacher: TeacherSignal, method: str) -> None:
    if student.labels.shape != teacher.labels.shape:
        raise ValueError(
            f"{method}: student labels {tuple(student.labels.shape)} and teacher labels "
            f"{tuple(teacher.labels.shape)} differ; same-vocabulary methods need the same "
            "tokenisation and padding on both sides (use dskd-cma, uld or mined otherwise)"
        )


def stack_terms(*cols: Tensor) -> Tensor:
    return torch.stack([c.float() for c in cols], -1)
