"""Distill benchmark on the toy world: cache vs online, loader headroom, memory vs cache size,
exact vs top-k teacher signal — side by side in one run.

    python benchmarks/distill_bench.py --work /tmp/distill-bench            # ~10-15 min, 2 cores
    python benchmarks/distill_bench.py --work /tmp/distill-bench --quick    # smoke run

Prints a markdown report (paste it into docs/benchmarks.md, section "distill") and writes
results.json in --work. Every training run is a separate `dskd distill` process; its peak memory
is sampled as PSS (shared pages split fairly) over the process and its DataLoader workers.

1. speed-up: student tokens/s from the cache (exact signal) ÷ the same run with the live
   teacher in the loop (`--teacher`), teacher ≈ 10× the student's parameters (goal ≥ 3×), for
   DSKD and for vanilla KD (whose loss is cheaper, so the teacher forward weighs more).
2. loader headroom: tokens/s the streaming loader alone delivers (same workers, same builder:
   cache read, student tokenization, collate) ÷ tokens/s the training loop consumes (goal ≥ 10×).
3. memory: peak PSS of the same run over a cache 4× larger (goal: unchanged ± 10%).
4. signal cost: vanilla KD with --teacher-signal exact vs topk (tokens/s, bytes read per token).

tokens/s are measured between steps (warm-up steps dropped) from metrics.jsonl, so model
loading and checkpointing are excluded. On a shared 2-core machine absolute numbers move with
the load; ratios of runs made back to back are the meaningful part.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from dskd.pipeline.toyworld import build_toy_world
from dskd.pipeline.toyworld.models import ModelSpec, build_model
from dskd.stages.cache_teacher import CacheTeacherConfig
from dskd.stages.cache_teacher import run as cache_run

THREADS = os.environ.get("DSKD_BENCH_THREADS", "1")
LRU_MB = 32
# Small shards, so that even the 1× cache has more shards than a loader keeps open (8): like a
# real cache, both sizes then run at the loader's bounds, not at the cache's size.
SHARD_SIZE = 32


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def n_params(model_dir: Path) -> int:
    """Parameters of a saved model, tied embeddings counted once."""
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())


TEACHERS = {"10x": ModelSpec("llama", 384, 3, 1024), "40x": ModelSpec("llama", 512, 6, 1536)}


def big_teacher(world, out: Path, size: str = "10x") -> Path:
    """A random Llama ≈ 10× (or 40×) the toy student's parameters (same bpe vocabulary)."""
    if not (out / "config.json").is_file():
        build_model(TEACHERS[size], world.tokenizers["bpe"], out, seed=1)
    return out


def repeat_data(src: Path, dst: Path, times: int) -> Path:
    """`times` copies of a data file (loader ids stay unique: duplicates get -1, -2 suffixes)."""
    if not dst.is_file():
        dst.write_text(src.read_text() * times)
    return dst


def make_cache(teacher: Path, data: Path, out: Path, top_k: int = 64) -> Path:
    if not (out / "manifest.json").is_file():
        t = time.perf_counter()
        cache_run(CacheTeacherConfig(teacher=str(teacher), data=str(data), out=str(out),
                                     shard_size=SHARD_SIZE, top_k=top_k, progress=False))
        log(f"cached {data.name} with {teacher.name} in {time.perf_counter() - t:.0f}s")
    return out


# --------------------------------------------------------------------------- measured runs


CHILD = r"""
import json, os, sys, threading, time
from pathlib import Path
from dskd.stages.distill import DistillConfig, run

def tree(pid):
    out = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = (task / "children").read_text().split()
        except OSError:
            continue
        for k in kids:
            out += tree(int(k))
    return out

def pss_mb(pid):
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0

peak = {"total": 0.0, "main": 0.0}
stop = threading.Event()

def sample():
    me = os.getpid()
    while not stop.is_set():
        pids = tree(me)
        main = pss_mb(me)
        peak["main"] = max(peak["main"], main)
        peak["total"] = max(peak["total"], main + sum(pss_mb(p) for p in pids[1:]))
        time.sleep(0.05)

threading.Thread(target=sample, daemon=True).start()
cfg = DistillConfig(**json.loads(sys.argv[1]))
t = time.perf_counter()
run(cfg)
wall = time.perf_counter() - t
stop.set()
print(json.dumps({"wall_s": wall, "pss_main_mb": peak["main"], "pss_total_mb": peak["total"]}))
"""


def distill(name: str, work: Path, warmup: int, **cfg) -> dict:
    """One `dskd distill` run in its own process: tokens/s after warm-up, peak RSS."""
    out = work / "runs" / name
    cfg = {"out": str(out), "overwrite": True, "log_interval": 1, "eval_interval": 10**6,
           "save_interval": 10**6, "tensorboard": False, **cfg}
    # One torch thread per process: on a shared CPU, OpenMP threads spin-waiting for a
    # descheduled sibling make 2-thread timings swing 50× from step to step.
    res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], check=False, capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": THREADS})
    if res.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{res.stderr[-3000:]}")
    stats = json.loads(res.stdout.strip().splitlines()[-1])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_s" in r]
    # with log_interval 1 each row's tokens_per_s covers exactly its own step
    tps = sorted(r["tokens_per_s"] for r in rows[warmup:])
    stats.update(name=name, steps=len(rows), tokens_per_s=tps[len(tps) // 2],
                 tokens_per_s_mean=sum(tps) / len(tps), final_loss=rows[-1]["loss"])
    if all("data_wait" in r for r in rows[warmup:]):  # share of wall time the loop waited
        stats["data_wait"] = sum(r["data_wait"] for r in rows[warmup:]) / len(rows[warmup:])
    log(f"{name}: {stats['tokens_per_s']:,.0f} tok/s (median of {len(tps)} steps), "
        f"peak PSS {stats['pss_total_mb']:.0f} MB (main {stats['pss_main_mb']:.0f} MB)")
    return stats


def loader_only(cache: Path | str, student: Path, batch_size: int, workers: int, steps: int,
                fields: list[str], **source: Any) -> float:
    """Tokens/s of the training stream alone (cache read + student tokenization + collate);
    ``source``: CacheSource options (e.g. read_ahead)."""
    from dskd.pipeline.train.loader import BatchStream, PlanConfig
    from dskd.pipeline.train.models import load_tokenizer
    from dskd.pipeline.train.sources import BatchBuilder, CacheSource

    tok, _ = load_tokenizer(student)
    src = CacheSource(cache, fields, **source)
    build = BatchBuilder(tok, 256, 512, teacher_fields=tuple(fields))
    stream = BatchStream(src, PlanConfig(batch_size=batch_size, seed=0), 0, build,
                         num_workers=workers)
    it = stream.steps()
    next(it)  # workers started, first batch out
    t, n = time.perf_counter(), 0
    for _ in range(steps):
        _, group = next(it)
        n += sum(int(mb.tensors["attention_mask"].sum()) for mb in group)
    return n / (time.perf_counter() - t)


def cache_bytes_per_token(cache: Path, fields: list[str]) -> float:
    m = json.loads((cache / "manifest.json").read_text())
    t = m["totals"]
    per = t["bytes_per_token"]
    return sum(per.get(f, 0.0) for f in fields) if per else float("nan")


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    steps = 12 if args.quick else 40
    warmup = 3
    bs = 8

    quick = args.quick
    world = build_toy_world(work / "world", seed=0, preset="tiny")
    teacher = big_teacher(world, work / "teacher_10x")
    student = Path(world.student)
    ratio = n_params(teacher) / n_params(student)
    log(f"teacher {n_params(teacher) / 1e6:.2f}M params, student {n_params(student) / 1e6:.2f}M "
        f"({ratio:.1f}×)")
    data = Path(world.train)
    data4 = repeat_data(data, work / "train_x4.jsonl", 4)
    cache = make_cache(teacher, data, work / "cache")
    cache4 = make_cache(teacher, data4, work / "cache_x4")

    # A block budget below the 1× cache's decoded size, so that both caches are larger than what
    # the loader may hold and the comparison shows the bound (the default is 256 MB).
    common = {"student": str(student), "batch_size": bs, "max_steps": steps, "num_workers": args.workers,
                  "seed": 0, "loader_cache_mb": LRU_MB}
    r: dict = {"teacher_params": n_params(teacher), "student_params": n_params(student),
               "batch_size": bs, "steps": steps, "workers": args.workers,
               "torch_threads": int(THREADS)}
    r["cache_dskd"] = distill("cache_dskd", work, warmup, cache=str(cache), method="dskd", **common)
    r["online_dskd"] = distill("online_dskd", work, warmup, teacher=str(teacher), data=str(data),
                               method="dskd", **common)
    r["speedup"] = r["cache_dskd"]["tokens_per_s"] / r["online_dskd"]["tokens_per_s"]

    torch.set_num_threads(int(THREADS))
    r["loader_tokens_per_s"] = loader_only(cache, student, bs, args.workers, steps * 3, ["hidden"])
    r["loader_headroom"] = r["loader_tokens_per_s"] / r["cache_dskd"]["tokens_per_s"]

    r["cache_x4_dskd"] = distill("cache_x4_dskd", work, warmup, cache=str(cache4), method="dskd",
                                 **common)
    m = json.loads((cache / "manifest.json").read_text())
    r["decoded_mb"] = m["totals"]["n_tokens"] * m["layout"]["hidden_size"] * 4 / 2**20
    r["rss_ratio_x4"] = r["cache_x4_dskd"]["pss_total_mb"] / r["cache_dskd"]["pss_total_mb"]

    r["kd_exact"] = distill("kd_exact", work, warmup, cache=str(cache), method="kd",
                            teacher_signal="exact", **common)
    r["kd_topk"] = distill("kd_topk", work, warmup, cache=str(cache), method="kd",
                           teacher_signal="topk", **common)
    r["kd_online"] = distill("kd_online", work, warmup, teacher=str(teacher), data=str(data),
                             method="kd", teacher_signal="exact", **common)
    r["speedup_kd"] = r["kd_exact"]["tokens_per_s"] / r["kd_online"]["tokens_per_s"]
    if not quick:  # the trend: the bigger the teacher, the more the cache saves
        t40 = big_teacher(world, work / "teacher_40x", "40x")
        c40 = make_cache(t40, data, work / "cache_40x")
        r["teacher40_params"] = n_params(t40)
        r["cache_dskd_40x"] = distill("cache_dskd_40x", work, warmup, cache=str(c40),
                                      method="dskd", **common)
        r["online_dskd_40x"] = distill("online_dskd_40x", work, warmup, teacher=str(t40),
                                       data=str(data), method="dskd", **common)
        r["speedup_40x"] = (r["cache_dskd_40x"]["tokens_per_s"]
                            / r["online_dskd_40x"]["tokens_per_s"])
    r["bytes_per_token_exact"] = cache_bytes_per_token(cache, ["hidden"])
    r["bytes_per_token_topk"] = cache_bytes_per_token(cache, ["topk_ids", "topk_logprobs",
                                                              "tail_logprob"])
    (work / "results.json").write_text(json.dumps(r, indent=2) + "\n")
    print(report(r))


def report(r: dict) -> str:
    def tps(k: str) -> str:
        return f"{r[k]['tokens_per_s']:,.0f}"

    def rss(k: str) -> str:
        return f"{r[k]['pss_total_mb']:.0f} (main {r[k]['pss_main_mb']:.0f})"

    ok = lambda good: "✅" if good else "❌"
    return "\n".join([
        (f"Toy world `tiny`; teacher Llama D=384 L=3 ({r['teacher_params'] / 1e6:.2f}M params) = "
        f"{r['teacher_params'] / r['student_params']:.1f}× the student "
        f"({r['student_params'] / 1e6:.2f}M); batch {r['batch_size']}, {r['steps']} steps per "
        f"run, {r['workers']} DataLoader workers, {r['torch_threads']} torch thread(s) per "
        "process; median "
        "tokens/s over steps after 3 warm-up steps."),
        "",
        "| measure | value | goal |",
        "|---|---|---|",
        f"| DSKD tokens/s from the cache (`exact`) | {tps('cache_dskd')} | |",
        f"| DSKD tokens/s online (`--teacher`) | {tps('online_dskd')} | |",
        f"| **speed-up cache ÷ online** | **{r['speedup']:.2f}×** | ≥ 3× {ok(r['speedup'] >= 3)} |",
        f"| loader alone, tokens/s | {r['loader_tokens_per_s']:,.0f} | |",
        (f"| **loader ÷ training consumption** | **{r['loader_headroom']:.1f}×** | ≥ 10× "
        f"{ok(r['loader_headroom'] >= 10)} |"),
        (f"| decoded hidden states in the cache, 1× / 4× (MB) | {r['decoded_mb']:.0f} / "
        f"{4 * r['decoded_mb']:.0f} | loader: {LRU_MB} MB of decoded blocks and ≤ 8 open "
        f"shards ({SHARD_SIZE} examples each) per process |"),
        f"| peak memory MB (PSS, main + workers), cache 1× | {rss('cache_dskd')} | |",
        f"| peak memory MB (PSS, main + workers), cache 4× | {rss('cache_x4_dskd')} | |",
        (f"| **peak memory 4× ÷ 1×** | **{r['rss_ratio_x4']:.3f}** | 1 ± 0.10 "
        f"{ok(abs(r['rss_ratio_x4'] - 1) <= 0.10)} |"),
        f"| KD tokens/s, `exact` (hidden × head, V=1916) | {tps('kd_exact')} | |",
        f"| KD tokens/s online | {tps('kd_online')} | |",
        (f"| **speed-up cache ÷ online, vanilla KD** | **{r['speedup_kd']:.2f}×** | ≥ 3× "
        f"{ok(r['speedup_kd'] >= 3)} |"),
        f"| KD tokens/s, `topk` (k=64 + tail) | {tps('kd_topk')} | |",
        (f"| cache bytes read per token, `exact` / `topk` | {r['bytes_per_token_exact']:.0f} / "
        f"{r['bytes_per_token_topk']:.0f} | |"),
    ] + ([
        (f"| DSKD tokens/s, teacher {r['teacher40_params'] / r['student_params']:.0f}× "
        f"(Llama D=512 L=6): cache / online | {tps('cache_dskd_40x')} / {tps('online_dskd_40x')} "
        "| |"),
        (f"| **speed-up cache ÷ online, teacher "
        f"{r['teacher40_params'] / r['student_params']:.0f}×** | **{r['speedup_40x']:.2f}×** | |"),
    ] if "speedup_40x" in r else []))


if __name__ == "__main__":
    main()
