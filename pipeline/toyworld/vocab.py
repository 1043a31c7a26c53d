"""Two locally trained tokenizer families, so teacher and student can disagree on segmentation.

* `bpe`: byte-level BPE (GPT-2 style, ~2k). Any text round-trips; a non-ASCII character can be
  split across tokens, so offsets of neighbouring tokens may share a character.
  Specials: `<|endoftext|>` = eos = bos = unk (id 0), `<|pad|>` (id 1).
* `unigram`: SentencePiece-style unigram (~1k) over a Metaspace pre-tokenizer with
  `prepend_scheme="never"`, so a string tokenized on its own (a response) gets no phantom
  leading space and `decode(encode(x)) == x` holds. Its alphabet is the corpus characters plus
  printable ASCII; anything else becomes `<unk>`. Specials: `<unk>` 0, `<s>` 1, `</s>` 2 (eos),
  `<pad>` 3.

Different eos/pad ids in the two families are deliberate: code that hard-codes one breaks here.
Neither adds BOS/EOS on encode (no post-processor); callers append eos themselves.
"""

from __future__ import annotations

import json
import os
import string
from contextlib import contextmanager
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

FAMILIES = ("bpe", "unigram")
METASPACE = "\u2581"  # "▁"
SPECIALS = {
    "bpe": {
        "eos": "<|endoftext|>",
        "bos": "<|endoftext|>",
        "unk": "<|endoftext|>",
        "pad": "<|pad|>",
    },
    "unigram": {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"},
}


@contextmanager
def _single_threaded():
    """Train without rayon threads so results cannot depend on scheduling (determinism)."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def _special_list(family: str) -> list[str]:
    return list(dict.fromkeys(SPECIALS[family].values()))  # unique, in id order


def train_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_special_list("bpe"),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is unknown
        show_progress=False,
    )
    with _single_threaded():
        tok.train_from_iterator(texts, trainer=trainer)
    return tok


def train_unigram(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [  # pieces never span a line break; spaces become "▁" and start a new piece
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="never"),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="never")
    # Printable ASCII is always in the vocab, so prompt templates with characters the corpus
    # lacks still round-trip. We add those ourselves: the trainer's `initial_alphabet` scores
    # them in hash-map order, which differs run to run.
    seen = set("".join(texts).replace(" ", METASPACE))
    missing = sorted((set(string.printable) - {" "} | {METASPACE}) - seen)
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size - len(missing),
        special_tokens=_special_list("unigram"),
        unk_token=SPECIALS["unigram"]["unk"],
        max_piece_length=12,
        show_progress=False,
    )
    with _single_threaded():
        tok.train_from_iterator(texts, trainer=trainer)
    return _canonical_unigram(tok, missing)


def _canonical_unigram(tok: Tokenizer, extra_chars: list[str]) -> Tokenizer:
    """Make the trained unigram byte-for-byte reproducible and add `extra_chars`.

    The EM sums floats in hash-map order, so scores wobble in the last bits between runs, and
    equal scores come out in any order. Round them (1e-6 is far above that noise, far below
    anything that matters for Viterbi) and order ties by piece text. The trainer also appends
    every corpus character it did not keep at `min_score + k * 1e-4`, k in hash-set order:
    give those one shared score.
    """
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]  # [[piece, log-prob], ...], specials first
    n_special = len(_special_list("unigram"))
    specials, pieces = vocab[:n_special], vocab[n_special:]
    assert [p for p, _ in specials] == _special_list("unigram"), specials
    floor = round(min(score for _, score in pieces), 6)
    n_chars = sum(len(p) == 1 for p, _ in pieces)
    band = floor + 1e-4 * (n_chars + 1)  # bounds the trainer's appended characters
    pieces = [
        [p, floor if len(p) == 1 and score < band else round(score, 6)] for p, score in pieces
    ]
    pieces += [[c, round(floor - 1.0, 6)] for c in extra_chars]  # usable, never preferred
    pieces.sort(key=lambda ps: (-ps[1], ps[0]))
    spec["model"]["vocab"] = specials + pieces
    return Tokenizer.from_str(json.dumps(spec))


def save_hf_tokenizer(
    tok: Tokenizer, family: str, out_dir: Path, model_max_length: int
) -> PreTrainedTokenizerFast:
    """Wrap in a fast HF tokenizer with specials set and save it (`AutoTokenizer`-loadable)."""
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        **{f"{k}_token": v for k, v in SPECIALS[family].items()},
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,  # would turn "a ." into "a." and break round trips
        padding_side="right",
    )
    hf.save_pretrained(out_dir)
    return hf


def train_tokenizer(
    family: str, texts: list[str], vocab_size: int, out_dir: Path, model_max_length: int
) -> PreTrainedTokenizerFast:
    """Train `family` ("bpe" | "unigram") on `texts` and save it to `out_dir`."""
    if family not in FAMILIES:
        raise ValueError(f"unknown tokenizer family {family!r}; expected one of {FAMILIES}")
    tok = (train_bpe if family == "bpe" else train_unigram)(texts, vocab_size)
    return save_hf_tokenizer(tok, family, out_dir, model_max_length)
