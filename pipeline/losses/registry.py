"""One registry: method name (+ divergence name + options) -> a DistillLoss module.

    loss = build_loss("dskd", "fkl", d_student=768, d_teacher=2048)
    out = loss(StudentBatch(...), TeacherSignal(...), batch_denom)   # LossOutput(loss, terms)
    optimizer.add_param_group({"params": loss.parameters(), "lr": projector_lr})
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

from torch import Tensor

from dskd.pipeline.losses.baselines import SFTLoss, ULDLoss, VanillaKD
from dskd.pipeline.losses.divergences import OFFICIAL_NAMES, DivergenceOptions, canonical_divergence
from dskd.pipeline.losses.dskd import DSKD, DSKDCMA
from dskd.pipeline.losses.signals import DistillLoss

METHODS = ("sft", "kd", "dskd", "dskd-cma", "uld", "mined")
DIVERGENCES = tuple(OFFICIAL_NAMES)


@dataclass
class LossOptions:
    """Every loss option, with its default (= the official behaviour) and meaning."""

    kd_rate: float = 0.5  # loss = (1-kd_rate)·CE + kd_rate·KD
    kd_temperature: float = 2.0  # τ on both logit tensors of every KD divergence
    teacher_temperature: float = 1.0  # extra target divisor, CMA student-space KD only
    skew_lambda: float = 0.1  # λ of skl / srkl
    adaptive_kl_alpha: float = 0.5  # α of akl
    teacher_space_divergence: Literal["official", "same"] = "official"  # official: always FKL
    cma_accuracy_filter: bool = True  # official: CMA student-space KD only where t2s is right
    unused_query_projector: bool = True  # official DSKD also builds an unused `query`
    projector_init: Literal["default", "pinv"] = "default"  # pinv: DSKDv2 pseudo-inverse init
    sparse_tail: Literal["bucket", "renorm"] = "bucket"  # top-k tail: one bucket or dropped
    teacher_target: Literal["auto", "dense", "sparse"] = "auto"  # kd/mined: which teacher form
    chunk_rows: int | None = None  # token rows per chunk (None: ~64 MiB per (rows, V) tensor)
    mined_stu2tea: Literal["closest", "first"] = "closest"  # student id -> teacher id choice


_OPTION_NAMES = {f.name for f in fields(LossOptions)}


def build_loss(
    method: str,
    divergence: str = "fkl",
    *,
    d_student: int | None = None,
    d_teacher: int | None = None,
    student_tokenizer: Any = None,
    teacher_tokenizer: Any = None,
    student_head_weight: Tensor | None = None,
    teacher_head_weight: Tensor | None = None,
    **options: Any,
) -> DistillLoss:
    """Build the loss for `method` with `divergence` (short or official name).

    d_student/d_teacher: hidden sizes (dskd, dskd-cma). student/teacher_tokenizer: HF
    tokenizers (mined builds its vocabulary map from them). *_head_weight: LM heads, only for
    projector_init='pinv'. options: fields of LossOptions; unknown names raise.
    """
    unknown = set(options) - _OPTION_NAMES
    if unknown:
        raise ValueError(f"unknown loss option(s) {sorted(unknown)}; valid: {sorted(_OPTION_NAMES)}")
    o = LossOptions(**options)
    key = method.strip().lower().replace("_", "-")
    if key not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    div = canonical_divergence(divergence)
    opts = DivergenceOptions(o.kd_temperature, o.teacher_temperature, o.skew_lambda,
                             o.adaptive_kl_alpha, o.sparse_tail)
    common = {"kd_rate": o.kd_rate, "chunk_rows": o.chunk_rows}

    if key == "sft":
        loss: DistillLoss = SFTLoss(**common)
    elif key == "kd":
        loss = VanillaKD(div, opts, o.teacher_target, **common)
    elif key == "uld":
        loss = ULDLoss(**common)
    elif key == "mined":
        from dskd.pipeline.losses.mined import MinEDLoss

        if student_tokenizer is None or teacher_tokenizer is None:
            raise ValueError("mined needs student_tokenizer and teacher_tokenizer")
        loss = MinEDLoss(student_tokenizer, teacher_tokenizer, div, opts,
                         teacher_target=o.teacher_target, stu2tea=o.mined_stu2tea, **common)
    else:
        if d_student is None or d_teacher is None:
            raise ValueError(f"{key} needs d_student and d_teacher (hidden sizes)")
        dual = {"divergence_name": div, "opts": opts,
                "teacher_space_divergence": o.teacher_space_divergence, **common}
        if key == "dskd":
            loss = DSKD(d_student, d_teacher, unused_query_projector=o.unused_query_projector,
                        **dual)
        else:
            loss = DSKDCMA(d_student, d_teacher, accuracy_filter=o.cma_accuracy_filter, **dual)

    if o.projector_init == "pinv":
        if not isinstance(loss, DSKD):
            raise ValueError("projector_init='pinv' needs the same vocabulary: method 'dskd' only")
        if student_head_weight is None or teacher_head_weight is None:
            raise ValueError("projector_init='pinv' needs student_head_weight and teacher_head_weight")
        loss.init_projectors_pinv(student_head_weight, teacher_head_weight)
    elif o.projector_init != "default":
        raise ValueError(f"projector_init must be 'default' or 'pinv', got {o.projector_init!r}")
    return loss
