"""The teacher signal of a micro-batch, from the cache or from a live teacher, as one type.

`exact`: full teacher logits = hidden × head (+ bias), rebuilt from the cached hidden states and
the cached head. They are materialised when (B, T_t, V_t) fits `dense_max_bytes`, otherwise the
loss gets hidden + head and applies the head chunk by chunk (same numbers, bounded memory).
`topk`: the cached top-k log-probs + tail mass only (cheap; no V_t-sized tensor). `sampled`: the
cached RS-KD draws (distinct ids + counts), an unbiased estimate of the teacher for forward KL.
Hidden states ride along whenever the loss needs them (DSKD uses them in every mode).

Online mode runs the teacher forward here and then builds the signal with the *same* code from
its hidden states, which is what makes cache-vs-online a like-for-like comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..cache.reader import load_head
from ..cache.spec import EMBED_WEIGHT, HEAD_BIAS, HEAD_WEIGHT
from ..losses.common import head_logits
from ..losses.signals import TeacherSignal

DEFAULT_DENSE_MAX_BYTES = 1 << 30


@dataclass
class TeacherHead:
    weight: Tensor  # (V_t, D_t), logit scale folded in
    bias: Tensor | None = None  # (V_t,)
    embed: Tensor | None = None  # (V_in, D_t) input embeddings (CMA keys)

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]


def cache_head(cache_dir: str | Path, manifest: dict[str, Any], device: torch.device) -> TeacherHead:
    """The cached head with the manifest's logit scale folded into weight and bias."""
    t = load_head(cache_dir)
    scale = float((manifest.get("head") or {}).get("logit_scale", 1.0) or 1.0)
    w = t[HEAD_WEIGHT].float()
    b = t[HEAD_BIAS].float() * scale if HEAD_BIAS in t else None
    e = t[EMBED_WEIGHT].float() if EMBED_WEIGHT in t else w  # not stored when tied to the head
    return TeacherHead((w * scale).to(device), None if b is None else b.to(device), e.to(device))


def align_head_vocab(head: TeacherHead, student_vocab: int, tokenizer_len: int) -> tuple[TeacherHead, str | None]:
    """Same-vocabulary KD with embeddings padded past the tokenizer (Qwen: 151936 or 152064 rows for
    151646 tokens). Ids ≥ ``tokenizer_len`` are never produced, so the teacher head is cut or
    extended to the student's logit width; extra rows get logit -inf (probability 0), which the
    divergences skip. Returns the head and a note for the user (None when nothing changed)."""
    v_t = head.vocab_size
    if v_t == student_vocab:
        return head, None
    if min(v_t, student_vocab) < tokenizer_len:
        raise ValueError(f"teacher head has {v_t} rows and the student {student_vocab} logits, but "
                         f"the tokenizer has {tokenizer_len} tokens: these are not the same "
                         "vocabulary; use --method dskd-cma, uld or mined")
    if v_t > student_vocab:
        w, b = head.weight[:student_vocab], None if head.bias is None else head.bias[:student_vocab]
    else:
        extra = student_vocab - v_t
        w = torch.cat([head.weight, head.weight.new_zeros(extra, head.weight.shape[1])])
        b0 = head.bias if head.bias is not None else head.weight.new_zeros(v_t)
        b = torch.cat([b0, b0.new_full((extra,), float("-inf"))])
    note = (f"teacher head has {v_t} rows, the student {student_vocab} logits (tokenizer: "
            f"{tokenizer_len}); padding rows past the tokenizer are {'cut' if v_t > student_vocab else 'given probability 0'}")
    return TeacherHead(w, b, head.embed), note


@torch.no_grad()
def teacher_forward(teacher: nn.Module, t: dict[str, Tensor]) -> Tensor:
    """Live teacher's last hidden state (B, T_t, D_t) float32 = input of its LM head.

    The same call as the cache's HF backend (base model, right padding), so a live teacher and
    the cache it would write see identical hidden states. Padded rows are set to 0, as the cache
    loader pads them: no loss reads them, but CMA's official std runs over the whole padded
    tensor, so they must hold the same values in both paths.
    """
    out = teacher.base_model(input_ids=t["teacher_input_ids"],
                             attention_mask=t["teacher_attention_mask"],
                             position_ids=t["teacher_position_ids"], use_cache=False)
    real = t["teacher_attention_mask"].bool().unsqueeze(-1)  # (B, T_t, 1)
    return out.last_hidden_state.float().masked_fill(~real, 0.0)


def round_hidden(h: Tensor, dtype: str) -> Tensor:
    """Round live hidden states the way a cache of that dtype stores them (fp32 = unchanged)."""
    if dtype == "fp32":
        return h
    return h.to({"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]).float()


def topk_from_hidden(hidden: Tensor, labels: Tensor, head: TeacherHead, k: int) -> dict[str, Tensor]:
    """Top-k log-probs + tail of live logits (online `topk`), with cache-teacher's own head step."""
    from ..teachers.head import Head, head_step

    B, T, D = hidden.shape
    out = head_step(hidden.reshape(-1, D), labels.clamp(min=0).reshape(-1),
                    Head(head.weight, head.bias), k)
    return {"teacher_topk_ids": out.topk_ids.long().reshape(B, T, -1),
            "teacher_topk_logprobs": out.topk_logprobs.reshape(B, T, -1),
            "teacher_tail_logprob": out.tail_logprob.reshape(B, T)}


def build_signal(t: dict[str, Tensor], head: TeacherHead, *, mode: str, needs_hidden: bool,
                 needs_embed: bool, dense_max_bytes: int = DEFAULT_DENSE_MAX_BYTES,
                 sample_temperature: float | None = None) -> TeacherSignal:
    """TeacherSignal for one micro-batch (tensors already on the device)."""
    hidden = t.get("teacher_hidden")
    sig = TeacherSignal(labels=t["teacher_labels"], input_ids=t["teacher_input_ids"],
                        vocab_size=head.vocab_size, label_index=t.get("teacher_label_index"),
                        embed_weight=head.embed if needs_embed else None)
    if "align_teacher" in t:  # dskd-eta: pairs made by the batch builder
        sig.alignment = (t["align_teacher"], t["align_student"])
    if mode == "exact" or needs_hidden:
        if hidden is None:
            raise ValueError("the teacher signal needs hidden states, but the batch has none")
        sig.hidden, sig.head_weight, sig.head_bias = hidden, head.weight, head.bias
    if mode == "exact":
        B, T, V = hidden.shape[0], hidden.shape[1], head.vocab_size
        if B * T * V * 4 <= dense_max_bytes:  # fits: materialise once, the loss reuses it
            sig.logits = head_logits(hidden, head.weight, head.bias)
    elif mode == "sampled":
        sig.sampled_ids = t["teacher_sampled_ids"]
        sig.sampled_counts = t["teacher_sampled_counts"]
        sig.sample_temperature = sample_temperature
    else:
        sig.topk_ids = t["teacher_topk_ids"]
        sig.topk_logprobs = t["teacher_topk_logprobs"]
        sig.tail_logprob = t.get("teacher_tail_logprob")
    return sig
