"""What bf16 autocast would cost the exact teacher signal: KL(p_fp32 || p) per token, where p is
the teacher distribution rebuilt as hidden @ head (a) inside a bf16 autocast region (the bug of
issue 12 item 1: autocast casts the matmul to bf16 even for float32 tensors) and (b) in float32
from bf16-stored hidden states (the cost of the cache's bf16 storage), side by side, on the tiny
toy world (untrained teacher, 64 training examples).

    python benchmarks/teacher_precision.py --work /tmp/teacher-precision     # ~1 min on 2 cores

The reference is the fp16-stored hidden states in float32 math (fp16 storage adds ~1e-9 nats).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dskd.pipeline.cache.manifest import load_manifest
from dskd.pipeline.cache.reader import CacheReader
from dskd.pipeline.losses.common import head_logits
from dskd.pipeline.toyworld import build_toy_world
from dskd.pipeline.train.signal import cache_head
from dskd.stages.cache_teacher import CacheTeacherConfig
from dskd.stages.cache_teacher import run as cache_run


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    lp, lq = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--rows", type=int, default=64)
    a = ap.parse_args()
    d = Path(a.work)
    w = build_toy_world(d / "world", seed=0, preset="tiny")
    rows = Path(w.train).read_text().splitlines()[: a.rows]
    (d / "train.jsonl").write_text("\n".join(rows) + "\n")
    hidden = {}
    for dtype in ("fp16", "bf16"):
        out = d / f"cache_{dtype}"
        if not (out / "manifest.json").exists():
            cache_run(CacheTeacherConfig(teacher=str(w.teacher), data=str(d / "train.jsonl"),
                                         out=str(out), hidden_dtype=dtype, top_k=0, progress=False))
        hidden[dtype] = [torch.as_tensor(r.hidden).float() for r in CacheReader(out, fields=["hidden"])]
    head = cache_head(d / "cache_fp16", load_manifest(d / "cache_fp16"), torch.device("cpu"))
    autocast, storage = [], []
    for h, hb in zip(hidden["fp16"], hidden["bf16"]):
        ref = head_logits(h, head.weight, head.bias)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = head_logits(h, head.weight, head.bias)
        autocast.append(kl(ref, under.float()))
        storage.append(kl(ref, head_logits(hb, head.weight, head.bias)))
    res = {"tokens": sum(len(x) for x in autocast), "V_t": head.vocab_size,
           "D_t": head.weight.shape[1]}
    for name, vals in (("bf16 autocast matmul", autocast), ("bf16 hidden storage", storage)):
        v = torch.cat(vals)
        res[name] = {"mean": v.mean().item(), "p99": v.quantile(0.99).item(), "max": v.max().item()}
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
