"""Hidden-state storage codecs: fp16, bf16 (as uint16 bits), fp8 e4m3fn (uint8 bits + per-token
scale).

Encoding runs in torch on the teacher's device (so only the small codes cross to the host);
decoding is plain numpy so a reader needs no torch.
"""

from __future__ import annotations

import numpy as np
import torch

from .spec import FP8_MAX, HIDDEN_DTYPES

_FP16_MAX = 65504.0


class HiddenRangeError(ValueError):
    """Hidden states that the chosen storage dtype cannot hold."""


def encode_hidden(h: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(T, D) float hidden states → (codes (T, D), scale (T,) float32 or None), on h's device."""
    if dtype not in HIDDEN_DTYPES:
        raise ValueError(f"unknown hidden dtype {dtype!r}; choose one of {HIDDEN_DTYPES}")
    if dtype == "fp16":
        # fp16 tops out at 65504: a larger value would silently become inf in the cache.
        if h.numel() and h.abs().max().item() > _FP16_MAX:
            raise HiddenRangeError(
                f"a hidden state value ({h.abs().max().item():.4g}) exceeds the fp16 range (65504); "
                "use --hidden-dtype bf16 or fp8 for this teacher")
        return h.to(torch.float16), None
    if dtype == "bf16":
        return h.to(torch.bfloat16).view(torch.int16), None
    # fp8: per-token absmax scaling so each row uses the whole e4m3 range.
    h32 = h.float()
    amax = h32.abs().amax(dim=-1) if h32.shape[-1] else h32.new_zeros(h32.shape[:-1])
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))  # (T,)
    codes = (h32 / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes.view(torch.uint8), scale


def codes_to_numpy(codes: torch.Tensor, dtype: str) -> np.ndarray:
    """Host numpy array in the on-disk dtype (bf16 bits are reinterpreted as uint16)."""
    arr = codes.detach().cpu().numpy()
    return arr.view(np.uint16) if dtype == "bf16" else arr


def _fp8_e4m3fn_table() -> np.ndarray:
    """The 256 float32 values of float8_e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits;
    exponent 0 is subnormal, 0x7F/0xFF are NaN, there is no inf."""
    b = np.arange(256, dtype=np.int64)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp = (b >> 3) & 0xF
    man = b & 0x7
    val = np.where(exp == 0, man / 8.0 * 2.0 ** -6, (1 + man / 8.0) * 2.0 ** (exp - 7.0))
    val = sign * val
    val[(b & 0x7F) == 0x7F] = np.nan
    return val.astype(np.float32)


FP8_TABLE = _fp8_e4m3fn_table()


def decode_hidden(codes: np.ndarray, dtype: str, scale: np.ndarray | None = None) -> np.ndarray:
    """Stored codes (T, D) → float32 (T, D)."""
    if dtype == "fp16":
        return codes.astype(np.float32)
    if dtype == "bf16":
        # bf16 is the top half of a float32: shift the 16 bits up and reinterpret.
        return (codes.astype(np.uint32) << 16).view(np.float32)
    if dtype == "fp8":
        if scale is None:
            raise ValueError("fp8 hidden states need their per-token scale")
        return FP8_TABLE[codes] * scale.astype(np.float32)[:, None]
    raise ValueError(f"unknown hidden dtype {dtype!r}; choose one of {HIDDEN_DTYPES}")


def rounding_bound(h: np.ndarray, dtype: str, scale: np.ndarray | None = None) -> np.ndarray:
    """(T, D) float32: how far each decoded value ``h`` may be from the value that was encoded.

    Every encoder above rounds to nearest, so that is half a step of the encoding at ``h`` (the
    step above ``h``, the larger one at a power of two). ``dtype`` may also be a torch compute
    dtype name ("bfloat16", "float16", "float32"): the rounding a bf16 teacher applies."""
    a = np.abs(h.astype(np.float32))
    if dtype in ("fp16", "float16"):
        step = np.spacing(a.astype(np.float16)).astype(np.float32)
    elif dtype in ("bf16", "bfloat16"):
        step = np.spacing(a) * np.float32(2**16)  # float32 step 2^(e-23); bf16 step 2^(e-7)
    elif dtype == "float32":
        step = np.spacing(a)
    elif dtype == "fp8":
        if scale is None:
            raise ValueError("fp8 hidden states need their per-token scale")
        s = scale.astype(np.float32)[:, None]
        c = a / s  # the e4m3 values themselves; below 2^-6 they are subnormal, step 2^-9
        step = np.exp2(np.floor(np.log2(np.maximum(c, 2.0**-6))) - 3).astype(np.float32) * s
    else:
        raise ValueError(f"unknown dtype {dtype!r}")
    return step / 2
