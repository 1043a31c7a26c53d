"""Exact metrics against the truth, for data that records p(reference | prompt) (`probs`).

For a prompt x with references r_1..r_m, true probabilities p_i and a model q:

* excess KL  KL(p ‖ q) = Σ_i p_i [log p_i − log q(r_i ⊕ eos | x)]. Exact, not sampled: forward KL
  needs q only on p's support, and the references are that support. 0 iff q matches the truth on
  it; the floor no model can beat is 0, whatever the task's entropy.
* validity   Σ_i q(r_i ⊕ eos | x): the probability that one sample at T = 1 is a valid answer
  (the expected exact-match rate, without sampling noise).
* excess NLL −log q(y ⊕ eos | x) + log p(y | x) for the row's own response y: held-out NLL minus
  the true entropy, a one-sample estimate of the excess KL (what a user without `probs` sees).

Per response (nats; comparable across vocabularies) and per response token of one fixed
reference tokenizer (the expected label tokens E_p[len(r ⊕ eos)] under it), so a model with a
finer vocabulary is not flattered by dividing by more tokens. q(r ⊕ eos | x) is the product of
the model's token probabilities, tokenized exactly as training does (`tokenize.tokenize_text`:
prompt and response apart, no BOS, EOS appended, prompt cut to max_prompt_len). ROUGE-L cannot
see any of this: it takes the best match over the references, so it scores validity, not how
the probability is spread over the valid answers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .data import Example
from .tokenize import TokenizeError, tokenize_text

METRICS = ("excess_kl", "excess_kl_per_token", "validity", "excess_nll", "excess_nll_per_token")


def row_scores(probs: Sequence[float], logq: Sequence[float],
               response_index: int = 0) -> dict[str, float]:
    """One prompt's excess KL, validity and excess NLL from the true probs and log q per reference."""
    if len(probs) != len(logq):
        raise ValueError(f"{len(probs)} probabilities but {len(logq)} model log-probabilities")
    kl = sum(p * (math.log(p) - lq) for p, lq in zip(probs, logq) if p > 0)
    return {
        "excess_kl": kl,
        "validity": sum(math.exp(lq) for lq in logq),
        "excess_nll": -logq[response_index] + math.log(probs[response_index]),
        "entropy": -sum(p * math.log(p) for p in probs if p > 0),
    }


@torch.no_grad()
def sequence_logprobs(model: torch.nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]],
                      *, max_prompt_len: int = 256, max_len: int = 512,
                      batch_size: int = 64) -> list[float]:
    """log q(response ⊕ eos | prompt) for each (prompt, response), training's tokenization.

    Raises when a response does not fit in max_len: a cut response has no exact probability.
    """
    seqs = []
    for prompt, response in pairs:
        t = tokenize_text("", prompt, response, tokenizer, max_prompt_len, max_len)
        full = len(tokenizer(response, add_special_tokens=False)["input_ids"]) + 1
        if t.num_tokens - t.prompt_len != full:
            raise TokenizeError(f"response {response[:40]!r} is cut by max_len {max_len}; "
                                "exact metrics need whole responses (raise --max-len)")
        seqs.append((t.input_ids, t.prompt_len))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[float] = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        n = max(len(ids) for ids, _ in chunk) - 1
        x = torch.full((len(chunk), n), pad, dtype=torch.long)
        y = torch.full((len(chunk), n), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), n), dtype=torch.long)
        for b, (ids, plen) in enumerate(chunk):
            k = len(ids) - 1
            x[b, :k] = torch.tensor(ids[:-1])
            mask[b, :k] = 1
            y[b, plen - 1:k] = torch.tensor(ids[plen:])  # labels of the response and its eos
        logits = model(input_ids=x.to(device), attention_mask=mask.to(device)).logits.float()
        logp = F.log_softmax(logits, dim=-1)  # (B, n, V)
        keep = y.to(device) != -100
        tok_lp = logp.gather(-1, y.clamp_min(0).to(device)[..., None])[..., 0] * keep
        out += tok_lp.sum(-1).tolist()
    return out


def truth_metrics(model: torch.nn.Module, tokenizer: Any, examples: Sequence[Example], *,
                  reference_tokenizer: Any = None, max_prompt_len: int = 256, max_len: int = 512,
                  batch_size: int = 64) -> dict[str, Any] | None:
    """Excess KL / validity / excess NLL of `model` on the examples that carry `probs`.

    Means over rows (a prompt counts as often as it occurs). Per-token numbers divide by the
    expected label tokens under `reference_tokenizer` (default: the model's own, which is then
    not comparable across vocabularies). None when no example has probs.
    """
    rows = [e for e in examples if e.probs is not None]
    if not rows:
        return None
    ref_tok = reference_tokenizer or tokenizer
    pairs = list(dict.fromkeys((e.prompt, r) for e in rows for r in e.references))
    logq = dict(zip(pairs, sequence_logprobs(model, tokenizer, pairs, max_prompt_len=max_prompt_len,
                                             max_len=max_len, batch_size=batch_size)))
    refs = list(dict.fromkeys(r for e in rows for r in e.references))
    ref_lens = {r: len(ids) + 1 for r, ids in zip(
        refs, ref_tok(refs, add_special_tokens=False)["input_ids"])}  # + eos
    sums = {"excess_kl": 0.0, "validity": 0.0, "excess_nll": 0.0, "entropy": 0.0}
    exp_tokens = resp_tokens = 0.0
    n_nll = 0  # rows whose response is one of its references (else no log p(y | x))
    for e in rows:
        i = e.references.index(e.response) if e.response in e.references else None
        got = row_scores(e.probs, [logq[(e.prompt, r)] for r in e.references], i or 0)
        for k in ("excess_kl", "validity", "entropy"):
            sums[k] += got[k]
        exp_tokens += sum(p * ref_lens[r] for p, r in zip(e.probs, e.references))
        if i is not None:
            sums["excess_nll"] += got["excess_nll"]
            resp_tokens += ref_lens[e.response]
            n_nll += 1
    n = len(rows)
    return {
        "excess_kl": sums["excess_kl"] / n,
        "excess_kl_per_token": sums["excess_kl"] / exp_tokens,
        "validity": sums["validity"] / n,
        "excess_nll": sums["excess_nll"] / n_nll if n_nll else None,
        "excess_nll_per_token": sums["excess_nll"] / resp_tokens if n_nll else None,
        "true_entropy": sums["entropy"] / n,
        "examples": n,
        "reference_tokenizer": str(getattr(ref_tok, "name_or_path", "") or ""),
    }
