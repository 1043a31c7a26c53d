"""Exact metrics against the truth: an oracle scores 0, a uniform model its closed form."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dskd.pipeline.data import load_examples
from dskd.pipeline.tokenize import tokenize_text
from dskd.pipeline.truth import row_scores, sequence_logprobs, truth_metrics


class TrieLM(torch.nn.Module):
    """A causal LM whose sequence probabilities are exactly given ones (a test oracle).

    Built from (prompt, {response: prob}) tokenized the training way; at every prefix it puts
    the conditional probability of each next token, so q(r ⊕ eos | x) = prob(r).
    """

    def __init__(self, tokenizer, table: dict[str, dict[str, float]], vocab: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))  # so .parameters() has a device
        self.vocab = vocab
        self.next: dict[tuple[int, ...], dict[int, float]] = {}
        for prompt, answers in table.items():
            for resp, p in answers.items():
                ids = tokenize_text("", prompt, resp, tokenizer).input_ids
                plen = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
                for k in range(plen, len(ids)):
                    d = self.next.setdefault(tuple(ids[:k]), {})
                    d[ids[k]] = d.get(ids[k], 0.0) + p

    def forward(self, input_ids, attention_mask=None):
        B, T = input_ids.shape
        logits = torch.full((B, T, self.vocab), -1e4)
        for b in range(B):
            for t in range(T):
                d = self.next.get(tuple(input_ids[b, : t + 1].tolist()))
                if d:
                    total = sum(d.values())
                    for tok, p in d.items():
                        logits[b, t, tok] = math.log(p / total)
        return type("Out", (), {"logits": logits})()


@pytest.fixture(scope="module")
def toy(toy_world):
    tok = AutoTokenizer.from_pretrained(toy_world.tokenizers["bpe"])
    examples = [e for e in load_examples(toy_world.test, template="none")][:30]
    assert any(len(e.references) > 3 for e in examples)
    return tok, examples


def _oracle(tok, examples, uniform: bool = False) -> TrieLM:
    table = {e.prompt: {r: (1 / len(e.references) if uniform else p)
                        for r, p in zip(e.references, e.probs)} for e in examples}
    return TrieLM(tok, table, len(tok))


def test_row_scores_closed_forms():
    p = [0.5, 0.3, 0.2]
    assert row_scores(p, [math.log(x) for x in p])["excess_kl"] == pytest.approx(0, abs=1e-12)
    uni = row_scores(p, [math.log(1 / 3)] * 3, response_index=2)
    assert uni["excess_kl"] == pytest.approx(sum(x * math.log(x) for x in p) + math.log(3))
    assert uni["validity"] == pytest.approx(1.0)
    assert uni["excess_nll"] == pytest.approx(math.log(3) + math.log(0.2))


def test_truth_scored_against_itself_is_zero(toy):
    tok, examples = toy
    got = truth_metrics(_oracle(tok, examples), tok, examples, batch_size=7)
    assert got["excess_kl"] == pytest.approx(0, abs=1e-4)
    assert got["excess_kl_per_token"] == pytest.approx(0, abs=1e-4)
    assert got["validity"] == pytest.approx(1.0, abs=1e-4)
    assert got["excess_nll"] == pytest.approx(0, abs=1e-4)
    assert got["examples"] == len(examples) and got["true_entropy"] > 0.1


def test_uniform_over_references_matches_its_closed_form(toy):
    tok, examples = toy
    got = truth_metrics(_oracle(tok, examples, uniform=True), tok, examples, batch_size=5)
    want = sum(sum(p * math.log(p) for p in e.probs) + math.log(len(e.probs))
               for e in examples) / len(examples)
    assert want > 0.05 and got["excess_kl"] == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert got["validity"] == pytest.approx(1.0, abs=1e-4)


def test_real_model_batching_does_not_change_scores(toy, toy_world):
    """Padding in a batch must not leak into a sequence's log-probability."""
    tok, examples = toy
    model = AutoModelForCausalLM.from_pretrained(toy_world.student).eval()
    pairs = [(e.prompt, r) for e in examples[:6] for r in e.references]
    one = sequence_logprobs(model, tok, pairs, batch_size=1)
    many = sequence_logprobs(model, tok, pairs, batch_size=16)
    assert many == pytest.approx(one, abs=1e-4)
    got = truth_metrics(model, tok, examples)
    assert got["excess_kl"] > 1.0 and 0 < got["validity"] < 0.5  # random init: far from truth


def test_data_without_probs_gives_none(toy):
    tok, examples = toy
    import dataclasses

    bare = [dataclasses.replace(e, probs=None) for e in examples]
    assert truth_metrics(_oracle(tok, examples), tok, bare) is None
