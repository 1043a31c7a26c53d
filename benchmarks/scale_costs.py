"""Costs that should grow with the data, not with workers or ranks (issue 14, item 1).

    python benchmarks/scale_costs.py --work /tmp/dskd-scale          # ~10 min on 2 cores
    python benchmarks/scale_costs.py --work /tmp/dskd-scale --quick  # smoke run

1. cache bytes read per epoch ÷ cache size, 2 DataLoader workers, 2 epochs: the per-token bytes
   each worker's reader slices and the bytes checksummed (counters in CacheReader), summed over
   the workers (each reports its counters with every micro-batch). Before = the old behaviour
   replayed with the same code: workers re-forked every epoch, each checksumming every shard it
   opens, reads through the block LRU.
2. device→host syncs per training micro-batch in the loss (forward + backward), counted with
   `pipeline/train/syncs.SyncCounter` (no CUDA needed), for each method, now vs the previous
   `map_rows` (its source from git, swapped in), at the real GPT-2 vocabulary's chunk size.
3. peak memory (PSS of the process tree) of `dskd distill` and of `dskd cache-teacher` when
   the dataset grows 10× (goal: flat within 10%).

Prints a markdown report (docs/benchmarks.md) and writes results.json in --work.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_bench import CHILD, distill, log, make_cache, repeat_data

from dskd.pipeline.toyworld import build_toy_world

BEFORE_COMMIT = "064ed2b"  # main before this work: per-chunk `nonzero` in map_rows


# --------------------------------------------------------------------------- 1. bytes per epoch


class Counted:
    """A CacheSource whose micro-batches carry the worker's read counters."""

    def __init__(self, src, build):
        self.src, self.inner, self.num_rows = src, build, src.num_rows

    def fetch(self, idx):
        return self.src.fetch(idx)

    def build(self, rows, padding):
        ids, t = self.inner(rows, padding)
        r = self.src.reader()
        t["_io"] = torch.tensor([os.getpid(), r.bytes_read, r.bytes_verified], dtype=torch.float64)
        return ids, t


def bytes_per_epoch(cache: Path, student: Path, epochs: int = 2, workers: int = 2,
                    before: bool = False) -> dict:
    from dskd.pipeline.train.loader import BatchStream, PlanConfig
    from dskd.pipeline.train.models import load_tokenizer
    from dskd.pipeline.train.sources import BatchBuilder, CacheSource

    tok, _ = load_tokenizer(student)
    fields = ["hidden"]
    src = CacheSource(cache, fields, use_mmap=not before)
    verified_main = 0 if before else src.verify_node_share()
    c = Counted(src, BatchBuilder(tok, 256, 512, teacher_fields=tuple(fields)))
    plan = PlanConfig(batch_size=8, seed=0)
    per_epoch, last = [], {}
    stream = BatchStream(c, plan, 0, c.build, num_workers=workers)
    it = stream.steps()
    for e in range(epochs):
        if before and e > 0:  # the old loader: a new DataLoader (new workers) every epoch
            stream = BatchStream(c, plan, 0, c.build, num_workers=workers)
            stream.seek(e, 0)
            it = stream.steps()
        start = {k: v for k, v in last.items()}
        for _ in range(stream.steps_in_epoch(e)):
            _, group = next(it)
            for mb in group:
                pid, rd, vf = mb.tensors["_io"].tolist()
                last[(e if before else 0, int(pid))] = (rd, vf)
        got = [v for k, v in last.items() if k not in start or start[k] != v]
        read = sum(v[0] - start.get(k, (0, 0))[0] for k, v in last.items())
        ver = sum(v[1] - start.get(k, (0, 0))[1] for k, v in last.items())
        per_epoch.append({"read": read, "verified": ver, "workers_seen": len(got)})
    m = json.loads((cache / "manifest.json").read_text())
    field_bytes = sum(info["bytes"] for s in m["shards"] for rel, info in s["files"].items()
                      if rel.split("/")[0] in fields)
    total = m["totals"]["bytes"]
    return {"field_bytes": field_bytes, "cache_bytes": total, "verified_main": verified_main,
            "epochs": per_epoch}


# --------------------------------------------------------------------------- 2. syncs per step


def _old_map_rows(work: Path):
    """`map_rows` as it was before this change (per-chunk `nonzero`), from git."""
    src = subprocess.run(["git", "show", f"{BEFORE_COMMIT}:pipeline/losses/common.py"],
                         capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    f = work / "old_common.py"
    f.write_text(src)
    spec = importlib.util.spec_from_file_location("old_common", f)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["old_common"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod.map_rows


def syncs_per_step(world, work: Path, methods=("sft", "kd", "dskd", "dskd-cma", "uld", "mined")) -> dict:
    """Loss forward + backward on one collated micro-batch of 8 toy examples, chunked as for
    V = 50,257 (the chunk row count the default chunk budget gives GPT-2's vocabulary)."""
    from dskd.pipeline.data import load_examples
    from dskd.pipeline.losses import (
        StudentBatch,
        TeacherSignal,
        baselines,
        build_loss,
        divergences,
        dskd,
        mined,
    )
    from dskd.pipeline.losses.common import chunk_rows_for
    from dskd.pipeline.train.models import load_tokenizer
    from dskd.pipeline.train.sources import BatchBuilder
    from dskd.pipeline.train.syncs import SyncCounter

    tok, _ = load_tokenizer(world.student)
    exs = load_examples(world.train, limit=8)
    _, t = BatchBuilder(tok, 256, 512, teacher_tokenizer=tok, teacher_pad_id=tok.pad_token_id)(
        exs, False)
    chunk = chunk_rows_for(50257)
    g = torch.Generator().manual_seed(0)
    V, DS, DT = len(tok), 16, 24
    B, T = t["labels"].shape
    n_chunks = -(-B * T // chunk)
    out = {"chunk_rows": chunk, "tokens": B * T, "label_tokens": int(t["labels"].ne(-100).sum())}
    mods = (baselines, divergences, dskd, mined)
    new_map = dskd.map_rows
    old_map = _old_map_rows(work)
    for method in methods:
        kw = {"student_tokenizer": tok, "teacher_tokenizer": tok} if method == "mined" else {}
        loss = build_loss(method, "fkl", d_student=DS, d_teacher=DT, chunk_rows=chunk, **kw)
        row = {}
        for variant in ("before", "now"):
            for m in mods:
                m.map_rows = old_map if variant == "before" else new_map
            hs = torch.randn(B, T, DS, generator=g, requires_grad=True)
            sb = StudentBatch(labels=t["labels"], hidden=hs, input_ids=t["input_ids"],
                              lm_head_weight=torch.randn(V, DS, generator=g),
                              embed_weight=torch.randn(V, DS, generator=g),
                              label_index=t["label_index"] if variant == "now" else None)
            if method == "mined" and variant == "now":
                sb.aligned_rows = loss.mined_aligner(t["input_ids"], t["labels"],
                                               t["teacher_input_ids"], t["teacher_labels"])
            ts = TeacherSignal(labels=t["teacher_labels"], input_ids=t["teacher_input_ids"],
                               hidden=torch.randn(B, T, DT, generator=g),
                               head_weight=torch.randn(V, DT, generator=g),
                               embed_weight=torch.randn(V, DT, generator=g),
                               label_index=t["teacher_label_index"] if variant == "now" else None)
            with SyncCounter() as c:
                loss(sb, ts).loss.backward()
            row[variant] = dict(c.calls)
        for m in mods:
            m.map_rows = new_map
        out[method] = row
        log(f"syncs {method}: before {sum(row['before'].values())} {row['before']}, "
            f"now {sum(row['now'].values())} {row['now']}")
    out["n_chunks"] = n_chunks
    return out


# --------------------------------------------------------------------------- 3. memory at 10×


CACHE_CHILD = CHILD.replace("from dskd.stages.distill import DistillConfig, run",
                            "from dskd.stages.cache_teacher import CacheTeacherConfig as DistillConfig, run")


def cache_teacher_rss(teacher: Path, data: Path, out: Path) -> dict:
    cfg = {"teacher": str(teacher), "data": str(data), "out": str(out), "overwrite": True,
           "shard_size": 32, "top_k": 64, "progress": False}
    res = subprocess.run([sys.executable, "-c", CACHE_CHILD, json.dumps(cfg)], check=False,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if res.returncode != 0:
        raise RuntimeError(f"cache-teacher failed:\n{res.stderr[-3000:]}")
    stats = json.loads(res.stdout.strip().splitlines()[-1])
    log(f"cache-teacher {data.name}: peak PSS {stats['pss_total_mb']:.0f} MB in {stats['wall_s']:.0f}s")
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="bytes,syncs,memory")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(","))
    res_file = work / "results.json"
    r = json.loads(res_file.read_text()) if res_file.is_file() else {}
    world = build_toy_world(work / "world", seed=0, preset="tiny")
    teacher, student = Path(world.teacher), Path(world.student)
    data = Path(world.train)
    torch.set_num_threads(1)
    if "bytes" in only:
        cache = make_cache(teacher, data, work / "cache")
        r["bytes"] = {"now": bytes_per_epoch(cache, student),
                      "before": bytes_per_epoch(cache, student, before=True)}
    if "syncs" in only:
        r["syncs"] = syncs_per_step(world, work)
    if "memory" in only:
        times = 2 if args.quick else 10
        data10 = repeat_data(data, work / f"train_x{times}.jsonl", times)
        r["ct_1x"] = cache_teacher_rss(teacher, data, work / "ct_1x")
        r["ct_10x"] = cache_teacher_rss(teacher, data10, work / "ct_10x")
        steps = 8 if args.quick else 30
        common = {"student": str(student), "batch_size": 8, "max_steps": steps,
                  "num_workers": 2, "seed": 0, "method": "dskd"}
        r["distill_1x"] = distill("scale_1x", work, 3, cache=str(work / "ct_1x"), **common)
        r["distill_10x"] = distill("scale_10x", work, 3, cache=str(work / "ct_10x"), **common)
        r["times"] = times
    res_file.write_text(json.dumps(r, indent=2) + "\n")
    print(report(r))


def report(r: dict) -> str:
    lines = []
    if "bytes" in r:
        lines += [("| loader | epoch | per-token bytes read ÷ their size in the cache | "
                  "bytes checksummed ÷ cache size |"), "|---|---|---|---|"]
        for variant in ("before", "now"):
            b = r["bytes"][variant]
            for e, ep in enumerate(b["epochs"]):
                ver = ep["verified"] + (b["verified_main"] if e == 0 else 0)
                lines.append(f"| {variant} | {e + 1} | {ep['read'] / b['field_bytes']:.3f} | "
                             f"{ver / b['cache_bytes']:.3f} |")
        lines.append("")
    if "syncs" in r:
        s = r["syncs"]
        lines += [(f"Syncs per micro-batch in the loss (forward + backward; {s['tokens']} token "
                  f"rows, {s['label_tokens']} labelled, chunks of {s['chunk_rows']} rows as for "
                  "V = 50,257):"), "", "| method | before | now |", "|---|---|---|"]
        for m, row in s.items():
            if isinstance(row, dict) and "now" in row:
                fmt = lambda d: f"{sum(d.values())} ({', '.join(f'{k} {v}' for k, v in sorted(d.items())) or '–'})"
                lines.append(f"| {m} | {fmt(row['before'])} | {fmt(row['now'])} |")
        lines.append("")
    if "ct_1x" in r:
        t = r["times"]
        ct = r["ct_10x"]["pss_total_mb"] / r["ct_1x"]["pss_total_mb"]
        di = r["distill_10x"]["pss_total_mb"] / r["distill_1x"]["pss_total_mb"]
        lines += ["| stage | peak PSS MB, data 1× | data " + f"{t}× | ratio (goal 1 ± 0.10) |",
                  "|---|---|---|---|",
                  (f"| cache-teacher | {r['ct_1x']['pss_total_mb']:.0f} | "
                  f"{r['ct_10x']['pss_total_mb']:.0f} | {ct:.3f} |"),
                  (f"| distill (DSKD, 2 workers) | {r['distill_1x']['pss_total_mb']:.0f} | "
                  f"{r['distill_10x']['pss_total_mb']:.0f} | {di:.3f} |")]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
