"""Top-k storage codecs: narrow ids and 8-bit / fp16 log-probs (format version 2).

The writer is handed top-k as int32 ids and float32 log-probs (the version-1 storage) and encodes
them here; the reader decodes back to int32 / float32, so nothing past the reader knows how a cache
stores its top-k. Plain numpy, so a reader needs no torch.

q8, the default: per row, the largest and smallest finite log-probs ``hi`` and ``lo`` are kept as
fp16 (``topk_logprob_bounds``) and each log-prob as one byte ``c = round(254 * sqrt((hi - lp) /
(hi - lo)))``, decoded as ``hi - (c / 254)^2 * (hi - lo)``. The square root spends the codes near
the top of the row, where a log-prob error costs the most KL (an error ε on log p_i costs about
p_i ε² / 2): on realistic rows its extra KL is ~10x below that of the same byte spent uniformly
in log space (docs/benchmarks.md, "compact top-k"). Code 255 is a -inf log-prob (padding).
"""

from __future__ import annotations

import numpy as np

from .spec import Q8_PAD, CacheError, TopkStorage

_FP16_MIN = -65504.0
_Q8_LEVELS = 254  # codes 0..254 are finite log-probs
_Q8_TABLE = (np.arange(_Q8_LEVELS + 1, dtype=np.float32) / _Q8_LEVELS) ** 2  # (255,)


def encode_topk(ids: np.ndarray, logprobs: np.ndarray, st: TopkStorage) -> dict[str, np.ndarray]:
    """(T, k) int ids and float32 log-probs → the stored arrays of ``st`` (spec.token_fields)."""
    return {**encode_ids(ids, st), **encode_logprobs(logprobs, st.logprobs)}


def encode_ids(ids: np.ndarray, st: TopkStorage) -> dict[str, np.ndarray]:
    ids = np.asarray(ids)
    if st.id_bits == 32:
        return {"topk_ids": ids.astype("<i4")}
    if ids.size and (ids.min() < 0 or ids.max() >= 1 << st.id_bits):
        raise CacheError(f"top-k ids outside [0, 2^{st.id_bits}): the cache's vocabulary is "
                         "larger than its layout says")
    out = {"topk_ids": (ids & 0xFFFF).astype("<u2")}
    if st.hi_bits:
        T, k = ids.shape
        shifts = np.arange(st.hi_bits - 1, -1, -1)  # most significant bit first
        bits = ((ids.astype(np.int64)[..., None] >> 16 >> shifts) & 1).astype(np.uint8)
        out["topk_ids_hi"] = np.packbits(bits.reshape(T, k * st.hi_bits), axis=1)
    return out


def decode_ids(lo: np.ndarray, hi: np.ndarray | None, st: TopkStorage) -> np.ndarray:
    """Stored ids → (T, k) int32."""
    if st.id_bits == 32 or not st.hi_bits:
        return np.asarray(lo).astype(np.int32, copy=False)
    T, k = lo.shape
    bits = np.unpackbits(np.asarray(hi), axis=1, count=k * st.hi_bits).reshape(T, k, st.hi_bits)
    weights = (1 << np.arange(st.hi_bits - 1, -1, -1)).astype(np.int32)
    return lo.astype(np.int32) | ((bits.astype(np.int32) @ weights) << 16)


def encode_logprobs(lp: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
    lp = np.asarray(lp, dtype=np.float32)
    if dtype == "fp32":
        return {"topk_logprobs": lp.astype("<f4")}
    finite = np.isfinite(lp)
    if dtype == "fp16":  # below -65504 (p < e^-65504) is probability 0 anyway: clamp, keep finite
        return {"topk_logprobs": np.where(finite, np.maximum(lp, _FP16_MIN), lp).astype("<f2")}
    if dtype != "q8":
        raise ValueError(f"unknown top-k log-prob dtype {dtype!r}")
    any_f = finite.any(axis=1) if lp.shape[1] else np.zeros(lp.shape[0], bool)
    hi = np.where(any_f, np.where(finite, lp, -np.inf).max(axis=1, initial=-np.inf), 0.0)
    lo = np.where(any_f, np.where(finite, lp, np.inf).min(axis=1, initial=np.inf), 0.0)
    # codes come from the fp16-rounded bounds, so decoding sees exactly what encoding used
    bounds = np.stack([np.maximum(hi, _FP16_MIN), np.maximum(lo, _FP16_MIN)], 1).astype("<f2")
    h, r = bounds[:, :1].astype(np.float32), (bounds[:, :1] - bounds[:, 1:]).astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(r > 0, np.clip(h - lp, 0.0, None) / np.where(r > 0, r, 1.0), 0.0)
    codes = np.rint(np.sqrt(np.clip(frac, 0.0, 1.0)) * _Q8_LEVELS)
    codes = np.where(finite, codes, Q8_PAD).astype(np.uint8)
    return {"topk_logprobs": codes, "topk_logprob_bounds": bounds}


def decode_logprobs(codes: np.ndarray, dtype: str, bounds: np.ndarray | None = None) -> np.ndarray:
    """Stored log-probs → (T, k) float32."""
    if dtype in ("fp32", "fp16"):
        return np.asarray(codes).astype(np.float32, copy=False)
    if bounds is None:
        raise CacheError("q8 top-k log-probs need their per-row bounds (topk_logprob_bounds)")
    b = np.asarray(bounds).astype(np.float32)
    h, r = b[:, :1], b[:, :1] - b[:, 1:]
    codes = np.asarray(codes)
    pad = codes == Q8_PAD
    out = h - _Q8_TABLE[np.where(pad, 0, codes)] * r
    return np.where(pad, np.float32(-np.inf), out).astype(np.float32)


def logprob_tolerance(dtype: str, bounds: np.ndarray | None, lp: np.ndarray) -> np.ndarray:
    """(T, 1) largest decode error of a row's log-probs: what a consistency check may allow."""
    if dtype == "fp32":
        return np.full((lp.shape[0], 1), 1e-4, np.float32)
    if dtype == "fp16":  # half an ulp of the largest magnitude in the row
        big = np.abs(np.where(np.isfinite(lp), lp, 0)).max(axis=1, keepdims=True, initial=0.0)
        return 1e-4 + big * 2.0 ** -11
    b = np.asarray(bounds).astype(np.float32)
    r = b[:, :1] - b[:, 1:]
    # half the widest code step (the last: 1 - (253/254)^2 < 2/254) plus fp16 rounding of both
    return 1e-4 + r / _Q8_LEVELS + (np.abs(b[:, :1]) + np.abs(b[:, 1:])) * 2.0 ** -11
