import torch

from dskd.pipeline.cache.manifest import load_manifest
from dskd.pipeline.cache.reader import load_head
from dskd.pipeline.losses.registry import build_loss
from dskd.pipeline.losses.signals import StudentBatch
from dskd.pipeline.train.signal import TeacherHead, build_signal, cache_head, topk_from_hidden


def _batch(B=2, T=5, D=6, V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :2] = -100
    t = {"teacher_labels": labels, "teacher_input_ids": torch.randint(0, V, (B, T), generator=g),
         "teacher_hidden": torch.randn(B, T, D, generator=g)}
    head = TeacherHead(torch.randn(V, D, generator=g), torch.randn(V, generator=g))
    return t, head


def test_exact_signal_is_the_same_materialised_or_chunked():
    t, head = _batch()
    small = build_signal(t, head, mode="exact", needs_hidden=False, needs_embed=False)
    lazy = build_signal(t, head, mode="exact", needs_hidden=False, needs_embed=False,
                        dense_max_bytes=0)
    assert small.logits is not None and lazy.logits is None and lazy.head_weight is not None
    ref = t["teacher_hidden"] @ head.weight.T + head.bias
    torch.testing.assert_close(small.logits, ref)
    loss = build_loss("kd", "fkl", teacher_target="dense")
    zs = torch.randn(2, 5, 11, requires_grad=True)
    a = loss(StudentBatch(labels=t["teacher_labels"], logits=zs), small, 3.0)
    b = loss(StudentBatch(labels=t["teacher_labels"], logits=zs), lazy, 3.0)
    torch.testing.assert_close(a.loss, b.loss)


def test_topk_signal_carries_no_dense_logits_unless_hidden_is_needed():
    t, head = _batch()
    t.update(topk_from_hidden(t["teacher_hidden"], t["teacher_labels"], head, 4))
    sig = build_signal(t, head, mode="topk", needs_hidden=False, needs_embed=False)
    assert sig.logits is None and sig.hidden is None and sig.topk_ids.shape == (2, 5, 4)
    lp = torch.log_softmax(t["teacher_hidden"] @ head.weight.T + head.bias, -1)
    torch.testing.assert_close(sig.topk_logprobs, lp.topk(4, -1).values)
    tail = torch.logsumexp(lp.scatter(-1, sig.topk_ids, float("-inf")), -1)
    torch.testing.assert_close(sig.tail_logprob, tail, atol=1e-5, rtol=1e-5)
    dskd = build_signal(t, head, mode="topk", needs_hidden=True, needs_embed=False)
    assert dskd.hidden is not None and dskd.head_weight is not None


def test_cache_head_folds_the_logit_scale_and_falls_back_to_tied_embeddings(tiny_cache):
    m = load_manifest(tiny_cache)
    raw = load_head(tiny_cache)
    h = cache_head(tiny_cache, m, torch.device("cpu"))
    torch.testing.assert_close(h.weight, raw["lm_head.weight"].float())
    m2 = {**m, "head": {**m["head"], "logit_scale": 2.0}}
    h2 = cache_head(tiny_cache, m2, torch.device("cpu"))
    torch.testing.assert_close(h2.weight, 2 * h.weight)
    assert h2.embed.shape[1] == h.weight.shape[1]


def test_a_renorm_run_does_not_read_the_cached_tail_and_its_loss_is_unchanged():
    """The renorm tail rule drops the teacher's tail mass, so distill does not ask the cache for
    tail_logprob (the bucket rule does); the loss equals the one computed with the tail read."""
    from types import SimpleNamespace

    from dskd.pipeline.losses.mined import MinEDLoss
    from dskd.pipeline.train.setup import cache_fields

    t, head = _batch()
    t.update(topk_from_hidden(t["teacher_hidden"], t["teacher_labels"], head, 4))
    zs = torch.randn(2, 5, 11)
    student = StudentBatch(labels=t["teacher_labels"], logits=zs)
    fields = {}
    for tail in ("bucket", "renorm"):
        cfg = SimpleNamespace(method="kd", teacher_signal="topk", sparse_tail=tail)
        fields[tail] = cache_fields(cfg, build_loss("kd", "fkl", sparse_tail=tail))
    assert fields["bucket"] == ["topk_ids", "topk_logprobs", "tail_logprob"]
    assert fields["renorm"] == ["topk_ids", "topk_logprobs"]
    assert not MinEDLoss.needs_teacher_tail  # its mapped top-k target has no tail either

    loss = build_loss("kd", "fkl", sparse_tail="renorm")
    read = {k: v for k, v in t.items() if k != "teacher_tail_logprob"}  # what the loader gives
    with_tail = build_signal(t, head, mode="topk", needs_hidden=False, needs_embed=False)
    without = build_signal(read, head, mode="topk", needs_hidden=False, needs_embed=False)
    assert with_tail.tail_logprob is not None and without.tail_logprob is None
    a, b = loss(student, with_tail, 3.0), loss(student, without, 3.0)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.terms["kd_loss"], b.terms["kd_loss"])
