"""transformers backend: a HF causal LM, bf16 on GPU / fp32 on CPU, right-padded batches.

Hidden states come from the base model (``model.base_model``), whose ``last_hidden_state`` is
``hidden_states[-1]``, the LM head's input: the LM head itself is skipped, since the head step
rebuilds logits from the stored head anyway. ``check_head`` runs the full model once on a real
batch to prove that ``hidden @ head`` equals the model's own logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .head import Head, check_reconstruction, head_from_model


class HFTeacher:
    def __init__(self, model_dir: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None):
        from transformers import AutoModelForCausalLM

        self.device = torch.device(device)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=self.dtype)
        self.model.to(self.device).eval()
        self.config = self.model.config.get_text_config()
        self.hidden_size = int(self.config.hidden_size)
        self.arch = ",".join(self.config.architectures or [type(self.model).__name__])
        self._head = head_from_model(self.model)  # refuses soft-capped architectures early

    def head(self) -> Head:
        return self._head

    def _batch(self, sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded (B, T) ids and attention mask. Right padding keeps every real token at its
        own position, so no position ids are needed; pad positions are never read."""
        T = max(len(s) for s in sequences)
        ids = torch.zeros(len(sequences), T, dtype=torch.long)
        mask = torch.zeros(len(sequences), T, dtype=torch.long)
        for i, s in enumerate(sequences):
            ids[i, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, :len(s)] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def hidden_states(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """One (n_i, D_t) float32 tensor per sequence, on ``self.device``."""
        if not sequences:
            return []
        ids, mask = self._batch(sequences)
        h = self.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False
                                  ).last_hidden_state  # (B, T, D_t)
        return [h[i, :len(s)].float() for i, s in enumerate(sequences)]

    @torch.inference_mode()
    def check_head(self, sequences: Sequence[Sequence[int]], tol: float | None = None) -> float:
        """Max |model logits - hidden_states @ head| over ``sequences`` (raises if too large)."""
        ids, mask = self._batch(sequences)
        ref = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, T, V)
        hs = self.hidden_states(sequences)
        ours = torch.cat([self._head.logits(h) for h in hs])  # (N, V)
        ref = torch.cat([ref[i, :len(s)] for i, s in enumerate(sequences)])
        if tol is None:  # bf16 logits carry ~3 significant digits; fp32 far more
            tol = 1e-4 if self.dtype == torch.float32 else 2e-2
        return check_reconstruction(ref, ours, self.arch, tol)

    def close(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
