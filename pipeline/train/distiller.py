"""Student + loss (with its projectors) as one module: what DDP / FSDP2 wrap and the loop calls.

Wrapping both is what makes DDP all-reduce the projector gradients too (the official code wraps
its `Distiller` for the same reason), and under FSDP2 it keeps the student's head and embedding
un-sharded while the loss reads them inside this forward.

Precision: only the student forward runs under the caller's autocast (bf16 on GPU). The loss runs
with autocast off on float32 inputs: autocast would otherwise cast `hidden @ head` of the teacher
to bf16 even for float32 tensors (on the toy teacher 4x the KL of bf16 hidden-state storage;
benchmarks/teacher_precision.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..losses.signals import DistillLoss, LossOutput, StudentBatch, TeacherSignal
from .models import hf_model


def head_is_plain(student: nn.Module) -> bool:
    """True when logits = hidden @ W.T (+ b): then the loss can apply the head chunk by chunk."""
    cfg = hf_model(student).config
    return all(getattr(cfg, a, None) in (None, 1.0) for a in
               ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"))


class Distiller(nn.Module):
    def __init__(self, student: nn.Module, loss: DistillLoss, lazy_logits: bool | None = None):
        super().__init__()
        self.student = student
        self.loss = loss
        # Lazy logits: run the decoder only and hand the loss hidden + head, so the (B, T, V_s)
        # student logits exist one chunk at a time (checkpointed) instead of all at once.
        self.lazy_logits = head_is_plain(student) if lazy_logits is None else lazy_logits

    def student_batch(self, t: dict[str, Tensor]) -> StudentBatch:
        model = hf_model(self.student)
        inputs = {"input_ids": t["input_ids"], "attention_mask": t["attention_mask"],
                      "position_ids": t["position_ids"], "use_cache": False}
        head = model.get_output_embeddings()
        # label_index / aligned_rows come precomputed from the loader workers (see sources.py)
        sb = StudentBatch(labels=t["labels"], input_ids=t["input_ids"],
                          label_index=t.get("label_index"), aligned_rows=t.get("aligned_rows"))
        if self.lazy_logits:
            sb.hidden = model.get_decoder()(**inputs).last_hidden_state  # (B, T_s, D_s)
            sb.lm_head_weight = head.weight
            sb.lm_head_bias = getattr(head, "bias", None)
        else:
            out = self.student(**inputs, output_hidden_states=self.loss.needs_student_hidden)
            sb.logits = out.logits  # (B, T_s, V_s)
            if self.loss.needs_student_hidden:
                sb.hidden = out.hidden_states[-1]
                sb.lm_head_weight = head.weight
                sb.lm_head_bias = getattr(head, "bias", None)
        if self.loss.needs_teacher_embeddings:  # CMA queries use the student's embeddings too
            sb.embed_weight = model.get_input_embeddings().weight
        return sb

    def forward(self, t: dict[str, Any], teacher: TeacherSignal | None,
                batch_denom: float | Tensor, loss: DistillLoss | None = None) -> LossOutput:
        """`loss` overrides the training loss (validation CE without a teacher signal)."""
        sb = self.student_batch(t)  # under the caller's autocast, if any
        with autocast_off(t["labels"].device):
            for name in ("logits", "hidden"):  # bf16 activations -> float32 (differentiable)
                x = getattr(sb, name)
                if x is not None and x.is_floating_point() and x.dtype != torch.float32:
                    setattr(sb, name, x.float())
            return (loss or self.loss)(sb, teacher, batch_denom)


def autocast_off(device: torch.device) -> torch.autocast:
    """A region of exact float32 math inside an autocast one (teacher signal, losses)."""
    return torch.autocast(device.type, enabled=False)
