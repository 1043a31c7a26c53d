"""Compact top-k and sampled targets: bytes/token, extra KL of the rebuilt target, codec speed.

    python benchmarks/sparse_targets_bench.py --work /tmp/dskd-sparse-bench       # ~15 min, 2 cores
    python benchmarks/sparse_targets_bench.py --work /tmp/dskd-sparse-bench --quick

Prints a markdown report (paste it into docs/benchmarks.md) and writes results.json in --work.

1. bytes per token row of the top-k and sampled fields, measured on caches the stage writes
   (toy teacher trained briefly so its distributions are peaked), for each top-k log-prob storage
   and N sampled draws; plus the payload arithmetic at k = 64 for large vocabularies.
2. extra KL of the rebuilt top-k target: KL(today's ‖ compact) between the bucket-rule targets
   (k ids + tail bucket, τ = 1) rebuilt from int32/fp32 storage and from the compact one, and the
   KL to the full teacher distribution of both, on the trained toy teacher's rows and on synthetic
   LLM-like rows (V = 32,000, mean entropy ~2 nats).
3. codec cost: encode/decode µs per 1,000 rows at k = 64 for 16/17/18-bit ids and q8/fp16.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from cache_bench import log, table, trained_teacher  # benchmarks/ is the script dir

from dskd.pipeline.cache import spec
from dskd.pipeline.cache.manifest import load_manifest
from dskd.pipeline.cache.topk import decode_ids, decode_logprobs, encode_ids, encode_logprobs
from dskd.pipeline.data import load_examples
from dskd.pipeline.teachers import length_batches
from dskd.pipeline.teachers.hf_backend import HFTeacher
from dskd.pipeline.tokenize import tokenize_example
from dskd.pipeline.toyworld import build_toy_world
from dskd.pipeline.train.distributed import DistEnv
from dskd.stages.cache_teacher import CacheTeacherConfig, cache_teacher

TOPK_FIELDS = ("topk_ids", "topk_ids_hi", "topk_logprobs", "topk_logprob_bounds", "tail_logprob")
SAMPLED_FIELDS = ("sampled_n", "sampled_ids", "sampled_counts")


# --------------------------------------------------------------------------- 1. bytes/token

def measured_bytes(world, teacher_dir: Path, work: Path, n: int) -> list[dict]:
    teacher = HFTeacher(teacher_dir)
    runs = [{"top_k": 64, "topk_logprobs": dt} for dt in ("fp32", "fp16", "q8")]
    runs += [{"top_k": 0, "sampled_targets": s} for s in (4, 16, 64)]
    out = []
    for kw in runs:
        d = work / "bpt"
        shutil.rmtree(d, ignore_errors=True)
        cache_teacher(CacheTeacherConfig(teacher=str(teacher_dir), data=str(world.train), out=str(d),
                                         limit=n, progress=False, **kw), DistEnv(), backend=teacher)
        t = load_manifest(d)["totals"]
        b = t["bytes_per_token"]
        fields = TOPK_FIELDS if kw["top_k"] else SAMPLED_FIELDS
        row = {"label": (f"top-64, {kw['topk_logprobs']}" if kw["top_k"]
                         else f"sampled N={kw['sampled_targets']}"),
               "vocab": load_manifest(d)["layout"]["vocab_size"], "rows": t["n_rows"],
               **{f: b.get(f, 0.0) for f in fields + ("hidden",)}, "total": b["total"]}
        row["signal"] = sum(b.get(f, 0.0) for f in fields)
        if "sampled_targets" in kw:
            row["distinct_per_row"] = t["field_bytes"]["sampled_ids"] / 2 / t["n_rows"]  # uint16
        out.append(row)
        shutil.rmtree(d)
    return out


def analytic_bytes(k: int = 64) -> list[dict]:
    """Payload of the top-k signal (ids + log-probs + q8 bounds + tail) per token row."""
    rows = []
    for name, V in (("GPT-2", 50257), ("Llama-3", 128256), ("Qwen2", 151936)):
        st = spec.TopkStorage.for_vocab(V, "q8")
        ids = 2 * k + st.hi_bytes(k)
        rows.append({"vocab": f"{name} ({V:,})", "id_bits": st.id_bits, "ids": ids,
                     "v1": 8 * k + 4, "fp16": ids + 2 * k + 4, "q8": ids + k + 4 + 4})
    return rows


# --------------------------------------------------------------------------- 2. KL

def synthetic_rows(n: int, V: int = 32000, seed: int = 0) -> torch.Tensor:
    """LLM-like log-probs: a Gaussian bulk, 1-20 boosted tokens, temperatures 0.3-1.5."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, V)).astype(np.float32) * 2.0
    for i in range(n):
        z[i, rng.choice(V, rng.integers(1, 20), replace=False)] += rng.uniform(2, 14)
    z /= np.exp(rng.uniform(np.log(0.3), np.log(1.5), (n, 1))).astype(np.float32)
    return torch.from_numpy(z).log_softmax(-1)


def teacher_rows(world, teacher_dir: Path, n: int) -> torch.Tensor:
    teacher = HFTeacher(teacher_dir)
    tok = __import__("transformers").AutoTokenizer.from_pretrained(teacher_dir)
    seqs = [tokenize_example(e, tok).input_ids[:-1] for e in load_examples(world.valid, limit=n)]
    H = torch.cat([h for b in length_batches([len(s) for s in seqs], 8192)
                   for h in teacher.hidden_states([seqs[i] for i in b])])
    return teacher.head().logits(H).log_softmax(-1)


def _bucket(lp: np.ndarray, tail: np.ndarray) -> np.ndarray:
    """(rows, k + 1) log-probs of the bucket-rule target at τ = 1 (what distill rebuilds)."""
    lw = np.concatenate([lp.astype(np.float64), tail[:, None].astype(np.float64)], 1)
    m = lw.max(1, keepdims=True)
    return lw - m - np.log(np.exp(lw - m).sum(1, keepdims=True))


def rebuilt_kl(logp: torch.Tensor, k: int, source: str) -> list[dict]:
    """logp (rows, V) full teacher log-probs → KL figures per top-k log-prob storage."""
    V = logp.shape[1]
    z = logp.float()
    vals, ids = z.topk(k, dim=-1)
    p = z.exp()
    tail = (p.sum(-1) - p.gather(1, ids).sum(-1)).clamp(min=1e-30).log()  # as the head step: direct sum
    lp, tail = vals.numpy(), tail.numpy()
    full = logp.double().numpy()
    ref = _bucket(lp, tail)
    ent = float(-(np.exp(full) * full).sum(1).mean())

    def to_full(b: np.ndarray) -> float:
        """Mean KL(p_full ‖ target), the tail bucket spread uniformly over the V - k other ids."""
        inside = np.take_along_axis(full, ids.numpy(), 1)
        kl_in = (np.exp(inside) * (inside - b[:, :k])).sum(1)
        mask = np.ones_like(full, bool)
        np.put_along_axis(mask, ids.numpy(), False, 1)
        out = np.where(mask, full, -np.inf)
        with np.errstate(invalid="ignore"):  # -inf · 0 where masked out
            kl_out = np.where(mask, np.exp(out) * (out - (b[:, k:] - np.log(V - k))), 0).sum(1)
        return float((kl_in + kl_out).mean())

    base = to_full(ref)
    res = []
    for dt in ("fp16", "q8"):
        enc = encode_logprobs(lp, dt)
        new = _bucket(decode_logprobs(enc["topk_logprobs"], dt, enc.get("topk_logprob_bounds")), tail)
        kl = (np.exp(ref) * (ref - new)).sum(1)
        res.append({"source": source, "k": k, "V": V, "rows": len(lp), "entropy": ent,
                    "logprobs": dt, "kl_mean": float(kl.mean()), "kl_p99": float(np.quantile(kl, 0.99)),
                    "kl_max": float(kl.max()), "full_kl_today": base,
                    "full_kl_delta": to_full(new) - base})
    return res


# --------------------------------------------------------------------------- 3. codec speed

def codec_speed(rows: int, k: int, repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    lp = -rng.exponential(0.3, (rows, k)).cumsum(1).astype(np.float32)  # descending log-probs
    res = []

    def best(fn) -> float:
        t = []
        for _ in range(repeats):
            a = time.perf_counter()
            fn()
            t.append(time.perf_counter() - a)
        return min(t) / rows * 1e3 * 1e6  # µs per 1,000 rows

    for V in (50257, 128256, 151936):
        st = spec.TopkStorage.for_vocab(V, "q8")
        ids = rng.integers(0, V, (rows, k)).astype(np.int32)
        enc = encode_ids(ids, st)
        res.append({"what": f"ids, {st.id_bits}-bit",
                    "encode_us": best(lambda ids=ids, st=st: encode_ids(ids, st)),
                    "decode_us": best(lambda enc=enc, st=st: decode_ids(
                        enc["topk_ids"], enc.get("topk_ids_hi"), st))})
    for dt in ("fp16", "q8"):
        enc = encode_logprobs(lp, dt)
        res.append({"what": f"log-probs, {dt}",
                    "encode_us": best(lambda dt=dt: encode_logprobs(lp, dt)),
                    "decode_us": best(lambda enc=enc, dt=dt: decode_logprobs(
                        enc["topk_logprobs"], dt, enc.get("topk_logprob_bounds")))})
    return res


# --------------------------------------------------------------------------- report

def report(R: dict) -> str:
    L = [f"Machine: {R['machine']}. Command: `{R['command']}`.", ""]
    b0 = R["bytes"][0]
    L += [(f"**1. bytes per token row, measured** (toy teacher after {R['train_steps']} SFT steps, "
           f"V = {b0['vocab']:,}, {R['examples']} examples = {b0['rows']:,} token rows; Zarr metadata and shard indexes included; "
           "\"signal\" = what `distill` reads: ids, log-probs, bounds and tail for top-k; the three "
           "sampled arrays for sampled)"), ""]
    L += table(["signal", "topk_ids", "topk_logprobs", "bounds", "tail", "sampled_n", "sampled_ids",
                "sampled_counts", "distinct ids / row", "**signal B/token**", "hidden", "total"],
               [[b["label"],
                 *[f"{b.get(f, 0):.1f}" if f in b else "" for f in (
                     "topk_ids", "topk_logprobs", "topk_logprob_bounds", "tail_logprob", "sampled_n",
                     "sampled_ids", "sampled_counts")],
                 f"{b['distinct_per_row']:.1f}" if "distinct_per_row" in b else "",
                 f"**{b['signal']:.1f}**", f"{b['hidden']:.1f}", f"{b['total']:.1f}"]
                for b in R["bytes"]])
    L += ["", ("Payload of the top-64 signal for real vocabularies (ids + log-probs + q8 bounds + "
               "fp32 tail, bytes per token row; version 1 = int32 + fp32 + tail):"), ""]
    L += table(["vocabulary", "id bits", "ids", "version 1", "fp16 log-probs", "q8 log-probs"],
               [[a["vocab"], a["id_bits"], a["ids"], a["v1"], a["fp16"], f"**{a['q8']}**"]
                for a in R["analytic"]])
    L += ["", ("**2. extra KL of the rebuilt top-k target** (bucket rule, τ = 1; \"KL(today ‖ new)\": "
               "between the targets rebuilt from float32 and from compact log-probs; \"to full\": "
               "mean KL(p_full ‖ target) with the tail spread uniformly, today's and its change)"), ""]
    L += table(["rows", "k", "V", "mean entropy", "log-probs", "KL(today ‖ new) mean", "p99", "max",
                "to full: today", "to full: change"],
               [[f"{r['source']} ({r['rows']:,})", r["k"], f"{r['V']:,}", f"{r['entropy']:.2f}",
                 r["logprobs"], f"**{r['kl_mean']:.2e}**", f"{r['kl_p99']:.2e}", f"{r['kl_max']:.2e}",
                 f"{r['full_kl_today']:.4f}", f"{r['full_kl_delta']:+.2e}"] for r in R["kl"]])
    L += ["", f"**3. codec cost** (numpy, k = 64, best of {R['repeats']}; µs per 1,000 token rows)", ""]
    L += table(["what", "encode µs", "decode µs"],
               [[c["what"], f"{c['encode_us']:.0f}", f"{c['decode_us']:.0f}"] for c in R["codec"]])
    return "\n".join(L)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/dskd-sparse-bench"))
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    ap.add_argument("--train-steps", type=int, default=None)
    args = ap.parse_args()
    q, work = args.quick, args.work
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    world = build_toy_world(work / "toyworld", seed=0, preset="tiny")
    steps = args.train_steps if args.train_steps is not None else (30 if q else 200)
    n = 32 if q else 100
    R: dict = {"command": " ".join(["python"] + sys.argv), "train_steps": steps, "examples": n,
               "repeats": 3, "machine": f"{os.cpu_count()} CPU cores (shared with other jobs), "
                                        f"torch {torch.__version__}, no GPU"}
    log("training the toy teacher")
    trained = trained_teacher(world, work / f"trained-teacher-{steps}", steps)
    log("1. bytes/token")
    R["bytes"] = measured_bytes(world, trained, work, n)
    R["analytic"] = analytic_bytes()
    log("2. KL")
    R["kl"] = []
    toy = teacher_rows(world, trained, n)
    for k in (16, 64):
        R["kl"] += rebuilt_kl(toy, k, "toy teacher")
    R["kl"] += rebuilt_kl(synthetic_rows(300 if q else 1000), 64, "synthetic LLM-like")
    log("3. codec")
    R["codec"] = codec_speed(2000 if q else 20000, 64, 3)
    (work / "results.json").write_text(json.dumps(R, indent=2))
    print(report(R))


if __name__ == "__main__":
    main()
