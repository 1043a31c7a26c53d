"""Tokenize one example for one model, the way the official DSKD data pipeline does.

Conventions (official ``DistillDataset``): no BOS; prompt and response are tokenized separately
with ``add_special_tokens=False``; the prompt is cut to its first ``max_prompt_len`` tokens; EOS is
appended to the response; the whole sequence is cut to ``max_len``. The model input is ``s[:-1]``
and the labels ``s[1:]`` with the first ``prompt_len - 1`` labels set to -100, so the loss covers
the response and the final EOS.

Every token keeps its character span in ``text = prompt + response``: that is what lets a cache
made with one vocabulary be aligned with a student of another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .data import Example

IGNORE_INDEX = -100


class TokenizeError(ValueError):
    """An example that cannot be tokenized within the limits (a bad row)."""


@dataclass(frozen=True)
class TokenizedExample:
    example_id: str
    text: str  # prompt + response
    input_ids: list[int]  # s = prompt_ids + response_ids + [eos], after truncation
    prompt_len: int  # number of prompt tokens in s
    offsets: list[tuple[int, int]]  # char span of each token of s in `text`; EOS → (len, len)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


def _encode(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def check_tokenizer(tokenizer: Any) -> None:
    """Offsets need a fast tokenizer; EOS ends every response."""
    if not getattr(tokenizer, "is_fast", False):
        raise TokenizeError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} is a slow (Python) tokenizer; "
            "dskd needs a fast one for character offsets. Save it with tokenizer.json "
            "(AutoTokenizer.from_pretrained(..., use_fast=True))."
        )
    if tokenizer.eos_token_id is None:
        raise TokenizeError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no EOS token; "
            "call ensure_special_tokens(tokenizer) first"
        )


def ensure_special_tokens(tokenizer: Any) -> list[str]:
    """Give a tokenizer without EOS or pad one; returns what was changed, to tell the user.

    Pad defaults to EOS (padding positions are masked everywhere, as in the official collate).
    An EOS is added as a new token only when there is none at all: the model's embedding must then
    be resized, which the caller does from ``len(tokenizer)``.
    """
    changed = []
    if tokenizer.eos_token_id is None:
        tokenizer.add_special_tokens({"eos_token": "<|endoftext|>"})
        changed.append(f"EOS token was missing; added {tokenizer.eos_token!r} "
                       f"(id {tokenizer.eos_token_id}); the model's embeddings must be resized")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        changed.append(f"pad token was missing; using EOS {tokenizer.eos_token!r} as pad")
    return changed


def tokenize_example(example: Example, tokenizer: Any, max_prompt_len: int = 256,
                     max_len: int = 512) -> TokenizedExample:
    """``Example`` → ``TokenizedExample`` for one tokenizer. Raises TokenizeError for bad rows."""
    return tokenize_text(example.id, example.prompt, example.response, tokenizer,
                         max_prompt_len, max_len)


def tokenize_text(example_id: str, prompt: str, response: str, tokenizer: Any,
                  max_prompt_len: int = 256, max_len: int = 512) -> TokenizedExample:
    """Tokenize raw prompt/response text (a student re-tokenizes a cache row's text this way)."""
    if max_len < 2 or max_prompt_len < 1:
        raise TokenizeError(f"max_len ({max_len}) must be ≥ 2 and max_prompt_len ≥ 1")
    prompt_ids, prompt_off = _encode(tokenizer, prompt)
    if not prompt_ids:
        raise TokenizeError("the prompt tokenizes to nothing")
    prompt_ids, prompt_off = prompt_ids[:max_prompt_len], prompt_off[:max_prompt_len]
    resp_ids, resp_off = _encode(tokenizer, response)
    shift = len(prompt)
    resp_off = [(a + shift, b + shift) for a, b in resp_off]
    text = prompt + response
    eos = tokenizer.eos_token_id
    ids = (prompt_ids + resp_ids + [eos])[:max_len]
    offsets = (prompt_off + resp_off + [(len(text), len(text))])[:max_len]
    prompt_len = len(prompt_ids)
    if len(ids) - prompt_len < 1:
        raise TokenizeError(
            f"the prompt ({prompt_len} tokens) leaves no room for the response within "
            f"--max-len {max_len}; raise --max-len or lower --max-prompt-len"
        )
    return TokenizedExample(example_id, text, ids, prompt_len, offsets)


def model_inputs(ex: TokenizedExample) -> tuple[list[int], list[int]]:
    """(input_ids, labels): ``s[:-1]`` and ``s[1:]`` with prompt labels masked (already shifted)."""
    s = ex.input_ids
    labels = list(s[1:])
    for k in range(min(ex.prompt_len - 1, len(labels))):
        labels[k] = IGNORE_INDEX
    return list(s[:-1]), labels


def response_mask(ex: TokenizedExample) -> list[bool]:
    """Per model-input position k (n-1 of them): is label k supervised?"""
    _, labels = model_inputs(ex)
    return [lab != IGNORE_INDEX for lab in labels]


def tokenize_all(examples: list[Example], tokenizer: Any, max_prompt_len: int, max_len: int,
                 bad: Any) -> list[TokenizedExample]:
    """Tokenize a dataset under the bad-row policy (``data.BadRows``): raise or skip-and-record."""
    check_tokenizer(tokenizer)
    out = []
    for ex in examples:
        try:
            out.append(tokenize_example(ex, tokenizer, max_prompt_len, max_len))
        except TokenizeError as e:
            bad.handle(ex.row, str(e), ex.prompt[:200])
    return out
