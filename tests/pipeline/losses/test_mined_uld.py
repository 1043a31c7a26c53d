"""MinED and ULD on real tokenizers (GPT-2, Mistral, Qwen2) and their alignment helpers."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

from dskd.pipeline.losses import StudentBatch, TeacherSignal, build_loss
from dskd.pipeline.losses.mined import build_vocab_map, dtw, edit_distance_matrix, token_bytes

PROMPT = "Question: what is the capital of France?\nAnswer:"
RESPONSE = " The capital of France is Paris, a city of 2,100,000 people. Ça va? 東京"


@pytest.fixture(scope="module")
def toks(shared_dir):
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoTokenizer

    tokenizers = shared_dir / "tokenizers"
    assert tokenizers.is_dir(), f"tokenizers not found at {tokenizers}"
    return {n: AutoTokenizer.from_pretrained(str(tokenizers / n)) for n in ("gpt2", "mistral", "qwen2")}


def _seq(tok, prompt=PROMPT, response=RESPONSE):
    """Architecture convention: s = prompt + response + [eos]; input s[:-1], labels s[1:]."""
    p = tok(prompt, add_special_tokens=False).input_ids
    r = tok(response, add_special_tokens=False).input_ids
    s = p + r + [tok.eos_token_id]
    labels = torch.tensor(s[1:])
    labels[: len(p) - 1] = -100
    return torch.tensor(s[:-1]), labels


def _pad(rows, value):
    n = max(len(r) for r in rows)
    return torch.stack([torch.cat([r, torch.full((n - len(r),), value)]) for r in rows])


def _naive_dtw(s1, s2, cost):
    """Textbook DTW with the official backtrack order (diag, up, left), cell by cell."""
    n, m = len(s1), len(s2)
    mat = np.full((n + 1, m + 1), np.inf)
    mat[0, 0] = 0
    for i in range(n):
        for j in range(m):
            mat[i + 1, j + 1] = cost[i, j] + min(mat[i, j + 1], mat[i + 1, j], mat[i, j])
    mat = mat[1:, 1:]
    i, j = n - 1, m - 1
    maps = [[] for _ in range(m)]
    while i > 0 or j > 0:
        maps[j].append(i)
        opts = [mat[i - 1, j - 1] if i > 0 and j > 0 else np.inf,
                mat[i - 1, j] if i > 0 else np.inf, mat[i, j - 1] if j > 0 else np.inf]
        mv = int(np.argmin(opts))
        i, j = (i - 1, j - 1) if mv == 0 else (i - 1, j) if mv == 1 else (i, j - 1)
    maps[0].append(0)
    return [list(reversed(x)) for x in maps]


def test_edit_distance_matches_reference():
    rng = np.random.default_rng(0)
    words = [bytes(rng.choice(list(b"ab c"), size=rng.integers(0, 8)).tolist()) for _ in range(30)]

    def lev(a, b):
        d = list(range(len(b) + 1))
        for i, ca in enumerate(a, 1):
            prev, d[0] = d[:], i
            for j, cb in enumerate(b, 1):
                d[j] = min(prev[j] + 1, d[j - 1] + 1, prev[j - 1] + (ca != cb))
        return d[-1]

    got = edit_distance_matrix(words, words[::-1], max_pairs=50)
    assert all(got[i, j] == lev(words[i], words[::-1][j]) for i in range(30) for j in range(30))


def test_dtw_equals_cell_by_cell_reference():
    rng = np.random.default_rng(1)
    for n, m in [(1, 1), (1, 5), (6, 1), (7, 9), (15, 11)]:
        cost = rng.integers(0, 4, size=(n, m)).astype(float)
        assert dtw(list(range(n)), list(range(m)), cost) == _naive_dtw(range(n), range(m), cost)


def test_token_bytes_normalise_markers(toks):
    g, _ = token_bytes(toks["gpt2"])
    m, _ = token_bytes(toks["mistral"])
    q, _ = token_bytes(toks["qwen2"])
    assert g[15496] == b"Hello" and m[22557] == b" Hello" and q[9707] == b"Hello"
    assert m[toks["mistral"].convert_tokens_to_ids("<0x0A>")] == b"\n"
    assert g[toks["gpt2"].convert_tokens_to_ids("Ċ")] == b"\n"


def test_vocab_map_gpt2_student_mistral_teacher(toks):
    vm = build_vocab_map(toks["gpt2"], toks["mistral"])
    s, t = toks["gpt2"], toks["mistral"]
    assert vm.tea2stu.shape == (len(t),) and vm.stu2tea.shape == (len(s),)
    # same text, different markers: exact matches
    assert vm.tea2stu[t.convert_tokens_to_ids("▁Paris")] == s.convert_tokens_to_ids("ĠParis")
    assert vm.tea2stu[t.eos_token_id] == s.eos_token_id
    assert (vm.distance >= 0).all() and (vm.distance == 0).float().mean() > 0.5
    stu, tea = vm.pairs()
    assert torch.equal(vm.tea2stu[tea], stu)  # stu2tea inverts tea2stu
    # cached: a second build returns the same object
    assert build_vocab_map(toks["gpt2"], toks["mistral"]) is vm


@pytest.mark.parametrize("student,teacher", [("gpt2", "mistral"), ("mistral", "gpt2")])
def test_mined_real_tokenizers(toks, student, teacher):
    st_, te_ = toks[student], toks[teacher]
    s_ids, s_lab = _seq(st_)
    t_ids, t_lab = _seq(te_)
    s_ids, s_lab = _pad([s_ids, s_ids[:20]], st_.eos_token_id), _pad([s_lab, s_lab[:20]], -100)
    t_ids, t_lab = _pad([t_ids, t_ids[:25]], te_.eos_token_id), _pad([t_lab, t_lab[:25]], -100)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(*s_ids.shape, len(st_), generator=g).requires_grad_()
    zt = torch.randn(*t_ids.shape, len(te_), generator=g)
    loss = build_loss("mined", "fkl", student_tokenizer=st_, teacher_tokenizer=te_)
    loss.keep_intermediates = True
    out = loss(StudentBatch(labels=s_lab, logits=z, input_ids=s_ids),
               TeacherSignal(labels=t_lab, logits=zt, input_ids=t_ids))
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(z.grad).all()
    part = out.intermediates["partners"]
    n_sup = int(s_lab.ne(-100).sum())
    assert 0.3 * n_sup < out.terms["aligned_tokens"] < n_sup  # words align, digits/CJK don't
    # every aligned pair carries the same token text, modulo the space marker
    sb, _ = token_bytes(st_)
    tb, _ = token_bytes(te_)
    for b, k in zip(*torch.nonzero(part >= 0, as_tuple=True)):
        j = int(part[b, k]) - int(b) * t_ids.shape[1]
        a, c = sb[int(s_ids[b, k])], tb[int(t_ids[b, j])]
        assert loss.vocab_map.tea2stu[int(t_ids[b, j])] == int(s_ids[b, k])
        assert a.strip() == c.strip() or edit_distance_matrix([a], [c])[0, 0] <= 2
    assert z.grad[s_lab.eq(-100)].abs().max() == 0

    if student != "gpt2":
        return
    # the sparse cache path with k = V equals the dense path
    lp = torch.log_softmax(zt, -1)
    top = lp.topk(len(te_), -1)  # k = V: carries exactly what the dense path carries
    sparse = TeacherSignal(labels=t_lab, input_ids=t_ids, topk_ids=top.indices,
                           topk_logprobs=top.values, vocab_size=len(te_))
    sp_loss = build_loss("mined", "fkl", student_tokenizer=st_, teacher_tokenizer=te_)
    sp = sp_loss(StudentBatch(labels=s_lab, logits=z.detach(), input_ids=s_ids), sparse)
    torch.testing.assert_close(sp.terms["kd_loss"], out.terms["kd_loss"].detach(), rtol=1e-4, atol=1e-4)


def _naive_uld(z, zt, lab, tlab):
    """The official per-sample roll to the first supervised index, then sorted-prob L1."""
    total = 0.0
    for b in range(z.shape[0]):
        a = int(lab[b].ne(-100).nonzero()[0])
        c = int(tlab[b].ne(-100).nonzero()[0])
        zs, ls = torch.roll(z[b], -a, 0), torch.roll(lab[b], -a, 0)
        zz, lt = torch.roll(zt[b], -c, 0), torch.roll(tlab[b], -c, 0)
        p = torch.softmax(zs, -1).sort(-1, descending=True).values
        q = torch.softmax(zz, -1).sort(-1, descending=True).values
        w = max(p.shape[-1], q.shape[-1])
        p = torch.nn.functional.pad(p, (0, w - p.shape[-1]))
        q = torch.nn.functional.pad(q, (0, w - q.shape[-1]))
        total += ((p - q).abs().sum(-1) * (ls.ne(-100) & lt.ne(-100))).sum()
    return total


def test_uld_real_segmentation_gpt2_vs_qwen2(toks):
    st_, te_ = toks["gpt2"], toks["qwen2"]
    _s_ids, s_lab = _seq(st_)
    _t_ids, t_lab = _seq(te_, prompt="<|im_start|>user\n" + PROMPT + "<|im_end|>\n")
    s_lab2, t_lab2 = _pad([s_lab, s_lab[:15]], -100), _pad([t_lab, t_lab[:30]], -100)
    assert s_lab2.shape[1] != t_lab2.shape[1]  # unequal padded lengths are accepted
    g = torch.Generator().manual_seed(0)
    v_s, v_t = 300, 400  # small random vocabularies keep the test fast; pairing is what matters
    s_lab2 = torch.where(s_lab2.ne(-100), s_lab2 % v_s, s_lab2)
    t_lab2 = torch.where(t_lab2.ne(-100), t_lab2 % v_t, t_lab2)
    z = torch.randn(*s_lab2.shape, v_s, generator=g)
    zt = torch.randn(*t_lab2.shape, v_t, generator=g)
    out = build_loss("uld")(StudentBatch(labels=s_lab2, logits=z),
                            TeacherSignal(labels=t_lab2, logits=zt))
    n = max(s_lab2.shape[1], t_lab2.shape[1])  # the official needs equal lengths: pad both
    zp = torch.nn.functional.pad(z, (0, 0, 0, n - z.shape[1]))
    ztp = torch.nn.functional.pad(zt, (0, 0, 0, n - zt.shape[1]))
    ref = _naive_uld(zp, ztp, torch.nn.functional.pad(s_lab2, (0, n - s_lab2.shape[1]), value=-100),
                     torch.nn.functional.pad(t_lab2, (0, n - t_lab2.shape[1]), value=-100))
    torch.testing.assert_close(out.terms["uld_loss"], ref, rtol=1e-5, atol=1e-5)


def test_mined_alignment_from_the_loader_equals_the_inline_one(toks):
    """The loader workers' BatchBuilder computes MinED's partners (DTW + backtrack) in collate;
    the loss then skips its own alignment and gives the same terms and gradients."""
    from dskd.pipeline.data import Example
    from dskd.pipeline.train.sources import BatchBuilder

    st_, te_ = copy.deepcopy(toks["gpt2"]), toks["mistral"]
    st_.pad_token = st_.eos_token  # GPT-2 has none; the distill stage sets it the same way
    rows = [Example("a", PROMPT, RESPONSE, (), 0), Example("b", "Say hi:", " Hello there, friend.", (), 1)]
    loss = build_loss("mined", "fkl", student_tokenizer=st_, teacher_tokenizer=te_)
    kw = {"student_tokenizer": st_, "max_prompt_len": 64, "max_len": 128, "teacher_tokenizer": te_,
          "teacher_pad_id": te_.eos_token_id}
    _, plain = BatchBuilder(**kw)(rows, False)
    _, t = BatchBuilder(**kw, mined_aligner=loss.mined_aligner)(rows, False)
    assert "aligned_rows" not in plain and int((t["aligned_rows"] >= 0).sum()) > 0
    g = torch.Generator().manual_seed(0)
    z = torch.randn(*t["input_ids"].shape, len(st_), generator=g).requires_grad_()
    zt = torch.randn(*t["teacher_input_ids"].shape, len(te_), generator=g)
    outs, grads = [], []
    for aligned in (None, t["aligned_rows"]):
        loss.keep_intermediates = True
        out = loss(StudentBatch(labels=t["labels"], logits=z, input_ids=t["input_ids"],
                                aligned_rows=aligned),
                   TeacherSignal(labels=t["teacher_labels"], logits=zt,
                                 input_ids=t["teacher_input_ids"]))
        outs.append(out)
        grads.append(torch.autograd.grad(out.loss, z)[0])
    assert torch.equal(outs[0].intermediates["partners"], outs[1].intermediates["partners"])
    for k in outs[0].terms:
        torch.testing.assert_close(outs[0].terms[k], outs[1].terms[k], rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
