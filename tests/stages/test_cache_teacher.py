"""cache-teacher on the toy world: what it writes, resume (bit-identical), refusals, locks, workers,
SIGKILL mid-run and torchrun."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from dskd.pipeline.cache import spec
from dskd.pipeline.cache.lock import CacheLockedError, WriterLock
from dskd.pipeline.cache.manifest import load_manifest
from dskd.pipeline.cache.quant import HiddenRangeError
from dskd.pipeline.cache.reader import CacheReader, load_head
from dskd.pipeline.cache.store import CacheMismatchError
from dskd.pipeline.cache.verify import verify_cache
from dskd.pipeline.cache_rows import RowPlan
from dskd.pipeline.config import ConfigError
from dskd.pipeline.data import load_examples
from dskd.pipeline.teachers.hf_backend import HFTeacher
from dskd.pipeline.tokenize import tokenize_example
from dskd.stages import cache_teacher as stage
from dskd.stages.cache_teacher import CacheTeacherConfig, run

N, SHARD = 15, 4  # 4 shards, the last one short


def _cfg(world, out: Path, **kw) -> CacheTeacherConfig:
    base = {"teacher": str(world.teacher), "data": str(world.train), "out": str(out), "limit": N,
            "shard_size": SHARD, "top_k": 16, "batch_tokens": 2048, "progress": False}
    return CacheTeacherConfig(**(base | kw))


def tree(d: Path, skip=("config.yaml", spec.LOCKS_DIR)) -> dict[str, bytes]:
    """Every file of a cache dir (bytes), except the run's own config and locks."""
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and p.relative_to(d).parts[0] not in skip}


@pytest.fixture(scope="module")
def reference(toy_world, tmp_path_factory):
    """An uninterrupted run: the bytes every other way of writing this cache must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "cache"
    assert run(_cfg(toy_world, out)) == out
    return out


def test_cache_holds_the_teacher_and_the_texts(reference, toy_world):
    assert verify_cache(reference) == []
    m = load_manifest(reference)
    assert m["complete"] and m["layout"]["n_shards"] == 4 and m["totals"]["n_examples"] == N
    assert m["head"]["check_max_abs_err"] < 1e-4  # hidden @ head == the model's logits
    tok = AutoTokenizer.from_pretrained(toy_world.teacher)
    examples = load_examples(toy_world.train, limit=N)
    teacher = HFTeacher(toy_world.teacher)
    head = {k: v for k, v in load_head(reference).items()}
    assert torch.equal(head[spec.HEAD_WEIGHT], teacher.head().weight)
    r = CacheReader(reference)
    cached = list(r)
    assert [c.example_id for c in cached] == [e.id for e in examples]
    worst = 0.0
    for c, e in zip(cached[:6], examples):
        t = tokenize_example(e, tok)
        assert (c.prompt, c.response) == (e.prompt, e.response)
        assert c.input_ids.tolist() == t.input_ids and c.prompt_len == t.prompt_len
        assert [tuple(o) for o in c.offsets.tolist()] == t.offsets
        # stored hidden = the teacher's, to fp16 precision
        h = teacher.hidden_states([t.input_ids[:-1]])[0]
        torch.testing.assert_close(torch.from_numpy(c.hidden), h, rtol=1e-3, atol=1e-3)
        # the sparse fields agree with the full distribution rebuilt from the cached hidden @ head
        logp = teacher.head().logits(torch.from_numpy(c.hidden)).log_softmax(-1)  # (n-1, V)
        ref_lp, _ = logp.topk(16, dim=-1)
        # default q8 storage: within one code step of the row's range (docs/cache-format.md §5.1)
        step = (ref_lp[:, :1] - ref_lp[:, -1:]) / 254
        worst = max(worst, ((ref_lp - torch.tensor(c.topk_logprobs)).abs() - step).max().item())
        nxt = logp.gather(1, torch.tensor(c.input_ids[1:].tolist())[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(c.next_logprob), nxt, rtol=0, atol=5e-3)
        mass = np.exp(c.topk_logprobs).sum(1) + np.exp(c.tail_logprob)
        np.testing.assert_allclose(mass, 1.0, atol=1e-2)  # q8: a step is up to 2·range/254
    assert worst < 5e-3, worst


def test_rerun_is_a_noop_mismatch_is_refused_overwrite_restarts(reference, toy_world, tmp_path):
    out = tmp_path / "c"
    shutil.copytree(reference, out)
    before = tree(out)
    run(_cfg(toy_world, out))
    assert tree(out) == before
    with pytest.raises(CacheMismatchError, match=r"top_k: cache has 16, this run has 8.*--overwrite"):
        run(_cfg(toy_world, out, top_k=8))
    with pytest.raises(CacheMismatchError, match="n_examples: cache has 15, this run has 12"):
        run(_cfg(toy_world, out, limit=12))
    assert tree(out) == before  # refusals touch nothing
    run(_cfg(toy_world, out, top_k=8, overwrite=True))
    assert load_manifest(out)["layout"]["top_k"] == 8 and verify_cache(out) == []


def test_cli_inspect_and_verify(reference, tmp_path):
    """`dskd cache inspect/verify` on a sound cache, then on one with a corrupted shard."""
    import json

    from typer.testing import CliRunner

    from dskd.cli import app

    out = tmp_path / "c"
    shutil.copytree(reference, out)
    r = CliRunner().invoke(app, ["cache", "inspect", str(out), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["examples"] == N and info["top_k"] == 16 and info["complete"]
    r = CliRunner().invoke(app, ["cache", "inspect", str(out)])
    assert "bytes/token" in r.output and "LlamaForCausalLM" in r.output
    assert CliRunner().invoke(app, ["cache", "verify", str(out)]).exit_code == 0
    f = out / spec.SHARDS_DIR / "shard-00002" / "topk_logprobs" / "c" / "0" / "0"
    f.write_bytes(f.read_bytes()[:-10])
    r = CliRunner().invoke(app, ["cache", "verify", str(out)])
    assert r.exit_code == 1 and "shard-00002/topk_logprobs/c/0/0" in r.output


def test_verify_catches_hidden_rows_off_by_one_against_their_topk(reference, tmp_path):
    """A real teacher's cache: sound, every recomputed value is within its tolerance; with the
    hidden rows of shard 2 moved one position (row k holds position k+1's state, checksums
    re-recorded), only the recompute check can tell, and it names that shard."""
    import zarr

    from dskd.pipeline.cache.manifest import hash_file, load_commits, save_manifest, write_commit
    from dskd.pipeline.cache.verify import check_cache

    sound = check_cache(reference, sample_rows=None)
    assert sound.problems == [] and len(sound.shards) == 4
    assert all(r.recompute.rows == r.n_rows and r.recompute.max_ratio < 1 and r.mass_err < 1e-4
               for r in sound.shards.values())
    out = tmp_path / "c"
    shutil.copytree(reference, out)
    d = out / spec.SHARDS_DIR / "shard-00002"
    g = zarr.open_group(str(d), mode="r+", zarr_format=3)
    to, hidden = g[spec.TOKEN_OFFSETS][:], g["hidden"][:]
    for a, b in itertools.pairwise(to):
        hidden[a:b - 1] = hidden[a + 1:b].copy()
    g["hidden"][...] = hidden
    m = load_manifest(out)
    rec = load_commits(out)[2]
    rec["files"] = {rel: {"bytes": (d / rel).stat().st_size, spec.CHECKSUM: hash_file(d / rel)}
                    for rel in rec["files"]}
    write_commit(out, rec)
    m["shards"][2] = rec
    save_manifest(out, m)
    bad = check_cache(out)
    assert [(p.shard, p.field) for p in bad.problems] == [("shard-00002", "hidden")]
    assert bad.shards["shard-00002"].recompute.max_ratio > 10


def test_lock_refuses_a_second_writer(toy_world, tmp_path):
    out = tmp_path / "c"
    with WriterLock(out), pytest.raises(CacheLockedError, match="already being written"):
        run(_cfg(toy_world, out))


def test_interrupted_then_resumed_is_bit_identical(reference, toy_world, tmp_path, monkeypatch):
    """In-process version of the SIGKILL test: die while shard 2 is being written."""
    out = tmp_path / "c"
    real = stage._commit

    def dying(writer, stats, *rest):
        if writer.index == 2:
            tmp = out / spec.TMP_DIR / "shard-00002.999"
            (tmp / "hidden").mkdir(parents=True)  # half-written leftovers
            (tmp / "hidden" / "zarr.json").write_text("{")
            raise KeyboardInterrupt
        real(writer, stats, *rest)

    monkeypatch.setattr(stage, "_commit", dying)
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(toy_world, out))
    assert not load_manifest(out)["complete"]
    assert sorted(p.name for p in (out / spec.COMMITS_DIR).iterdir()) == [
        "shard-00000.json", "shard-00001.json"]
    monkeypatch.setattr(stage, "_commit", real)
    run(_cfg(toy_world, out))
    assert tree(out) == tree(reference)


def test_job_array_workers_build_the_same_cache(reference, toy_world, tmp_path):
    out = tmp_path / "c"
    final, _ = stage.cache_teacher(_cfg(toy_world, out, num_workers=2, worker_index=1), _env())
    assert final is None  # shards 0 and 2 are still missing; worker 1 cannot finalize
    final, stats = stage.cache_teacher(_cfg(toy_world, out, num_workers=2, worker_index=0), _env())
    assert final["complete"] and stats.shards == 2
    assert tree(out) == tree(reference)


def test_tokenized_examples_held_at_once_are_bounded_by_the_shard(reference, toy_world, tmp_path,
                                                                 monkeypatch):
    """The dataset is streamed, never held: tokenized examples (ids and offsets, ~100 B per token
    as Python lists) alive at once never exceed two shards' worth, however long the dataset."""
    from dskd.pipeline import cache_rows

    live: set[int] = set()
    peak = [0]
    real = cache_rows.tokenize_example

    def counted(*a, **kw):
        t = real(*a, **kw)
        live.add(id(t))
        peak[0] = max(peak[0], len(live))
        weakref.finalize(t, live.discard, id(t))
        return t

    monkeypatch.setattr(cache_rows, "tokenize_example", counted)
    run(_cfg(toy_world, tmp_path / "c"))
    assert tree(tmp_path / "c") == tree(reference)
    assert 0 < peak[0] <= 2 * SHARD < N


def test_rows_that_do_not_tokenize_are_skipped_alike_by_every_worker(toy_world, tmp_path):
    """A prompt with no room for its response (row 5) is skipped and reported; the cache holds
    the other rows, and two job-array workers (each tokenizing only its shards) write the same
    bytes as one."""
    rows = toy_world.train.read_text().splitlines()[:10]
    rows[5] = json.dumps({"instruction": "word " * 300, "response": "ok"})
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(rows) + "\n")
    kw = {"data": str(data), "limit": None, "on_bad_row": "skip", "max_prompt_len": 160,
          "max_len": 160}
    one, two = tmp_path / "one", tmp_path / "two"
    run(_cfg(toy_world, one, **kw))
    for w in (1, 0):
        stage.cache_teacher(_cfg(toy_world, two, num_workers=2, worker_index=w, **kw), _env())
    assert tree(one) == tree(two)
    skipped = [json.loads(x) for x in (one / "skipped_rows.jsonl").read_text().splitlines()]
    assert [s["row"] for s in skipped] == [5] and "no room" in skipped[0]["reason"]
    kept = [e for e in load_examples(data) if e.row != 5]
    assert [x.example_id for x in CacheReader(one)] == [e.id for e in kept]
    assert load_manifest(one)["layout"]["n_shards"] == 3  # 9 rows in shards of 4


def test_fp16_overflow_stops_before_any_shard_is_committed(toy_world, tmp_path, monkeypatch):
    real = stage.encode_hidden
    monkeypatch.setattr(stage, "encode_hidden", lambda h, d: real(h * 1e6, d))
    with pytest.raises(HiddenRangeError, match="bf16"):
        run(_cfg(toy_world, tmp_path / "c"))
    assert not (tmp_path / "c" / spec.COMMITS_DIR).exists()


def test_config_errors_are_listed_before_anything_loads(tmp_path):
    bad = CacheTeacherConfig(teacher=str(tmp_path), data="x", out="", top_k=-1, worker_index=3,
                             num_workers=2)
    with pytest.raises(ValueError) as e:
        run(bad)
    msg = str(e.value)
    for part in ("--out is required", "no config.json", "--top-k -1", "--worker-index 3"):
        assert part in msg


def _env():
    from dskd.pipeline.train.distributed import DistEnv

    return DistEnv()


# --------------------------------------------------------------------------- subprocess tests

_SCRIPT = """
import sys
from dskd.stages.cache_teacher import CacheTeacherConfig, run
run(CacheTeacherConfig(teacher={teacher!r}, data={data!r}, out=sys.argv[1], limit={n},
                       shard_size=2, top_k=16, batch_tokens=2048, progress=False))
"""


def _script(world, tmp_path: Path, n: int) -> Path:
    p = tmp_path / "run_cache.py"
    p.write_text(_SCRIPT.format(teacher=str(world.teacher), data=str(world.train), n=n))
    return p


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    return env


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_is_bit_identical(toy_world, tmp_path):
    script, env = _script(toy_world, tmp_path, 60), _subprocess_env()
    ref, out = tmp_path / "ref", tmp_path / "killed"
    subprocess.run([sys.executable, str(script), str(ref)], env=env, check=True)
    p = subprocess.Popen([sys.executable, str(script), str(out)], env=env)
    deadline = time.time() + 300
    # kill once a few shards are committed: the next one is mid-forward or mid-write
    while time.time() < deadline and p.poll() is None:
        if len(list((out / spec.COMMITS_DIR).glob("*.json"))) >= 4:
            break
        time.sleep(0.02)
    assert p.poll() is None, "the run finished before it could be killed; make it longer"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not load_manifest(out)["complete"]
    subprocess.run([sys.executable, str(script), str(out)], env=env, check=True)
    assert verify_cache(out) == []
    assert tree(out) == tree(ref)


@pytest.mark.slow
def test_torchrun_two_processes_writes_the_same_examples_as_one(toy_world, tmp_path):
    script, env = _script(toy_world, tmp_path, 20), _subprocess_env()
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, str(script), str(one)], env=env, check=True)
    torchrun = Path(sys.executable).with_name("torchrun")
    subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", str(script), str(two)],
                   env=env, check=True)
    assert verify_cache(two) == []
    a, b = list(CacheReader(one)), list(CacheReader(two))
    assert [x.example_id for x in a] == [x.example_id for x in b]
    for x, y in zip(a, b):
        assert np.array_equal(x.input_ids, y.input_ids) and x.prompt == y.prompt
        for f in ("hidden", "topk_logprobs", "lse", "next_logprob"):
            np.testing.assert_allclose(getattr(x, f), getattr(y, f), rtol=0, atol=1e-5)
        np.testing.assert_array_equal(x.topk_ids[:, :4], y.topk_ids[:, :4])
    # same threads, same batches: even the bytes agree
    assert tree(one) == tree(two)


# --------------------------------------------------------------------------- teacher dtype


def test_teacher_dtype_auto_is_resolved_by_dskd_not_by_the_backend():
    from dskd.pipeline.teachers import resolve_dtype

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", cpu, "float32") == "float32"
    assert resolve_dtype("auto", cpu, "bfloat16") == "float32"
    assert resolve_dtype("auto", gpu, "float32", bf16_supported=True) == "bfloat16"
    # no bf16 (V100, T4): never float16 for a float32 checkpoint, as vLLM's own "auto" would
    assert resolve_dtype("auto", gpu, "float32", bf16_supported=False) == "float32"
    assert resolve_dtype("auto", gpu, None, bf16_supported=False) == "float32"
    assert resolve_dtype("auto", gpu, "float16", bf16_supported=False) == "float16"
    assert resolve_dtype("float16", cpu, "float32") == "float16"  # explicit: as asked


def test_vllm_backend_gets_the_resolved_dtype_and_the_manifest_records_it(reference, toy_world,
                                                                          monkeypatch):
    from dskd.pipeline.teachers import checkpoint_dtype, vllm_backend

    assert checkpoint_dtype(toy_world.teacher) == "float32"
    m = load_manifest(reference)
    assert m["teacher"]["dtype"] == "float32" and m["teacher"]["compute"] == "cpu-float32"
    seen = {}

    class FakeVLLM:  # records what the stage hands vLLM (no engine needed)
        def __init__(self, model_dir, **kw):
            seen.update(kw)

    monkeypatch.setattr(vllm_backend, "VLLMTeacher", FakeVLLM)
    cfg = _cfg(toy_world, Path("unused"), backend="vllm")
    stage.load_backend(cfg, torch.device("cpu"))
    assert seen["dtype"] == "float32"  # not "auto": vLLM would downcast fp32 to fp16
    fps = stage.fingerprints(cfg, str(toy_world.teacher), RowPlan(0, "", frozenset()),
                             torch.device("cpu"))
    assert fps["compute"] == "cpu-float32"


def test_a_backend_running_another_dtype_than_recorded_is_refused(toy_world, tmp_path, monkeypatch):
    real = stage.load_backend

    def bf16_backend(cfg, device):
        b = real(cfg, device)
        b.dtype = torch.bfloat16  # as if the backend had decided for itself
        return b

    monkeypatch.setattr(stage, "load_backend", bf16_backend)
    with pytest.raises(ConfigError, match="runs the teacher in bfloat16, but this cache records float32"):
        run(_cfg(toy_world, tmp_path / "c", limit=4))
    assert not (tmp_path / "c" / spec.MANIFEST).exists()


# --------------------------------------------------------------------------- teacher tokenizer


def test_the_teacher_tokenizer_travels_with_the_cache(reference, toy_world, tmp_path):
    from dskd.pipeline.cache.fingerprint import tokenizer_fingerprint
    from dskd.pipeline.cache.spec import CacheError
    from dskd.pipeline.cache.tokenizer import teacher_tokenizer_dir

    m = load_manifest(reference)
    d = teacher_tokenizer_dir(reference, m)
    assert d == reference / "tokenizer" and "tokenizer.json" in m["tokenizer"]["files"]
    assert tokenizer_fingerprint(d) == m["fingerprints"]["tokenizer"]
    mine, theirs = AutoTokenizer.from_pretrained(d), AutoTokenizer.from_pretrained(toy_world.teacher)
    text = load_examples(toy_world.train, limit=1)[0].prompt
    assert mine(text).input_ids == theirs(text).input_ids and len(mine) == len(theirs)
    # a damaged copy is named, and verify sees it too
    c = tmp_path / "c"
    shutil.copytree(reference, c)
    (c / "tokenizer" / "tokenizer.json").write_text("{}")
    with pytest.raises(CacheError, match=r"tokenizer/: tokenizer.json: size"):
        teacher_tokenizer_dir(c, m)
    assert str(verify_cache(c)[0]).startswith("cache/tokenizer: tokenizer.json: size")
    # a cache written before the copy existed: its teacher dir, if it is there and the same
    old = {k: v for k, v in m.items() if k != "tokenizer"}
    assert teacher_tokenizer_dir(c, old) == Path(m["teacher"]["path"])
    gone = old | {"teacher": old["teacher"] | {"path": str(tmp_path / "deleted")}}
    with pytest.raises(CacheError, match="holds no copy of the teacher's tokenizer"):
        teacher_tokenizer_dir(c, gone)
    other = old | {"teacher": old["teacher"] | {"path": str(toy_world.student_xvocab)}}
    with pytest.raises(CacheError, match="is not the one the cache was made with"):
        teacher_tokenizer_dir(c, other)


@pytest.mark.slow
def test_two_nodes_write_the_same_cache_bytes_as_one(toy_world, tmp_path, torchrun_two_nodes):
    """`torchrun --nnodes 2` (two agents, c10d rendezvous on 127.0.0.1, one process each): each
    node's rank writes its own shards, rank 0 the manifest; every byte equals one process's."""
    script, env = _script(toy_world, tmp_path, 20), _subprocess_env()
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, str(script), str(one)], env=env, check=True)
    torchrun_two_nodes([str(script), str(two)], env)
    assert verify_cache(two) == []
    assert tree(one) == tree(two)
