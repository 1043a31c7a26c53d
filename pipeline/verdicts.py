"""Paired-seed claims and their verdicts: mean paired difference, 95% t-interval, Holm, gates.

A claim "A > B" on a lower-is-better metric is tested on per-seed paired differences
d_s = metric(B, s) − metric(A, s) (positive = A better), where seed s fixes what the two runs
share (student init, data order). Each claim gets a two-sided one-sample t-test of mean(d) = 0;
the p-values of all claims are Holm-corrected together (family-wise error 5%), and a claim
reads `holds` (corrected p < α and mean > 0), `reversed` (corrected p < α, mean < 0) or
`inconclusive`. The 95% interval shown is the plain (uncorrected) t-interval.

Gates come first: a failed gate turns the claims it guards into `not testable` (never "does not
hold"), because the setup could not have shown them. The t distribution is computed here (the
regularized incomplete beta by its continued fraction) to avoid a SciPy dependency for ~30 lines.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

ALPHA = 0.05
HOLDS, REVERSED, INCONCLUSIVE, NOT_TESTABLE = "holds", "reversed", "inconclusive", "not testable"


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta (modified Lentz; Numerical Recipes §6.4)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| ≥ |t|) for Student's t with `df` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(q: float, df: int) -> float:
    """The q-quantile (q > 0.5) of Student's t, by bisection on the two-sided p."""
    lo, hi = 0.0, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > 2 * (1 - q) else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Claim:
    """`better` beats `worse` on a lower-is-better metric; `gates` that must hold to test it."""

    name: str
    better: str
    worse: str
    gates: tuple[str, ...] = ()


def paired_test(diffs: Sequence[float]) -> dict[str, float | list[float]]:
    """Mean paired difference, its 95% t-interval and the two-sided p of mean = 0."""
    n = len(diffs)
    if n < 2:
        raise ValueError(f"a paired test needs ≥ 2 seeds, got {n}")
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = t_quantile(0.975, n - 1) * sd / math.sqrt(n)
    if sd == 0:
        p = 1.0 if mean == 0 else 0.0
    else:
        p = t_two_sided_p(mean / (sd / math.sqrt(n)), n - 1)
    return {"n": n, "mean": mean, "sd": sd, "ci95": [mean - half, mean + half], "p": p}


def holm(p_values: Mapping[str, float], alpha: float = ALPHA) -> dict[str, float]:
    """Holm-adjusted p-values (step-down, monotone); reject where adjusted p < alpha."""
    order = sorted(p_values, key=lambda k: p_values[k])
    m, running, out = len(order), 0.0, {}
    for i, k in enumerate(order):
        running = max(running, min(1.0, (m - i) * p_values[k]))
        out[k] = running
    return out


def judge(per_seed: Mapping[str, Mapping[int, float]], claims: Sequence[Claim],
          gates: Mapping[str, bool], claim_gates: Mapping[str, str] | None = None,
          alpha: float = ALPHA) -> tuple[list[dict], dict[str, bool]]:
    """One record per claim (paired stats over the seeds both methods share, Holm verdict),
    and every gate's outcome.

    per_seed[method][seed] = metric (lower is better). `gates` are measured outside (G1: the
    teacher is good enough); `claim_gates` maps a gate to a claim that must *hold* for it
    (G2: KD > SFT). Holm runs over all claims whatever the gates say (conservative), so a
    claim gate's verdict does not depend on the gates it opens.
    """
    records = []
    for c in claims:
        seeds = sorted(set(per_seed[c.better]) & set(per_seed[c.worse]))
        diffs = [per_seed[c.worse][s] - per_seed[c.better][s] for s in seeds]
        records.append({"claim": c.name, "better": c.better, "worse": c.worse, "seeds": seeds,
                        "diffs": diffs, **paired_test(diffs), "gates": list(c.gates)})
    adjusted = holm({r["claim"]: r["p"] for r in records}, alpha)
    for r in records:
        r["p_holm"] = adjusted[r["claim"]]
    outcome = dict(gates)
    by_name = {r["claim"]: r for r in records}
    for gate, claim in (claim_gates or {}).items():
        r = by_name[claim]
        outcome[gate] = (all(outcome.get(g, False) for g in r["gates"])
                         and r["p_holm"] < alpha and r["mean"] > 0)
    for r in records:
        failed = [g for g in r["gates"] if not outcome.get(g, False)]
        if failed:
            r["verdict"] = NOT_TESTABLE
            r["why"] = "gate " + ", ".join(failed) + " failed"
        elif r["p_holm"] < alpha:
            r["verdict"] = HOLDS if r["mean"] > 0 else REVERSED
        else:
            r["verdict"] = INCONCLUSIVE
    return records, outcome
