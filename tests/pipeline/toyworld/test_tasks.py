"""Toy task generator: schema, correctness of single answers, soft many-answer distributions, splits."""

from __future__ import annotations

import itertools
import re
from collections import Counter

import pytest

from dskd.pipeline.toyworld import tasks
from dskd.pipeline.toyworld.tasks import (
    MANY_ANSWER_CATEGORIES,
    SINGLE_ANSWER_CATEGORIES,
    make_splits,
    toy_examples,
)

FIELDS = ["instruction", "context", "response", "category", "references", "probs"]


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return toy_examples(1500, seed=0)


def test_same_seed_same_rows_other_seed_other_rows():
    assert toy_examples(50, seed=3) == toy_examples(50, seed=3)
    assert toy_examples(50, seed=3) != toy_examples(50, seed=4)


def test_rows_follow_dolly_schema_with_references(rows):
    assert len(rows) == 1500
    for row in rows:
        assert list(row) == FIELDS
        assert all(isinstance(row[k], str) for k in FIELDS[:4])
        assert len(row["probs"]) == len(row["references"])
        assert abs(sum(row["probs"]) - 1.0) < 1e-9 and min(row["probs"]) > 0
        assert row["probs"] == sorted(row["probs"], reverse=True)  # most-likely-first
        assert row["instruction"] and row["response"]
        assert row["response"] in row["references"]
        assert len(set(row["references"])) == len(row["references"])
    assert {r["category"] for r in rows} == set(SINGLE_ANSWER_CATEGORIES) | set(
        MANY_ANSWER_CATEGORIES
    )


def _check_single_answer(row: dict) -> None:
    ins, ctx, ans = row["instruction"], row["context"], row["response"]
    if row["category"] == "arithmetic":
        a, op, b = re.search(r"(\d+) (plus|minus|times|\+|-|\*) (\d+)", ins).groups()
        expected = {"plus": int(a) + int(b), "+": int(a) + int(b), "minus": int(a) - int(b),
                    "-": int(a) - int(b), "times": int(a) * int(b), "*": int(a) * int(b)}[op]  # fmt: skip
        assert ans == str(expected)
    elif row["category"] == "sorting":
        items = ins.split(": ", 1)[1].rstrip(".").split(", ")
        key = int if items[0].isdigit() else str
        assert ans.split(", ") == [str(x) for x in sorted(map(key, items))]
    elif row["category"] == "lookup":
        name = re.search(r"(?:does|is) (\S+?)(?: live| like)?\?", ins).group(1)
        facts = [f.rstrip(".").split() for f in ctx.split(". ")]
        fact = next(f for f in facts if f[0] == name)
        value = fact[2] if "years" in fact else fact[-1]  # "N is 42 years old" / "N lives in X"
        assert ans == value
    elif row["category"] == "transform":
        text = ins.split(": ", 1)[1] if ": " in ins else ins.split()[3]  # "Spell the word W ..."
        if ins.startswith("Write in capital"):
            assert ans == text.upper()
        elif ins.startswith("Reverse"):
            assert ans.split() == text.split()[::-1]
        else:
            assert ans.replace(" ", "") == text
    else:
        raise AssertionError(f"not a single-answer category: {row['category']}")


def test_single_answer_tasks_have_one_correct_reference(rows):
    single = [r for r in rows if r["category"] in SINGLE_ANSWER_CATEGORIES]
    assert len(single) > 300
    for row in single:
        assert row["references"] == [row["response"]] and row["probs"] == [1.0]
        _check_single_answer(row)
    assert any(r["context"] for r in single if r["category"] == "lookup")


def test_many_answer_tasks_keep_all_references(rows):
    many = [r for r in rows if r["category"] in MANY_ANSWER_CATEGORIES]
    assert len(many) > 0.6 * len(rows)  # soft labels carry information here, so most rows
    assert all(len(set(r["references"])) >= 2 for r in many)
    # Paraphrases never echo their input sentence.
    assert all(r["context"] not in r["references"] for r in many if r["category"] == "paraphrase")


def test_many_answer_responses_are_non_uniform(rows):
    """References are most-likely-first; responses must favour the front, not be uniform."""
    many = [r for r in rows if r["category"] in MANY_ANSWER_CATEGORIES]
    top_share = sum(r["response"] == r["references"][0] for r in many) / len(many)
    uniform_share = sum(1 / len(r["references"]) for r in many) / len(many)
    assert top_share > 2 * uniform_share
    # Counts fall with the rank of the answer in its references.
    ranks = Counter(r["references"].index(r["response"]) for r in many)
    assert ranks[0] > ranks[2] > ranks[4] and ranks[0] > 2 * ranks[4]


def test_repeated_prompts_keep_their_answer_frequencies(rows):
    """Rows are i.i.d.: "Name one X." repeats, and its answers repeat in Zipf proportion."""
    one = [r for r in rows if r["category"] == "list" and len(r["references"]) == 5]
    assert len({(r["instruction"], r["response"]) for r in one}) < len(one)  # exact repeats kept
    ranks = Counter(r["references"].index(r["response"]) for r in one)
    assert ranks[0] > 0.3 * len(one)  # Zipf(1.2) over 5: ~49%; uniform would be 20%


def test_responses_follow_the_recorded_probs(rows):
    """The response is a draw from `probs`: pooled over rows, rank frequencies match them."""
    many = [r for r in rows if r["category"] in MANY_ANSWER_CATEGORIES]
    observed = sum(r["references"].index(r["response"]) == 0 for r in many) / len(many)
    expected = sum(r["probs"][0] for r in many) / len(many)
    assert abs(observed - expected) < 4 * (expected * (1 - expected) / len(many)) ** 0.5


def test_answer_distributions_depend_on_the_prompt_not_only_the_task(rows):
    """Objects of one class favour different adjectives; one category asked in other words
    favours other items; and the favourite is a function of the prompt."""
    from dskd.pipeline.toyworld import lexicon as lx

    by_prompt: dict[tuple[str, str], set] = {}
    for r in rows:
        by_prompt.setdefault((r["instruction"], r["context"]), set()).add(tuple(r["probs"]))
        by_prompt[(r["instruction"], r["context"])].add(r["references"][0])
    assert all(len(v) <= 2 for v in by_prompt.values())  # one probs vector, one favourite

    animals, adjs = lx.OBJECT_CLASSES["animal"]
    top_adj = set()
    for r in rows:
        if r["category"] == "describe" and any(f" {o} " in f" {r['instruction']} " for o in animals):
            top_adj |= {a for a in adjs if a in r["references"][0].split()
                        or f"{a}." in r["references"][0].split()}
    assert len(top_adj) >= 2, top_adj

    list_tops: dict[str, set] = {}
    for r in rows:
        if r["category"] == "list" and len(r["references"]) == 5:
            list_tops.setdefault(r["instruction"].split()[-1], set()).add(r["references"][0])
    assert any(len(v) > 1 for v in list_tops.values())


def test_zipf_weights_decrease():
    w = tasks.zipf_weights(5)
    assert w[0] == 1.0 and all(a > b for a, b in itertools.pairwise(w))


def test_splits_have_requested_sizes_and_disjoint_prompts():
    sizes = {"train": 300, "valid": 60, "test": 60}
    splits = make_splits(sizes, seed=0)
    assert {k: len(v) for k, v in splits.items()} == sizes
    prompts = {k: {(r["instruction"], r["context"]) for r in v} for k, v in splits.items()}
    assert not prompts["train"] & prompts["valid"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["valid"] & prompts["test"]
    assert len(prompts["train"]) < sizes["train"]  # many-answer prompts repeat
    for name in sizes:  # every split keeps the whole task mix
        assert {r["category"] for r in splits[name]} == set(tasks.TASKS)
    assert make_splits(sizes, seed=0) == splits
    assert make_splits(sizes, seed=1)["test"] != splits["test"]


def test_prompt_shares_give_a_small_split_many_prompts():
    sizes = {"pretrain": 2000, "test": 60}
    by_rows = make_splits(sizes, seed=0)
    shared = make_splits(sizes, seed=0, prompt_shares={"pretrain": 0.8, "test": 0.2})
    distinct = {k: len({(r["instruction"], r["context"]) for r in v["test"]
                        if r["category"] == "describe"})
                for k, v in (("rows", by_rows), ("shares", shared))}
    assert distinct["shares"] > distinct["rows"]
    prompts = {k: {(r["instruction"], r["context"]) for r in v} for k, v in shared.items()}
    assert not prompts["pretrain"] & prompts["test"]


def test_splits_fail_loudly_when_prompt_space_is_too_small(monkeypatch):
    constant = {
        "instruction": "Say hi.",
        "context": "",
        "response": "hi",
        "category": "list",
        "references": ["hi"],
    }
    monkeypatch.setattr(tasks, "TASKS", {"list": (lambda rng: dict(constant), 1.0)})
    with pytest.raises(RuntimeError, match="prompt space too small"):
        make_splits({"train": 2, "test": 2}, seed=0)
