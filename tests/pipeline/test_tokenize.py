"""Tokenization: DSKD conventions on a hand-checked example, offsets, truncation, bad rows."""


import pytest
from transformers import AutoTokenizer

from dskd.pipeline.data import Example
from dskd.pipeline.tokenize import (
    IGNORE_INDEX,
    TokenizeError,
    ensure_special_tokens,
    model_inputs,
    tokenize_example,
)


@pytest.fixture(scope="module")
def gpt2(shared_dir):
    return AutoTokenizer.from_pretrained(shared_dir / "tokenizers" / "gpt2")


@pytest.fixture(scope="module")
def mistral(shared_dir):
    return AutoTokenizer.from_pretrained(shared_dir / "tokenizers" / "mistral")


PROMPT = "### Instruction:\nSay hi\n\n### Response:\n"


def test_hand_checked_gpt2_example(gpt2):
    """Checked by hand against GPT-2's vocab: '###'=21017 ' Instruction'=46486 ':'=25 '\\n'=198
    'Say'=25515 ' hi'=23105 ' Response'=18261; 'Hi'=17250 ' there'=612 '.'=13; EOS 50256."""
    ex = tokenize_example(Example("id0", PROMPT, "Hi there.", ("Hi there.",), 0), gpt2)
    prompt_ids = [21017, 46486, 25, 198, 25515, 23105, 198, 198, 21017, 18261, 25, 198]
    assert ex.input_ids == prompt_ids + [17250, 612, 13, 50256]  # no BOS, EOS appended
    assert ex.prompt_len == 12
    inputs, labels = model_inputs(ex)
    assert inputs == ex.input_ids[:-1]
    # labels are shifted: label[k] is the target of position k; the first prompt_len-1 are masked,
    # so the loss covers the response and EOS only.
    assert labels == [IGNORE_INDEX] * 11 + [17250, 612, 13, 50256]


def test_offsets_map_every_token_back_to_its_text(gpt2, mistral):
    ex_in = Example("i", "Répondez: 東京 😀\n\n### Response:\n", "  Two  spaces, ünïcode!", ("x",), 0)
    for tok in (gpt2, mistral):
        ex = tokenize_example(ex_in, tok)
        assert len(ex.offsets) == len(ex.input_ids)
        assert ex.offsets[-1] == (len(ex.text), len(ex.text))  # EOS
        prev_end = 0
        for (a, b), tid in zip(ex.offsets[:-1], ex.input_ids[:-1]):
            assert 0 <= a <= b <= len(ex.text) and a >= prev_end - 1
            piece = tok.decode([tid])
            # byte-level pieces of a multi-byte char decode to U+FFFD; others match the span text
            if "\ufffd" not in piece:
                assert piece.strip() == ex.text[a:b].strip() or tok is mistral
            prev_end = b
        # the spans cover the text: every non-space character lies in some token's span
        covered = set()
        for a, b in ex.offsets:
            covered.update(range(a, b))
        assert all(i in covered for i, c in enumerate(ex.text) if not c.isspace())
        # response tokens start at or after the prompt
        assert all(a >= len(ex_in.prompt) for a, _ in ex.offsets[ex.prompt_len:])


def test_truncation_follows_official_code(gpt2):
    prompt = " ".join(["word"] * 50)
    ex = tokenize_example(Example("i", prompt, "a b c d e f", ("x",), 0), gpt2, max_prompt_len=10, max_len=14)
    assert ex.prompt_len == 10  # first max_prompt_len prompt tokens kept
    assert len(ex.input_ids) == 14  # total cut to max_len (EOS may be cut, as officially)
    assert ex.input_ids[-1] != gpt2.eos_token_id


def test_prompt_leaving_no_room_is_a_bad_row(gpt2):
    with pytest.raises(TokenizeError, match="no room for the response"):
        tokenize_example(Example("i", "one two three four", "x", ("x",), 0), gpt2, max_prompt_len=8, max_len=4)


def test_ensure_special_tokens_sets_pad(shared_dir):
    tok = AutoTokenizer.from_pretrained(shared_dir / "tokenizers" / "gpt2")
    assert tok.pad_token_id is None
    changes = ensure_special_tokens(tok)
    assert tok.pad_token_id == tok.eos_token_id and any("pad" in c for c in changes)
    assert ensure_special_tokens(tok) == []
