"""Loader headroom against object storage: does a training step wait on the store?

    python benchmarks/store_bench.py --work /tmp/dskd-store            # ~15 min on 2 busy cores
    python benchmarks/store_bench.py --work /tmp/dskd-store --quick    # smoke run
    python benchmarks/store_bench.py --work /tmp/dskd-store --quick --latency-ms 30  # + S3 TTFB

distill_bench's 10× teacher caches the toy data once; the cache is copied into a local
S3-compatible server (moto's `moto_server`, its own process, on 127.0.0.1). Side by side, in one
run, on the same cache bytes:

1. loader tokens/s (shard reads + student tokenization + collate, 2 DataLoader workers, no
   training) from disk, from the store without read-ahead, and from the store with it;
2. `dskd distill` tokens/s (DSKD from the cache, own process each, 1 torch thread) in the same
   three settings, with the share of the loop's wall time spent waiting for a batch
   (metrics.jsonl `data_wait`).

Headroom = loader tokens/s ÷ distill tokens/s from disk: above 1, the loader keeps ahead of
training and a step does not wait on the store. moto on localhost has no WAN latency; what hides
a real store's latency is the loader's read-ahead (each DataLoader worker names its next
DSKD_READ_AHEAD_BATCHES micro-batches to background threads, which open their shards in two
concurrent request rounds and read their blocks) plus the DataLoader's prefetched batches.
Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_bench import THREADS, big_teacher, distill, loader_only, log, make_cache

from dskd.pipeline.toyworld import build_toy_world
from dskd.pipeline.train.sources import READ_AHEAD_BATCHES


def start_moto(work: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_file = open(work / "moto.log", "w")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1",
                             "-p", str(port)], stdout=log_file, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, endpoint
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto_server did not start; see moto.log")


def start_latency_proxy(endpoint: str, latency_ms: float) -> str:
    """A TCP proxy in front of ``endpoint`` that holds every request for ``latency_ms`` before
    passing it on: a store's time to first byte (tens of ms for S3 in-region) on top of
    localhost. Runs in a daemon thread of this process for the rest of the run."""
    import asyncio
    import threading

    host, port = endpoint.removeprefix("http://").split(":")
    ready: dict[str, int] = {}
    started = threading.Event()

    async def pipe(reader, writer, delay: float) -> None:
        try:
            while data := await reader.read(1 << 16):
                if delay:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def handle(c_reader, c_writer) -> None:
        s_reader, s_writer = await asyncio.open_connection(host, int(port))
        await asyncio.gather(pipe(c_reader, s_writer, latency_ms / 1000),
                             pipe(s_reader, c_writer, 0.0))

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        ready["port"] = server.sockets[0].getsockname()[1]
        started.set()
        await server.serve_forever()

    threading.Thread(target=lambda: asyncio.run(serve()), daemon=True).start()
    started.wait(30)
    return f"http://127.0.0.1:{ready['port']}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--latency-ms", type=float, default=0.0,
                    help="added to every request to the store (a proxy in front of moto)")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    steps, warmup, bs = (12, 3, 8) if args.quick else (40, 3, 8)

    world = build_toy_world(work / "world", seed=0, preset="tiny")
    teacher = big_teacher(world, work / "teacher_10x")
    student = Path(world.student)
    cache = make_cache(teacher, Path(world.train), work / "cache")

    proc, endpoint = start_moto(work)
    try:
        # credentials the way users give them: the standard variables (fake ones for moto)
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL_S3=endpoint,
                          DSKD_STORE_CACHE=str(work / "store-views"))
        import s3fs

        fs = s3fs.S3FileSystem()
        fs.mkdir("dskd-bench")
        t = time.perf_counter()
        fs.put(str(cache) + "/", "s3://dskd-bench/cache/", recursive=True)
        url = "s3://dskd-bench/cache"
        m = json.loads((cache / "manifest.json").read_text())
        r: dict = {"cache_mb": m["totals"]["bytes"] / 2**20, "n_shards": len(m["shards"]),
                   "upload_s": time.perf_counter() - t, "batch_size": bs, "steps": steps,
                   "workers": args.workers, "torch_threads": int(THREADS)}
        log(f"uploaded {r['cache_mb']:.1f} MB in {r['upload_s']:.1f}s")
        r["latency_ms"] = args.latency_ms
        if args.latency_ms:  # reads go through the delaying proxy from here on
            os.environ["AWS_ENDPOINT_URL_S3"] = start_latency_proxy(endpoint, args.latency_ms)
            s3fs.S3FileSystem.clear_instance_cache()

        torch.set_num_threads(int(THREADS))
        r["read_ahead"] = READ_AHEAD_BATCHES
        runs = (("disk", str(cache), {}), ("store_no_read_ahead", url, {"read_ahead": 0}),
                ("store", url, {}))
        for where, loc, opts in runs:
            r[f"loader_{where}"] = loader_only(loc, student, bs, args.workers, steps * 3,
                                               ["hidden"], **opts)
            log(f"loader from {where}: {r[f'loader_{where}']:,.0f} tok/s")
        common = {"student": str(student), "batch_size": bs, "max_steps": steps,
                  "num_workers": args.workers, "seed": 0, "method": "dskd"}
        for where, loc, opts in runs:
            os.environ["DSKD_READ_AHEAD_BATCHES"] = str(opts.get("read_ahead", READ_AHEAD_BATCHES))
            r[f"distill_{where}"] = distill(f"distill_{where}", work, warmup, cache=loc, **common)
        os.environ.pop("DSKD_READ_AHEAD_BATCHES")
        train = r["distill_disk"]["tokens_per_s"]
        for where, _, _ in runs:
            r[f"headroom_{where}"] = r[f"loader_{where}"] / train
        r["distill_store_vs_disk"] = r["distill_store"]["tokens_per_s"] / train
        r["same_final_loss"] = len({r[f"distill_{w}"]["final_loss"] for w, _, _ in runs}) == 1
    finally:
        proc.kill()
        proc.wait()
    (work / "results.json").write_text(json.dumps(r, indent=2) + "\n")
    print(report(r))


def report(r: dict) -> str:
    cols = ("disk", "store_no_read_ahead", "store")

    def row(label: str, fmt) -> str:
        return f"| {label} | " + " | ".join(fmt(c) for c in cols) + " |"

    def wait(c: str) -> str:
        w = r[f"distill_{c}"].get("data_wait")
        return "n/a" if w is None else f"{100 * w:.1f}%"
    return "\n".join([
        (f"cache {r['cache_mb']:.1f} MB in {r['n_shards']} shards; batch {r['batch_size']}, "
         f"{r['steps']} steps, {r['workers']} DataLoader workers, {r['torch_threads']} torch "
         f"thread(s); {r.get('latency_ms', 0):g} ms added to every store request"),
        "",
        ("| | from disk | from the store (moto S3), no read-ahead | from the store, read-ahead "
         f"{r['read_ahead']} micro-batches |"),
        "|---|---:|---:|---:|",
        row("loader alone, tokens/s", lambda c: f"{r[f'loader_{c}']:,.0f}"),
        row("loader headroom (loader ÷ distill from disk)", lambda c: f"{r[f'headroom_{c}']:.1f}×"),
        row("`dskd distill` (DSKD), tokens/s",
            lambda c: f"{r[f'distill_{c}']['tokens_per_s']:,.0f}"),
        row("share of the training loop's time spent waiting for a batch", wait),
        "",
        (f"distill from the store (read-ahead) ÷ from disk: {r['distill_store_vs_disk']:.2f}; "
         f"same final loss in all three: {r['same_final_loss']}"),
    ])


if __name__ == "__main__":
    main()
