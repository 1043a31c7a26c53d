"""Token-level divergences D(target ‖ student), dense or sparse, equal to the official DSKD code.

`p` is the target (teacher) distribution and `q` the student's, both after temperature.
Every divergence is written once, over log-probabilities (`_from_logprobs`); the dense and
sparse paths only differ in how they build (log p, log q):

* dense:  log q = log_softmax(s/τ), log p = log_softmax(t/τ/τ_t) over the whole vocabulary.
* sparse: the teacher is known on its top-k ids only (+ the tail mass). Both distributions are
  reduced to the same outcomes: `bucket` = the k ids plus one tail bucket, `renorm` = the k ids
  renormalised (tail dropped). See docs/methods.md for the temperature rule of the tail.

* sampled (`SampledTarget`, RS-KD): the teacher is known through N draws; only forward KL is
  supported, as the unbiased cross-entropy estimate `sampled_cross_entropy` (docs/methods.md).

Shapes: student logits (…, V); dense target logits (…, V); sparse target ids/logprobs (…, k);
results are per token (…,), unmasked. `divergence_rows` is the chunked, masked variant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from dskd.pipeline.losses.common import HeadLogits, map_rows

# short name -> official kd_objective name. The short names are the public ones.
OFFICIAL_NAMES = {
    "fkl": "forward_kl",
    "rkl": "reverse_kl",
    "js": "js_divergence",
    "skl": "skewed_forward_kl",
    "srkl": "skewed_reverse_kl",
    "akl": "adaptive_kl",
    "tvd": "tvd",  # not in the official code
}
_BY_OFFICIAL = {v: k for k, v in OFFICIAL_NAMES.items()}

SparseTail = Literal["bucket", "renorm"]


def canonical_divergence(name: str) -> str:
    """Short name for a short or official divergence name; raises with the valid choices."""
    key = name.strip().lower().replace("-", "_")
    if key in OFFICIAL_NAMES:
        return key
    if key in _BY_OFFICIAL:
        return _BY_OFFICIAL[key]
    valid = ", ".join(f"{k} ({v})" for k, v in OFFICIAL_NAMES.items())
    raise ValueError(f"unknown divergence {name!r}; choose one of: {valid}")


@dataclass(frozen=True)
class DivergenceOptions:
    """Hyper-parameters shared by all divergences (defaults = the official ones)."""

    temperature: float = 1.0  # τ, divides both logit tensors (losses pass kd_temperature=2.0)
    target_temperature: float = 1.0  # extra divisor of the target only (official CMA tea_temp)
    skew_lambda: float = 0.1  # λ of skewed forward/reverse KL
    akl_alpha: float = 0.5  # head/tail split of adaptive KL
    sparse_tail: SparseTail = "bucket"  # how a top-k target treats the missing mass


@dataclass
class SparseTarget:
    """A teacher distribution known on its top-k ids.

    ids (…, k) int64; logprobs (…, k) teacher log_softmax at τ = 1 over the FULL vocabulary
    (entries with logprob = -inf are padding and ignored); tail_logprob (…,) optional
    log(1 - Σ top-k probs) from the full vocabulary (more exact than recomputing it);
    vocab_size V of the distribution (needed for the tail's temperature rule).
    """

    ids: Tensor
    logprobs: Tensor
    vocab_size: int
    tail_logprob: Tensor | None = None


@dataclass
class SampledTarget:
    """A teacher distribution known through N draws from it (RS-KD, sampled sparse targets).

    ids (…, W) int64 distinct drawn ids; counts (…, W) how often each was drawn (0 = padding),
    summing to N per row; temperature: the temperature the draws were made at (None: unchecked).
    count / N is an unbiased estimate of the teacher's probability, which is all a loss that is
    linear in the target (cross-entropy, hence forward KL up to the teacher's entropy) needs.
    """

    ids: Tensor
    counts: Tensor
    temperature: float | None = None


# Divergences a sampled target supports: those linear in p, so that E[count/N] = p carries over.
SAMPLED_DIVERGENCES = ("fkl",)

Target = Tensor | HeadLogits | SparseTarget | SampledTarget


# ---------------------------------------------------------------------------------------------
# the divergences, on (log p, log q) over a common last axis


def _from_logprobs(
    name: str, logq: Tensor, logp: Tensor, invalid: Tensor, opts: DivergenceOptions
) -> Tensor:
    """Per-token divergence (…,) from log q (student) and log p (target) over the last axis.

    invalid (…, V) marks entries the official code zeroes before the vocabulary sum (a logit
    was ±inf, or a sparse padding slot). Logs are replaced by 0 there *before* use so that no
    NaN/inf reaches the forward or the backward; `where` then drops those terms.
    """
    p, q = logp.exp(), logq.exp()
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    lp = torch.where(invalid, zero, logp)
    lq = torch.where(invalid, zero, logq)
    p = torch.where(invalid & p.isnan(), zero, p)
    q = torch.where(invalid & q.isnan(), zero, q)

    if name == "fkl":
        terms = p * (lp - lq)
    elif name == "rkl":
        terms = q * (lq - lp)
    elif name == "js":
        # official: 1e-9 inside every log, on plain probabilities
        m = (p + q) / 2
        lm = torch.log(m + 1e-9)
        terms = (p * (torch.log(p + 1e-9) - lm) + q * (torch.log(q + 1e-9) - lm)) / 2
    elif name == "skl":
        lmix = _log_mix(lp, lq, opts.skew_lambda)  # log(λp + (1-λ)q)
        terms = p * (lp - lmix)
    elif name == "srkl":
        lmix = _log_mix(lq, lp, opts.skew_lambda)  # log((1-λ)p + λq)
        terms = q * (lq - lmix)
    elif name == "tvd":
        terms = (p - q).abs() / 2
    elif name == "akl":
        return _adaptive_kl(p, q, lp, lq, invalid, opts.akl_alpha)
    else:
        raise ValueError(f"unknown divergence {name!r}")
    return torch.where(invalid, zero, terms).sum(-1)


def _log_mix(la: Tensor, lb: Tensor, lam: float) -> Tensor:
    """log(λ·e^la + (1-λ)·e^lb) by log-add-exp: the official takes log of the plain mixture,
    which is equal wherever it is finite; this form also stays finite when both underflow."""
    log_lam = math.log(lam) if lam > 0 else -math.inf
    log_rest = math.log1p(-lam) if lam < 1 else -math.inf
    return torch.logaddexp(la + log_lam, lb + log_rest)


def _adaptive_kl(
    p: Tensor, q: Tensor, lp: Tensor, lq: Tensor, invalid: Tensor, alpha: float
) -> Tensor:
    """AKL: head/tail weights from the ascending-sorted target, both stop-gradient.

    tail = cumsum(sorted p) <= α (inclusive, as the official); weights g_head/(g_head+g_tail)
    on FKL and g_tail/(…) on RKL. When p == q exactly both gaps are 0 (the official divides
    0/0 = NaN); we use weight 0 there, FKL = RKL = 0 anyway.
    """
    with torch.no_grad():
        sorted_p, idx = p.sort(-1)
        gap = (sorted_p - q.gather(-1, idx)).abs()
        tail = torch.cumsum(sorted_p, -1).le(alpha).to(gap.dtype)
        g_head = (gap * (1 - tail)).sum(-1)
        g_tail = (gap * tail).sum(-1)
        denom = g_head + g_tail
        denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    fkl = torch.where(invalid, zero, p * (lp - lq)).sum(-1)
    rkl = torch.where(invalid, zero, q * (lq - lp)).sum(-1)
    return g_head / denom * fkl + g_tail / denom * rkl


# ---------------------------------------------------------------------------------------------
# building (log q, log p) from logits


def _dense_logprobs(
    student_logits: Tensor, target_logits: Tensor, opts: DivergenceOptions
) -> tuple[Tensor, Tensor, Tensor]:
    s = student_logits.float() / opts.temperature
    t = target_logits.float() / opts.temperature / opts.target_temperature
    # official: FKL checks only the student logits, the others both; the union is equal
    # wherever the official is finite and keeps -inf teacher entries (padded vocab) finite.
    invalid = s.isinf() | t.isinf()
    return torch.log_softmax(s, -1), torch.log_softmax(t, -1), invalid


def _sparse_logprobs(
    student_logits: Tensor, target: SparseTarget, opts: DivergenceOptions
) -> tuple[Tensor, Tensor, Tensor]:
    """Reduce student and teacher to the k ids (+ tail bucket) at temperature τ.

    Teacher: log p_i(τ) ∝ logprob_i / τ (exact within the top-k, lse cancels). The tail bucket
    holds n = V - k' unseen ids (k' = valid ids) of total mass m at τ = 1; assuming they share
    it uniformly, its weight at τ is n·(m/n)^(1/τ), i.e. log w = log m / τ + (1 - 1/τ)·log n.
    Exact for τ = 1, for k' = V (empty tail) and for any uniform tail.
    Student: exact. log q_i = log_softmax(s/τ)[id_i]; tail = logsumexp over the non-top-k ids.
    """
    tau = opts.temperature * opts.target_temperature
    s = student_logits.float() / opts.temperature  # (…, V)
    ids, lp_k = target.ids, target.logprobs.float()
    valid = torch.isfinite(lp_k)  # (…, k)
    lse_s = torch.logsumexp(s, -1, keepdim=True)
    s_k = s.gather(-1, ids)
    neg_inf = torch.full_like(lp_k, -math.inf)

    if opts.sparse_tail == "renorm":
        lq = torch.log_softmax(torch.where(valid, s_k, neg_inf), -1)
        lp = torch.log_softmax(torch.where(valid, lp_k / tau, neg_inf), -1)
        invalid = ~valid | lq.isinf() | lp.isinf()
        return lq, lp, invalid
    if opts.sparse_tail != "bucket":
        raise ValueError(f"sparse_tail must be 'bucket' or 'renorm', got {opts.sparse_tail!r}")

    n_tail = target.vocab_size - _distinct_valid(ids, valid, s.shape[-1])  # (…,)
    has_tail = n_tail > 0
    # teacher tail mass at τ = 1
    if target.tail_logprob is not None:
        lm = target.tail_logprob.float()
    else:
        top = torch.logsumexp(torch.where(valid, lp_k, neg_inf), -1).clamp(max=0.0)
        lm = torch.log(-torch.expm1(torch.where(top < 0, top, torch.full_like(top, -1.0))))
        lm = torch.where(top < 0, lm, torch.full_like(lm, -math.inf))
    log_n = torch.log(n_tail.clamp(min=1).to(lm.dtype))
    lw_tail = lm / tau + (1 - 1 / tau) * log_n
    lw_tail = torch.where(has_tail, lw_tail, torch.full_like(lw_tail, -math.inf))
    lw = torch.cat([torch.where(valid, lp_k / tau, neg_inf), lw_tail.unsqueeze(-1)], -1)
    lp = torch.log_softmax(lw, -1)

    # student tail: logsumexp over ids outside the top-k, exact and cancellation-free
    s_out = torch.where(_membership(ids, valid, s.shape[-1]), torch.full_like(s, -math.inf), s)
    has_tail = has_tail & (s_out > -math.inf).any(-1)  # rows with an empty student tail too
    s_out = torch.where(has_tail.unsqueeze(-1), s_out, torch.zeros_like(s))  # no all -inf rows
    lq_tail = torch.logsumexp(s_out, -1, keepdim=True) - lse_s
    lq_tail = torch.where(has_tail.unsqueeze(-1), lq_tail, torch.full_like(lq_tail, -math.inf))
    lq = torch.cat([s_k - lse_s, lq_tail], -1)
    invalid = lp.isinf() | lq.isinf()
    return lq, lp, invalid


def _membership(ids: Tensor, valid: Tensor, vocab: int) -> Tensor:
    """(…, V) bool: id is one of the valid top-k ids (duplicates and padding are safe)."""
    counts = torch.zeros(*ids.shape[:-1], vocab, dtype=torch.int32, device=ids.device)
    return counts.scatter_add_(-1, ids, valid.to(torch.int32)) > 0


def _distinct_valid(ids: Tensor, valid: Tensor, vocab: int) -> Tensor:
    return _membership(ids, valid, vocab).sum(-1)


def sampled_cross_entropy(student_logits: Tensor, target: SampledTarget,
                          opts: DivergenceOptions) -> Tensor:
    """Per-token Σ_w count_w / N · -log q_τ(id_w) (…,): unbiased for the cross-entropy H(p_τ, q_τ)
    when the ids were drawn from the teacher at τ, so its gradient is unbiased for forward KL's
    (KL = H(p, q) - H(p), and H(p) does not depend on the student). Rows without draws give 0."""
    tau = opts.temperature * opts.target_temperature
    if target.temperature is not None and not math.isclose(tau, target.temperature, rel_tol=1e-6):
        raise ValueError(f"the sampled targets were drawn at temperature {target.temperature:g} "
                         f"but the divergence's target temperature is {tau:g}; an unbiased "
                         "estimate needs the two equal")
    lq = torch.log_softmax(student_logits.float() / opts.temperature, -1)
    counts = target.counts.to(lq.dtype)
    w = counts / counts.sum(-1, keepdim=True).clamp(min=1)
    lq_ids = lq.gather(-1, target.ids.long())
    return -torch.where(counts > 0, w * lq_ids, torch.zeros_like(lq_ids)).sum(-1)


def _per_token(key: str, student_logits: Tensor, target: Target, opts: DivergenceOptions) -> Tensor:
    if isinstance(target, SampledTarget):
        if key not in SAMPLED_DIVERGENCES:
            raise ValueError(f"divergence {key!r} cannot be estimated from sampled targets (it is "
                             f"not linear in the teacher's probabilities); use one of "
                             f"{SAMPLED_DIVERGENCES}")
        return sampled_cross_entropy(student_logits, target, opts)
    lq, lp, invalid = logprobs_pair(student_logits, target, opts)
    return _from_logprobs(key, lq, lp, invalid, opts)


def logprobs_pair(
    student_logits: Tensor, target: Target, opts: DivergenceOptions
) -> tuple[Tensor, Tensor, Tensor]:
    """(log q, log p, invalid) for any target kind."""
    if isinstance(target, SparseTarget):
        return _sparse_logprobs(student_logits, target, opts)
    if isinstance(target, HeadLogits):
        target = target.materialize()
    return _dense_logprobs(student_logits, target, opts)


# ---------------------------------------------------------------------------------------------
# public API


def divergence(
    name: str, student_logits: Tensor, target: Target, opts: DivergenceOptions | None = None
) -> Tensor:
    """Per-token D(target ‖ student) (…,), unmasked, float32. Gradients reach the student only."""
    opts = opts or DivergenceOptions()
    key = canonical_divergence(name)
    return _per_token(key, student_logits, _detach_target(target), opts)


def divergence_rows(
    name: str,
    student_logits: Tensor,
    target: Target,
    mask: Tensor | None = None,
    opts: DivergenceOptions | None = None,
    *,
    chunk_rows: int | None = None,
) -> Tensor:
    """Chunked `divergence`: same per-token values (…,), 0 where mask is False.

    Works over flattened tokens in chunks (see common.map_rows), so a (B, T, V) problem
    never holds more than one chunk of (rows, V) temporaries; HeadLogits targets are also
    projected chunk by chunk.
    """
    opts = opts or DivergenceOptions()
    key = canonical_divergence(name)
    lead = student_logits.shape[:-1]
    vocab = student_logits.shape[-1]
    target = _detach_target(target)
    rows, rebuild = target_rows(target, len(lead))
    s_rows = student_logits.reshape(-1, vocab)

    def fn(s: Tensor, *t_rows: Tensor | None) -> Tensor:
        return _per_token(key, s, rebuild(t_rows), opts)

    sel = mask.reshape(-1) if mask is not None else None
    out = map_rows(fn, [s_rows, *rows], select=sel, chunk_rows=chunk_rows, vocab_size=vocab)
    return out.reshape(lead)


def _detach_target(target: Target) -> Target:
    if isinstance(target, Tensor):
        return target.detach()
    if isinstance(target, HeadLogits):
        b = target.bias.detach() if target.bias is not None else None
        return HeadLogits(target.hidden.detach(), target.weight.detach(), b, target.scale)
    return target


def target_rows(target: Target, n_lead: int):
    """Flatten a target to row tensors plus a function that rebuilds a target from a chunk."""

    def flat(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.reshape(-1, *t.shape[n_lead:])

    if isinstance(target, Tensor):
        return [flat(target)], lambda r: r[0]
    if isinstance(target, HeadLogits):
        return [flat(target.hidden)], lambda r: HeadLogits(
            r[0], target.weight, target.bias, target.scale)
    if isinstance(target, SampledTarget):
        return [flat(target.ids), flat(target.counts)], lambda r: SampledTarget(
            r[0], r[1], target.temperature)
    rows = [flat(target.ids), flat(target.logprobs), flat(target.tail_logprob)]
    return rows, lambda r: SparseTarget(r[0], r[1], target.vocab_size, r[2])
