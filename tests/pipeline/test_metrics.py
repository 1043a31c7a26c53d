import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer

from dskd.pipeline import metrics

# (prediction, references, hand-checked ROUGE-L F, exact match). Hand computation: rouge-score
# lowercases, keeps [a-z0-9] tokens, Porter-stems; F = 2PR/(P+R) with P = LCS/|pred|,
# R = LCS/|ref|.
FIXTURE = [
    # identical up to case -> 1, and EM ignores case/articles
    ("The cat sat on the mat", ["the cat sat on the mat"], 1.0, 1.0),
    # pred: cat run fast; ref1: the cat are run -> LCS 2, P 2/3, R 2/4, F 4/7; ref2 scores 0
    ("cat running fast", ["the cats are running", "a dog"], 4 / 7, 0.0),
    # ref2: the sky is blue -> LCS 1, P 1/2, R 1/4, F 1/3; the max picks the second reference
    ("blue sky", ["green grass", "the sky is blue"], 1 / 3, 0.0),
    # empty generation scores 0
    ("", ["anything at all"], 0.0, 0.0),
    # stemming makes these equal for ROUGE but not for exact match
    ("running dogs", ["run dog"], 1.0, 0.0),
    # EM: punctuation and articles are dropped, any reference may match; ROUGE P 1/2, R 1 -> 2/3
    ("The answer.", ["wrong", "answer"], 2 / 3, 1.0),
]


@pytest.mark.parametrize("pred,refs,rouge,em", FIXTURE)
def test_rouge_and_em_hand_checked(pred, refs, rouge, em):
    assert metrics.rouge_l(pred, refs) == pytest.approx(rouge)
    assert metrics.exact_match(pred, refs) == em


def test_rouge_matches_rouge_score_direct():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for pred, refs, _, _ in FIXTURE:
        direct = scorer.score_multi(refs, pred)["rougeL"].fmeasure
        assert metrics.rouge_l(pred, refs) == pytest.approx(direct)


def test_score_texts_is_mean_times_100():
    preds = [f[0] for f in FIXTURE]
    refs = [f[1] for f in FIXTURE]
    out = metrics.score_texts(preds, refs)
    assert out["rougeL"] == pytest.approx(100 * sum(f[2] for f in FIXTURE) / len(FIXTURE))
    assert out["exact_match"] == pytest.approx(100 * 2 / len(FIXTURE))


def test_score_texts_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        metrics.score_texts([], [])
    with pytest.raises(ValueError, match="2 predictions but 1"):
        metrics.score_texts(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="at least one reference"):
        metrics.rouge_l("a", [])


def test_summarize_seeds():
    out = metrics.summarize_seeds({10: 1.0, 20: 3.0})
    assert out == {"per_seed": {"10": 1.0, "20": 3.0}, "mean": 2.0, "std": 1.0}
    assert metrics.summarize_seeds({10: 5.0})["std"] == 0.0


def test_token_fidelity_hand_checked():
    # Teacher p = (0.5, 0.5), student q = (0.75, 0.25): KL = 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25)
    t = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    s = torch.log(torch.tensor([[0.75, 0.25], [0.2, 0.8]]))
    out = metrics.token_fidelity(t, s)
    kl0 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    kl1 = 0.9 * math.log(0.9 / 0.2) + 0.1 * math.log(0.1 / 0.8)
    assert out["kl_sum"] == pytest.approx(kl0 + kl1, rel=1e-5)
    # row 0: teacher tie -> argmax 0, student 0 -> agree; row 1: 0 vs 1 -> disagree
    assert out["agree"] == 1 and out["tokens"] == 2
    assert metrics.token_fidelity(s, s)["kl_sum"] == pytest.approx(0.0, abs=1e-6)


def test_token_fidelity_masked_teacher_vocab_is_finite():
    t = torch.tensor([[0.0, -math.inf, 1.0]])
    s = torch.tensor([[0.0, -math.inf, 0.0]])
    out = metrics.token_fidelity(t, s)
    assert math.isfinite(out["kl_sum"]) and out["kl_sum"] > 0
    # student assigns zero mass where the teacher has some -> KL is infinite, not clamped
    assert metrics.token_fidelity(torch.zeros(1, 3), t)["kl_sum"] == math.inf
    with pytest.raises(ValueError, match="same positions and vocabulary"):
        metrics.token_fidelity(t, s[:, :2])


def test_response_nll_and_finalize():
    torch.manual_seed(0)
    logits = torch.randn(5, 7)
    labels = torch.tensor([-100, -100, 3, 1, 6])
    out = metrics.response_nll(logits, labels)
    ref = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
    assert out["nll_sum"] == pytest.approx(ref) and out["tokens"] == 3
    assert metrics.response_nll(logits, torch.full((5,), -100))["tokens"] == 0

    fid = metrics.add_sums({}, {"kl_sum": 1.0, "agree": 1, "tokens": 2})
    metrics.add_sums(fid, {"kl_sum": 2.0, "agree": 2, "tokens": 2})
    nll = metrics.add_sums({}, out)
    final = metrics.finalize_fidelity(fid, nll)
    assert final["kl"] == pytest.approx(0.75) and final["top1_agreement"] == pytest.approx(75.0)
    assert final["ppl"] == pytest.approx(math.exp(ref / 3))
    assert metrics.finalize_fidelity({}, {})["kl"] is None


def test_average_over_sets():
    a = metrics.summarize_seeds({10: 10.0, 20: 20.0})
    b = metrics.summarize_seeds({10: 30.0, 20: 0.0})
    avg = metrics.average_over_sets([a, b])
    # per-seed averages 20 and 10 -> mean 15, std 5 (not the mean of the two stds)
    assert avg == {"per_seed": {"10": 20.0, "20": 10.0}, "mean": 15.0, "std": 5.0}
    c = metrics.summarize_seeds({30: 40.0})
    assert metrics.average_over_sets([a, c]) == {"per_seed": {}, "mean": 27.5, "std": None}


# --------------------------------------------------------------------------- cache fidelity


def _fake_cache_rows(teacher, tok, examples, max_prompt_len=256, max_len=512):
    """Cache rows as the reader yields them, made from the teacher's forward (hidden = LM input)."""
    from dskd.pipeline.cache.reader import CachedExample
    from dskd.pipeline.tokenize import tokenize_example

    rows = []
    for i, ex in enumerate(examples):
        t = tokenize_example(ex, tok, max_prompt_len, max_len)
        ids, plen = t.input_ids, t.prompt_len
        x = torch.tensor(ids[:-1])[None]
        with torch.no_grad():
            hidden = teacher(input_ids=x, output_hidden_states=True).hidden_states[-1][0]
        mask = np.array([k >= plen for k in range(len(ids))])
        rows.append(CachedExample(ex.id, i, ex.prompt, ex.response, np.array(ids, np.int32), plen,
                                  mask, np.zeros((len(ids), 2), np.int32), 0, i,
                                  hidden=hidden.numpy()))
    return rows


@pytest.fixture(scope="module")
def fidelity_world(toy_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dskd.pipeline.data import load_examples

    def load(d):
        return AutoModelForCausalLM.from_pretrained(d).eval(), AutoTokenizer.from_pretrained(d)

    teacher, tok = load(toy_world.teacher)
    rows = _fake_cache_rows(teacher, tok, load_examples(toy_world.valid)[:4])
    return toy_world, teacher, tok, rows, load


def test_cache_fidelity_teacher_against_itself(fidelity_world):
    _, teacher, tok, rows, _ = fidelity_world
    out = metrics.cache_fidelity(rows, teacher.lm_head.weight, teacher, tok, same_vocab=True)
    assert out["kl"] == pytest.approx(0.0, abs=1e-5)
    assert out["top1_agreement"] == 100.0
    assert out["examples"] == 4 and "note" not in out
    # NLL: the teacher's own token loss on the response (+EOS) tokens
    total, count = 0.0, 0
    for r in rows:
        ids = torch.tensor(r.input_ids, dtype=torch.long)
        logits = teacher(input_ids=ids[None, :-1]).logits[0]
        lab = ids[1:].clone()
        lab[: r.prompt_len - 1] = -100
        total += F.cross_entropy(logits, lab, ignore_index=-100, reduction="sum").item()
        count += int((lab != -100).sum())
    assert out["nll_tokens"] == count
    assert out["nll"] == pytest.approx(total / count, rel=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_cache_fidelity_same_vocab_student(fidelity_world):
    world, teacher, _tok, rows, load = fidelity_world
    student, stok = load(world.student)
    out = metrics.cache_fidelity(rows, teacher.lm_head.weight, student, stok, same_vocab=True)
    # recompute KL(T‖S) over response positions directly from both models' logits
    kl, agree, n = 0.0, 0, 0
    for r in rows:
        ids = torch.tensor(r.input_ids[:-1], dtype=torch.long)[None]
        t = teacher(input_ids=ids).logits[0][r.label_mask]
        s = student(input_ids=ids).logits[0][r.label_mask]
        kl += F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True,
                       reduction="sum").item()
        agree += int((t.argmax(-1) == s.argmax(-1)).sum())
        n += t.shape[0]
    assert out["fidelity_tokens"] == n
    assert out["kl"] == pytest.approx(kl / n, rel=1e-4) and out["kl"] > 0.01
    assert out["top1_agreement"] == pytest.approx(100 * agree / n)


def test_cache_fidelity_cross_vocab_student_reports_nll_only(fidelity_world):
    world, teacher, _, rows, load = fidelity_world
    student, stok = load(world.student_xvocab)
    out = metrics.cache_fidelity(rows, teacher.lm_head.weight, student, stok, limit=2,
                                 same_vocab=False)
    assert out["kl"] is None and out["top1_agreement"] is None
    assert out["nll"] > 0 and out["examples"] == 2
    assert "vocabulary" in out["note"]
    with pytest.raises(ValueError, match="no examples"):
        metrics.cache_fidelity([], teacher.lm_head.weight, student, stok, same_vocab=False)


def test_cache_fidelity_with_prompts_cut_by_the_cache(fidelity_world):
    """Prompts longer than the cache's max_prompt_len: scored with the cache's limits, the teacher
    against itself is still KL 0 / top-1 100 on every example (not a vanished metric)."""
    world, teacher, tok, _, _ = fidelity_world
    from dskd.pipeline.data import load_examples

    rows = _fake_cache_rows(teacher, tok, load_examples(world.valid)[:4], max_prompt_len=3)
    assert all(r.prompt_len == 3 for r in rows)  # every prompt was cut
    out = metrics.cache_fidelity(rows, teacher.lm_head.weight, teacher, tok, same_vocab=True,
                                 max_prompt_len=3)
    assert out["kl"] == pytest.approx(0.0, abs=1e-5) and out["top1_agreement"] == 100.0
    assert out["fidelity_tokens"] == sum(int(r.label_mask.sum()) for r in rows)
    assert "note" not in out
    # a row the student tokenizes otherwise drops out of KL/top-1 alone, and is counted
    rows[0].input_ids[-2] = (int(rows[0].input_ids[-2]) + 1) % len(tok)
    out = metrics.cache_fidelity(rows, teacher.lm_head.weight, teacher, tok, same_vocab=True,
                                 max_prompt_len=3)
    assert out["fidelity_skipped"] == 1 and out["top1_agreement"] == 100.0
    assert out["fidelity_tokens"] == sum(int(r.label_mask.sum()) for r in rows[1:])


def test_cache_vocab_match_from_fingerprints(fidelity_world, tmp_path):
    import json
    import shutil

    world, _, tok, rows, load = fidelity_world
    from dskd.pipeline.cache.fingerprint import tokenizer_fingerprint

    fp = {"tokenizer": tokenizer_fingerprint(world.teacher), "max_prompt_len": 256, "max_len": 512}
    same = {"fingerprints": fp, "teacher": {"path": str(world.teacher)}}
    assert metrics.cache_vocab_match(tok, world.teacher, same)[0]
    # a re-saved copy (other bytes, same vocabulary) is recognised through the teacher's tokenizer
    copy = tmp_path / "copy"
    shutil.copytree(world.teacher, copy)
    cfg = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**cfg, "model_max_length": 77}))
    assert tokenizer_fingerprint(copy) != fp["tokenizer"]
    ok, how = metrics.cache_vocab_match(load(copy)[1], copy, same)
    assert ok and "vocabulary fingerprint" in how
    _, xtok = load(world.student_xvocab)
    assert not metrics.cache_vocab_match(xtok, world.student_xvocab, same)[0]
    # no teacher tokenizer here: the first rows decide
    gone = {"fingerprints": fp, "teacher": {"path": str(tmp_path / "absent")}}
    assert metrics.cache_vocab_match(load(copy)[1], copy, gone, rows)[0]
    assert not metrics.cache_vocab_match(xtok, world.student_xvocab, gone, rows)[0]
