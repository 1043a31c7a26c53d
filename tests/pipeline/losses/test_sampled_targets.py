"""Sampled sparse targets (RS-KD): the draws, and the estimate's expectation = the exact cross-entropy."""

import math

import numpy as np
import pytest
import torch

from dskd.pipeline.cache.sampled import decode, draw, encode
from dskd.pipeline.losses.divergences import (
    DivergenceOptions,
    SampledTarget,
    divergence,
    divergence_rows,
)


def test_draws_are_distinct_ascending_ids_whose_counts_sum_to_n_and_round_trip_ragged():
    g = torch.Generator().manual_seed(0)
    w = torch.softmax(torch.randn(50, 30, generator=g) * 3, -1)
    ids, counts = draw(w, 24, g)
    assert ids.shape == counts.shape == (50, 24) and ids.dtype == counts.dtype == torch.int32
    assert (counts.sum(1) == 24).all()
    n = (counts > 0).sum(1)
    for r in range(50):  # the first n slots hold distinct ascending ids, the rest is padding
        assert (counts[r, :n[r]] > 0).all() and (counts[r, n[r]:] == 0).all()
        assert (ids[r, 1:n[r]] > ids[r, :n[r] - 1]).all()
    enc = encode(ids.numpy(), counts.numpy(), np.dtype("<u2"), np.dtype("u1"))
    assert enc["sampled_ids"].size == int(n.sum())  # ragged: no padding stored
    back_ids, back_counts = decode(enc["sampled_n"], enc["sampled_ids"], enc["sampled_counts"])
    W = int(n.max())
    assert (torch.from_numpy(back_ids) == ids[:, :W]).all()
    assert (torch.from_numpy(back_counts) == counts[:, :W]).all()


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_sampled_estimate_expectation_equals_the_exact_cross_entropy_and_its_gradient(tau):
    """M independent sets of N draws per row (fixed seed): the mean estimate and its mean gradient
    lie within 5 standard errors of the exact cross-entropy and gradient, for every row and logit;
    a biased variant (each distinct id weighted equally, counts ignored) does not."""
    g = torch.Generator().manual_seed(1)
    R, V, N, M = 6, 40, 16, 4000
    t = torch.randn(R, V, generator=g) * 2.5  # teacher logits
    s = torch.randn(R, V, generator=g)  # student logits
    opts = DivergenceOptions(temperature=tau)
    p = torch.softmax(t / tau, -1)
    ids, counts = draw(p.repeat(M, 1), N, g)  # (M·R, N)
    s_rep = s.repeat(M, 1).requires_grad_()
    est = divergence("fkl", s_rep, SampledTarget(ids.long(), counts, tau), opts)
    est.sum().backward()
    est, grad = est.detach().reshape(M, R), s_rep.grad.reshape(M, R, V)

    lq = torch.log_softmax(s / tau, -1)
    exact = -(p * lq).sum(-1)  # H(p_τ, q_τ)
    exact_grad = (lq.exp() - p) / tau
    # forward KL differs from it by H(p_τ) only: same gradient, so the estimate serves fkl
    s2 = s.clone().requires_grad_()
    divergence("fkl", s2, t, opts).sum().backward()
    torch.testing.assert_close(s2.grad, exact_grad, rtol=1e-4, atol=1e-6)

    se = est.std(0) / math.sqrt(M)
    assert ((est.mean(0) - exact).abs() <= 5 * se).all(), (est.mean(0), exact, se)
    gse = grad.std(0) / math.sqrt(M)
    # (+1e-4: an id too unlikely to be drawn once in M·N draws has a zero standard error)
    assert ((grad.mean(0) - exact_grad).abs() <= 5 * gse + 1e-4).all()

    flat = torch.where(counts > 0, torch.ones_like(counts), torch.zeros_like(counts))
    biased = divergence("fkl", s.repeat(M, 1), SampledTarget(ids.long(), flat, tau), opts)
    b = biased.reshape(M, R)
    assert ((b.mean(0) - exact).abs() > 5 * b.std(0) / math.sqrt(M)).any()


def test_chunked_rows_equal_per_token_and_padding_rows_give_zero():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(3, 5, 20, generator=g)
    ids, counts = draw(torch.softmax(torch.randn(15, 20, generator=g), -1), 8, g)
    ids, counts = ids.reshape(3, 5, 8).long(), counts.reshape(3, 5, 8)
    counts[1, 2] = 0  # a padded row (no draws)
    target = SampledTarget(ids, counts, 2.0)
    opts = DivergenceOptions(temperature=2.0)
    full = divergence("fkl", s, target, opts)
    assert full[1, 2] == 0
    mask = torch.ones(3, 5, dtype=torch.bool)
    torch.testing.assert_close(divergence_rows("fkl", s, target, mask, opts, chunk_rows=4), full)


def test_other_divergences_and_another_temperature_are_refused():
    s = torch.randn(2, 10)
    target = SampledTarget(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.int32), 1.0)
    for name in ("rkl", "js", "skl", "srkl", "tvd", "akl"):
        with pytest.raises(ValueError, match="cannot be estimated from sampled targets"):
            divergence(name, s, target, DivergenceOptions(temperature=1.0))
    with pytest.raises(ValueError, match="drawn at temperature 1"):
        divergence("fkl", s, target, DivergenceOptions(temperature=2.0))
