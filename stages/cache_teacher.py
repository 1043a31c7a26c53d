"""Run the teacher once over a dataset and write the teacher cache (stage 1).

    dskd cache-teacher --teacher TEACHER_DIR --data train.jsonl --out CACHE_DIR
    torchrun --nproc-per-node 8 -m dskd.cli cache-teacher ...   # each rank writes its own shards
    dskd cache-teacher ... --num-workers 4 --worker-index $SLURM_ARRAY_TASK_ID   # job arrays

Recipe: config → every check that needs no model (lock, fingerprints vs an existing cache) →
teacher → head check on a real batch → shards (forward, head step, encode; written whole by a
background thread) → manifest. Rerunning the same command resumes; the result is bit-identical to
an uninterrupted run.
"""

from __future__ import annotations

import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..pipeline.cache import spec
from ..pipeline.cache.fingerprint import (
    config_fingerprint,
    tokenizer_fingerprint,
    weights_fingerprint,
)
from ..pipeline.cache.lock import ObjectLock, WriterLock
from ..pipeline.cache.manifest import finalize, load_commits, load_manifest
from ..pipeline.cache.quant import codes_to_numpy, encode_hidden
from ..pipeline.cache.remote import Store, check_url, is_url, local_path
from ..pipeline.cache.store import discard_uncommitted, resumable_manifest, start_cache, write_head
from ..pipeline.cache.tokenizer import TOKENIZER_DIR, write_tokenizer
from ..pipeline.cache.writer import ExampleRows, ShardLayout, ShardWriter
from ..pipeline.cache_rows import RowPlan, RowSource, plan_rows, shard_examples
from ..pipeline.config import ConfigError, save_config
from ..pipeline.data import BadRows
from ..pipeline.teachers import TeacherBackend, checkpoint_dtype, length_batches, resolve_dtype
from ..pipeline.teachers.head import Head, head_step
from ..pipeline.tokenize import TokenizedExample, check_tokenizer
from ..pipeline.train.distributed import all_gather_object, barrier, cleanup, init_distributed
from ..pipeline.train.logger import stage_progress

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROBE_EXAMPLES = 4  # the head check runs on the dataset's first examples: deterministic


@dataclass
class CacheTeacherConfig:
    teacher: str = field(default="", metadata={"help": "teacher model directory (HF format)"})
    data: str = field(default="", metadata={"help": "dataset file or directory (jsonl/json/parquet/csv/HF dir)"})
    out: str = field(default="", metadata={
        "help": "cache to write (or resume): a dir, or a store URL (s3://bucket/prefix, gs://…)"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer dir [default: --teacher]"})
    limit: int | None = field(default=None, metadata={"help": "use only the first N examples"})
    backend: Literal["transformers", "vllm"] = field(default="transformers", metadata={"help": "teacher backend"})
    hidden_dtype: Literal["fp16", "bf16", "fp8"] = field(
        default="fp16", metadata={"help": "storage dtype of hidden states (fp8: e4m3 + per-token scale)"})
    top_k: int = field(default=64, metadata={"help": "top-k ids/log-probs kept per token (0: none)"})
    topk_logprobs: Literal["q8", "fp16", "fp32"] = field(default="q8", metadata={
        "help": "storage of top-k log-probs: q8 (1 byte, extra KL < 1e-5 nats), fp16, fp32"})
    sampled_targets: int = field(default=0, metadata={
        "help": "RS-KD: also draw N ids per token from the teacher and keep the distinct ones "
                "with their counts, for distill --teacher-signal sampled (0: none)"})
    sampled_temperature: float = field(default=1.0, metadata={
        "help": "temperature of the distribution --sampled-targets draws from (1.0: the "
                "teacher's own, untempered). distill --teacher-signal sampled needs "
                "--kd-temperature equal to it, and distill's default is 2.0 (official DSKD): "
                "cache at 2.0 to train with that default, or train with --kd-temperature 1.0"})
    batch_tokens: int = field(default=16384, metadata={"help": "padded tokens per forward batch"})
    shard_size: int = field(default=256, metadata={"help": "examples per shard"})
    max_prompt_len: int = field(default=256, metadata={"help": "prompt tokens kept"})
    max_len: int = field(default=512, metadata={"help": "tokens kept per example (prompt+response+eos)"})
    template: Literal["dskd", "chat", "none"] = field(default="dskd", metadata={"help": "prompt template"})
    field_map: str | None = field(default=None, metadata={"help": "canonical=column,... for unknown schemas"})
    on_bad_row: Literal["error", "skip"] = field(default="error", metadata={"help": "bad-row policy"})
    num_workers: int = field(default=1, metadata={"help": "independent workers (job arrays) sharing --out"})
    worker_index: int = field(default=0, metadata={"help": "this worker's index in [0, --num-workers)"})
    overwrite: bool = field(default=False, metadata={"help": "delete an existing cache at --out and start over"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "teacher compute dtype (auto: fp32 on CPU; bf16 on GPU, "
                                  "fp32 where the GPU has no bf16; the manifest records it)"})
    seed: int = field(default=0, metadata={"help": "random seed of the --sampled-targets draws (all else is deterministic)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


@dataclass
class RunStats:
    """What one worker did (the benchmark reads these)."""

    examples: int = 0
    tokens: int = 0
    shards: int = 0
    bytes: int = 0
    total_s: float = 0.0  # the whole stage: data, tokenizer, teacher load, head check, shards
    wall_s: float = 0.0  # the shard loop
    cpu_s: float = 0.0  # CPU time of the whole process (all threads) during the shard loop
    forward_s: float = 0.0  # backend hidden states
    head_s: float = 0.0  # head step + encode + copy to host
    write_s: float = 0.0  # shard commits, in the writer thread
    head_check_err: float | None = None


def validate(cfg: CacheTeacherConfig) -> None:
    """Every config problem at once, before anything is loaded."""
    errs = []
    for name in ("teacher", "data", "out"):
        if not getattr(cfg, name):
            errs.append(f"--{name} is required")
    if cfg.out and is_url(cfg.out) and (bad := check_url(cfg.out)):
        errs.append(f"--out {bad}")
    if cfg.teacher and not (Path(cfg.teacher) / "config.json").is_file():
        errs.append(f"--teacher {cfg.teacher}: no config.json there; pass a HF model directory")
    if cfg.top_k < 0:
        errs.append(f"--top-k {cfg.top_k}: must be ≥ 0")
    if cfg.sampled_targets < 0 or cfg.sampled_targets > 65535:
        errs.append(f"--sampled-targets {cfg.sampled_targets}: must be in [0, 65535]")
    if not cfg.sampled_temperature > 0:
        errs.append(f"--sampled-temperature {cfg.sampled_temperature}: must be > 0")
    if cfg.shard_size < 1:
        errs.append(f"--shard-size {cfg.shard_size}: must be ≥ 1")
    if cfg.batch_tokens < cfg.max_len:
        errs.append(f"--batch-tokens {cfg.batch_tokens} must be ≥ --max-len {cfg.max_len}")
    if not 0 <= cfg.worker_index < cfg.num_workers:
        errs.append(f"--worker-index {cfg.worker_index} must be in [0, --num-workers {cfg.num_workers})")
    if cfg.overwrite and cfg.num_workers > 1:
        errs.append("--overwrite with --num-workers > 1 would let one worker delete another's "
                    "shards; delete the cache dir once before launching the workers")
    if cfg.limit is not None and cfg.limit < 1:
        errs.append(f"--limit {cfg.limit}: must be ≥ 1")
    if errs:
        raise ConfigError("cache-teacher: " + "; ".join(errs))


def run(cfg: CacheTeacherConfig) -> Path | str:
    validate(cfg)
    env = init_distributed(cfg.device)
    try:
        cache_teacher(cfg, env)
    finally:
        cleanup()
    return cfg.out if is_url(cfg.out) else local_path(cfg.out)


def cache_teacher(cfg: CacheTeacherConfig, env: Any, backend: TeacherBackend | None = None
                  ) -> tuple[dict | None, RunStats]:
    """The stage body; returns (the final manifest or None if other workers are still writing,
    this worker's stats). ``backend``: an already loaded teacher to reuse (benchmarks)."""
    t_start = time.perf_counter()
    console = Console(stderr=True, quiet=not cfg.progress)
    torch.manual_seed(cfg.seed)
    # A store URL: the stage works in the store's local view (manifest, commit records, head,
    # tokenizer, the shard being written) and publishes each object in commit-protocol order.
    slot = cfg.worker_index * env.world_size + env.rank
    n_slots = cfg.num_workers * env.world_size
    # several writers (ranks, job-array workers) on one host: each stages in its own view
    store = (Store(cfg.out, writer=f"w{slot}-of-{n_slots}" if n_slots > 1 else "")
             if is_url(cfg.out) else None)
    out = store.view if store else local_path(cfg.out)
    lead = slot == 0  # writes config.yaml and the bad-row report

    # --- data, tokenization, fingerprints: everything that needs no model. The dataset is
    # streamed, never held: one pass checks every row (each rank tokenizes 1/W of them) for the
    # count and fingerprint; the shard loop reads it again and tokenizes only this worker's shards.
    from transformers import AutoTokenizer

    tok_dir = cfg.tokenizer or cfg.teacher
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    check_tokenizer(tokenizer)
    bad = BadRows(cfg.data, cfg.on_bad_row)
    src = RowSource(cfg.data, tokenizer, cfg.field_map, cfg.template, cfg.limit,
                    cfg.max_prompt_len, cfg.max_len)
    plan = plan_rows(src, bad, env.rank, env.world_size, all_gather_object)
    fps = fingerprints(cfg, tok_dir, plan, env.device)
    ranges = spec.shard_ranges(plan.n_examples, cfg.shard_size)
    mine = spec.shards_for_worker(len(ranges), slot, n_slots)
    out.mkdir(parents=True, exist_ok=True)

    lock = (ObjectLock(store, slot, n_slots) if store  # it says a takeover on stderr, always
            else WriterLock(out, slot, n_slots))
    with lock:
        # torchrun: rank 0 decides (and may --overwrite) alone; the others follow its manifest.
        if env.rank == 0:
            if store:
                store.pull(for_write=True)
                if cfg.overwrite:
                    store.wipe()
            manifest = resumable_manifest(out, fps, cfg.overwrite, cfg.out)
            if store and manifest is None:  # no manifest: nothing is committed, all is leftover
                store.remove(spec.COMMITS_DIR, spec.SHARDS_DIR)
        barrier()
        if env.rank != 0:
            if store:
                store.pull(for_write=True)
            manifest = resumable_manifest(out, fps, overwrite=False, shown=cfg.out)
        if manifest is not None and manifest["complete"]:
            console.print(f"[green]cache {cfg.out} is already complete[/]; nothing to do")
            if store and store.writer:
                shutil.rmtree(store.view, ignore_errors=True)
            return manifest, RunStats()
        if lead:
            save_config(cfg, out)
            report = bad.write_report(out)
            if store:
                store.push("config.yaml", *([report.name] if report else []))

        own_backend = backend is None
        backend = backend or load_backend(cfg, env.device)
        _check_backend_dtype(backend, cfg, fps)
        head = backend.head()
        stats = RunStats()
        if manifest is None and env.rank == 0:
            first = [(0, min(PROBE_EXAMPLES, plan.n_examples))]
            probe = [t.input_ids[:-1] for _, t in next(shard_examples(src, plan, first, [0]))[1]]
            stats.head_check_err = backend.check_head(probe) if hasattr(backend, "check_head") else None
            manifest = _start(out, cfg, fps, backend, head, plan.n_examples, stats.head_check_err,
                              tok_dir)
            if store:  # the manifest after what it lists
                store.push(spec.HEAD_FILE, TOKENIZER_DIR, spec.MANIFEST)
        barrier()
        if store:  # what is committed is what the store's commit records say
            store.pull()
        manifest = load_manifest(out)
        committed = load_commits(out)
        removed = discard_uncommitted(out, mine, committed)
        if removed:
            console.print(f"discarded {len(removed)} partial shard(s): {', '.join(removed)}")
        todo = [i for i in mine if i not in committed]
        if len(todo) < len(mine):
            console.print(f"resuming: {len(mine) - len(todo)} of {len(mine)} shards of this worker "
                          "already committed")
        _write_shards(out, cfg, backend, head, src, plan, ranges, todo,
                      ShardLayout.from_manifest(manifest), stats, console, slot, n_slots,
                      lock, store)
        if own_backend:
            backend.close()

    barrier()
    final = None
    if env.rank == 0:
        if store:
            store.pull()
        final = finalize(out)
        if store and final is not None:  # written last: the cache now exists, complete
            store.push(spec.MANIFEST)
    stats.total_s = time.perf_counter() - t_start
    if env.rank == 0:
        if final is None:
            missing = manifest["layout"]["n_shards"] - len(load_commits(out))
            console.print(f"this worker is done; {missing} shard(s) are still being written by other "
                          "workers (the last one to finish writes the manifest)")
        else:
            t = final["totals"]
            console.print(f"[green]cache complete[/]: {cfg.out}  {t['n_examples']:,} examples, "
                          f"{t['n_tokens']:,} tokens, {t['bytes'] / 2**20:,.1f} MiB, "
                          f"{t['bytes_per_token']['total']:.0f} B/token")
    if store and store.writer:  # this writer's scratch view (the shared one stays)
        shutil.rmtree(store.view, ignore_errors=True)
    return final, stats


def fingerprints(cfg: CacheTeacherConfig, tok_dir: str, rows: RowPlan,
                 device: torch.device) -> dict[str, Any]:
    """Everything that decides the cache's bytes. Resuming needs all of them equal."""
    return {
        "format_version": spec.FORMAT_VERSION,
        "teacher_config": config_fingerprint(cfg.teacher),
        "teacher_weights": weights_fingerprint(cfg.teacher),
        "tokenizer": tokenizer_fingerprint(tok_dir),
        "n_examples": rows.n_examples,
        "dataset": rows.fingerprint,
        "template": cfg.template,
        "max_prompt_len": cfg.max_prompt_len,
        "max_len": cfg.max_len,
        "hidden_dtype": cfg.hidden_dtype,
        "top_k": cfg.top_k,
        "topk_logprobs": cfg.topk_logprobs,
        "sampled_targets": cfg.sampled_targets,
        "sampled_temperature": cfg.sampled_temperature,
        "seed": cfg.seed if cfg.sampled_targets else None,  # draws the sampled targets
        "shard_size": cfg.shard_size,
        "backend": cfg.backend,
        "compute": f"{device.type}-{_compute_dtype(cfg, device)}",
    }


def _compute_dtype(cfg: CacheTeacherConfig, device: torch.device) -> str:
    """--teacher-dtype with "auto" resolved: what the fingerprints, the manifest and the backend
    all get (a backend left to resolve "auto" itself may pick another dtype than it says)."""
    return resolve_dtype(cfg.teacher_dtype, device, checkpoint_dtype(cfg.teacher))


def _check_backend_dtype(backend: Any, cfg: CacheTeacherConfig, fps: dict[str, Any]) -> None:
    """The loaded teacher runs in the dtype the cache is about to record, or we stop."""
    ran = str(getattr(backend, "dtype", "")).removeprefix("torch.")
    want = fps["compute"].split("-", 1)[1]
    if ran and ran != want:
        raise ConfigError(f"the {cfg.backend} backend runs the teacher in {ran}, but this cache "
                          f"records {want} (--teacher-dtype {cfg.teacher_dtype}); pass "
                          "--teacher-dtype explicitly with a dtype this backend supports")


def load_backend(cfg: CacheTeacherConfig, device: torch.device) -> TeacherBackend:
    dtype_name = _compute_dtype(cfg, device)
    if cfg.backend == "vllm":
        from ..pipeline.teachers.vllm_backend import VLLMTeacher

        return VLLMTeacher(cfg.teacher, dtype=dtype_name, max_model_len=cfg.max_len,
                           seed=cfg.seed, head_device=device)
    from ..pipeline.teachers.hf_backend import HFTeacher

    return HFTeacher(cfg.teacher, device=device, dtype=_DTYPES[dtype_name])


def _start(out: Path, cfg: CacheTeacherConfig, fps: dict[str, Any], backend: Any, head: Head,
           n_examples: int, check_err: float | None, tok_dir: str) -> dict[str, Any]:
    """Head and tokenizer files, then the manifest header: from here on the cache exists (with
    no shards)."""
    tensors = {spec.HEAD_WEIGHT: head.weight}
    if head.bias is not None:
        tensors[spec.HEAD_BIAS] = head.bias
    if head.embed is not None:
        tensors[spec.EMBED_WEIGHT] = head.embed
    meta = {"logit_scale": head.logit_scale, "tied_embeddings": head.embed is None}
    head_info = write_head(out, tensors, meta) | meta | {
        # max |model logits - hidden @ head| on the first examples (None: backend has no logits)
        "check_max_abs_err": check_err,
    }
    topk = spec.TopkStorage.for_vocab(head.vocab_size, cfg.topk_logprobs)
    layout = {
        "n_examples": n_examples,
        "shard_size": cfg.shard_size,
        "n_shards": len(spec.shard_ranges(n_examples, cfg.shard_size)),
        "hidden_dtype": cfg.hidden_dtype,
        "hidden_storage": str(spec.HIDDEN_STORAGE[cfg.hidden_dtype]),
        "top_k": min(cfg.top_k, head.vocab_size),
        **(topk.layout_keys() if cfg.top_k > 0 else {}),
        **({"sampled_targets": cfg.sampled_targets, "sampled_temperature": cfg.sampled_temperature}
           if cfg.sampled_targets else {}),
        "hidden_size": backend.hidden_size,
        "vocab_size": head.vocab_size,
        "token_fields": [f.name for f in spec.token_fields(
            cfg.hidden_dtype, cfg.top_k, topk, cfg.sampled_targets, head.vocab_size)],
        "checksum": spec.CHECKSUM,
    }
    teacher = {
        "name": Path(cfg.teacher).name,
        "path": str(cfg.teacher),
        "architecture": getattr(backend, "arch", "?"),
        "backend": cfg.backend,
        "compute": fps["compute"],
        "dtype": fps["compute"].split("-", 1)[1],  # the resolved --teacher-dtype
        "template": cfg.template,
        "max_prompt_len": cfg.max_prompt_len,
        "max_len": cfg.max_len,
    }
    # the teacher's tokenizer travels with the cache (MinED needs it where the student trains)
    tokenizer = write_tokenizer(out, tok_dir, cfg.teacher)
    return start_cache(out, fps, teacher, layout, head_info, tokenizer)


def _write_shards(out: Path, cfg: CacheTeacherConfig, backend: Any, head: Head,
                  src: RowSource, plan: RowPlan, ranges: list[tuple[int, int]],
                  todo: list[int], layout: ShardLayout, stats: RunStats, console: Console,
                  slot: int, n_slots: int, lock: WriterLock | ObjectLock,
                  store: Store | None = None) -> None:
    """Forward + head step per length-bucketed batch; each finished shard is committed by a
    background thread while the teacher moves on to the next one (at most one shard waits).
    Each shard's examples are read and tokenized as its turn comes (``shard_examples``)."""
    n_todo = sum(ranges[i][1] - ranges[i][0] for i in todo)
    t0, c0 = time.perf_counter(), time.process_time()
    pending: Future | None = None
    columns = [TextColumn(f"cache-teacher [{slot + 1}/{n_slots}]"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[tps]:,.0f} tok/s  {task.fields[mb]:,.1f} MB"),
               TimeRemainingColumn()]
    line = (f"cache-teacher [{slot + 1}/{n_slots}] {{completed}}/{{total}} examples · "
            "{tps:,.0f} tok/s · {mb:,.1f} MB · ETA {eta}")
    progress = stage_progress(lambda: Progress(*columns, console=console,
                                               disable=not cfg.progress), line, cfg.progress)
    with ThreadPoolExecutor(1) as pool, progress as bar:
        task = bar.add_task("", total=n_todo, tps=0.0, mb=0.0)
        for si, shard in shard_examples(src, plan, ranges, todo):
            a, b = ranges[si]
            # staged for a store: durability is the upload's, not the local disk's
            writer = ShardWriter(out, si, (a, b), layout, fsync=store is None)
            lengths = [len(t.input_ids) - 1 for _, t in shard]
            # one stream of draws per shard, seeded by (seed, shard): a shard's bytes do not
            # depend on which worker writes it or on whether the run was resumed
            gen = torch.Generator(head.device).manual_seed(cfg.seed * 1_000_003 + si)
            for batch in length_batches(lengths, cfg.batch_tokens):
                rows = _cache_batch(backend, head, [shard[i][1] for i in batch], cfg, stats, gen)
                for i, tok in zip(batch, rows):
                    ex, t = shard[i]
                    writer.add(ExampleRows(ex.id, a + i, ex.prompt, ex.response, t.input_ids,
                                           t.prompt_len, t.offsets, tok))
                    stats.tokens += len(t.input_ids)
                stats.examples += len(batch)
                bar.update(task, advance=len(batch), tps=stats.tokens / (time.perf_counter() - t0),
                           mb=stats.bytes / 1e6)
            if pending is not None:
                pending.result()  # bounded memory: one shard in flight while the next is computed
            pending = pool.submit(_commit, writer, stats, lock, store)
        if pending is not None:
            pending.result()
        bar.update(task, mb=stats.bytes / 1e6)
    stats.wall_s = time.perf_counter() - t0
    stats.cpu_s = time.process_time() - c0


def _commit(writer: ShardWriter, stats: RunStats, lock: WriterLock | ObjectLock | None = None,
            store: Store | None = None) -> None:
    t = time.perf_counter()
    if lock is not None:
        lock.check()
    rec = writer.commit()
    if store is not None:
        store.publish_shard(rec)
    stats.write_s += time.perf_counter() - t
    stats.bytes += rec["bytes"]
    stats.shards += 1


def _cache_batch(backend: Any, head: Head, toks: list[TokenizedExample], cfg: CacheTeacherConfig,
                 stats: RunStats, generator: torch.Generator | None = None
                 ) -> list[dict[str, np.ndarray]]:
    """One forward batch → per-example per-token arrays in their storage dtypes.

    The teacher sees s[:-1] (its last token predicts nothing in the cache): row k of example i is
    the hidden state at position k, whose target is s[k+1]."""
    t = time.perf_counter()
    hs = backend.hidden_states([x.input_ids[:-1] for x in toks])
    H = torch.cat([torch.as_tensor(h).to(head.device) for h in hs])  # (N, D_t), N = Σ (n_i - 1)
    t1 = time.perf_counter()
    nxt = torch.as_tensor([i for x in toks for i in x.input_ids[1:]], device=head.device)  # (N,)
    o = head_step(H, nxt, head, cfg.top_k, sampled=cfg.sampled_targets,
                  sample_temperature=cfg.sampled_temperature, generator=generator)
    codes, scale = encode_hidden(H, cfg.hidden_dtype)
    host = {"hidden": codes_to_numpy(codes, cfg.hidden_dtype),
            "lse": o.lse.cpu().numpy(), "tail_logprob": o.tail_logprob.cpu().numpy(),
            "next_logprob": o.next_logprob.cpu().numpy()}
    if scale is not None:
        host["hidden_scale"] = scale.cpu().numpy()
    if cfg.top_k > 0:
        host["topk_ids"] = o.topk_ids.cpu().numpy()
        host["topk_logprobs"] = o.topk_logprobs.cpu().numpy()
    if cfg.sampled_targets:
        host["sampled_ids"] = o.sampled_ids.cpu().numpy()
        host["sampled_counts"] = o.sampled_counts.cpu().numpy()
    cuts = np.cumsum([len(x.input_ids) - 1 for x in toks])[:-1]
    split = {k: np.split(v, cuts) for k, v in host.items()}
    stats.forward_s += t1 - t
    stats.head_s += time.perf_counter() - t1
    return [{k: split[k][j] for k in split} for j in range(len(toks))]
