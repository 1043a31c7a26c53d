"""Teacher-cache benchmark: overhead vs a bare forward, writer vs raw disk, bytes/token, fp8/bf16 KL.

    python benchmarks/cache_bench.py --work /tmp/cache-bench            # ~5-10 min on 2 CPU cores
    python benchmarks/cache_bench.py --work /tmp/cache-bench --quick    # smaller, for a smoke run

Prints a markdown report (paste it into docs/benchmarks.md) and writes results.json in --work.

1. overhead: cache-teacher's shard loop (forward + head step + encode + background writes) ÷ a bare
   ``model(ids).logits`` forward over the same length-bucketed batches (goal ≤ 1.10).
2. writer: ShardWriter.commit MB/s on a realistic shard (D_t=4096, k=64) ÷ raw sequential write
   MB/s of the same number of bytes, both with fsync, in the same run (goal ≥ 0.5).
3. bytes/token per field for k = 16/64/128 and each hidden dtype (toy teacher, D_t=256), plus the
   same arithmetic for D_t = 4096.
4. extra KL(p_fp32 || p_dtype) of the teacher distribution rebuilt from stored hidden states, for
   fp16, bf16 and fp8, on a toy teacher briefly trained so its distributions are peaked.
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

from dskd.pipeline.cache import spec
from dskd.pipeline.cache.manifest import load_manifest
from dskd.pipeline.cache.quant import codes_to_numpy, decode_hidden, encode_hidden
from dskd.pipeline.cache.writer import ExampleRows, ShardLayout, ShardWriter
from dskd.pipeline.data import load_examples
from dskd.pipeline.teachers import length_batches
from dskd.pipeline.teachers.hf_backend import HFTeacher
from dskd.pipeline.tokenize import tokenize_example
from dskd.pipeline.toyworld import build_toy_world
from dskd.pipeline.train.distributed import DistEnv
from dskd.stages.cache_teacher import CacheTeacherConfig, cache_teacher


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- teachers

def medium_teacher(world, out: Path, hidden: int, layers: int) -> Path:
    """A random Llama big enough that its forward, not Python overhead, dominates."""
    if (out / "config.json").is_file():
        return out
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(world.teacher)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64,
                      num_key_value_heads=hidden // 64, max_position_embeddings=1024,
                      tie_word_embeddings=False, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def trained_teacher(world, out: Path, steps: int) -> Path:
    """The toy teacher after `steps` of plain SFT on the toy train split, so that its next-token
    distributions are peaked like a real teacher's (a random init is nearly uniform, and any
    quantization KL on it would be meaninglessly small)."""
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world.teacher)
    model = AutoModelForCausalLM.from_pretrained(world.teacher, dtype=torch.float32)
    exs = [tokenize_example(e, tok, 256, 256) for e in load_examples(world.train)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = np.random.default_rng(0)
    model.train()
    for step in range(steps):
        batch = [exs[i] for i in rng.choice(len(exs), 16, replace=False)]
        T = max(len(x.input_ids) for x in batch)
        ids = torch.full((16, T), tok.pad_token_id)
        labels = torch.full((16, T), -100)
        for i, x in enumerate(batch):
            ids[i, :len(x.input_ids)] = torch.tensor(x.input_ids)
            labels[i, :len(x.input_ids)] = torch.tensor(x.input_ids)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            log(f"  train step {step}: loss {loss.item():.3f}")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# --------------------------------------------------------------------------- 1. overhead

def bare_forward_s(teacher: HFTeacher, seqs: list[list[int]], batches: list[list[int]]
                   ) -> tuple[float, float]:
    """What a user would run without dskd: the model's own forward, logits included.
    Returns (wall s, process CPU s)."""
    t, c = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for b in batches:
            ids, mask = teacher._batch([seqs[i] for i in b])
            teacher.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    return time.perf_counter() - t, time.process_time() - c


def overhead(world, teacher_dir: Path, work: Path, n: int, shard_size: int, repeats: int) -> dict:
    teacher = HFTeacher(teacher_dir)
    tok_cfg = {"teacher": str(teacher_dir), "data": str(world.train), "limit": n,
               "shard_size": shard_size, "top_k": 64, "batch_tokens": 8192, "progress": False}
    tok = __import__("transformers").AutoTokenizer.from_pretrained(teacher_dir)
    seqs = [tokenize_example(e, tok).input_ids[:-1] for e in load_examples(world.train, limit=n)]
    lengths = [len(s) for s in seqs]
    # the cache's batches: length-bucketed inside each shard (shards never share a batch, so
    # that a shard's bytes do not depend on its neighbours); and the best a bare run could do
    same = [[a + i for i in b] for a in range(0, n, shard_size)
            for b in length_batches(lengths[a:a + shard_size], tok_cfg["batch_tokens"])]
    best = length_batches(lengths, tok_cfg["batch_tokens"])
    bare, bare_g, loop, total, write, head, bare_cpu, loop_cpu = ([] for _ in range(8))
    for r in range(repeats):  # interleaved, best of: the machine is shared
        w, c = bare_forward_s(teacher, seqs, same)
        bare.append(w)
        bare_cpu.append(c)
        bare_g.append(bare_forward_s(teacher, seqs, best)[0])
        out = work / f"overhead-{teacher_dir.name}"
        shutil.rmtree(out, ignore_errors=True)
        _, st = cache_teacher(CacheTeacherConfig(out=str(out), **tok_cfg), DistEnv(), backend=teacher)
        loop.append(st.wall_s)
        loop_cpu.append(st.cpu_s)
        total.append(st.total_s)
        write.append(st.write_s)
        head.append(st.head_s)
        log(f"  {teacher_dir.name} run {r}: bare {bare[-1]:.2f}s (cpu {c:.2f}; globally "
            f"bucketed {bare_g[-1]:.2f}s), cache loop "
            f"{loop[-1]:.2f}s (cpu {st.cpu_s:.2f}) "
            f"(head {st.head_s:.2f}s, writer thread {st.write_s:.2f}s), stage total {total[-1]:.2f}s")
    tokens = sum(len(s) for s in seqs)
    return {"teacher": teacher_dir.name, "shard_size": shard_size, "params_M": round(sum(p.numel() for p in teacher.model.parameters()) / 1e6, 1),
            "examples": n, "tokens": tokens, "bare_forward_s": min(bare), "cache_loop_s": min(loop),
            "head_step_s": min(head), "writer_thread_s": min(write), "stage_total_s": min(total),
            "ratio": min(loop) / min(bare), "ratio_total": min(total) / min(bare),
            "bare_cpu_s": min(bare_cpu), "cache_loop_cpu_s": min(loop_cpu),
            "ratio_cpu": min(loop_cpu) / min(bare_cpu), "bare_global_s": min(bare_g),
            "ratio_global": min(loop) / min(bare_g)}


# --------------------------------------------------------------------------- 2. writer vs disk

def writer_vs_disk(work: Path, D: int, k: int, rows_per_example: int, examples: int,
                   repeats: int) -> dict:
    rng = np.random.default_rng(0)
    T = rows_per_example
    h = rng.standard_normal((T, D), dtype=np.float32).astype(np.float16)
    tokens = {"hidden": h, "topk_ids": rng.integers(0, 32000, (T, k)).astype(np.int32),
              "topk_logprobs": -rng.random((T, k), dtype=np.float32),
              "lse": rng.random(T, dtype=np.float32), "tail_logprob": -rng.random(T, dtype=np.float32),
              "next_logprob": -rng.random(T, dtype=np.float32)}
    rows = [ExampleRows(f"e{i}", i, "p" * 400, "r" * 400, list(range(T + 1)), 10,
                        [(j, j + 1) for j in range(T + 1)], tokens) for i in range(examples)]
    lay = ShardLayout("fp16", k, D)
    d = work / "writer"
    best_w, best_raw, nbytes = 0.0, 0.0, 0
    for _ in range(repeats):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        w = ShardWriter(d, 0, (0, examples), lay, fsync=True)
        for r in rows:
            w.add(r)
        t = time.perf_counter()
        rec = w.commit()
        dt = time.perf_counter() - t
        nbytes = rec["bytes"]
        best_w = max(best_w, nbytes / dt / 1e6)
        # raw: the same bytes, one sequential write + fsync, from memory
        buf = np.random.default_rng(1).bytes(nbytes)
        t = time.perf_counter()
        with open(d / "raw.bin", "wb") as f:
            f.write(buf)
            f.flush()
            os.fsync(f.fileno())
        best_raw = max(best_raw, nbytes / (time.perf_counter() - t) / 1e6)
        (d / "raw.bin").unlink()
        log(f"  writer {nbytes / dt / 1e6:.0f} MB/s, raw {best_raw:.0f} MB/s (best so far)")
    shutil.rmtree(d, ignore_errors=True)
    return {"shard_MB": nbytes / 1e6, "D": D, "k": k, "writer_MBps": best_w, "raw_MBps": best_raw,
            "ratio": best_w / best_raw}


# --------------------------------------------------------------------------- 3. bytes/token

def bytes_per_token(world, teacher_dir: Path, work: Path, n: int) -> list[dict]:
    teacher = HFTeacher(teacher_dir)
    out = []
    for k in (16, 64, 128):
        for dt in ("fp16", "bf16", "fp8"):
            d = work / f"bpt-{k}-{dt}"
            shutil.rmtree(d, ignore_errors=True)
            cache_teacher(CacheTeacherConfig(teacher=str(teacher_dir), data=str(world.train),
                                             out=str(d), limit=n, top_k=k, hidden_dtype=dt,
                                             progress=False), DistEnv(), backend=teacher)
            t = load_manifest(d)["totals"]
            out.append({"k": k, "hidden_dtype": dt, **t["bytes_per_token"]})
            shutil.rmtree(d)
    return out


def analytic_bytes_per_token(D: int) -> list[dict]:
    """Payload bytes per token row, no container overhead, for a real-sized teacher."""
    rows = []
    for k in (16, 64, 128):
        for dt in ("fp16", "bf16", "fp8"):
            hid = D * spec.HIDDEN_STORAGE[dt].itemsize + (4 if dt == "fp8" else 0)
            rows.append({"k": k, "hidden_dtype": dt, "hidden": hid, "topk": 8 * k, "scalars": 12,
                         "total": hid + 8 * k + 12})
    return rows


# --------------------------------------------------------------------------- 4. KL

def quant_kl(world, teacher_dir: Path, n: int) -> list[dict]:
    teacher = HFTeacher(teacher_dir)
    head = teacher.head()
    tok = __import__("transformers").AutoTokenizer.from_pretrained(teacher_dir)
    seqs = [tokenize_example(e, tok).input_ids[:-1] for e in load_examples(world.valid, limit=n)]
    H = torch.cat([h for b in length_batches([len(s) for s in seqs], 8192)
                   for h in teacher.hidden_states([seqs[i] for i in b])])  # (N, D)
    ref = head.logits(H).double().log_softmax(-1)  # (N, V) the fp32 teacher; KL in float64
    res = []
    for dt in ("fp16", "bf16", "fp8"):
        codes, scale = encode_hidden(H, dt)
        back = torch.from_numpy(decode_hidden(codes_to_numpy(codes, dt), dt,
                                              None if scale is None else scale.numpy()))
        q = head.logits(back).double().log_softmax(-1)
        kl = (ref.exp() * (ref - q)).sum(-1)  # (N,)
        res.append({"hidden_dtype": dt, "tokens": H.shape[0],
                    "kl_mean": kl.mean().item(), "kl_p99": kl.quantile(0.99).item(),
                    "kl_max": kl.max().item(),
                    "top1_agree": (ref.argmax(-1) == q.argmax(-1)).float().mean().item(),
                    "max_abs_logit_err": (head.logits(H) - head.logits(back)).abs().max().item()})
    ent = -(ref.exp() * ref).sum(-1).mean().item()
    for r in res:
        r["extra_kl_vs_fp16"] = r["kl_mean"] - res[0]["kl_mean"]
        r["teacher_entropy"] = ent
    return res


# --------------------------------------------------------------------------- report

def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def report(R: dict) -> str:
    L = [f"Machine: {R['machine']}. Command: `{R['command']}`.", ""]
    L += [("**1. cache-teacher overhead vs a bare teacher forward** (same examples and the "
           "cache's batches, i.e. length-bucketed inside each shard; fp32 CPU; best of interleaved "
           "repeats. \"vs global\": the bare forward bucketing all examples at once)"), ""]
    L += table(["teacher", "params", "examples", "shard size", "tokens", "bare forward s",
                "cache loop s", "ratio (goal ≤ 1.10)", "CPU-time ratio", "ratio vs global",
                "whole stage s", "ratio incl. startup"],
               [[o["teacher"], f"{o['params_M']}M", o["examples"], o["shard_size"],
                 f"{o['tokens']:,}",
                 f"{o['bare_forward_s']:.2f}", f"{o['cache_loop_s']:.2f}", f"**{o['ratio']:.2f}**",
                 f"{o['ratio_cpu']:.2f}", f"{o['ratio_global']:.2f}", f"{o['stage_total_s']:.2f}", f"{o['ratio_total']:.2f}"] for o in R["overhead"]])
    w = R["writer"]
    L += ["", (f"**2. writer vs raw disk** (one shard, D_t={w['D']}, k={w['k']}, fp16, "
          f"{w['shard_MB']:.0f} MB, fsync on both, best of repeats)"), ""]
    L += table(["writer MB/s", "raw sequential write MB/s", "ratio (goal ≥ 0.5)"],
               [[f"{w['writer_MBps']:.0f}", f"{w['raw_MBps']:.0f}", f"**{w['ratio']:.2f}**"]])
    L += ["", ("**3. bytes per token row, measured** (toy teacher, D_t=256, V=1916; `examples` is "
          "the Arrow file; Zarr metadata and shard indexes included)"), ""]
    L += table(["k", "hidden dtype", "hidden", "hidden_scale", "topk_ids", "topk_logprobs", "lse",
                "tail", "next", "token_offsets", "examples", "total"],
               [[b["k"], b["hidden_dtype"]] + [f"{b.get(f, 0):.1f}" for f in (
                   "hidden", "hidden_scale", "topk_ids", "topk_logprobs", "lse", "tail_logprob",
                   "next_logprob", "token_offsets", "examples", "total")]
                for b in R["bytes_per_token"]])
    L += ["", "Payload arithmetic for a D_t = 4096 teacher (bytes per token row):", ""]
    L += table(["k", "hidden dtype", "hidden", "top-k (ids + log-probs)", "lse + tail + next",
                "total"], [[a["k"], a["hidden_dtype"], a["hidden"], a["topk"], a["scalars"],
                            a["total"]] for a in R["bytes_per_token_4096"]])
    kl = R["kl"]
    L += ["", (f"**4. KL of the teacher distribution rebuilt from stored hidden states** "
          f"(hidden @ head vs the fp32 teacher; toy teacher after {R['train_steps']} SFT steps, "
          f"mean entropy {kl[0]['teacher_entropy']:.2f} nats, {kl[0]['tokens']:,} valid tokens)"), ""]
    L += table(["hidden dtype", "mean KL (nats)", "extra KL vs fp16", "p99 KL", "max KL",
                "top-1 agreement", "max abs logit error"],
               [[r["hidden_dtype"], f"{r['kl_mean']:.2e}", f"{r['extra_kl_vs_fp16']:.2e}",
                 f"{r['kl_p99']:.2e}", f"{r['kl_max']:.2e}", f"{r['top1_agree']:.4f}",
                 f"{r['max_abs_logit_err']:.3g}"] for r in kl])
    return "\n".join(L)


SECTIONS = ("writer", "overhead", "bytes", "kl")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/dskd-cache-bench"))
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    ap.add_argument("--train-steps", type=int, default=None)
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help="comma-separated sections to (re)run; others keep --work/results.json")
    args = ap.parse_args()
    q, work, only = args.quick, args.work, set(args.only.split(","))
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    world = build_toy_world(work / "toyworld", seed=0, preset="tiny")
    steps = args.train_steps if args.train_steps is not None else (30 if q else 300)
    results = work / "results.json"
    R: dict = json.loads(results.read_text()) if results.is_file() else {}
    R |= {"command": " ".join(["python"] + sys.argv), "train_steps": steps,
          "machine": f"{os.cpu_count()} CPU cores (shared with other jobs), torch "
                     f"{torch.__version__}, {torch.get_num_threads()} threads, no GPU"}
    if "writer" in only:
        log("2. writer vs disk")
        R["writer"] = writer_vs_disk(work, 4096, 64, 300, 8 if q else 64, 2 if q else 3)
    if "overhead" in only:
        log("1. overhead")
        medium = medium_teacher(world, work / "medium-teacher", 256 if q else 512, 2 if q else 6)
        R["overhead"] = [overhead(world, t, work, 128 if q else 512, 64 if q else 256,
                                  2 if q else 3) for t in (world.teacher, medium)]
    if "bytes" in only:
        log("3. bytes/token")
        R["bytes_per_token"] = bytes_per_token(world, world.teacher, work, 32 if q else 100)
        R["bytes_per_token_4096"] = analytic_bytes_per_token(4096)
    if "kl" in only:
        log("4. KL (training the toy teacher first)")
        trained = trained_teacher(world, work / f"trained-teacher-{steps}", steps)
        R["kl"] = quant_kl(world, trained, 32 if q else 100)
    results.write_text(json.dumps(R, indent=2))
    print(report(R))


if __name__ == "__main__":
    main()
