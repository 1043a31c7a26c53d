"""Eval metrics: ROUGE-L and exact match on decoded text, seed aggregation, and teacher-fidelity math.

Text metrics follow the DSKD paper: ROUGE-L F-measure from `rouge-score` with the Porter stemmer,
max over an example's references, mean over examples x100, computed per seed; the table number is
mean ± std over seeds. Fidelity functions are pure tensor math (token sums, so callers can pool
them token-weighted over any number of examples); `stages/evaluate.py` feeds them from the cache.
"""

from __future__ import annotations

import itertools
import math
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer


@lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    # Built once: constructing the stemmer-backed scorer is the slow part of scoring short texts.
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure in [0, 1], max over `references` (the paper's multi-reference rule)."""
    if not references:
        raise ValueError("rouge_l needs at least one reference")
    scorer = _scorer()
    # rouge-score's signature is score(target, prediction).
    return max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD-style normalization: lowercase, drop punctuation and articles, collapse whitespace."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 if the normalized prediction equals any normalized reference, else 0.0."""
    if not references:
        raise ValueError("exact_match needs at least one reference")
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(ref) for ref in references))


def score_texts(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus scores x100 for one (model, eval set, seed): {"rougeL": .., "exact_match": ..}."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("cannot score an empty set of predictions")
    rl = [rouge_l(p, r) for p, r in zip(predictions, references)]
    em = [exact_match(p, r) for p, r in zip(predictions, references)]
    return {"rougeL": 100.0 * sum(rl) / len(rl), "exact_match": 100.0 * sum(em) / len(em)}


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and population std (ddof=0, numpy's default); one value gives std 0."""
    vals = list(values)
    if not vals:
        raise ValueError("mean_std of no values")
    mean = sum(vals) / len(vals)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))


def summarize_seeds(per_seed: Mapping[int, float]) -> dict:
    """{"per_seed": {seed: x}, "mean": m, "std": s}: the shape every number in results.json takes."""
    mean, std = mean_std(per_seed.values())
    return {"per_seed": {str(k): v for k, v in per_seed.items()}, "mean": mean, "std": std}


# --------------------------------------------------------------------------- fidelity (pure math)


def token_fidelity(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> dict[str, float]:
    """Summed KL(teacher ‖ student) and top-1 agreements over T positions (same vocabulary).

    teacher_logits, student_logits: (T, V) at the same positions (rows already restricted to the
    positions to score). Returns sums, not means, so callers pool token-weighted across examples.
    Callers slice both to the shared vocabulary first (models often pad V past len(tokenizer)).
    """
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher logits {tuple(teacher_logits.shape)} vs student {tuple(student_logits.shape)}:"
            " fidelity needs the same positions and vocabulary"
        )
    t_logp = F.log_softmax(teacher_logits.float(), dim=-1)  # (T, V)
    s_logp = F.log_softmax(student_logits.float(), dim=-1)  # (T, V)
    # xlogy-style: positions where p_t == 0 contribute 0 even if log p_s = -inf.
    kl = (t_logp.exp() * (t_logp - s_logp)).nan_to_num(nan=0.0, posinf=math.inf).sum(-1)  # (T,)
    kl = kl.clamp_min(0.0)  # KL ≥ 0; identical rows can come out at -1e-8 in float32
    agree = (teacher_logits.argmax(-1) == student_logits.argmax(-1)).sum()
    return {"kl_sum": kl.sum().item(), "agree": agree.item(), "tokens": teacher_logits.shape[0]}


def response_nll(student_logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Summed token NLL of `labels` under the student; label -100 is ignored.

    student_logits: (T, V), labels: (T,) already shifted (label[k] is the target of logits[k]).
    """
    mask = labels != -100
    if not mask.any():
        return {"nll_sum": 0.0, "tokens": 0}
    nll = F.cross_entropy(student_logits[mask].float(), labels[mask], reduction="sum")
    return {"nll_sum": nll.item(), "tokens": int(mask.sum().item())}


def add_sums(total: dict[str, float], part: Mapping[str, float]) -> dict[str, float]:
    """Accumulate the sum dicts returned by token_fidelity / response_nll (in place, returned)."""
    for k, v in part.items():
        total[k] = total.get(k, 0) + v
    return total


def finalize_fidelity(fid: Mapping[str, float], nll: Mapping[str, float]) -> dict[str, float | None]:
    """Token-weighted means from pooled sums: kl, top1_agreement (x100), nll, ppl."""
    out: dict[str, float | None] = {"kl": None, "top1_agreement": None, "nll": None, "ppl": None}
    if fid.get("tokens"):
        out["kl"] = fid["kl_sum"] / fid["tokens"]
        out["top1_agreement"] = 100.0 * fid["agree"] / fid["tokens"]
        out["fidelity_tokens"] = int(fid["tokens"])
    if nll.get("tokens"):
        out["nll"] = nll["nll_sum"] / nll["tokens"]
        out["ppl"] = math.exp(out["nll"])
        out["nll_tokens"] = int(nll["tokens"])
    return out


def average_over_sets(summaries: Sequence[Mapping]) -> dict:
    """The "Average" column: per-seed mean over eval sets, then mean ± std over seeds.

    `summaries` are `summarize_seeds` dicts. When the sets were run with different seeds the
    per-seed view does not exist; the mean of means is returned with std None.
    """
    if not summaries:
        raise ValueError("average_over_sets of no eval sets")
    seed_sets = [tuple(s["per_seed"]) for s in summaries]
    if all(seeds == seed_sets[0] for seeds in seed_sets):
        per_seed = {int(k): sum(s["per_seed"][k] for s in summaries) / len(summaries)
                    for k in seed_sets[0]}
        return summarize_seeds(per_seed)
    return {"per_seed": {}, "mean": sum(s["mean"] for s in summaries) / len(summaries), "std": None}


# --------------------------------------------------------------------------- fidelity from a cache


def cache_vocab_match(tokenizer: Any, tokenizer_dir: str | Path, manifest: Mapping[str, Any],
                      rows: Sequence[Any] = ()) -> tuple[bool, str]:
    """Does `tokenizer` share the cache teacher's vocabulary? Decided once, before scoring.

    1. its files have the fingerprint the cache recorded → same;
    2. else, with the teacher's tokenizer at hand (the manifest's teacher path), the vocabulary
       fingerprints of the two decide (files may differ in bytes and still tokenize alike);
    3. else the first cached `rows`, tokenized with the cache's limits, must give the cached ids.
    Returns (same, how it was decided).
    """
    from .cache.fingerprint import tokenizer_fingerprint, vocab_fingerprint

    recorded = (manifest.get("fingerprints") or {}).get("tokenizer")
    try:
        if recorded and tokenizer_fingerprint(tokenizer_dir) == recorded:
            return True, "tokenizer files identical to the cache's"
    except FileNotFoundError:
        pass
    teacher_dir = (manifest.get("teacher") or {}).get("path")
    if teacher_dir and Path(teacher_dir).is_dir():
        from transformers import AutoTokenizer

        teacher_tok = AutoTokenizer.from_pretrained(teacher_dir)
        same = vocab_fingerprint(tokenizer) == vocab_fingerprint(teacher_tok)
        return same, f"vocabulary fingerprint {'equals' if same else 'differs from'} the teacher's"
    limits = cache_limits(manifest)
    same = bool(rows) and all(_tokenize_like_cache(tokenizer, r, limits) == (
        [int(i) for i in r.input_ids], int(r.prompt_len)) for r in rows)
    return same, f"first {len(rows)} cached examples {'re-tokenize' if same else 'do not re-tokenize'} alike"


def cache_limits(manifest: Mapping[str, Any]) -> tuple[int, int]:
    """(max_prompt_len, max_len) the cache tokenized with."""
    fp = manifest.get("fingerprints") or {}
    return int(fp.get("max_prompt_len", 256)), int(fp.get("max_len", 512))


def _tokenize_like_cache(tokenizer: Any, ex: Any, limits: tuple[int, int]
                         ) -> tuple[list[int], int] | None:
    """Training's tokenization under the cache's limits (prompt cut, sequence cut), or None."""
    from .tokenize import TokenizeError, tokenize_text

    try:
        t = tokenize_text(ex.example_id, ex.prompt, ex.response, tokenizer, *limits)
    except TokenizeError:
        return None
    return list(t.input_ids), t.prompt_len


def _student_logits(model: torch.nn.Module, seqs: Sequence[Sequence[int]],
                    pad_id: int) -> list[torch.Tensor]:
    """(n-1, V) float logits over each sequence's first n-1 tokens, from one right-padded
    forward: padding sits after every real token, so it never changes a real position."""
    device = next(model.parameters()).device
    width = max(len(ids) for ids in seqs) - 1
    x = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
    for b, ids in enumerate(seqs):
        x[b, : len(ids) - 1] = torch.tensor(ids[:-1])
        mask[b, : len(ids) - 1] = 1
    logits = model(input_ids=x.to(device), attention_mask=mask.to(device)).logits  # (B, T, V)
    return [logits[b, : len(ids) - 1].float() for b, ids in enumerate(seqs)]


def _pad_id(tokenizer: Any) -> int:
    return next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)


def _chunks(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _response_labels(ids: Sequence[int], plen: int, device: torch.device) -> torch.Tensor:
    labels = torch.tensor(ids[1:], device=device)  # (n-1,) already shifted
    labels[: plen - 1] = -100
    return labels


@torch.no_grad()
def heldout_nll(examples: Sequence[Any], model: torch.nn.Module, tokenizer: Any, *,
                max_prompt_len: int = 256, max_len: int = 512,
                batch_size: int = 16) -> dict[str, float | None]:
    """Token-weighted NLL/PPL of each example's response given its prompt (no generation).

    Tokenized as training does, under `max_prompt_len`/`max_len` (pass a cache's limits to match
    `cache_fidelity`'s NLL); an example that does not fit is counted in `skipped`.
    """
    from .tokenize import TokenizeError, tokenize_text

    device = next(model.parameters()).device
    kept = []
    for ex in examples:
        try:
            t = tokenize_text(ex.id, ex.prompt, ex.response, tokenizer, max_prompt_len, max_len)
        except TokenizeError:
            continue
        kept.append((list(t.input_ids), t.prompt_len))
    nll: dict[str, float] = {}
    for chunk in _chunks(kept, batch_size):
        logits = _student_logits(model, [ids for ids, _ in chunk], _pad_id(tokenizer))
        for (ids, plen), s_logits in zip(chunk, logits):
            add_sums(nll, response_nll(s_logits, _response_labels(ids, plen, device)))
    out = finalize_fidelity({}, nll)
    return {"nll": out["nll"], "ppl": out["ppl"], "nll_tokens": out.get("nll_tokens", 0),
            "examples": len(kept), "skipped": len(examples) - len(kept)}


@torch.no_grad()
def cache_fidelity(
    examples: Iterable[Any],
    head_weight: torch.Tensor,
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    same_vocab: bool,
    max_prompt_len: int = 256,
    max_len: int = 512,
    head_bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    limit: int | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Student vs cached teacher on response positions: KL(T‖S), top-1 agreement, NLL, PPL.

    `examples` are cache rows (`example_id, prompt, response, input_ids, prompt_len, hidden
    (n-1, D_t), label_mask`); teacher logits = (hidden @ W.T + b) * logit_scale. The student
    tokenizes each row as training does, with the cache's `max_prompt_len`/`max_len`. KL and
    agreement need `same_vocab` (decide it once, `cache_vocab_match`); an example that still
    tokenizes otherwise is left out of them and counted (`fidelity_skipped`). NLL/PPL are on the
    student's own tokenization. Both logit rows are cut to the smaller V (models pad their vocab
    past len(tokenizer)).
    """
    device = next(model.parameters()).device
    fid: dict[str, float] = {}
    nll: dict[str, float] = {}
    n = skipped = 0
    # the student runs on `batch_size` rows at once (right-padded); the rest is per example
    for chunk in _chunks(itertools.islice(examples, limit), batch_size):
        n += len(chunk)
        fitted = [(ex, _tokenize_like_cache(tokenizer, ex, (max_prompt_len, max_len)))
                  for ex in chunk]
        # an example the student cannot fit in the cache's limits
        skipped += sum(mine is None for _, mine in fitted) if same_vocab else 0
        fitted = [(ex, mine) for ex, mine in fitted if mine is not None]
        if not fitted:
            continue
        logits = _student_logits(model, [mine[0] for _, mine in fitted], _pad_id(tokenizer))
        for (ex, (ids, plen)), s_logits in zip(fitted, logits):  # s_logits: (n-1, V_s)
            add_sums(nll, response_nll(s_logits, _response_labels(ids, plen, device)))
            if not same_vocab or ex.hidden is None:
                continue
            if ids != [int(i) for i in ex.input_ids] or plen != int(ex.prompt_len):
                skipped += 1
                continue
            rows = torch.as_tensor(ex.label_mask, device=device)  # (n-1,) response positions
            h = torch.as_tensor(ex.hidden, device=device)[rows]  # (R, D_t)
            t_logits = F.linear(h.to(head_weight.dtype), head_weight,
                                head_bias).float() * logit_scale  # (R, V_t)
            v = min(t_logits.shape[-1], s_logits.shape[-1])
            add_sums(fid, token_fidelity(t_logits[:, :v], s_logits[rows][:, :v]))
    if n == 0:
        raise ValueError("the cache has no examples to measure fidelity on")
    out: dict[str, Any] = finalize_fidelity(fid if same_vocab else {}, nll)
    out["examples"] = n
    if not same_vocab:
        out["note"] = "student vocabulary differs from the cache's; KL and top-1 need the same one"
    elif skipped:
        out["fidelity_skipped"] = skipped
        out["note"] = (f"{skipped} example(s) tokenize differently from the cache and are left "
                       "out of KL and top-1")
    return out
