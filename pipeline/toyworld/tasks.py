"""Toy instruction-following tasks in Dolly schema, generated from a seed.

Two kinds of task, so a teacher has *soft* knowledge to pass on, not only one-hot answers:

* single-answer (`arithmetic`, `sorting`, `lookup`, `transform`): `references == [response]`;
* many-answer (`describe`, `list`, `paraphrase`): every accepted answer is in `references`,
  listed most-likely-first, and `response` is drawn from Zipf-like weights over them, so a model
  that learned the data has a non-uniform next-token distribution worth distilling. The ranking
  depends on the prompt (the object described, the wording of the ask, the sentence's name and
  place), so a small model cannot pool answers by task class: it has to learn each prompt's.

Every row is `{"instruction", "context", "response", "category", "references", "probs"}`:
`probs[i]` is the true probability of `references[i]` given the prompt (they sum to 1; a
single-answer row has `[1.0]`), which is what lets eval score a model against the truth exactly
(`pipeline/truth.py`). `context` is "" when a task has none. Texts are short (≈10–60 tokens
prompt + response). Many-answer tasks are ~70% of the mix: they are where soft labels carry
information beyond the label.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator

from dskd.pipeline.toyworld import lexicon as lx

Row = dict[str, object]

ZIPF_S = 1.2  # exponent of the many-answer weights: 1/(rank+1)^s
SINGLE_ANSWER_CATEGORIES = ("arithmetic", "sorting", "lookup", "transform")
MANY_ANSWER_CATEGORIES = ("describe", "list", "paraphrase")


def zipf_weights(n: int, s: float = ZIPF_S) -> list[float]:
    """Unnormalised weights 1/(i+1)^s for ranks 0..n-1."""
    return [1.0 / (i + 1) ** s for i in range(n)]


def _row(
    category: str,
    instruction: str,
    references: list[str],
    response: str,
    probs: list[float],
    context: str = "",
) -> Row:
    assert response in references and len(probs) == len(references), (category, references)
    return {
        "instruction": instruction,
        "context": context,
        "response": response,
        "category": category,
        "references": references,
        "probs": probs,
    }


def _single(category: str, instruction: str, answer: str, context: str = "") -> Row:
    return _row(category, instruction, [answer], answer, [1.0], context)


def _ranked(items: tuple[str, ...] | list[str], key: str) -> list[str]:
    """`items` in an order fixed by `key` (a stable hash): the prompt decides who ranks first."""
    def score(item: str) -> bytes:
        return hashlib.sha256(f"{key}\x00{item}".encode()).digest()

    return sorted(items, key=score)


def _many(
    rng: random.Random,
    category: str,
    instruction: str,
    answers: dict[str, float],
    context: str = "",
) -> Row:
    """Row whose response is drawn from `answers` (text → weight); references most-likely-first."""
    # Stable sort: equal weights keep generation order, so references are deterministic.
    refs = sorted(answers, key=lambda a: -answers[a])
    total = sum(answers.values())
    probs = [answers[a] / total for a in refs]
    response = rng.choices(refs, weights=probs)[0]
    return _row(category, instruction, refs, response, probs, context)


def _article(word: str) -> str:
    return f"{'an' if word[0] in 'aeio' else 'a'} {word}"


# ---- single-answer tasks ----------------------------------------------------------------------


def arithmetic(rng: random.Random) -> Row:
    op = rng.choice(("plus", "minus", "times"))
    if op == "times":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        answer, sym = a * b, "*"
    else:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        if op == "minus":
            a, b = max(a, b), min(a, b)  # keep answers non-negative
        answer, sym = (a + b, "+") if op == "plus" else (a - b, "-")
    ask = rng.choice(
        (f"What is {a} {op} {b}?", f"Compute {a} {sym} {b}.", f"Work out {a} {op} {b}.")
    )
    return _single("arithmetic", ask, str(answer))


def sorting(rng: random.Random) -> Row:
    k = rng.randint(3, 5)
    if rng.random() < 0.5:
        nums = rng.sample(range(1, 100), k)
        ask = "Sort these numbers from smallest to largest: " + ", ".join(map(str, nums)) + "."
        return _single("sorting", ask, ", ".join(map(str, sorted(nums))))
    words = rng.sample(lx.WORDS, k)
    ask = "Sort these words alphabetically: " + ", ".join(words) + "."
    return _single("sorting", ask, ", ".join(sorted(words)))


def lookup(rng: random.Random) -> Row:
    """Answer a question from 3–4 facts in `context`."""
    names = rng.sample(lx.NAMES, rng.randint(3, 4))
    relation = rng.choice(("city", "age", "likes"))
    if relation == "city":
        values = [rng.choice(lx.CITIES) for _ in names]
        facts = [f"{n} lives in {v}." for n, v in zip(names, values)]
        ask = "Where does {} live?"
    elif relation == "age":
        values = [str(rng.randint(5, 90)) for _ in names]
        facts = [f"{n} is {v} years old." for n, v in zip(names, values)]
        ask = "How old is {}?"
    else:
        values = [rng.choice(lx.OBJECT_CLASSES["fruit"][0]) for _ in names]
        facts = [f"{n} likes the {v}." for n, v in zip(names, values)]
        ask = "Which fruit does {} like?"
    i = rng.randrange(len(names))
    return _single("lookup", ask.format(names[i]), values[i], context=" ".join(facts))


def transform(rng: random.Random) -> Row:
    kind = rng.choice(("upper", "reverse", "spell"))
    if kind == "upper":
        text = f"{rng.choice(lx.SMALL_ADJS)} {rng.choice(lx.WORDS)}"
        return _single("transform", f"Write in capital letters: {text}", text.upper())
    if kind == "reverse":
        words = rng.sample(lx.WORDS, rng.randint(3, 4))
        ask = "Reverse the order of these words: " + " ".join(words)
        return _single("transform", ask, " ".join(reversed(words)))
    word = rng.choice(lx.WORDS)
    return _single("transform", f"Spell the word {word} letter by letter.", " ".join(word))


# ---- many-answer tasks ------------------------------------------------------------------------


def describe(rng: random.Random) -> Row:
    """One sentence about an object: frame × adjective, both Zipf-weighted in an object's order."""
    objects, adjs = lx.OBJECT_CLASSES[rng.choice(sorted(lx.OBJECT_CLASSES))]
    obj = rng.choice(objects)
    frames = _ranked(lx.DESCRIBE_FRAMES, f"frame:{obj}")
    answers: dict[str, float] = {}
    for frame, wf in zip(frames, zipf_weights(len(frames))):
        for adj, wa in zip(_ranked(adjs, f"adj:{obj}"), zipf_weights(len(adjs))):
            text = frame.format(
                obj=obj, adj=adj, A_obj=_article(obj).capitalize(), a_adj=_article(adj)
            )
            answers[text] = wf * wa
    ask = rng.choice(lx.DESCRIBE_ASKS).format(a_obj=_article(obj))
    return _many(rng, "describe", ask, answers)


def list_items(rng: random.Random) -> Row:
    """Name one or two items of a category; two = ordered draw without replacement.

    The items' ranking depends on the category and the wording of the ask ("Name" vs "List").
    """
    cat = rng.choice(sorted(lx.LIST_CATEGORIES))
    ask_template = rng.choice(lx.LIST_ASKS)
    items = _ranked(lx.LIST_CATEGORIES[cat], f"list:{ask_template}:{cat}")
    w = zipf_weights(len(items))
    total = sum(w)
    n = rng.choice(("one", "two"))
    if n == "one":
        answers = dict(zip(items, w))
        cat_word = cat[:-1]  # "colors" -> "color"
    else:
        answers = {
            f"{a} and {b}": wa * wb / (total - wa)
            for a, wa in zip(items, w)
            for b, wb in zip(items, w)
            if a != b
        }
        cat_word = cat
    ask = ask_template.format(n=n, cat=cat_word)
    return _many(rng, "list", ask, answers)


def _fill_slots(template: str, choice: dict[str, str]) -> str:
    for slot, word in choice.items():
        template = template.replace("{" + slot + "}", word)
    return template


def paraphrase(rng: random.Random) -> Row:
    """Reword a sentence: the input is one synonym realisation, answers are all the others.

    Synonyms are ranked per person (or per place in sentences without one), so the preferred
    wording depends on the input, and is learnable: the person recurs across sentences.
    """
    template, slots = rng.choice(lx.PARAPHRASE_TEMPLATES)
    key_var = "<name>" if "<name>" in template else "<place>"
    variables = {
        "<name>": rng.choice(lx.NAMES),
        "<place>": rng.choice(lx.CITIES),
        "<thing>": rng.choice(lx.OBJECT_CLASSES["vehicle"][0] + lx.OBJECT_CLASSES["tool"][0]),
    }
    for var, value in variables.items():
        template = template.replace(var, value)
    # Every realisation with its weight = product of its slot choices' Zipf weights.
    options: list[tuple[dict[str, str], float]] = [({}, 1.0)]
    for slot, words in slots.items():
        ranked = _ranked(words, f"paraphrase:{variables[key_var]}:{slot}")
        weighted = list(zip(ranked, zipf_weights(len(words))))
        options = [({**c, slot: wd}, p * w) for c, p in options for wd, w in weighted]
    texts = {_fill_slots(template, c): p for c, p in options}
    source = rng.choice(sorted(texts))  # inputs uniform, so every wording is seen as input
    answers = {t: p for t, p in texts.items() if t != source}
    return _many(rng, "paraphrase", rng.choice(lx.PARAPHRASE_ASKS), answers, context=source)


TASKS: dict[str, tuple[Callable[[random.Random], Row], float]] = {
    # category: (generator, mixing weight)
    "arithmetic": (arithmetic, 0.08),
    "sorting": (sorting, 0.07),
    "lookup": (lookup, 0.08),
    "transform": (transform, 0.07),
    "describe": (describe, 0.25),
    "list": (list_items, 0.20),
    "paraphrase": (paraphrase, 0.25),
}


def _stream(rng: random.Random) -> Iterator[Row]:
    gens = [g for g, _ in TASKS.values()]
    weights = [w for _, w in TASKS.values()]
    while True:
        yield rng.choices(gens, weights=weights)[0](rng)


def toy_examples(n: int, seed: int = 0) -> list[Row]:
    """`n` Dolly-schema rows for `seed`, drawn i.i.d. (so repeats keep their true frequency)."""
    rng = random.Random(f"dskd-toyworld-examples:{seed}")  # str seeds hash stably (sha512)
    stream = _stream(rng)
    return [next(stream) for _ in range(n)]


def _split_of(row: Row, seed: int, bounds: list[tuple[float, str]]) -> str:
    """Route by a hash of the prompt, so a prompt never lands in two splits."""
    key = f"{seed}\x00{row['instruction']}\x00{row['context']}".encode()
    u = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64
    return next(name for bound, name in bounds if u < bound)


def make_splits(
    sizes: dict[str, int], seed: int = 0, prompt_shares: dict[str, float] | None = None
) -> dict[str, list[Row]]:
    """Splits of the given sizes whose prompts (instruction + context) are disjoint.

    Rows are i.i.d. draws routed by prompt hash, so every split keeps the task mix, and a
    prompt that repeats within a split does so with responses in their Zipf frequencies (exact
    repeats included: that *is* the distribution a teacher should learn; `data.py` gives
    repeated rows distinct ids). `prompt_shares` (split → share of the prompt space; default:
    proportional to `sizes`) lets a small split still see many distinct prompts: a 300-row test
    split next to a 20k-row teacher split would otherwise get ~1% of the prompts.
    """
    shares = prompt_shares or sizes
    total = sum(shares[name] for name in sizes)
    bounds, acc = [], 0.0
    for name in sizes:
        acc += shares[name] / total
        bounds.append((acc, name))
    bounds[-1] = (1.0, bounds[-1][1])
    splits: dict[str, list[Row]] = {name: [] for name in sizes}
    rng = random.Random(f"dskd-toyworld-splits:{seed}")
    for attempt, row in enumerate(_stream(rng)):
        if all(len(splits[s]) >= n for s, n in sizes.items()):
            break
        if attempt > 50 * sum(sizes.values()):
            have = {s: len(r) for s, r in splits.items()}
            raise RuntimeError(
                f"toy world: prompt space too small for split sizes {sizes} (got {have})"
            )
        name = _split_of(row, seed, bounds)
        if len(splits[name]) < sizes[name]:
            splits[name].append(row)
    return splits
