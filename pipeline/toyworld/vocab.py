"""Three locally trained tokenizer families, so teacher and student can disagree on segmentation.

* `bpe`: byte-level BPE (GPT-2 style, ~2k). Any text round-trips; a non-ASCII character can be
  split across tokens, so offsets of neighbouring tokens may share a character.
  Specials: `<|endoftext|>` = eos = bos = unk (id 0), `<|pad|>` (id 1). The teacher's.
* `spbpe`: SentencePiece-style BPE (Llama/Mistral style, ~1.15k): a Metaspace pre-tokenizer
  (`prepend_scheme="never"`), digits split one by one, character alphabet plus `<unk>`. Against
  `bpe` it lands where real pairs do (GPT-2/Mistral on the toy responses: 1.24x the tokens, 77%
  boundary agreement; toy `spbpe`/`bpe`: ~1.09x, ~73%); `build.py` checks that on every build.
  Specials: `<unk>` 0, `<s>` 1, `</s>` 2 (eos), `<pad>` 3. The realistic cross-vocab student's.
* `unigram`: SentencePiece-style unigram (~1k) over the same Metaspace pre-tokenizer. The
  trainer stops near 900 pieces on this corpus, so it cuts responses into ~1.5x the `bpe`
  tokens with ~63% boundary agreement: a *stress* variant, far coarser-vs-finer than real pairs.
  Its alphabet is the corpus characters plus printable ASCII; anything else becomes `<unk>`.
  Specials: `<unk>` 0, `<s>` 1, `</s>` 2 (eos), `<pad>` 3.

With `prepend_scheme="never"` a string tokenized on its own (a response) gets no phantom leading
space, so `decode(encode(prompt) + encode(response)) == prompt + response`.
Different eos/pad ids across families are deliberate: code that hard-codes one breaks here.
No family adds BOS/EOS on encode (no post-processor); callers append eos themselves.
"""

from __future__ import annotations

import json
import os
import string
from contextlib import contextmanager
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

FAMILIES = ("bpe", "spbpe", "unigram")
METASPACE = "\u2581"  # "▁"
SPECIALS = {
    "bpe": {
        "eos": "<|endoftext|>",
        "bos": "<|endoftext|>",
        "unk": "<|endoftext|>",
        "pad": "<|pad|>",
    },
    "spbpe": {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"},
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


def _metaspace(digits: bool = False) -> pre_tokenizers.PreTokenizer:
    """Pieces never span a line break; spaces become "▁" and start a new piece."""
    steps = [pre_tokenizers.Split("\n", behavior="isolated")]
    if digits:  # Llama/Mistral split numbers into digits
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    steps.append(pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="never"))
    return pre_tokenizers.Sequence(steps)


def _missing_printable(texts: list[str]) -> list[str]:
    """Printable ASCII the corpus lacks: added so prompt templates with them still round-trip."""
    seen = set("".join(texts).replace(" ", METASPACE))
    return sorted((set(string.printable) - {" "} | {METASPACE}) - seen)


def train_spbpe(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=SPECIALS["spbpe"]["unk"]))
    tok.pre_tokenizer = _metaspace(digits=True)
    tok.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="never")
    alphabet = sorted(set("".join(texts).replace(" ", METASPACE)) | set(_missing_printable(texts)))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_special_list("spbpe"),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    with _single_threaded():
        tok.train_from_iterator(texts, trainer=trainer)
    return tok


def train_unigram(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = _metaspace()
    tok.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="never")
    # Printable ASCII is always in the vocab (see _missing_printable). We add those ourselves:
    # the trainer's `initial_alphabet` scores them in hash-map order, which differs run to run.
    missing = _missing_printable(texts)
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
    """Train `family` (one of FAMILIES) on `texts` and save it to `out_dir`."""
    trainers_by_family = {"bpe": train_bpe, "spbpe": train_spbpe, "unigram": train_unigram}
    if family not in trainers_by_family:
        raise ValueError(f"unknown tokenizer family {family!r}; expected one of {FAMILIES}")
    tok = trainers_by_family[family](texts, vocab_size)
    return save_hf_tokenizer(tok, family, out_dir, model_max_length)
