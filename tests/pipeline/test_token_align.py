"""Exact Token Alignment on the real tokenizers (../shared/tokenizers): the `offsets` rule gives
the official alignment on plain text and recovers where the official rule stops (newlines,
accents, byte-fallback tokens). The official rule itself is pinned by the golden files
(tests/pipeline/losses/test_golden.py, v2/align_*.json)."""

from __future__ import annotations

import functools

import pytest

from dskd.pipeline.token_align import Aligner, align_offsets, label_tokens, prediction_map
from dskd.pipeline.tokenize import tokenize_text

PAIRS = [("gpt2", "qwen2"), ("gpt2", "mistral"), ("qwen2", "mistral"), ("mistral", "gpt2")]
PROMPT = "Below is an instruction. Write a response.\n\n### Response:\n"
# Plain: one line of ASCII prose. Numbers are left out on purpose: Qwen2 and Mistral put the
# space of " 2024" in a token of its own, after which the official rule skips the next digit
# that offsets do pair (test_offsets_pair_digits_after_a_lone_space_token).
PLAIN = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "Bees make honey; they don't like rain, and they sting when scared!",
    "Photosynthesis converts light energy into chemical energy (glucose).",
]
MIXED = [
    "The café opens at nine.\nIt closes at six, and the crème brûlée is good.",
    "First line.\nSecond line.\nThird line with naïve résumé words.",
    "Zürich and Kraków are cities.\n\nBoth are old.",
]


@functools.cache
def _tok(shared: str, name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(f"{shared}/tokenizers/{name}")


def _pairs(shared, student: str, teacher: str, text: str, rule: str):
    s_tok, t_tok = _tok(str(shared), student), _tok(str(shared), teacher)
    s = tokenize_text("x", PROMPT, text, s_tok)
    t = tokenize_text("x", PROMPT, text, t_tok)
    return Aligner(s_tok, t_tok, rule)(label_tokens(t.input_ids, t.prompt_len, t.offsets),
                                       label_tokens(s.input_ids, s.prompt_len, s.offsets), s.text)


@pytest.mark.parametrize("student,teacher", PAIRS)
def test_offsets_equal_the_official_alignment_on_plain_text(shared_dir, student, teacher):
    for text in PLAIN:
        official = _pairs(shared_dir, student, teacher, text, "official")
        assert len(official[0]) > 3, text  # something to compare
        assert _pairs(shared_dir, student, teacher, text, "offsets") == official, text


@pytest.mark.parametrize("student,teacher", PAIRS)
def test_offsets_align_more_on_text_with_newlines_and_accents(shared_dir, student, teacher):
    n_official = n_offsets = 0
    for text in MIXED:
        official = _pairs(shared_dir, student, teacher, text, "official")
        offsets = _pairs(shared_dir, student, teacher, text, "offsets")
        n_official, n_offsets = n_official + len(official[0]), n_offsets + len(offsets[0])
        assert len(offsets[0]) >= len(official[0]), text
    if "mistral" in (student, teacher):  # byte-level vs SentencePiece: official stops for good
        assert n_offsets > n_official + 10, (n_official, n_offsets)
    else:  # GPT-2 / Qwen2 share the byte alphabet: the official rule loses little or nothing
        assert n_offsets >= n_official


def test_offsets_recover_after_a_difference(shared_dir):
    """'The café …' (README: 1 of 12 aligned for gpt2 ← mistral officially): with offsets the
    words after the accent align again, and so does EOS."""
    text = "The café opens at nine."
    official = _pairs(shared_dir, "gpt2", "mistral", text, "official")
    offsets = _pairs(shared_dir, "gpt2", "mistral", text, "offsets")
    assert len(official[0]) <= 2 and len(offsets[0]) >= 5
    s_tok = _tok(str(shared_dir), "gpt2")
    s = tokenize_text("x", PROMPT, text, s_tok)
    last_row = len(s.input_ids) - 2  # the row whose label is EOS
    assert offsets[1][-1] == last_row


def test_offsets_pair_digits_after_a_lone_space_token(shared_dir):
    text = "In 2024, the company hired 1,250 new employees."
    official = _pairs(shared_dir, "gpt2", "qwen2", text, "official")
    offsets = _pairs(shared_dir, "gpt2", "qwen2", text, "offsets")
    assert set(zip(*official)) < set(zip(*offsets))  # everything official, plus 'Ġ1' ↔ '1'


def test_align_offsets_pairs_equal_trimmed_spans_only():
    text = "ab cd\nef"
    # teacher: "ab", " cd", "\n", "ef", EOS; student: "ab", " ", "cd", "\nef", EOS
    t = [(0, 2), (2, 5), (5, 6), (6, 8), (8, 8)]
    s = [(0, 2), (2, 3), (3, 5), (5, 8), (8, 8)]
    assert align_offsets(t, s, text) == ([0, 1, 3, 4], [0, 2, 3, 4])  # "\nef" trims to "ef"


def test_prediction_map_is_the_official_string_lookup(shared_dir):
    gpt2, qwen2, mistral = (_tok(str(shared_dir), n) for n in ("gpt2", "qwen2", "mistral"))
    m = prediction_map(qwen2, gpt2, 151936)
    assert len(m) == 151936 and m[151700] == -1  # head rows past the tokenizer: dropped
    assert m[qwen2.convert_tokens_to_ids("Ġthe")] == gpt2.convert_tokens_to_ids("Ġthe")
    assert m[qwen2.eos_token_id] == gpt2.eos_token_id
    # an unknown string: GPT-2's unk (<|endoftext|>); Qwen2 has no unk → dropped
    m = prediction_map(mistral, gpt2, 32000)
    assert m[mistral.convert_tokens_to_ids("▁the")] == gpt2.unk_token_id
    m = prediction_map(mistral, qwen2, 32000)
    assert m[mistral.convert_tokens_to_ids("▁the")] == -1
