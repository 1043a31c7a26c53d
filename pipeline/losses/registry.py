"""One registry: method name (+ divergence name + options) -> a DistillLoss module.

    loss = build_loss("dskd", "fkl", d_student=768, d_teacher=2048)
    out = loss(StudentBatch(...), TeacherSignal(...), batch_denom)   # LossOutput(loss, terms)
    optimizer.add_param_group({"params": loss.parameters(), "lr": projector_lr})
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from torch import Tensor

from dskd.pipeline.losses.baselines import SFTLoss, ULDLoss, VanillaKD
from dskd.pipeline.losses.divergences import OFFICIAL_NAMES, DivergenceOptions, canonical_divergence
from dskd.pipeline.losses.dskd import DSKD, DSKDCMA, DualSpaceLoss
from dskd.pipeline.losses.dskd_v2 import DSKDETA, DSKDV2
from dskd.pipeline.losses.pinv import S2TPinvMap, overlap_columns, t2s_pinv_weight, vocab_overlap
from dskd.pipeline.losses.signals import DistillLoss
from dskd.pipeline.token_align import prediction_map

METHODS = ("sft", "kd", "dskd", "dskd-cma", "dskd-v2", "dskd-eta", "uld", "mined")
DUAL_SPACE = ("dskd", "dskd-cma", "dskd-v2", "dskd-eta")  # methods with t2s/s2t projectors
DSKD_V2 = ("dskd-v2", "dskd-eta")
PROJECTOR_INITS = ("auto", "random", "pinv")
DIVERGENCES = tuple(OFFICIAL_NAMES)

# Which teacher signal (`dskd distill --teacher-signal`) each method can learn from; checked
# before any model loads. exact: full logits = cached hidden @ head; topk: cached top-k + tail;
# sampled: the cache's RS-KD draws, an unbiased estimate for an expectation over the teacher (KD's
# forward KL; the other constraints of sampled: train/setup._sampled_check, docs/methods.md).
# The dual-space methods project hidden states and rebuild full logits in the teacher space, so
# a top-k signal would add nothing; ULD sorts the whole distribution, MinED maps it across
# vocabularies. Add a signal here and in the losses that read it; every method needs an entry
# (tested).
TEACHER_SIGNALS: dict[str, tuple[str, ...]] = {
    "sft": (),  # no teacher
    "kd": ("exact", "topk", "sampled"),
    "dskd": ("exact",),
    "dskd-cma": ("exact",),
    "dskd-v2": ("exact",),
    "dskd-eta": ("exact",),
    "uld": ("exact",),
    "mined": ("exact", "topk"),
}


def signal_problem(method: str, signal: str) -> str | None:
    """Why `method` cannot learn from teacher `signal` (naming what works), or None if it can."""
    allowed = TEACHER_SIGNALS.get(method)
    if not allowed or signal in allowed:  # no teacher, or an unknown method (build_loss says)
        return None
    table = "; ".join(f"{m}: {', '.join(s)}" for m, s in TEACHER_SIGNALS.items() if s)
    return (f"--method {method} cannot learn from --teacher-signal {signal}; use --teacher-signal "
            f"{' or '.join(allowed)}. Supported combinations: {table}")


@dataclass
class LossOptions:
    """Every loss option, with its default (= the official behaviour) and meaning."""

    kd_rate: float = 0.5  # loss = (1-kd_rate)·CE + kd_rate·KD
    kd_temperature: float = 2.0  # τ on both logit tensors of every KD divergence
    teacher_temperature: float = 1.0  # extra target divisor, CMA student-space KD only
    skew_lambda: float = 0.1  # λ of skl / srkl
    adaptive_kl_alpha: float = 0.5  # α of akl
    teacher_space_divergence: Literal["official", "same"] = "official"  # official: always FKL
    # student-space KD only where argmax t2s_logits = label; official: on for CMA, off for DSKD
    accuracy_filter: Literal["official", "on", "off"] = "official"
    cma_norm: Literal["official", "supervised"] = "official"  # CMA stds: padded batch / label rows
    unused_query_projector: bool = True  # official DSKD also builds an unused `query`
    # auto = the official choice per method: random for dskd/dskd-cma (v1), pinv for dskd-v2 /
    # dskd-eta (the official v2 scripts pass --init-t2s/s2t-projector; v2 fails without them)
    projector_init: Literal["auto", "random", "pinv"] = "auto"
    t2s_agreement: float = 1.0  # DSKDv2: filter the student-space KD while agreement ≤ this
    sparse_tail: Literal["bucket", "renorm"] = "bucket"  # top-k tail: one bucket or dropped
    teacher_target: Literal["auto", "dense", "sparse", "sampled"] = "auto"  # kd/mined: teacher form
    chunk_rows: int | None = None  # token rows per chunk (None: ~64 MiB per (rows, V) tensor)
    mined_stu2tea: Literal["closest", "first"] = "closest"  # student id -> teacher id choice


_OPTION_NAMES = {f.name for f in fields(LossOptions)}

SIGNALS = ("exact", "topk", "sampled")


# Methods whose loss has a KD term (the others: sft trains on CE only), and those whose KD term
# is a `--divergence` at `--kd-temperature` (ULD's is an L1 between sorted probabilities).
KD_TERM = tuple(m for m in METHODS if m != "sft")
DIVERGENCE_KD = tuple(m for m in KD_TERM if m != "uld")


@dataclass(frozen=True)
class OptionScope:
    """Which methods, teacher signals and divergences read a loss option. With any other, a
    non-default value would be silently ignored, so `dskd distill` refuses it (option_problems
    says who reads it)."""

    methods: tuple[str, ...] = METHODS
    signals: tuple[str, ...] = SIGNALS
    divergences: tuple[str, ...] = DIVERGENCES  # short names (--divergence)
    default: Any = None  # None: the LossOptions default (set for a flag LossOptions lacks)


# The one table of loss-option scopes: every LossOptions field, plus the distill flags that only
# some methods read (tested: every loss option flag of `dskd distill` has an entry). An entry
# with the full scope is never refused: these accept any method, as they always have.
OPTION_SCOPES: dict[str, OptionScope] = {
    "kd_rate": OptionScope(KD_TERM),  # sft's loss is CE alone (SFTLoss has no KD term)
    "kd_temperature": OptionScope(DIVERGENCE_KD),
    "divergence": OptionScope(DIVERGENCE_KD, default="fkl"),
    "skew_lambda": OptionScope(DIVERGENCE_KD, divergences=("skl", "srkl")),
    "adaptive_kl_alpha": OptionScope(DIVERGENCE_KD, divergences=("akl",)),
    "chunk_rows": OptionScope(),
    "teacher_target": OptionScope(),  # not a flag: follows --teacher-signal
    "teacher_space_divergence": OptionScope(DUAL_SPACE),
    "accuracy_filter": OptionScope(("dskd", "dskd-cma")),
    "cma_norm": OptionScope(("dskd-cma",)),
    "teacher_temperature": OptionScope(("dskd-cma",)),
    "unused_query_projector": OptionScope(("dskd",)),
    "mined_stu2tea": OptionScope(("mined",)),
    "projector_init": OptionScope(DUAL_SPACE),  # the others have no projectors
    "t2s_agreement": OptionScope(DSKD_V2),  # the v2 agreement filter
    "alignment": OptionScope(("dskd-eta",), default="official"),  # ETA's token alignment rule
    # only a top-k target has a tail, and only the methods that learn from one read it
    "sparse_tail": OptionScope(tuple(m for m, s in TEACHER_SIGNALS.items() if "topk" in s),
                               signals=("topk",)),
}


def option_problems(method: str, values: Mapping[str, Any], teacher_signal: str = "exact"
                    ) -> list[str]:
    """Each non-default loss option in `values` that `method` (with this signal and the
    divergence `values["divergence"]`, default fkl) does not read."""
    base, out = LossOptions(), []
    divergence = canonical_divergence(values.get("divergence") or "fkl")
    for name, scope in OPTION_SCOPES.items():
        default = getattr(base, name) if scope.default is None else scope.default
        v = values.get(name, default)
        if v == default:
            continue
        if method not in scope.methods:
            out.append(f"{_flag(name, v)} does nothing with --method {method} (read by "
                       f"{', '.join(scope.methods)} only); drop it")
        elif teacher_signal not in scope.signals:
            out.append(f"{_flag(name, v)} does nothing without --teacher-signal "
                       f"{' or '.join(scope.signals)}; drop it")
        elif divergence not in scope.divergences:
            out.append(f"{_flag(name, v)} does nothing with --divergence {divergence} (read by "
                       f"--divergence {' or '.join(scope.divergences)} only); drop it")
    return out


def _flag(name: str, value: Any) -> str:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    return f"{flag} {value}"


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

    d_student/d_teacher: hidden sizes (dual-space methods). student/teacher_tokenizer: HF
    tokenizers (mined and dskd-eta map vocabularies with them; a pinv init across vocabularies
    finds the shared tokens with them). *_head_weight: LM heads (pinv init; dskd-eta maps
    every teacher head row). options: fields of LossOptions; unknown names raise.
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
        loss = _dual_space(key, div, opts, o, common, d_student, d_teacher, student_tokenizer,
                           teacher_tokenizer, student_head_weight, teacher_head_weight)
    return loss


def resolve_projector_init(method: str, projector_init: str) -> str:
    """'auto' → the official init of the method: pinv for DSKDv2, random for v1."""
    if projector_init not in PROJECTOR_INITS:
        raise ValueError(f"projector_init must be one of {', '.join(PROJECTOR_INITS)}, "
                         f"got {projector_init!r}")
    if projector_init != "auto":
        return projector_init
    return "pinv" if method in DSKD_V2 else "random"


def _dual_space(key: str, div: str, opts: DivergenceOptions, o: LossOptions, common: dict,
                d_student: int, d_teacher: int, student_tok: Any, teacher_tok: Any,
                student_head: Tensor | None, teacher_head: Tensor | None) -> DistillLoss:
    """dskd, dskd-cma, dskd-v2, dskd-eta, with their projector init."""
    init = resolve_projector_init(key, o.projector_init)
    overlap = None
    if (init == "pinv" or key == "dskd-eta") and (student_head is None or teacher_head is None):
        raise ValueError(f"{key} with projector_init={init!r} needs student_head_weight and "
                         "teacher_head_weight")
    if key in ("dskd-cma", "dskd-eta") and (init == "pinv" or key == "dskd-eta") \
            and (student_tok is None or teacher_tok is None):
        raise ValueError(f"{key} needs student_tokenizer and teacher_tokenizer (the shared tokens "
                         "of the pinv init; dskd-eta also maps the teacher's predictions)")
    if init == "pinv" and key in ("dskd-cma", "dskd-eta"):
        overlap = vocab_overlap(student_tok, teacher_tok)
    dual = {"divergence_name": div, "opts": opts,
            "teacher_space_divergence": o.teacher_space_divergence, **common}
    if key in DSKD_V2:
        if o.accuracy_filter != "official" or o.cma_norm != "official":
            raise ValueError(f"{key}: accuracy_filter and cma_norm are dskd/dskd-cma options; "
                             "DSKDv2 filters by agreement (t2s_agreement)")
        s2t_map = S2TPinvMap(student_head, teacher_head, overlap) if init == "pinv" else None
        v2 = {"s2t_map": s2t_map, "agreement_threshold": o.t2s_agreement, **dual}
        if key == "dskd-v2":
            loss: DualSpaceLoss = DSKDV2(d_student, d_teacher, **v2)
        else:
            pred_map = prediction_map(teacher_tok, student_tok, teacher_head.shape[0])
            loss = DSKDETA(d_student, d_teacher, pred_map, **v2)
        if init == "pinv":
            with torch.no_grad():
                p_s, p_t = overlap_columns(student_head, teacher_head, overlap)
                loss.t2s.weight.copy_(t2s_pinv_weight(p_s, p_t))
        return loss
    dual["accuracy_filter"] = o.accuracy_filter
    if key == "dskd":
        loss = DSKD(d_student, d_teacher, unused_query_projector=o.unused_query_projector, **dual)
    else:
        loss = DSKDCMA(d_student, d_teacher, norm=o.cma_norm, **dual)
    if init == "pinv":
        loss.init_projectors_pinv(student_head, teacher_head, overlap)
    return loss
