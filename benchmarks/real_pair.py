"""Distill benchmark, real-proportion case: cache vs online for a Qwen2-1.5B-shaped teacher and a
GPT-2-124M-shaped student, with the FLOP model's prediction beside the measurement.

    python benchmarks/real_pair.py --work /tmp/dskd-real-pair            # ~10 min on 2 cores
    python benchmarks/real_pair.py --work /tmp/dskd-real-pair --quick    # smoke run

The toy pairs make the LM head a large share of the teacher; here every width and both
vocabularies are the real ones (teacher D=1536, FFN 8960, 12 heads / 2 KV heads, V=151,936,
tied; student D=768, 12 heads, V=50,257, tied, the real Qwen2 and GPT-2 tokenizers) and only the
depths are cut, by the same factor (28 → 7 and 12 → 3 layers), so that a step fits 2 CPU cores.
Weights are random (speed does not depend on them). Method: DSKD-CMA (the paper's
cross-tokenizer method for Qwen → GPT-2), `--teacher-signal exact`.

1. tokens/s from the cache and online, each a separate `dskd distill` process, run interleaved
   (cache, online, cache, online) so both see the same machine load; ratio of the medians.
2. the FLOP model (multiply-adds per token of each part of a step) for this pair and for the
   paper's pairs at full depth.
3. where a step's time goes (wall time per part, measured in-process with the same components:
   teacher body, student forward, loss forward, backward, optimizer), and the GFLOP/s each part
   reaches — the reason the measured ratio sits below the FLOP model's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_bench import distill, log

SHARED = Path(os.environ.get("DSKD_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
MAX_LEN, MAX_PROMPT = 64, 32


@dataclass(frozen=True)
class Shape:
    """What the FLOP model needs of a decoder: per-layer matmul MACs per token, head size."""

    name: str
    d: int
    layers: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    gated: bool  # SwiGLU (3 FFN matrices) vs GPT-2's 2

    @property
    def layer_macs(self) -> int:
        hd = self.d // self.heads
        attn = 2 * self.d * self.d + 2 * self.d * self.kv_heads * hd
        return attn + (3 if self.gated else 2) * self.d * self.ffn

    @property
    def head_macs(self) -> int:
        return self.vocab * self.d

    def depth(self, layers: int) -> Shape:
        return Shape(self.name, self.d, layers, self.ffn, self.heads, self.kv_heads, self.vocab,
                     self.gated)


QWEN2_1_5B = Shape("Qwen2-1.5B", 1536, 28, 8960, 12, 2, 151936, True)
QWEN1_5_1_8B = Shape("Qwen1.5-1.8B", 2048, 24, 5504, 16, 16, 151936, True)
GPT2_XL = Shape("GPT-2 XL 1.5B", 1600, 48, 6400, 25, 25, 50257, False)
GPT2 = Shape("GPT-2 124M", 768, 12, 3072, 12, 12, 50257, False)
MISTRAL_7B = Shape("Mistral-7B", 4096, 32, 14336, 32, 8, 32000, True)
LLAMA2_7B = Shape("LLaMA2-7B", 4096, 32, 11008, 32, 32, 32000, True)
TINYLLAMA = Shape("TinyLLaMA-1.1B", 2048, 22, 5632, 32, 4, 32000, True)
QWEN2_7B = Shape("Qwen2-7B", 3584, 28, 18944, 28, 4, 152064, True)


def flop_model(t: Shape, s: Shape, method: str) -> dict[str, float]:
    """Multiply-adds per token of one training step (fwd + bwd = 3 × fwd; chunks of the loss run
    under activation checkpointing, so their forward runs twice).

    student: decoder fwd + bwd; its head is applied inside the loss (lazy logits).
    loss (DSKD / DSKD-CMA): student head z (fwd, recompute, 2 bwd), t2s logits through the frozen
    student head (fwd, recompute, bwd to the projection), s2t logits through the frozen teacher
    head (fwd, recompute, bwd to the projection), the teacher's own logits rebuilt from its
    hidden state (fwd, recompute; no grad), projectors (small), CMA attention (≈ 0).
    teacher (online only): the teacher's decoder forward, without its head.
    """
    student = 3 * s.layers * s.layer_macs
    z = 4 * s.head_macs
    if method in ("dskd", "dskd-cma"):
        proj = 3 * 2 * s.d * t.d * (3 if method == "dskd-cma" else 1)
        loss = z + 3 * s.head_macs + 3 * t.head_macs + 2 * t.head_macs + proj
    else:  # vanilla KD: student head + the teacher's logits
        loss = z + 2 * t.head_macs
    teacher = t.layers * t.layer_macs
    cache = student + loss
    return {"student": student, "loss": loss, "teacher": teacher, "cache": cache,
            "online": cache + teacher, "ratio": (cache + teacher) / cache}


def build_pair(work: Path, t_layers: int, s_layers: int) -> tuple[Path, Path]:
    """Random Qwen2-shaped teacher and GPT-2-shaped student at the given depths, saved with the
    real tokenizers."""
    from transformers import (
        AutoTokenizer,
        GPT2Config,
        GPT2LMHeadModel,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    t_dir, s_dir = work / f"teacher_qwen2_L{t_layers}", work / f"student_gpt2_L{s_layers}"
    if not (t_dir / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "qwen2")
        q = QWEN2_1_5B
        cfg = Qwen2Config(vocab_size=q.vocab, hidden_size=q.d, intermediate_size=q.ffn,
                          num_hidden_layers=t_layers, num_attention_heads=q.heads,
                          num_key_value_heads=q.kv_heads, max_position_embeddings=512,
                          tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, bos_token_id=None)
        torch.manual_seed(1)
        Qwen2ForCausalLM(cfg).save_pretrained(t_dir)
        tok.save_pretrained(t_dir)
    if not (s_dir / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "gpt2")
        g = GPT2
        cfg = GPT2Config(vocab_size=g.vocab, n_embd=g.d, n_layer=s_layers, n_head=g.heads,
                         n_positions=512, tie_word_embeddings=True, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.eos_token_id)
        torch.manual_seed(2)
        GPT2LMHeadModel(cfg).save_pretrained(s_dir)
        tok.save_pretrained(s_dir)
    return t_dir, s_dir


def breakdown(cache: Path, teacher: Path, student: Path, steps: int, batch: int) -> dict:
    """Wall time per part of a training step, in this process (1 thread), cache mode with the
    teacher body run beside it as online mode would: teacher body / student decoder fwd / loss
    fwd / backward / optimizer. Same components as `dskd distill`."""
    from dskd.pipeline.losses.registry import build_loss
    from dskd.pipeline.train.distiller import Distiller
    from dskd.pipeline.train.loader import BatchStream, PlanConfig
    from dskd.pipeline.train.models import load_student, load_teacher, load_tokenizer
    from dskd.pipeline.train.signal import build_signal, cache_head, teacher_forward
    from dskd.pipeline.train.sources import BatchBuilder, CacheSource

    s_tok, _ = load_tokenizer(student)
    model = load_student(student, s_tok)
    t_model = load_teacher(teacher, torch.device("cpu"))
    src = CacheSource(cache, ["hidden"])
    head = cache_head(cache, src.manifest, torch.device("cpu"))
    loss = build_loss("dskd-cma", "fkl", d_student=GPT2.d, d_teacher=QWEN2_1_5B.d)
    dist = Distiller(model, loss)
    opt = torch.optim.AdamW(list(model.parameters()) + list(loss.parameters()), lr=1e-4)
    build = BatchBuilder(s_tok, MAX_PROMPT, MAX_LEN, teacher_fields=("hidden",))
    it = BatchStream(src, PlanConfig(batch_size=batch, seed=0), 0, build).steps()
    parts: dict[str, float] = {}
    tokens = 0

    @contextlib.contextmanager
    def timed(name: str):
        t0 = time.perf_counter()
        yield
        parts[name] = parts.get(name, 0.0) + time.perf_counter() - t0

    for i in range(steps + 1):
        if i == 1:  # the first step is warm-up
            parts.clear()
            tokens = 0
        with timed("loader"):
            _, (mb,) = next(it)
        t = mb.tensors
        tokens += int(t["attention_mask"].sum())
        with timed("teacher body (online only)"), torch.no_grad():
            teacher_forward(t_model, t)
        sig = build_signal(t, head, mode="exact", needs_hidden=True, needs_embed=True)
        with timed("student decoder fwd"):
            sb = dist.student_batch(t)
        with timed("loss fwd"):
            out = loss(sb, sig, 1.0)
        with timed("backward"):
            out.loss.backward()
        with timed("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
    return {"seconds": parts, "tokens": tokens}


def finished(work: Path, name: str, warmup: int) -> dict | None:
    """tokens/s of a run already in --work (its metrics.jsonl, as `distill` reads it)."""
    out = work / "runs" / name
    if not (out / "final").is_dir():
        return None
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    tps = sorted([r["tokens_per_s"] for r in rows if "tokens_per_s" in r][warmup:])
    return {"name": name, "tokens_per_s": tps[len(tps) // 2], "steps": len(rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--examples", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2, help="cache/online pairs of runs")
    ap.add_argument("--breakdown-steps", type=int, default=4)
    ap.add_argument("--reuse", action="store_true", help="keep finished runs in --work")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    t_layers, s_layers = 7, 3
    steps, warmup, batch = (4, 1, 2) if args.quick else (8, 2, 2)
    repeats = 1 if args.quick else args.repeats
    from dskd.pipeline.toyworld import build_toy_world
    from dskd.stages.cache_teacher import CacheTeacherConfig
    from dskd.stages.cache_teacher import run as cache_run

    world = build_toy_world(work / "world", seed=0, preset="tiny")
    data = work / "train.jsonl"
    if not data.is_file():
        data.write_text("".join(Path(world.train).read_text().splitlines(True)[: args.examples]))
    teacher, student = build_pair(work, t_layers, s_layers)
    cache = work / "cache"
    torch.set_num_threads(1)
    if not (cache / "manifest.json").is_file():
        t0 = time.perf_counter()
        cache_run(CacheTeacherConfig(teacher=str(teacher), data=str(data), out=str(cache),
                                     shard_size=16, top_k=16, max_len=MAX_LEN,
                                     max_prompt_len=MAX_PROMPT, batch_tokens=1024,
                                     progress=False))
        log(f"cache built in {time.perf_counter() - t0:.0f}s")
    common = {"student": str(student), "batch_size": batch, "max_steps": steps,
              "num_workers": 1, "seed": 0, "method": "dskd-cma"}
    r: dict = {"steps": steps, "batch": batch, "t_layers": t_layers, "s_layers": s_layers,
               "runs": []}
    run = (lambda name, **kw: finished(work, name, warmup)
           or distill(name, work, warmup, **kw)) if args.reuse else (
        lambda name, **kw: distill(name, work, warmup, **kw))
    for k in range(repeats):  # interleaved: both modes see the same load
        r["runs"].append(run(f"cache_{k}", cache=str(cache), **common))
        r["runs"].append(run(f"online_{k}", teacher=str(teacher), data=str(data),
                             max_len=MAX_LEN, max_prompt_len=MAX_PROMPT, **common))
    med = lambda xs: sorted(xs)[len(xs) // 2]
    r["cache_tps"] = med([x["tokens_per_s"] for x in r["runs"] if x["name"].startswith("cache")])
    r["online_tps"] = med([x["tokens_per_s"] for x in r["runs"] if x["name"].startswith("online")])
    r["measured_ratio"] = r["cache_tps"] / r["online_tps"]
    r["model_here"] = flop_model(QWEN2_1_5B.depth(t_layers), GPT2.depth(s_layers), "dskd-cma")
    r["breakdown"] = breakdown(cache, teacher, student, args.breakdown_steps, batch)
    (work / "results.json").write_text(json.dumps(r, indent=2) + "\n")
    print(report(r))


PAPER_PAIRS = [(GPT2_XL, GPT2, "dskd"), (QWEN1_5_1_8B, GPT2, "dskd-cma"),
               (QWEN2_1_5B, GPT2, "dskd-cma"), (LLAMA2_7B, TINYLLAMA, "dskd"),
               (MISTRAL_7B, TINYLLAMA, "dskd-cma"), (QWEN2_7B, TINYLLAMA, "dskd-cma")]


def report(r: dict) -> str:
    m = r["model_here"]
    lines = [(f"Teacher Qwen2-1.5B-shaped at {r['t_layers']} of 28 layers, student GPT-2-shaped at "
             f"{r['s_layers']} of 12 layers, DSKD-CMA, batch {r['batch']}, {r['steps']} steps per "
             "run, runs interleaved (cache, online, cache, online), 1 torch thread each."), "",
             "| run | tokens/s |", "|---|---|"]
    lines += [f"| {x['name']} | {x['tokens_per_s']:,.1f} |" for x in r["runs"]]
    lines += ["", (f"Measured cache ÷ online (medians): **{r['measured_ratio']:.2f}×**; the FLOP "
              f"model for this pair: **{m['ratio']:.2f}×** (per token: student {m['student'] / 1e6:,.0f}M, "
              f"loss {m['loss'] / 1e6:,.0f}M, teacher body saved {m['teacher'] / 1e6:,.0f}M "
              "multiply-adds)."), "",
              "| pair (full depth) | method | student | loss | teacher saved | predicted cache ÷ online |",
              "|---|---|---|---|---|---|"]
    for t, s, meth in PAPER_PAIRS:
        f = flop_model(t, s, meth)
        lines.append(f"| {t.name} → {s.name} | {meth} | {f['student'] / 1e9:.2f}G | "
                     f"{f['loss'] / 1e9:.2f}G | {f['teacher'] / 1e9:.2f}G | {f['ratio']:.2f}× |")
    b = r["breakdown"]
    tok = b["tokens"]
    macs = {"teacher body (online only)": m["teacher"], "student decoder fwd": m["student"] / 3}
    lines += ["", f"Where a step's time goes (in-process, same components, {tok} tokens):", "",
              "| part | s per 1k tokens | share of the cache step | GFLOP/s (matmul model) |",
              "|---|---|---|---|"]
    cache_s = sum(v for k, v in b["seconds"].items() if k != "teacher body (online only)")
    for k, v in b["seconds"].items():
        gf = f"{2 * macs[k] * tok / v / 1e9:.1f}" if k in macs else ""
        share = "" if k.startswith("teacher") else f"{v / cache_s:.0%}"
        lines.append(f"| {k} | {1000 * v / tok:.2f} | {share} | {gf} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
