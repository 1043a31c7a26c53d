"""Hidden-state codecs: exact where the format is exact, bounded error for fp8."""

import numpy as np
import pytest
import torch

from dskd.pipeline.cache.quant import (
    FP8_TABLE,
    HiddenRangeError,
    codes_to_numpy,
    decode_hidden,
    encode_hidden,
)


def _roundtrip(h: torch.Tensor, dtype: str) -> np.ndarray:
    codes, scale = encode_hidden(h, dtype)
    return decode_hidden(codes_to_numpy(codes, dtype), dtype,
                         None if scale is None else scale.numpy())


def test_fp8_table_matches_torch_for_every_code():
    codes = torch.arange(256, dtype=torch.uint8)
    ref = codes.view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(np.isnan(FP8_TABLE), np.isnan(ref))
    ok = ~np.isnan(ref)
    np.testing.assert_array_equal(FP8_TABLE[ok], ref[ok])


@pytest.mark.parametrize("dtype,torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_fp16_bf16_decode_equals_torch_cast(dtype, torch_dtype):
    h = torch.randn(7, 33) * 10
    np.testing.assert_array_equal(_roundtrip(h, dtype), h.to(torch_dtype).float().numpy())


def test_fp8_per_token_scale_bounds_relative_error():
    g = torch.Generator().manual_seed(0)
    # rows of very different magnitudes: a shared scale would crush the small ones
    h = torch.randn(64, 128, generator=g) * torch.logspace(-3, 3, 64)[:, None]
    back = _roundtrip(h, "fp8")
    amax = h.abs().amax(1, keepdim=True).numpy()
    err = np.abs(back - h.numpy())
    # e4m3: 3 mantissa bits → relative step 2^-3, rounding error ≤ half of it; subnormals are
    # absolute steps of 2^-9 of the row's scale (amax / 448)
    assert (err <= np.abs(h.numpy()) * 2 ** -4 + amax / 448 * 2 ** -9 + 1e-12).all()
    assert np.allclose(np.abs(back).max(1), amax[:, 0], rtol=1e-6)  # the row max is exact


def test_fp8_zero_rows_and_empty_arrays():
    h = torch.zeros(3, 8)
    assert (_roundtrip(h, "fp8") == 0).all()
    assert _roundtrip(torch.zeros(0, 8), "fp8").shape == (0, 8)


def test_fp16_overflow_is_refused_with_advice():
    with pytest.raises(HiddenRangeError, match="bf16"):
        encode_hidden(torch.tensor([[1e5, 0.0]]), "fp16")
