"""Properties of the divergences: non-negative, zero at p = q, sparse(k = V) = dense, chunked =
plain, masks exclude positions exactly, finite gradients for extreme logits."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dskd.pipeline.losses.common import HeadLogits
from dskd.pipeline.losses.divergences import (
    OFFICIAL_NAMES,
    DivergenceOptions,
    SparseTarget,
    canonical_divergence,
    divergence,
    divergence_rows,
)

NAMES = list(OFFICIAL_NAMES)
FAST = settings(max_examples=5, deadline=None)


def _logits(seed: int, *shape: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def _sparse_full(t: torch.Tensor) -> SparseTarget:
    """All V ids as a 'top-k' (sorted by probability), i.e. no tail."""
    lp = torch.log_softmax(t, -1)
    vals, ids = lp.sort(-1, descending=True)
    return SparseTarget(ids, vals, t.shape[-1])


@pytest.mark.parametrize("name", NAMES)
@given(seed=st.integers(0, 10_000), tau=st.sampled_from([0.5, 1.0, 2.0, 3.0]),
       scale=st.sampled_from([0.1, 1.0, 5.0]))
@FAST
def test_nonnegative_and_zero_at_equality(name, seed, tau, scale):
    s, t = _logits(seed, 3, 5, 17, scale=scale), _logits(seed + 1, 3, 5, 17, scale=scale)
    opts = DivergenceOptions(temperature=tau)
    d = divergence(name, s, t, opts)
    assert d.shape == (3, 5)
    assert (d >= -1e-6).all(), d.min()
    same = divergence(name, s, s.clone(), opts)
    assert same.abs().max() < 1e-5, (name, same.abs().max())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tail", ["bucket", "renorm"])
@given(seed=st.integers(0, 10_000), tau=st.sampled_from([1.0, 2.0]))
@FAST
def test_sparse_with_k_equal_v_matches_dense(name, tail, seed, tau):
    s, t = _logits(seed, 2, 4, 23), _logits(seed + 7, 2, 4, 23)
    opts = DivergenceOptions(temperature=tau, sparse_tail=tail)
    dense = divergence(name, s, t, opts)
    sparse = divergence(name, s, _sparse_full(t), opts)
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 12),
       tau=st.sampled_from([0.7, 1.0, 2.0]), tail=st.sampled_from(["bucket", "renorm"]))
@FAST
def test_sparse_nonnegative_and_exact_for_uniform_tail(name, seed, k, tau, tail):
    v = 19
    t = _logits(seed, 2, 3, v)
    # a teacher whose non-top-k logits are all equal: the bucket's uniform-tail rule is exact
    top = t.topk(k, -1)
    flat = torch.full_like(t, t.min().item() - 1.0).scatter(-1, top.indices, top.values)
    lp = torch.log_softmax(flat, -1)
    # the exact tail mass, as the cache stores it (recomputing 1 - Σ top-k in float32 cancels)
    tail_lp = torch.logsumexp(lp.scatter(-1, top.indices, -math.inf), -1)
    sp = SparseTarget(top.indices, lp.gather(-1, top.indices), v, tail_lp if k < v else None)
    opts = DivergenceOptions(temperature=tau, sparse_tail=tail)
    s = _logits(seed + 3, 2, 3, v)
    d = divergence(name, s, sp, opts)
    assert (d >= -1e-6).all()
    # student equal to the teacher -> 0
    assert divergence(name, flat.clone(), sp, opts).abs().max() < 1e-5
    if tail == "bucket" and k < v:  # = dense divergence between the bucketed distributions
        dense_p = torch.softmax(flat / tau, -1)
        q = torch.softmax(s / tau, -1)
        in_top = torch.zeros_like(q, dtype=torch.bool).scatter(-1, top.indices, True)
        bucket = lambda x: torch.cat([x.gather(-1, top.indices),
                                      (x * ~in_top).sum(-1, keepdim=True)], -1)
        ref = divergence(name, torch.log(bucket(q)) * tau, torch.log(bucket(dense_p)) * tau,
                         opts)
        torch.testing.assert_close(d, ref, rtol=1e-4, atol=1e-5)


def test_sparse_tail_logprob_field_and_padding():
    """A given tail_logprob equals the recomputed one; -inf logprobs are padding."""
    t, s = _logits(1, 2, 3, 31), _logits(2, 2, 3, 31)
    lp = torch.log_softmax(t, -1)
    top = lp.topk(6, -1)
    tail = torch.log1p(-top.values.exp().sum(-1))
    opts = DivergenceOptions(temperature=2.0)
    a = divergence("fkl", s, SparseTarget(top.indices, top.values, 31), opts)
    b = divergence("fkl", s, SparseTarget(top.indices, top.values, 31, tail), opts)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    padded_ids = torch.cat([top.indices, torch.zeros_like(top.indices[..., :2])], -1)
    padded_lp = torch.cat([top.values, torch.full_like(top.values[..., :2], -math.inf)], -1)
    c = divergence("fkl", s, SparseTarget(padded_ids, padded_lp, 31), opts)
    torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["dense", "head", "sparse"])
def test_chunked_equals_plain_values_and_grads(name, kind):
    b, t, d, v = 3, 7, 8, 41
    s = _logits(5, b, t, v)
    h = _logits(6, b, t, d, scale=1.0)
    w = _logits(7, v, d, scale=1.0)
    target = {"dense": h @ w.T, "head": HeadLogits(h, w),
              "sparse": SparseTarget(*reversed(torch.log_softmax(h @ w.T, -1).topk(9, -1)), v)}[kind]
    mask = _logits(8, b, t, scale=1.0) > 0
    opts = DivergenceOptions(temperature=2.0)
    s1 = s.clone().requires_grad_()
    plain = divergence(name, s1, target, opts)
    torch.where(mask, plain, 0.0).sum().backward()
    s2 = s.clone().requires_grad_()
    chunked = divergence_rows(name, s2, target, mask, opts, chunk_rows=4)
    chunked.sum().backward()
    torch.testing.assert_close(chunked, torch.where(mask, plain, 0.0).detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_mask_excludes_positions_exactly(name):
    """Whatever sits at a masked position (even NaN/inf logits) changes neither value nor grad."""
    s, t = _logits(11, 2, 6, 13), _logits(12, 2, 6, 13)
    mask = torch.tensor([[1, 1, 0, 1, 0, 0], [0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    opts = DivergenceOptions(temperature=2.0)
    s_bad, t_bad = s.clone(), t.clone()
    s_bad[~mask] = float("nan")
    t_bad[~mask] = float("inf")
    a = s.clone().requires_grad_()
    b = s_bad.clone().requires_grad_()
    ref = divergence_rows(name, a, t, mask, opts, chunk_rows=5)
    got = divergence_rows(name, b, t_bad, mask, opts, chunk_rows=5)
    ref.sum().backward()
    got.sum().backward()
    assert torch.equal(ref, got)
    assert torch.equal(a.grad, b.grad)
    assert (b.grad[~mask] == 0).all()


@pytest.mark.parametrize("name", NAMES)
@given(seed=st.integers(0, 10_000), tau=st.sampled_from([1.0, 2.0]))
@FAST
def test_finite_gradients_for_extreme_logits(name, seed, tau):
    v = 29
    g = torch.Generator().manual_seed(seed)
    pick = lambda: torch.tensor([-1e4, 1e4, 0.0])[torch.randint(0, 3, (2, 4, v), generator=g)]
    s, t = pick(), pick()
    t[..., -5:] = -math.inf  # a teacher with -inf in its tail (e.g. padded vocabulary rows)
    opts = DivergenceOptions(temperature=tau)
    for target in (t, SparseTarget(*reversed(torch.log_softmax(t, -1).topk(6, -1)), v)):
        x = s.clone().requires_grad_()
        d = divergence(name, x, target, opts)
        d.sum().backward()
        assert torch.isfinite(d).all(), (name, d)
        assert torch.isfinite(x.grad).all(), name


def test_names_and_aliases():
    for short, official in OFFICIAL_NAMES.items():
        assert canonical_divergence(short) == short
        assert canonical_divergence(official) == short
    assert canonical_divergence("adaptive-kl") == "akl"
    with pytest.raises(ValueError, match="fkl"):
        canonical_divergence("kl_forward")


def test_tvd_value():
    s, t = _logits(1, 4, 9), _logits(2, 4, 9)
    ref = (torch.softmax(s, -1) - torch.softmax(t, -1)).abs().sum(-1) / 2
    torch.testing.assert_close(divergence("tvd", s, t), ref)


def test_target_gets_no_gradient():
    s = _logits(1, 3, 11).requires_grad_()
    t = _logits(2, 3, 11).requires_grad_()
    divergence("js", s, t, DivergenceOptions(temperature=2.0)).sum().backward()
    assert t.grad is None and s.grad is not None
