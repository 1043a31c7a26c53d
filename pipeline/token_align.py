"""Exact Token Alignment (DSKDv2): which student token and which teacher token are "the same".

Two rules, both over the label tokens (response + EOS) of one example:

* `official` — DSKDv2's `align_sequences`, kept with its behaviour: token strings with every
  "Ġ"/"▁" removed are compared while the concatenated prefixes are equal. Once the two texts
  differ in content (a newline is "Ċ" in byte-level BPE and "<0x0A>" in SentencePiece; an accent
  is "Ã©" vs "é"), the prefixes never agree again and nothing after that point aligns.
* `offsets` — tokens that cover the same characters of the shared text (the spans the cache and
  the student tokenizer record), whitespace trimmed. A difference stays local: alignment
  resumes at the next token boundary both sides share.

This runs in the DataLoader workers (plain Python, no torch), one example at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

AlignmentRule = Literal["official", "offsets"]
ALIGNMENTS: tuple[str, ...] = ("official", "offsets")


def strip_markers(token: str) -> str:
    """Official: remove every "▁" and "Ġ", also inside a token."""
    return token.replace("▁", "").replace("Ġ", "")


def align_official(teacher_tokens: Sequence[str], student_tokens: Sequence[str],
                   teacher_eos: str, student_eos: str) -> tuple[list[int], list[int]]:
    """The official `align_sequences`: (teacher indices, student indices) of aligned pairs.

    Lengths are Python string lengths; the two EOS tokens match each other whatever their text.
    """
    T = [strip_markers(t) for t in teacher_tokens]
    S = [strip_markers(s) for s in student_tokens]
    i = j = 0
    h_t = h_s = ""
    ti: list[int] = []
    si: list[int] = []
    while i < len(T) and j < len(S):
        if h_t == h_s and (T[i] == S[j] or (T[i] == teacher_eos and S[j] == student_eos)):
            h_t += T[i]
            h_s += S[j]
            ti.append(i)
            si.append(j)
            i += 1
            j += 1
        elif len(h_t) > len(h_s):
            h_s += S[j]
            j += 1
        elif len(h_t) < len(h_s):
            h_t += T[i]
            i += 1
        else:  # equal length, different content: both move on
            h_t += T[i]
            h_s += S[j]
            i += 1
            j += 1
    return ti, si


def _span_keys(spans: Sequence[tuple[int, int]], text: str) -> list[tuple[int, int] | None]:
    """Per token: its character span with surrounding whitespace trimmed; a whitespace-only or
    empty token (EOS is (len, len)) keeps its raw span. None for a span shared by several tokens
    of the same side (a character split into byte tokens): those cannot be matched one to one."""
    keys: list[tuple[int, int]] = []
    for a, b in spans:
        a, b = int(a), int(b)
        piece = text[a:b]
        lead = len(piece) - len(piece.lstrip())
        trail = len(piece) - len(piece.rstrip())
        keys.append((a + lead, b - trail) if lead + trail < len(piece) else (a, b))
    seen: dict[tuple[int, int], int] = {}
    for k in keys:
        seen[k] = seen.get(k, 0) + 1
    return [k if seen[k] == 1 else None for k in keys]


def align_offsets(teacher_spans: Sequence[tuple[int, int]],
                  student_spans: Sequence[tuple[int, int]], text: str
                  ) -> tuple[list[int], list[int]]:
    """Pairs of tokens that cover the same characters of `text` (after trimming whitespace)."""
    t_keys = _span_keys(teacher_spans, text)
    by_key = {k: i for i, k in enumerate(t_keys) if k is not None}
    ti: list[int] = []
    si: list[int] = []
    for j, k in enumerate(_span_keys(student_spans, text)):
        i = by_key.get(k) if k is not None else None
        if i is not None and (not ti or i > ti[-1]):
            ti.append(i)
            si.append(j)
    return ti, si


@dataclass
class Aligner:
    """Aligns the label tokens of a student and a teacher sequence of one example.

    For `s = prompt + response + [eos]` with p prompt tokens, label row k predicts s[k+1]: the
    label tokens are s[p:] and the first label row is p - 1 (`label_tokens`). Returns absolute
    (teacher rows, student rows) of the aligned pairs.
    """

    student_tokenizer: Any
    teacher_tokenizer: Any
    rule: AlignmentRule = "official"

    def __post_init__(self) -> None:
        if self.rule not in ALIGNMENTS:
            raise ValueError(f"alignment must be one of {', '.join(ALIGNMENTS)}, got {self.rule!r}")
        # official: EOS strings of the tokenizers (the ids the sequences end with)
        self.student_eos = self.student_tokenizer.eos_token
        self.teacher_eos = self.teacher_tokenizer.eos_token

    def __call__(self, teacher: LabelTokens, student: LabelTokens, text: str = ""
                 ) -> tuple[list[int], list[int]]:
        if self.rule == "official":
            ti, si = align_official(
                self.teacher_tokenizer.convert_ids_to_tokens([int(x) for x in teacher.ids]),
                self.student_tokenizer.convert_ids_to_tokens([int(x) for x in student.ids]),
                self.teacher_eos, self.student_eos)
        else:
            if teacher.spans is None or student.spans is None:
                raise ValueError("alignment 'offsets' needs the character spans of both sides")
            ti, si = align_offsets(teacher.spans, student.spans, text)
        return [teacher.first_row + i for i in ti], [student.first_row + j for j in si]


@dataclass
class LabelTokens:
    """The label tokens of one sequence: ids, first label row, character spans (or None)."""

    ids: Sequence[int]
    first_row: int
    spans: Sequence[tuple[int, int]] | None = None


def label_tokens(ids: Sequence[int], prompt_len: int,
                 offsets: Sequence[Sequence[int]] | None = None) -> LabelTokens:
    """s = prompt + response + [eos] → its label tokens s[prompt_len:] (first row p - 1)."""
    p = int(prompt_len)
    spans = None if offsets is None else [(int(a), int(b)) for a, b in offsets[p:]]
    return LabelTokens([int(x) for x in ids[p:]], p - 1, spans)


def prediction_map(teacher_tokenizer: Any, student_tokenizer: Any, teacher_vocab_size: int,
                   teacher_eos_id: int | None = None, student_eos_id: int | None = None
                   ) -> list[int]:
    """Teacher id → student id the official way, for every teacher head row; -1 = dropped.

    Exact token string (`convert_ids_to_tokens` → `convert_tokens_to_ids`, no Ġ/▁ folding):
    an unknown string becomes the student's unk id when it has one (GPT-2: <|endoftext|>,
    LLaMA/Mistral: <unk>), and is dropped when it has none (Qwen2). Head rows past the
    tokenizer have no string and are dropped. The teacher EOS maps to the student EOS.
    """
    t_eos = teacher_tokenizer.eos_token_id if teacher_eos_id is None else teacher_eos_id
    s_eos = student_tokenizer.eos_token_id if student_eos_id is None else student_eos_id
    n_tok = len(teacher_tokenizer)
    strings = teacher_tokenizer.convert_ids_to_tokens(list(range(min(n_tok, teacher_vocab_size))))
    vocab = student_tokenizer.get_vocab()
    unk = student_tokenizer.unk_token_id
    fallback = -1 if unk is None else int(unk)
    out = [fallback if s is None else vocab.get(s, fallback) for s in strings]
    out += [-1] * (teacher_vocab_size - len(out))
    if t_eos is not None and int(t_eos) < teacher_vocab_size:
        out[int(t_eos)] = int(s_eos)
    return out
