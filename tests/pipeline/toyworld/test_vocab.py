"""The tokenizer families: loadable, specials set, lossless, and segmenting differently."""

from __future__ import annotations

import itertools
import json
import string

import pytest
from transformers import AutoTokenizer

FAMILIES = ("bpe", "spbpe", "unigram")
# A prompt-template-like string with characters the generated data never uses.
TEMPLATE = (
    "### Instruction:\n{Sort these}\n\n### Input:\n<x> = 3 * (4 + 5); 100%\t~ok~\n\n### Response:\n"
)


@pytest.fixture(scope="module")
def toks(toy_world):
    return {fam: AutoTokenizer.from_pretrained(toy_world.tokenizers[fam]) for fam in FAMILIES}


@pytest.fixture(scope="module")
def texts(toy_world) -> list[str]:
    out = []
    for path in (toy_world.train, toy_world.valid, toy_world.test):
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            out += [row["instruction"], row["context"], row["response"], *row["references"]]
    return [t for t in out if t]


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_as_fast_tokenizer_with_specials(toks, family):
    tok = toks[family]
    assert tok.is_fast
    for name in ("eos", "pad", "bos", "unk"):
        assert getattr(tok, f"{name}_token_id") is not None, name
    assert tok.pad_token_id != tok.eos_token_id  # so pad-masking never hides the eos label
    ids = tok("The owl is quiet.")["input_ids"]  # default add_special_tokens=True adds nothing
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids


def test_families_use_different_special_ids(toks):
    assert toks["bpe"].eos_token_id != toks["unigram"].eos_token_id
    assert toks["bpe"].pad_token_id != toks["unigram"].pad_token_id


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trips_generated_data(toks, texts, family):
    tok = toks[family]
    joined = "\n".join(texts[:300])
    batch = texts + [joined, " " + texts[0], texts[0] + "  ", TEMPLATE, string.printable]
    ids = tok(batch, add_special_tokens=False)["input_ids"]
    bad = [t for t, i in zip(batch, ids) if tok.decode(i) != t]
    assert not bad, f"{family}: {len(bad)} texts do not round-trip, e.g. {bad[:3]!r}"
    assert tok.unk_token_id not in {i for seq in ids for i in seq}


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_and_response_tokenized_apart_decode_to_their_concatenation(toks, family):
    """tokenize.py encodes prompt and response separately; no phantom spaces may appear."""
    tok = toks[family]
    prompt, response = "Describe an owl in one sentence.\n", "The owl is quiet."
    ids = (
        tok(prompt, add_special_tokens=False)["input_ids"]
        + tok(response, add_special_tokens=False)["input_ids"]
    )
    assert tok.decode(ids) == prompt + response


@pytest.mark.parametrize("family", FAMILIES)
def test_offsets_tile_the_text(toks, family):
    text = "Zoë lives in Malmö, 5 Ω away. How old is Tom?\n" + TEMPLATE  # "Ω": unseen, 2 bytes
    enc = toks[family](text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    assert len(offsets) == len(enc["input_ids"])
    assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
    for prev, (start, end) in itertools.pairwise(offsets):
        # Contiguous; byte-level BPE gives every byte-piece of a split character that char's span.
        assert end > start and (start == prev[1] or (start, end) == prev), (prev, (start, end))


def test_families_segment_differently(toks):
    assert 1500 <= len(toks["bpe"]) <= 2048
    assert 500 <= len(toks["unigram"]) <= 1024
    assert 1000 <= len(toks["spbpe"]) <= 1152
    assert len(toks["bpe"]) != len(toks["unigram"])
    text = "Describe an owl in one sentence. The owl is usually curious."
    ends = {
        fam: [
            e
            for _, e in tok(text, add_special_tokens=False, return_offsets_mapping=True)[
                "offset_mapping"
            ]
        ]
        for fam, tok in toks.items()
    }
    assert ends["bpe"] != ends["unigram"]
    assert len(ends["bpe"]) != len(ends["unigram"])


def test_realistic_pair_is_checked_and_recorded(toy_world):
    """spbpe sits where real pairs do against the teacher's bpe; unigram is the stress variant."""
    from dskd.pipeline.toyworld import build

    info = json.loads((toy_world.root / "toyworld.json").read_text())["tokenizers"]
    real, stress = info["spbpe"]["vs_teacher"], info["unigram"]["vs_teacher"]
    assert 1.05 <= real["label_token_ratio"] <= 1.3 and real["boundary_agreement"] >= 0.7
    assert stress["label_token_ratio"] > 1.3  # degenerate on purpose
    build._check_realistic_pair(real, "spbpe")
    with pytest.raises(RuntimeError, match="'unigram' vs the teacher's has label-token ratio"):
        build._check_realistic_pair(stress, "unigram")
