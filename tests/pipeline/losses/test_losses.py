"""Registry, options and the methods' behaviour beyond the golden files."""

from __future__ import annotations

import pytest
import torch

from dskd.pipeline.losses import METHODS, StudentBatch, TeacherSignal, build_loss
from dskd.pipeline.losses.divergences import OFFICIAL_NAMES

B, T, V, DS, DT = 2, 6, 37, 8, 12


def _batch(seed: int = 0, v_t: int = V, t_t: int = T):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :2] = -100
    labels[1, -1] = -100
    t_labels = labels.clone() if (v_t == V and t_t == T) else torch.randint(0, v_t, (B, t_t), generator=g)
    if t_labels is not labels:
        t_labels[:, :3] = -100
    hs = torch.randn(B, T, DS, generator=g)
    ws = torch.randn(V, DS, generator=g)
    ht = torch.randn(B, t_t, DT, generator=g) * 2
    wt = torch.randn(v_t, DT, generator=g)
    student = StudentBatch(labels=labels, logits=hs @ ws.T, hidden=hs, lm_head_weight=ws,
                           input_ids=torch.randint(0, V, (B, T), generator=g),
                           embed_weight=torch.randn(V, DS, generator=g))
    teacher = TeacherSignal(labels=t_labels, hidden=ht, head_weight=wt,
                            input_ids=torch.randint(0, v_t, (B, t_t), generator=g),
                            embed_weight=torch.randn(v_t, DT, generator=g))
    return student, teacher


def test_every_method_and_divergence_builds_and_runs():
    student, teacher = _batch()
    heads = {"student_head_weight": student.lm_head_weight, "teacher_head_weight": teacher.head_weight}
    for method in ("sft", "kd", "dskd", "dskd-cma", "dskd-v2", "uld"):
        for div in OFFICIAL_NAMES:
            loss = build_loss(method, div, d_student=DS, d_teacher=DT, **heads)
            out = loss(student, teacher)
            assert torch.isfinite(out.loss), (method, div)
            assert {"ce_loss", "loss_sum"} <= set(out.terms)
            n = student.mask.sum()
            torch.testing.assert_close(out.loss, out.terms["loss_sum"] / n)
    # mined and dskd-eta need real tokenizers: tests/pipeline/losses/test_mined_uld.py, the
    # golden v2 files and tests/stages/test_distill_eta.py
    assert set(METHODS) == {"sft", "kd", "dskd", "dskd-cma", "dskd-v2", "dskd-eta", "uld", "mined"}


def test_every_method_declares_its_teacher_signals():
    from dskd.pipeline.losses.registry import TEACHER_SIGNALS, signal_problem

    assert set(TEACHER_SIGNALS) == set(METHODS)
    assert signal_problem("kd", "topk") is None and signal_problem("sft", "topk") is None
    assert "use --teacher-signal exact" in signal_problem("uld", "topk")
    assert signal_problem("kd", "sampled") is None
    assert "exact or topk" in signal_problem("mined", "sampled")


def test_bad_names_and_options_fail_clearly():
    with pytest.raises(ValueError, match="unknown method"):
        build_loss("dskdv2")
    with pytest.raises(ValueError, match="unknown divergence"):
        build_loss("kd", "kl")
    with pytest.raises(ValueError, match="unknown loss option"):
        build_loss("kd", kd_temp=2.0)
    with pytest.raises(ValueError, match="d_student"):
        build_loss("dskd")
    with pytest.raises(ValueError, match="tokenizer"):
        build_loss("mined")


def test_official_defaults_and_needs():
    loss = build_loss("dskd", "rkl", d_student=DS, d_teacher=DT)
    assert loss.teacher_divergence == "fkl" and loss.divergence == "rkl"
    assert loss.opts.temperature == 2.0 and loss.kd_rate == 0.5
    assert {n for n, _ in loss.named_parameters()} == {
        "s2t.weight", "s2t.bias", "t2s.weight", "t2s.bias", "query.weight", "query.bias"}
    assert loss.needs_teacher_hidden and loss.needs_same_vocab
    cma = build_loss("dskd-cma", d_student=DS, d_teacher=DT)
    assert cma.accuracy_filter and cma.needs_teacher_embeddings and not cma.needs_same_vocab
    assert not build_loss("sft").needs_teacher


def test_teacher_space_divergence_option():
    student, teacher = _batch(1)
    official = build_loss("dskd", "rkl", d_student=DS, d_teacher=DT)
    paper = build_loss("dskd", "rkl", d_student=DS, d_teacher=DT, teacher_space_divergence="same")
    paper.load_state_dict(official.state_dict())
    fkl = build_loss("dskd", "fkl", d_student=DS, d_teacher=DT)
    fkl.load_state_dict(official.state_dict())
    a, b, c = official(student, teacher), paper(student, teacher), fkl(student, teacher)
    torch.testing.assert_close(a.terms["s2t_kd_loss"], c.terms["s2t_kd_loss"])
    assert not torch.allclose(a.terms["s2t_kd_loss"], b.terms["s2t_kd_loss"])
    torch.testing.assert_close(a.terms["t2s_kd_loss"], b.terms["t2s_kd_loss"])


def test_cma_accuracy_filter_option_and_different_vocab():
    student, teacher = _batch(2, v_t=53, t_t=9)
    on = build_loss("dskd-cma", "fkl", d_student=DS, d_teacher=DT)
    off = build_loss("dskd-cma", "fkl", d_student=DS, d_teacher=DT, accuracy_filter="off")
    off.load_state_dict(on.state_dict())
    a, b = on(student, teacher), off(student, teacher)
    assert a.terms["t2s_acc"] < student.mask.sum()  # random projectors: filter drops tokens
    assert b.terms["t2s_kd_loss"] > a.terms["t2s_kd_loss"]
    torch.testing.assert_close(a.terms["s2t_kd_loss"], b.terms["s2t_kd_loss"])


def test_accuracy_filter_option_for_dskd():
    """Official DSKD has no filter; accuracy_filter='on' gives it CMA's (student-space KD only
    where argmax t2s_logits = label)."""
    student, teacher = _batch(2)
    plain = build_loss("dskd", "fkl", d_student=DS, d_teacher=DT)
    on = build_loss("dskd", "fkl", d_student=DS, d_teacher=DT, accuracy_filter="on")
    on.load_state_dict(plain.state_dict())
    assert not plain.accuracy_filter and on.accuracy_filter
    a, b = plain(student, teacher), on(student, teacher)
    assert a.terms["t2s_acc"] < student.mask.sum()
    assert b.terms["t2s_kd_loss"] < a.terms["t2s_kd_loss"]
    torch.testing.assert_close(a.terms["t2s_ce_loss"], b.terms["t2s_ce_loss"])
    with pytest.raises(ValueError, match="accuracy_filter"):
        build_loss("dskd", d_student=DS, d_teacher=DT, accuracy_filter=True)


def _pad_teacher(teacher: TeacherSignal, extra: int, fill: float) -> TeacherSignal:
    """The same teacher rows with `extra` more padded rows (label -100, hidden `fill`)."""
    def pad(x, v):
        return torch.cat([x, x.new_full((x.shape[0], extra, *x.shape[2:]), v)], 1)

    return TeacherSignal(labels=pad(teacher.labels, -100), hidden=pad(teacher.hidden, fill),
                         head_weight=teacher.head_weight, input_ids=pad(teacher.input_ids, 0),
                         embed_weight=teacher.embed_weight)


def test_cma_norm_official_depends_on_padding_supervised_does_not():
    """Official CMA stds run over the whole padded batch, so padding moves the loss; with
    cma_norm='supervised' they run over the teacher's supervised rows and padding does not."""
    student, teacher = _batch(6, v_t=53, t_t=9)
    more = _pad_teacher(teacher, 4, 0.0)
    official = build_loss("dskd-cma", "fkl", d_student=DS, d_teacher=DT)
    sup = build_loss("dskd-cma", "fkl", d_student=DS, d_teacher=DT, cma_norm="supervised")
    sup.load_state_dict(official.state_dict())
    a, b = official(student, teacher).terms, official(student, more).terms
    assert abs(a["t2s_ce_loss"] - b["t2s_ce_loss"]) > 1e-4 * abs(a["t2s_ce_loss"])
    c, d = sup(student, teacher).terms, sup(student, _pad_teacher(teacher, 4, 3.0)).terms
    for k in ("t2s_ce_loss", "t2s_kd_loss", "s2t_kd_loss"):
        torch.testing.assert_close(c[k], d[k], rtol=1e-6, atol=1e-6)
    assert abs(c["t2s_ce_loss"] - a["t2s_ce_loss"]) > 1e-4 * abs(a["t2s_ce_loss"])


def test_dense_teacher_from_hidden_equals_given_logits_and_chunking():
    student, teacher = _batch(3)
    given = TeacherSignal(labels=teacher.labels, logits=teacher.hidden @ teacher.head_weight.T,
                          hidden=teacher.hidden, head_weight=teacher.head_weight)
    for method in ("kd", "dskd"):
        one = build_loss(method, "akl", d_student=DS, d_teacher=DT)
        two = build_loss(method, "akl", d_student=DS, d_teacher=DT, chunk_rows=3)
        two.load_state_dict(one.state_dict())
        a, b = one(student, teacher), two(student, given)
        for k in a.terms:
            torch.testing.assert_close(a.terms[k].float(), b.terms[k].float(), rtol=1e-5, atol=1e-6)


def test_student_logits_from_hidden_match_given_logits():
    student, teacher = _batch(4)
    lazy = StudentBatch(labels=student.labels, hidden=student.hidden,
                        lm_head_weight=student.lm_head_weight)
    loss = build_loss("dskd", d_student=DS, d_teacher=DT)
    torch.testing.assert_close(loss(lazy, teacher).loss, loss(student, teacher).loss)


def test_kd_from_sparse_cache_fields():
    """kd on the top-k cache: k = V reproduces dense KD; small k stays close and finite."""
    student, teacher = _batch(5)
    zt = teacher.hidden @ teacher.head_weight.T
    lp = torch.log_softmax(zt, -1)
    dense = build_loss("kd", "fkl", teacher_target="dense")(student, teacher)
    for k, tail in [(V, "bucket"), (V, "renorm"), (8, "bucket"), (8, "renorm")]:
        top = lp.topk(k, -1)
        tail_lp = torch.logsumexp(lp.scatter(-1, top.indices, float("-inf")), -1)
        sparse = TeacherSignal(labels=teacher.labels, topk_ids=top.indices.int(),
                               topk_logprobs=top.values, tail_logprob=tail_lp, vocab_size=V)
        out = build_loss("kd", "fkl", sparse_tail=tail)(student, sparse)
        assert torch.isfinite(out.loss)
        if k == V:
            torch.testing.assert_close(out.terms["kd_loss"], dense.terms["kd_loss"], rtol=1e-4, atol=1e-5)


def test_pinv_projector_init():
    g = torch.Generator().manual_seed(0)
    ws, wt = torch.randn(V, DS, generator=g), torch.randn(V, DT, generator=g)
    # a teacher head that the student head can express exactly: W_t = W_s @ M
    wt_exact = ws @ torch.randn(DS, DT, generator=g)
    loss = build_loss("dskd", d_student=DS, d_teacher=DT, projector_init="pinv",
                      student_head_weight=ws, teacher_head_weight=wt_exact)
    ht = torch.randn(5, DT, generator=g)
    torch.testing.assert_close(loss.t2s(ht) @ ws.T, ht @ wt_exact.T, rtol=1e-3, atol=1e-3)
    # in general it is the least-squares solution: residual orthogonal to W_s's columns
    loss = build_loss("dskd", d_student=DS, d_teacher=DT, projector_init="pinv",
                      student_head_weight=ws, teacher_head_weight=wt)
    resid = ws @ loss.t2s.weight - wt
    assert (ws.T @ resid).abs().max() < 1e-3
    assert loss.t2s.bias.abs().max() == 0
    with pytest.raises(ValueError, match="tokenizer"):  # the shared tokens come from them
        build_loss("dskd-cma", d_student=DS, d_teacher=DT, projector_init="pinv",
                   student_head_weight=ws, teacher_head_weight=wt)


class _Vocab:
    """The part of a tokenizer the overlap reads."""

    def __init__(self, tokens: list[str]) -> None:
        self.vocab = {t: i for i, t in enumerate(tokens)}

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)


def test_pinv_init_across_vocabularies_uses_the_shared_tokens():
    """dskd-cma / dskd-eta: only tokens both vocabularies know ("Ġx" = "▁x") enter the pinv, and
    on them the projected teacher reproduces the teacher's logits when that is possible."""
    g = torch.Generator().manual_seed(1)
    s_tok = _Vocab([f"Ġw{i}" for i in range(30)] + [f"s{i}" for i in range(7)])
    t_tok = _Vocab([f"t{i}" for i in range(9)] + [f"▁w{i}" for i in range(30)])
    ws = torch.randn(37, DS, generator=g)
    wt = torch.randn(39, DT, generator=g)
    wt[9:] = ws[:30] @ torch.randn(DS, DT, generator=g)  # shared rows: exactly expressible
    loss = build_loss("dskd-cma", d_student=DS, d_teacher=DT, projector_init="pinv",
                      student_tokenizer=s_tok, teacher_tokenizer=t_tok,
                      student_head_weight=ws, teacher_head_weight=wt)
    ht = torch.randn(5, DT, generator=g)
    torch.testing.assert_close(loss.t2s(ht) @ ws[:30].T, ht @ wt[9:].T, rtol=1e-3, atol=1e-3)
    assert loss.t2s.bias.abs().max() == 0 and loss.s2t.bias.abs().max() == 0
    random = build_loss("dskd-cma", d_student=DS, d_teacher=DT)
    assert not torch.allclose(random.t2s.weight, loss.t2s.weight)


def test_projector_init_defaults_follow_the_official_code():
    from dskd.pipeline.losses.registry import resolve_projector_init

    assert resolve_projector_init("dskd", "auto") == "random"
    assert resolve_projector_init("dskd-cma", "auto") == "random"
    assert resolve_projector_init("dskd-v2", "auto") == "pinv"
    assert resolve_projector_init("dskd-eta", "auto") == "pinv"
    student, teacher = _batch()
    v2 = build_loss("dskd-v2", d_student=DS, d_teacher=DT, student_head_weight=student.lm_head_weight,
                    teacher_head_weight=teacher.head_weight)
    assert v2.s2t_map is not None and not hasattr(v2, "s2t") and v2.t2s.bias is None
    assert set(v2.state_dict()) == {"t2s.weight"}  # the pinv map is rebuilt, never saved
    v2r = build_loss("dskd-v2", d_student=DS, d_teacher=DT, projector_init="random",
                     student_head_weight=student.lm_head_weight, teacher_head_weight=teacher.head_weight)
    assert set(v2r.state_dict()) == {"t2s.weight", "s2t.weight"}
    with pytest.raises(ValueError, match="projector_init"):
        build_loss("dskd", d_student=DS, d_teacher=DT, projector_init="default")


def test_batch_denom_and_kd_rate():
    student, teacher = _batch(6)
    loss = build_loss("kd", "js", kd_rate=0.3)
    out = loss(student, teacher, batch_denom=4.0)
    t = out.terms
    torch.testing.assert_close(out.loss, (0.7 * t["ce_loss"] + 0.3 * t["kd_loss"]) / 4.0)
    sft = build_loss("sft")(student, None)
    torch.testing.assert_close(sft.loss, sft.terms["ce_loss"] / student.mask.sum())


def test_projector_gradients_flow_only_where_official():
    student, teacher = _batch(7)
    loss = build_loss("dskd", d_student=DS, d_teacher=DT)
    hs = student.hidden.clone().requires_grad_()
    ws = student.lm_head_weight.clone().requires_grad_()
    s = StudentBatch(labels=student.labels, logits=hs @ ws.T, hidden=hs, lm_head_weight=ws)
    loss(s, teacher).loss.backward()
    assert loss.t2s.weight.grad is not None and loss.s2t.weight.grad is not None
    assert loss.query.weight.grad is None
    assert teacher.hidden.grad is None
