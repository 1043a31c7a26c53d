"""Head step: top-k, log-sum-exp, tail mass and next-token log-prob agree with the full softmax."""

import pytest
import torch
from transformers import CohereConfig, Gemma2Config, LlamaConfig

from dskd.pipeline.teachers.head import (
    Head,
    UnsupportedTeacherError,
    check_architecture,
    check_reconstruction,
    head_step,
)


def _head(V=97, D=24, bias=True, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Head(torch.randn(V, D, generator=g), torch.randn(V, generator=g) if bias else None, scale)


@pytest.mark.parametrize("k", [0, 1, 10, 97, 200])
def test_head_step_matches_full_softmax(k):
    head = _head(scale=0.7)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(33, 24, generator=g) * 2
    nxt = torch.randint(0, 97, (33,), generator=g)
    o = head_step(h, nxt, head, k)
    logits = (h @ head.weight.T + head.bias) * 0.7
    logp = logits.log_softmax(-1)  # (T, V) the reference
    kk = min(k, 97)
    ref_lp, ref_ids = logp.topk(kk, dim=-1)
    assert o.topk_ids.dtype == torch.int32 and o.topk_ids.shape == (33, kk)
    torch.testing.assert_close(o.topk_ids.long(), ref_ids, rtol=0, atol=0)
    torch.testing.assert_close(o.topk_logprobs, ref_lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(o.lse, torch.logsumexp(logits, -1), rtol=0, atol=1e-5)
    torch.testing.assert_close(o.next_logprob, logp.gather(1, nxt[:, None])[:, 0], rtol=0, atol=1e-5)
    # tail: exactly the mass the top-k misses (the top-k plus the tail is the whole distribution)
    covered = ref_lp.exp().sum(-1)
    if kk < 97:
        torch.testing.assert_close(o.tail_logprob.exp(), 1 - covered, rtol=1e-4, atol=1e-6)
    else:
        assert torch.isneginf(o.tail_logprob).all()


def test_chunked_equals_unchunked():
    head = _head()
    h, nxt = torch.randn(50, 24), torch.randint(0, 97, (50,))
    a = head_step(h, nxt, head, 8)
    b = head_step(h, nxt, head, 8, max_logit_elems=97 * 7)  # 7 rows per chunk
    assert torch.equal(a.topk_ids, b.topk_ids)
    # equal up to float rounding: GEMM results depend on the row count (blocking), not on chunking
    for f in ("topk_logprobs", "lse", "tail_logprob", "next_logprob"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=0, atol=1e-5, msg=f)


def test_empty_input():
    o = head_step(torch.zeros(0, 24), torch.zeros(0, dtype=torch.long), _head(), 5)
    assert o.topk_ids.shape == (0, 5) and o.lse.shape == (0,)


def test_soft_capping_is_refused_and_constant_scales_are_recorded():
    gemma = Gemma2Config(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=8, intermediate_size=32)
    with pytest.raises(UnsupportedTeacherError, match="soft-caps its logits"):
        check_architecture(gemma)
    gemma.final_logit_softcapping = None
    assert check_architecture(gemma) == 1.0
    assert check_architecture(CohereConfig(logit_scale=0.0625)) == 0.0625
    assert check_architecture(LlamaConfig()) == 1.0


def test_reconstruction_check_reports_error_and_refuses_a_mismatch():
    ref = torch.randn(10, 50) * 5
    assert check_reconstruction(ref, ref + 1e-6, "X", tol=1e-4) <= 2e-6
    with pytest.raises(UnsupportedTeacherError, match="max abs error"):
        check_reconstruction(30 * torch.tanh(ref / 30), ref, "Gemma2ForCausalLM", tol=1e-4)
    with pytest.raises(UnsupportedTeacherError):
        check_reconstruction(ref, ref * float("nan"), "X", tol=1e-4)
