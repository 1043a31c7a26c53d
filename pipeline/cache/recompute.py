"""`cache verify`'s recompute check: does each stored hidden row still explain its log-probs?

Checksums, shapes and ranges cannot see a hidden-state row shifted against its top-k (a writer's
off-by-one, two examples' rows swapped): every field is well formed, they just belong to
different tokens. Recomputing ``hidden @ head`` and comparing it with the stored lse, top-k and
next-token log-probs can.

Tolerance, per value, so an fp8 cache is held to what fp8 can do and an fp16 one to much more.
The writer computed the log-probs from the hidden state h before storage; we have its decoded
code ĥ = h + e with |e_d| ≤ q_d (half a step of the encoding, plus the teacher dtype's own
rounding when its head ran in bf16/fp16). A log-prob's error is then, to first order, the linear
form Σ_d (W_vd − w̄_d)·e_d, with w̄ = softmax(z) @ W the log-sum-exp's own row. Independent
bounded rounding errors make it sub-Gaussian with σ² = Σ_d (W_vd − w̄_d)²·q_d² (Hoeffding), so
|error| > 7σ has probability below 1e-10 per value. On top of 7σ: the writer's logits rounded to
the head's dtype (u·|z|), float32 accumulation order, and the log-sum-exp's second-order term.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .quant import rounding_bound
from .spec import HEAD_BIAS, HEAD_WEIGHT

Z = 7.0  # standard deviations: P(|error| > Zσ) < 2·exp(−Z²/2) ≈ 5e-11
ROWS_PER_STEP = 32  # rows per recompute step: (rows, k, D) float32 gathered head rows


@dataclass
class RecomputeStats:
    """One shard's recompute check: rows checked, the largest error and error/tolerance."""

    rows: int = 0
    max_err: float = 0.0  # nats, over lse, top-k and next-token log-probs
    max_ratio: float = 0.0  # largest error / its tolerance; above 1 is a problem
    worst_row: int | None = None  # token row (in the shard) of max_ratio

    def add(self, err: np.ndarray, ratio: np.ndarray, rows: np.ndarray) -> None:
        if not len(rows):
            return
        self.rows += len(rows)
        self.max_err = max(self.max_err, float(err.max()))
        j = int(ratio.argmax())
        if ratio[j] >= self.max_ratio:
            self.max_ratio, self.worst_row = float(ratio[j]), int(rows[j])


class HeadRecompute:
    """The cache's head (torch tensors from head.safetensors) as float32 numpy, and the rounding
    of the dtype the writer's logits were computed in (the head is stored in the teacher's compute
    dtype). numpy, not torch: on a busy machine torch's thread pool costs ~0.1 s per small op."""

    def __init__(self, tensors: dict[str, torch.Tensor], logit_scale: float):
        w = tensors[HEAD_WEIGHT]
        self.dtype = str(w.dtype).removeprefix("torch.")
        self.u = torch.finfo(w.dtype).eps / 2  # unit roundoff of the writer's logits
        self.W = w.float().numpy()  # (V, D_t)
        self.b = tensors[HEAD_BIAS].float().numpy() if HEAD_BIAS in tensors else None
        self.scale = float(logit_scale)

    def check(self, h: np.ndarray, q: np.ndarray, topk_ids: np.ndarray | None,
              topk_logprobs: np.ndarray | None, lse: np.ndarray, next_ids: np.ndarray,
              next_logprob: np.ndarray, topk_tol: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        """(error, error / tolerance) per row, each the max over the row's lse, top-k and
        next-token log-prob. h: (r, D) decoded hidden rows; q: (r, D) their rounding bound;
        topk_tol: (r,) decode error of the stored top-k log-probs (q8/fp16 storage)."""
        errs, ratios = [np.zeros(0)], [np.zeros(0)]
        for a in range(0, len(h), ROWS_PER_STEP):
            s = slice(a, a + ROWS_PER_STEP)
            e, r = self._check(h[s], q[s], None if topk_ids is None else topk_ids[s],
                               None if topk_logprobs is None else topk_logprobs[s], lse[s],
                               next_ids[s], next_logprob[s],
                               None if topk_tol is None else topk_tol[s])
            errs.append(e)
            ratios.append(r)
        return np.concatenate(errs), np.concatenate(ratios)

    def _check(self, h, q, topk_ids, topk_logprobs, lse, next_ids, next_logprob, topk_tol):
        h = np.asarray(h, np.float32)
        q = np.asarray(q, np.float32)
        if self.dtype != "float32":  # the writer fed h to the head in its dtype: rounded again
            q = q + rounding_bound(h, self.dtype)
        q2 = q * q  # (r, D)
        z = h @ self.W.T  # (r, V) logits
        if self.b is not None:
            z += self.b
        z *= self.scale
        m = z.max(axis=-1, keepdims=True)
        p = np.exp(z - m)  # (r, V)
        total = p.sum(axis=-1, keepdims=True)
        lse_r = (m + np.log(total))[:, 0]  # (r,)
        wbar = (p / total) @ self.W  # (r, D): d lse / d h, unscaled
        ids = next_ids.astype(np.int64)[:, None]  # (r, 1)
        stored = np.asarray(next_logprob, np.float32)[:, None]
        stored_tol = np.zeros((len(h), 1), np.float32)  # next_logprob is float32
        if topk_ids is not None and topk_ids.shape[1]:
            k = topk_ids.shape[1]
            ids = np.concatenate([topk_ids.astype(np.int64), ids], axis=1)  # (r, k+1)
            stored = np.concatenate([np.asarray(topk_logprobs, np.float32), stored], axis=1)
            extra = np.zeros((len(h), k), np.float32) if topk_tol is None else \
                np.broadcast_to(np.asarray(topk_tol, np.float32)[:, None], (len(h), k))
            stored_tol = np.concatenate([extra, stored_tol], axis=1)
        got = np.take_along_axis(z, ids, 1) - lse_r[:, None]  # (r, k+1) recomputed log-probs
        d = self.W[ids] - wbar[:, None, :]  # (r, k+1, D): gradient of each log-prob w.r.t. h
        sd_lp = self.scale * np.sqrt(np.einsum("rkd,rkd,rd->rk", d, d, q2))  # (r, k+1)
        sd_lse = self.scale * np.sqrt(np.einsum("rd,rd,rd->r", wbar, wbar, q2))  # (r,)
        zmax = np.abs(z).max(axis=-1)  # (r,)
        slack = 2 * self.u * zmax + 1e-5 * (1 + zmax)  # writer's logit rounding, fp32 order
        second = 0.5 * (Z * np.maximum(sd_lp.max(-1), sd_lse)) ** 2  # lse's 2nd-order term
        base = slack + second
        err_lp = np.abs(got - stored)
        err_lse = np.abs(lse_r - np.asarray(lse, np.float32))
        with np.errstate(invalid="ignore"):
            ratio = np.maximum((err_lp / (Z * sd_lp + base[:, None] + stored_tol)).max(-1),
                               err_lse / (Z * sd_lse + base))
        err = np.maximum(err_lp.max(-1), err_lse)
        # NaN (a corrupt row) must count as a failure, not vanish in a max
        return err, np.nan_to_num(ratio, nan=np.inf)
