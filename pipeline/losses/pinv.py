"""Pseudo-inverse projector init (DSKDv2 `projector_init`): start the projectors at "logit
equivalence" so that projected hidden states already give the other model's logits.

With heads H_s = W_s.T (D_s, V_s) and H_t = W_t.T (D_t, V_t) restricted to the tokens both
vocabularies share (P_s, P_t: (D, N) columns of the overlap):
    t2s: h_t @ W_t2s.T @ P_s ≈ h_t @ P_t   ⇒  W_t2s = (P_t @ pinv(P_s)).T      (D_s, D_t)
    s2t: h_s @ M @ P_t ≈ h_s @ P_s          ⇒  M = P_s @ pinv(P_t)              (D_s, D_t)
DSKDv2 rebuilds M in every forward from the current student head (`S2TPinvMap`); DSKD and
DSKD-CMA, whose s2t is a trained Linear, start it at M.T.

The overlap is the official one: vocabularies equal → every row; otherwise the token strings
both tokenizers know once "Ġ" is read as "▁" (special tokens included).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def vocab_overlap(student_tok: Any, teacher_tok: Any) -> tuple[Tensor, Tensor] | None:
    """(student ids, teacher ids) of the shared tokens, sorted by student id; None when the two
    vocabularies are identical (then every row is shared).

    The official code iterates `get_vocab()` in hash order, which only moves rounding; sorting
    makes the result reproducible.
    """
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv == tv:
        return None
    # Official: {tok.replace("Ġ", "▁"): id}; on a clash the last one in dict order wins.
    s_norm = {k.replace("Ġ", "▁"): v for k, v in sv.items()}
    t_norm = {k.replace("Ġ", "▁"): v for k, v in tv.items()}
    pairs = sorted((s_norm[k], t_norm[k]) for k in s_norm if k in t_norm)
    if not pairs:
        raise ValueError("the student and teacher vocabularies share no token: a pseudo-inverse "
                         "init needs an overlap; use --projector-init random")
    ids = torch.tensor(pairs, dtype=torch.long)
    return ids[:, 0], ids[:, 1]


def overlap_columns(student_head: Tensor, teacher_head: Tensor,
                    overlap: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
    """P_s (D_s, N), P_t (D_t, N): head columns of the shared tokens (float64), on the teacher
    head's device (the trainer builds the loss with the student still on the CPU)."""
    w_t = teacher_head.detach().double()
    w_s = student_head.detach().to(w_t.device, torch.float64)
    if overlap is None:  # same vocabulary: a padded head (Qwen) has extra rows no token reaches
        n = min(w_s.shape[0], w_t.shape[0])
        return w_s[:n].T, w_t[:n].T
    s_ids, t_ids = overlap
    for name, ids, w in (("student", s_ids, w_s), ("teacher", t_ids, w_t)):
        if int(ids.max()) >= w.shape[0]:
            raise ValueError(f"{name} tokenizer id {int(ids.max())} is past its head "
                             f"({w.shape[0]} rows): tokenizer and model do not match")
    return w_s[s_ids.to(w_s.device)].T, w_t[t_ids.to(w_t.device)].T


def t2s_pinv_weight(p_s: Tensor, p_t: Tensor) -> Tensor:
    """W_t2s = (P_t @ pinv(P_s)).T, (D_s, D_t) float64 (the official float32 pinv agrees to
    ~2e-6 of the largest entry)."""
    return (p_t @ torch.linalg.pinv(p_s)).T


def s2t_pinv_map(p_s: Tensor, p_t: Tensor) -> Tensor:
    """M = P_s @ pinv(P_t), (D_s, D_t) float64: s2t_hiddens = h_s @ M."""
    return p_s @ torch.linalg.pinv(p_t)


@torch.no_grad()
def init_linear_pinv(t2s: nn.Linear, s2t: nn.Linear, student_head: Tensor, teacher_head: Tensor,
                     overlap: tuple[Tensor, Tensor] | None) -> None:
    """DSKD / DSKD-CMA: t2s and s2t Linear layers start at the two pinv maps, bias 0."""
    p_s, p_t = overlap_columns(student_head, teacher_head, overlap)
    t2s.weight.copy_(t2s_pinv_weight(p_s, p_t))
    s2t.weight.copy_(s2t_pinv_map(p_s, p_t).T)
    for lin in (t2s, s2t):
        if lin.bias is not None:
            lin.bias.zero_()


class S2TPinvMap(nn.Module):
    """DSKDv2 s2t with `--init-s2t-projector`: M = sg(W_s).T[:, overlap] @ pinv(P_t), rebuilt in
    every forward from the CURRENT student head; pinv(P_t) is fixed (the teacher is frozen).

    Not a parameter and not saved (persistent=False): it is recomputed from the cached teacher
    head when the loss is built, also on resume.
    """

    def __init__(self, student_head: Tensor, teacher_head: Tensor,
                 overlap: tuple[Tensor, Tensor] | None) -> None:
        super().__init__()
        _, p_t = overlap_columns(student_head, teacher_head, overlap)
        student_ids = None if overlap is None else overlap[0]
        self.n_tokens = p_t.shape[1]
        self.register_buffer("teacher_head_pinv", torch.linalg.pinv(p_t).float(),
                             persistent=False)  # (N, D_t)
        self.register_buffer("student_ids", student_ids, persistent=False)

    def matrix(self, student_head: Tensor) -> Tensor:
        """M (D_s, D_t) from the student head (V_s, D_s), detached."""
        w = student_head.detach().float()
        w = w[: self.n_tokens] if self.student_ids is None else w[self.student_ids]
        return w.T @ self.teacher_head_pinv

    def forward(self, hidden: Tensor, student_head: Tensor) -> Tensor:
        return hidden.float() @ self.matrix(student_head)
