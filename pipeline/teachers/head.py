"""The head step: hidden states → logits → top-k, log-sum-exp, tail mass, next-token log-prob.

Both backends hand us last-layer hidden states (the LM head's input); the logits are rebuilt here
from the stored head, on the same device, so the cache's sparse fields and its ``hidden @ head``
always agree. Architectures that transform logits in a way the cache does not record (soft-capping)
are refused; a constant logit scale (Cohere, Granite) is recorded as ``logit_scale``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..cache.sampled import draw


class UnsupportedTeacherError(ValueError):
    """A teacher whose logits the cache could not reproduce from hidden states."""


@dataclass
class Head:
    """logits = (hidden @ weight.T + bias) * logit_scale."""

    weight: torch.Tensor  # (V, D_t), in the model's dtype
    bias: torch.Tensor | None = None  # (V,)
    logit_scale: float = 1.0
    embed: torch.Tensor | None = None  # (V_in, D_t) input embeddings; None when tied to weight

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(T, D_t) → (T, V) float32. The matmul runs in the weight's dtype, like the model's own
        LM head, so a bf16 teacher's logits match its forward bit for bit."""
        z = F.linear(hidden.to(self.weight.dtype), self.weight, self.bias).float()
        return z * self.logit_scale if self.logit_scale != 1.0 else z


@dataclass
class HeadOutputs:
    topk_ids: torch.Tensor  # (T, k) int32, by logit descending
    topk_logprobs: torch.Tensor  # (T, k) float32
    lse: torch.Tensor  # (T,) float32, log-sum-exp of the logits
    tail_logprob: torch.Tensor  # (T,) float32, log of the mass outside the top-k (-inf if none)
    next_logprob: torch.Tensor  # (T,) float32, log p(observed next token)
    sampled_ids: torch.Tensor | None = None  # (T, N) int32 distinct drawn ids (sampled targets)
    sampled_counts: torch.Tensor | None = None  # (T, N) int32 their counts, 0 = padding


def head_step(hidden: torch.Tensor, next_ids: torch.Tensor, head: Head, top_k: int,
              max_logit_elems: int = 1 << 26, sampled: int = 0, sample_temperature: float = 1.0,
              generator: torch.Generator | None = None) -> HeadOutputs:
    """Sparse teacher signal for T token rows at temperature 1, computed in row chunks so the
    (rows, V) float32 logits stay under ``max_logit_elems`` elements (256 MiB by default).
    ``sampled`` > 0 also draws that many ids per row from softmax(logits / sample_temperature)."""
    hidden = hidden.to(head.device)
    next_ids = next_ids.to(head.device, torch.long)
    V = head.vocab_size
    k = min(top_k, V)
    step = max(1, max_logit_elems // V)
    parts: list[HeadOutputs] = []
    for a in range(0, hidden.shape[0], step):
        z = head.logits(hidden[a:a + step])  # (t, V), a fresh tensor we may overwrite
        nxt_logit = z.gather(1, next_ids[a:a + step, None])[:, 0]  # (t,)
        if k > 0:
            vals, ids = z.topk(k, dim=-1, sorted=True)  # (t, k)
        else:
            ids = torch.zeros(z.shape[0], 0, dtype=torch.long, device=z.device)
            vals = z.new_zeros(z.shape[0], 0)
        # One exp pass serves both the log-sum-exp and the tail mass: p = exp(z - max), in place.
        m = z.amax(dim=-1, keepdim=True)  # (t, 1)
        p = z.sub_(m).exp_()  # (t, V)
        if sampled:  # before the tail step below overwrites p
            w = p if sample_temperature == 1.0 else p.pow(1.0 / sample_temperature)
            drawn = draw(w, sampled, generator)
        total = p.sum(dim=-1)  # (t,)
        lse = m[:, 0] + total.log()
        nxt = nxt_logit - lse
        logp = vals - lse[:, None]
        if 0 < k < V:
            # the mass outside the top-k, summed directly (1 - Σ top-k would cancel when tiny)
            tail = p.scatter_(1, ids, 0.0).sum(dim=-1).log() - total.log()
        elif k >= V:
            tail = torch.full_like(lse, float("-inf"))
        else:
            tail = torch.zeros_like(lse)  # all mass is outside an empty top-k: log 1
        parts.append(HeadOutputs(ids.to(torch.int32), logp, lse, tail, nxt,
                                 *(drawn if sampled else (None, None))))
    if not parts:
        e = hidden.new_zeros(0, dtype=torch.float32)
        none = torch.zeros(0, sampled, dtype=torch.int32, device=head.device) if sampled else None
        return HeadOutputs(torch.zeros(0, k, dtype=torch.int32, device=head.device),
                           e.new_zeros(0, k), e, e.clone(), e.clone(), none,
                           None if none is None else none.clone())
    names = ["topk_ids", "topk_logprobs", "lse", "tail_logprob", "next_logprob"]
    names += ["sampled_ids", "sampled_counts"] if sampled else []
    return HeadOutputs(*(torch.cat([getattr(p, f) for p in parts]) for f in names))


# --------------------------------------------------------------------------- architectures

# Config keys that transform logits after the LM head in a way the cache does not record.
_REFUSED = {
    "final_logit_softcapping": "soft-caps its logits (cap * tanh(logits / cap))",
}
# Config keys that scale logits by a constant: recorded as Head.logit_scale.
_SCALES = {
    "logit_scale": lambda v: float(v),  # Cohere: logits * logit_scale
    "logits_scaling": lambda v: 1.0 / float(v),  # Granite: logits / logits_scaling
}


def check_architecture(config: Any) -> float:
    """Refuse configs whose logits the cache cannot rebuild; return the constant logit scale."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    arch = ",".join(getattr(cfg, "architectures", None) or [getattr(cfg, "model_type", "?")])
    for key, what in _REFUSED.items():
        if getattr(cfg, key, None) not in (None, 0, 0.0):
            raise UnsupportedTeacherError(
                f"teacher {arch} {what} ({key}={getattr(cfg, key)}); the cache stores hidden "
                "states and the LM head, from which such logits cannot be rebuilt exactly, so "
                "dskd refuses rather than write a silently wrong cache")
    scale = 1.0
    for key, fn in _SCALES.items():
        if getattr(cfg, key, None) not in (None, 1, 1.0):
            scale *= fn(getattr(cfg, key))
    return scale


def head_from_model(model: Any) -> Head:
    """The head of a loaded HF causal LM (weights stay where the model is)."""
    scale = check_architecture(model.config)
    out = model.get_output_embeddings()
    if out is None or not hasattr(out, "weight"):
        raise UnsupportedTeacherError(f"{type(model).__name__} has no output embedding (LM head)")
    emb = model.get_input_embeddings()
    tied = emb is not None and emb.weight.data_ptr() == out.weight.data_ptr()
    return Head(out.weight.detach(), None if getattr(out, "bias", None) is None else out.bias.detach(),
                scale, None if tied or emb is None else emb.weight.detach())


def check_reconstruction(ref_logits: torch.Tensor, rebuilt: torch.Tensor, arch: str,
                         tol: float) -> float:
    """Max |model logits - hidden @ head| over a real batch, relative to the logit scale.

    Raises UnsupportedTeacherError above ``tol``: the model does something to its logits (or to
    the head input) that the cache would not record."""
    ref, ours = ref_logits.float(), rebuilt.float()
    err = (ref - ours).abs().max().item() if ref.numel() else 0.0
    scale = max(1.0, ref.abs().max().item() if ref.numel() else 1.0)
    if not err <= tol * scale:  # also catches NaN
        raise UnsupportedTeacherError(
            f"hidden @ head does not reproduce the logits of teacher {arch}: max abs error {err:.4g} "
            f"(logits up to {scale:.4g}, tolerance {tol:g} relative). The architecture transforms "
            "its logits or its final hidden state in a way the cache does not record; refusing to "
            "write a silently wrong cache")
    return err


def head_from_checkpoint(model_dir: str | Path, device: str | torch.device = "cpu",
                         dtype: torch.dtype | None = None) -> Head:
    """The head read straight from a checkpoint's safetensors, without loading the whole model
    (the vLLM backend's case: the model lives inside vLLM). Parameter names come from the model
    class built on the meta device; tied heads fall back to the input embedding."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = Path(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    scale = check_architecture(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names: dict[int, list[str]] = {}  # a tied parameter has several names; a file keeps one
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    out = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    tied = bool(getattr(config.get_text_config(), "tie_word_embeddings", False))
    files = _weight_files(model_dir)

    def load(param: torch.Tensor) -> torch.Tensor | None:
        # Checkpoint keys may carry or lack the base-model prefix ("model.embed_tokens.weight").
        keys = [k for name in names[id(param)] for k in sorted(
            (k for k in files if k == name or k.endswith("." + name) or name.endswith("." + k)),
            key=lambda k: k != name)]
        if not keys:
            return None
        with safe_open(str(files[keys[0]]), framework="pt", device=str(device)) as sf:
            return sf.get_tensor(keys[0])

    embed = load(emb.weight)
    weight = None if tied else load(out.weight)
    if weight is None:
        if embed is None:
            raise UnsupportedTeacherError(f"{model_dir}: found neither the LM head nor the input "
                                          "embedding in the checkpoint's safetensors")
        weight, embed = embed, None
    bias = load(out.bias) if getattr(out, "bias", None) is not None else None
    cast = (lambda t: t if t is None or dtype is None else t.to(dtype))
    return Head(cast(weight), cast(bias), scale, cast(embed))


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name → the safetensors file holding it."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        wm = json.loads(index.read_text())["weight_map"]
        return {k: model_dir / v for k, v in wm.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UnsupportedTeacherError(f"{model_dir}: no *.safetensors weights to read the head from")
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            out.update(dict.fromkeys(sf.keys(), f))
    return out
