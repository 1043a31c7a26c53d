"""`dskd cache verify`: checksums, shapes, offsets, id ranges, a NaN/inf scan, the probability
mass of every row (Σ exp(top-k) + exp(tail) = 1), and ``hidden @ head`` recomputed for a sample of
rows of every shard (all rows with ``sample_rows=None``) against the stored log-probs.

Returns a list of problems, each naming the shard and field, instead of stopping at the first: a
user fixing a cache wants to know every bad shard at once; ``check_cache`` adds, per shard, the
largest errors it measured.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import zarr

from .manifest import committed_shards, hash_file, load_manifest
from .quant import decode_hidden, rounding_bound
from .recompute import HeadRecompute, RecomputeStats
from .remote import open_cache_location, store_of
from .spec import (
    CHECKSUM,
    COMMITS_DIR,
    EXAMPLE_COLUMNS,
    EXAMPLES_FILE,
    HEAD_FILE,
    HEAD_WEIGHT,
    MANIFEST,
    SHARDS_DIR,
    TOKEN_OFFSETS,
    CacheError,
    TopkStorage,
    chunk_rows,
    layout_fields,
)
from .tokenizer import TOKENIZER_DIR, check_tokenizer_files
from .topk import decode_ids, decode_logprobs, logprob_tolerance

_EPS = 1e-5  # log-probs may exceed 0 by float rounding
SAMPLE_ROWS = 64  # token rows per shard whose hidden @ head is recomputed (None: every row)


@dataclass(frozen=True)
class Problem:
    shard: str | None  # shard name; None for the cache as a whole
    field: str | None  # file or field name
    message: str

    def __str__(self) -> str:
        where = self.shard or "cache"
        return f"{where}{'/' + self.field if self.field else ''}: {self.message}"


@dataclass
class ShardReport:
    """What the content checks measured in one shard."""

    n_rows: int = 0
    mass_err: float = 0.0  # max |Σ exp(topk_logprobs) + exp(tail_logprob) − 1| over all rows
    recompute: RecomputeStats = field(default_factory=RecomputeStats)


@dataclass
class VerifyReport:
    problems: list[Problem]
    shards: dict[str, ShardReport]  # by shard name, for the shards whose contents were read


def verify_cache(path: str | Path, checksums: bool = True,
                 sample_rows: int | None = SAMPLE_ROWS) -> list[Problem]:
    """Every problem found in the cache at ``path``; an empty list means it is sound."""
    return check_cache(path, checksums, sample_rows).problems


def check_cache(path: str | Path, checksums: bool = True,
                sample_rows: int | None = SAMPLE_ROWS) -> VerifyReport:
    """verify_cache's problems plus what each shard measured. ``sample_rows``: token rows per
    shard whose ``hidden @ head`` is recomputed (None: all of them)."""
    try:
        path = open_cache_location(path)  # a store URL: its view; shards are read in the store
        m = load_manifest(path)
    except CacheError as e:
        return VerifyReport([Problem(None, "manifest.json", str(e))], {})
    problems: list[Problem] = []
    lay = m["layout"]
    shards = committed_shards(path, m)
    if not m["complete"]:
        problems.append(Problem(None, None, f"incomplete: {len(shards)} of {lay['n_shards']} shards "
                                "committed; rerun the same cache-teacher command to finish it"))
    head_problems = _check_head(path, m, checksums)
    problems += head_problems
    problems += [Problem(None, TOKENIZER_DIR, p) for p in check_tokenizer_files(path, m, checksums)]
    head = None if head_problems else _load_head(path, m)
    reports = {}
    for idx in sorted(shards):
        found, reports[shards[idx]["name"]] = verify_shard(path, shards[idx], lay, checksums, head,
                                                           sample_rows)
        problems += found
    return VerifyReport(problems, reports)


def _load_head(path: Path, m: dict[str, Any]) -> HeadRecompute:
    from safetensors.torch import load_file

    tensors = load_file(str(path / HEAD_FILE))
    return HeadRecompute(tensors, m["head"].get("logit_scale", 1.0))


def _check_head(path: Path, m: dict[str, Any], checksums: bool) -> list[Problem]:
    f = path / HEAD_FILE
    if not f.is_file():
        return [Problem(None, HEAD_FILE, "missing")]
    if f.stat().st_size != m["head"]["bytes"]:
        return [Problem(None, HEAD_FILE, f"size {f.stat().st_size}, manifest says {m['head']['bytes']}")]
    if checksums and hash_file(f) != m["head"][CHECKSUM]:
        return [Problem(None, HEAD_FILE, f"{CHECKSUM} mismatch (file corrupted or replaced)")]
    from safetensors import safe_open

    with safe_open(str(f), framework="np") as sf:
        shape = list(sf.get_slice(HEAD_WEIGHT).get_shape())
    want = [m["layout"]["vocab_size"], m["layout"]["hidden_size"]]
    return [] if shape == want else [Problem(None, HEAD_FILE, f"{HEAD_WEIGHT} is {shape}, expected {want}")]


def verify_shard(path: Path, rec: dict[str, Any], lay: dict[str, Any], checksums: bool = True,
                 head: HeadRecompute | None = None, sample_rows: int | None = SAMPLE_ROWS
                 ) -> tuple[list[Problem], ShardReport]:
    """(problems, measurements) of one committed shard; ``head`` None skips the recompute."""
    store = store_of(path)
    if store is None:
        return _verify_shard_dir(path / SHARDS_DIR / rec["name"], rec, lay, checksums, head,
                                 sample_rows)
    # In a store: verifying reads every byte anyway (checksums), so the shard is downloaded
    # once, into a temp dir beside the view, and checked there by the same code.
    with tempfile.TemporaryDirectory(dir=path, prefix=".verify-") as tmp:
        d = Path(tmp) / rec["name"]
        store.get_shard(rec["name"], d)
        return _verify_shard_dir(d, rec, lay, checksums, head, sample_rows)


def _verify_shard_dir(d: Path, rec: dict[str, Any], lay: dict[str, Any], checksums: bool,
                      head: HeadRecompute | None, sample_rows: int | None
                      ) -> tuple[list[Problem], ShardReport]:
    name = rec["name"]
    report = ShardReport(n_rows=rec["n_rows"])
    if not d.is_dir():
        return [Problem(name, None, f"directory {d} is missing")], report
    problems = []
    on_disk = {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()}
    for rel, info in rec["files"].items():
        f = d / rel
        if rel not in on_disk:
            problems.append(Problem(name, rel, "file missing"))
        elif f.stat().st_size != info["bytes"]:
            problems.append(Problem(name, rel, f"size {f.stat().st_size} bytes, manifest says "
                                    f"{info['bytes']} (truncated or overwritten)"))
        elif checksums and hash_file(f) != info[CHECKSUM]:
            problems.append(Problem(name, rel, f"{CHECKSUM} mismatch (file corrupted)"))
    for rel in sorted(on_disk - set(rec["files"])):
        problems.append(Problem(name, rel, "file not recorded in the manifest"))
    try:
        problems += _check_contents(d, rec, lay, head, _sample(rec, sample_rows), report)
    except Exception as e:  # noqa: BLE001 - a corrupt file can break any reader: report, go on
        problems.append(Problem(name, None, f"cannot be read: {type(e).__name__}: {e}"))
    return problems, report


def _sample(rec: dict[str, Any], sample_rows: int | None) -> np.ndarray:
    """Sorted token rows to recompute: a fixed random sample per shard (seeded by its index, so
    reruns check the same rows), or every row."""
    n = rec["n_rows"]
    if sample_rows is None or sample_rows >= n:
        return np.arange(n)
    rng = np.random.default_rng(rec["index"])
    return np.sort(rng.choice(n, size=sample_rows, replace=False))


def _check_contents(d: Path, rec: dict[str, Any], lay: dict[str, Any],
                    head: HeadRecompute | None, sample: np.ndarray,
                    report: ShardReport) -> list[Problem]:
    name, V = rec["name"], lay["vocab_size"]
    P = []
    table = pa.ipc.open_file(pa.memory_map(str(d / EXAMPLES_FILE), "r")).read_all()
    if table.column_names != list(EXAMPLE_COLUMNS):
        return [Problem(name, EXAMPLES_FILE, f"columns {table.column_names}, expected "
                        f"{list(EXAMPLE_COLUMNS)}")]
    if table.num_rows != rec["n_examples"]:
        P.append(Problem(name, EXAMPLES_FILE, f"{table.num_rows} rows, manifest says {rec['n_examples']}"))
    idx = table.column("index").to_numpy()
    if not np.array_equal(idx, np.arange(rec["example_start"], rec["example_end"])):
        P.append(Problem(name, "index", f"example indices are not {rec['example_start']}.."
                         f"{rec['example_end'] - 1}"))
    ids = table.column("input_ids").combine_chunks()
    n = table.column("n_tokens").to_numpy().astype(np.int64)
    lens = np.diff(ids.offsets.to_numpy())
    if not np.array_equal(lens, n) or (n < 1).any():
        P.append(Problem(name, "input_ids", "list lengths disagree with n_tokens (or are empty)"))
    flat_ids = ids.values.to_numpy()
    if flat_ids.size and (flat_ids.min() < 0 or flat_ids.max() >= V):
        P.append(Problem(name, "input_ids", f"token ids outside [0, {V})"))
    if n.sum() != rec["n_tokens"]:
        P.append(Problem(name, "n_tokens", f"{n.sum()} tokens, manifest says {rec['n_tokens']}"))
    mask = table.column("response_mask").combine_chunks()
    pl = table.column("prompt_len").to_numpy()
    want_mask = np.concatenate([np.arange(k) >= p for k, p in zip(n, pl)]) if len(n) else []
    if not np.array_equal(mask.values.to_numpy(zero_copy_only=False), want_mask):
        P.append(Problem(name, "response_mask", "does not match prompt_len"))
    offs = table.column("offsets").combine_chunks()
    if not np.array_equal(np.diff(offs.offsets.to_numpy()), 2 * n):
        P.append(Problem(name, "offsets", "expected 2 ints (start, end) per token"))

    g = zarr.open_group(str(d), mode="r", zarr_format=3)
    to = g[TOKEN_OFFSETS][:]
    n_rows = rec["n_rows"]
    if (to.shape != (len(n) + 1,) or to[0] != 0 or not np.array_equal(np.diff(to), n - 1)
            or to[-1] != n_rows):
        return P + [Problem(name, TOKEN_OFFSETS, "CSR offsets disagree with n_tokens - 1 per example "
                            f"or with n_rows={n_rows}")]
    n_entries = (int(np.asarray(g["sampled_n"][:], np.int64).sum()) if "sampled_n" in g
                 else -1)  # ragged sampled arrays hold one entry per distinct sampled id
    for f in layout_fields(lay):
        want = f.shape(n_entries if f.ragged else n_rows, lay["hidden_size"], lay["top_k"])
        if f.name not in g:
            P.append(Problem(name, f.name, "array missing"))
        elif g[f.name].shape != want or g[f.name].dtype != f.dtype:
            P.append(Problem(name, f.name, f"is {g[f.name].dtype}{g[f.name].shape}, expected "
                             f"{f.dtype}{want}"))
    if P:
        return P
    return (_scan_values(g, name, lay, flat_ids, to, head, sample, report)
            + _scan_sampled(g, name, lay))


def _scan_sampled(g: zarr.Group, name: str, lay: dict[str, Any]) -> list[Problem]:
    """Sampled targets: 1..N distinct ids per row, ascending, in range, counts summing to N."""
    N = int(lay.get("sampled_targets", 0))
    if not N:
        return []
    n = np.asarray(g["sampled_n"][:], np.int64)
    ids = np.asarray(g["sampled_ids"][:], np.int64)
    counts = np.asarray(g["sampled_counts"][:], np.int64)
    P: list[Problem] = []
    if not n.size:
        return P
    if (n.min() < 1 or n.max() > min(N, lay["vocab_size"])):
        P.append(Problem(name, "sampled_n", f"rows with 0 or more than {N} distinct ids"))
        return P
    if ids.size and (ids.min() < 0 or ids.max() >= lay["vocab_size"]):
        P.append(Problem(name, "sampled_ids", f"ids outside [0, {lay['vocab_size']})"))
    starts = np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int64)
    if counts.size and (counts.min() < 1 or (np.add.reduceat(counts, starts) != N).any()):
        P.append(Problem(name, "sampled_counts", f"counts < 1, or a row's counts do not sum to {N}"))
    first = np.zeros(ids.size, bool)
    first[starts] = True
    if ids.size and (np.diff(ids)[~first[1:]] <= 0).any():
        P.append(Problem(name, "sampled_ids", "ids of a row are not distinct and ascending"))
    return P


def _scan_values(g: zarr.Group, name: str, lay: dict[str, Any], flat_ids: np.ndarray,
                 to: np.ndarray, head: HeadRecompute | None, sample: np.ndarray,
                 report: ShardReport) -> list[Problem]:
    """NaN/inf, range and probability-mass checks on every row, and the recompute check on the
    ``sample`` rows, a block of rows at a time so memory stays bounded."""
    V, k, hd = lay["vocab_size"], lay["top_k"], lay["hidden_dtype"]
    st = TopkStorage.from_layout(lay)
    n_rows = int(to[-1])
    # next token of each row: s[j+1] of its example, laid out like the token rows
    starts = to[:-1] + np.arange(len(to) - 1)  # token start of example j in flat_ids
    next_ids = np.concatenate([flat_ids[s + 1:s + 1 + (to[j + 1] - to[j])]
                               for j, s in enumerate(starts)]) if n_rows else np.zeros(0, np.int32)
    found: dict[str, str] = {}
    step = chunk_rows(lay["hidden_size"] * 4)
    for a in range(0, n_rows, step):
        b = min(n_rows, a + step)
        scale = g["hidden_scale"][a:b] if hd == "fp8" else None
        if scale is not None and not (np.isfinite(scale).all() and (scale > 0).all()):
            found.setdefault("hidden_scale", "non-finite or non-positive scales")
        h = decode_hidden(g["hidden"][a:b], hd, scale)
        if not np.isfinite(h).all():
            found.setdefault("hidden", f"NaN/inf at row {a + int(np.argmin(np.isfinite(h).all(1)))}")
        lse = g["lse"][a:b]
        if not np.isfinite(lse).all():
            found.setdefault("lse", "NaN/inf values")
        nxt = g["next_logprob"][a:b]
        if not (np.isfinite(nxt).all() and (nxt <= _EPS).all()):
            found.setdefault("next_logprob", "NaN/inf or positive log-probs")
        tail = g["tail_logprob"][a:b]
        if np.isnan(tail).any() or (tail > _EPS).any():
            found.setdefault("tail_logprob", "NaN or positive values")
        ids = lp = None
        if k:
            ids = decode_ids(g["topk_ids"][a:b], g["topk_ids_hi"][a:b] if st.hi_bits else None, st)
            bounds = g["topk_logprob_bounds"][a:b] if st.logprobs == "q8" else None
            if bounds is not None and not (np.isfinite(bounds).all()
                                           and (bounds[:, 1] <= bounds[:, 0]).all()):
                found.setdefault("topk_logprob_bounds", "NaN/inf or last > first")
            lp = decode_logprobs(g["topk_logprobs"][a:b], st.logprobs, bounds)
            if ids.size and (ids.min() < 0 or ids.max() >= V):
                found.setdefault("topk_ids", f"ids outside [0, {V})")
            if not (np.isfinite(lp).all() and (lp <= _EPS).all()):
                found.setdefault("topk_logprobs", "NaN/inf or positive log-probs")
            elif (np.diff(lp, axis=1) > _EPS).any():
                found.setdefault("topk_logprobs", "not sorted in descending order")
            # where the observed next token is in the top-k, both fields must give its log-prob
            # (within what the top-k storage can represent: one q8 step, half an fp16 ulp)
            hit = ids == next_ids[a:b, None]
            rows = hit.any(1)
            tol = np.broadcast_to(logprob_tolerance(st.logprobs, bounds, lp), lp.shape)
            if rows.any() and (np.abs(lp[hit] - nxt[rows]) > tol[hit]).any():
                found.setdefault("next_logprob", "disagrees with topk_logprobs for the same token")
        lp_tol = tol[:, 0] if k else None  # (rows,) what the top-k storage may add per value
        _check_mass(lp, lp_tol, tail, a, found, report)
        if head is not None and not found:
            s = sample[(sample >= a) & (sample < b)]
            if len(s):
                _recompute(head, h, scale, hd, ids, lp, lp_tol, lse, next_ids[a:b], nxt, s - a,
                           a, found, report)
    return [Problem(name, f, msg) for f, msg in found.items()]


# Σ exp(top-k) + exp(tail) = 1: float32 sums over the vocabulary are good to ~1e-6.
_MASS_TOL = 1e-4


def _check_mass(lp: np.ndarray | None, lp_tol: np.ndarray | None, tail: np.ndarray, a: int,
                found: dict[str, str], report: ShardReport) -> None:
    """Every row's top-k probabilities plus its tail mass sum to 1 (docs/cache-format.md §4.1),
    up to what the top-k storage (q8/fp16 log-probs: ``lp_tol`` per row) can represent."""
    mass = np.exp(tail.astype(np.float64))  # -inf tail (k ≥ V) → 0; k = 0 → tail 0 → 1
    tol = np.full(len(tail), _MASS_TOL)
    if lp is not None:
        p = np.exp(lp.astype(np.float64)).sum(axis=1)
        mass += p
        tol += p * np.expm1(lp_tol.astype(np.float64))
    if not len(mass):
        return
    dev = np.abs(mass - 1)
    over = np.nan_to_num(dev / tol, nan=np.inf)
    j = int(over.argmax())
    report.mass_err = max(report.mass_err, float(dev[j]) if np.isfinite(dev[j]) else np.inf)
    if not over[j] <= 1:
        found.setdefault("tail_logprob", f"row {a + j}: Σ exp(topk_logprobs) + exp(tail_logprob) "
                         f"= {mass[j]:.6g}, not 1 (top-k and tail mass do not belong together)")


def _recompute(head: HeadRecompute, h: np.ndarray, scale: np.ndarray | None, hd: str,
               ids: np.ndarray | None, lp: np.ndarray | None, lp_tol: np.ndarray | None,
               lse: np.ndarray, next_ids: np.ndarray, nxt: np.ndarray, rows: np.ndarray, a: int,
               found: dict[str, str], report: ShardReport) -> None:
    """``hidden @ head`` on ``rows`` (of this block) against the stored log-probs and lse."""
    hs = h[rows]
    q = rounding_bound(hs, hd, None if scale is None else scale[rows])
    err, ratio = head.check(hs, q, None if ids is None else ids[rows],
                            None if lp is None else lp[rows], lse[rows], next_ids[rows],
                            nxt[rows], None if lp_tol is None else lp_tol[rows])
    report.recompute.add(err, ratio, rows + a)
    bad = np.flatnonzero(~(ratio <= 1))
    if len(bad):
        j = bad[int(ratio[bad].argmax())] if np.isfinite(ratio[bad]).any() else bad[0]
        found.setdefault("hidden", (
            f"row {a + rows[j]}: hidden @ head disagrees with the stored log-probs/lse by "
            f"{err[j]:.3g} nats ({ratio[j]:.3g}x the tolerance for {hd} storage); the hidden "
            "state is not the one the log-probs were computed from (rows shifted or mixed up)"))


def uncommit_bad_shards(path: str | Path, problems: list[Problem]) -> list[str]:
    """Turn bad shards back into unwritten ones, so rerunning cache-teacher rewrites only them.

    Their commit records are removed and the manifest marked incomplete; the good shards stay
    committed (nothing is recomputed for them). Problems of the cache as a whole (manifest, head)
    cannot be repaired this way: those need ``cache-teacher --overwrite``.
    """
    from .manifest import commit_path, save_manifest

    path = open_cache_location(path)
    store = store_of(path)
    m = load_manifest(path)
    by_name = {s["name"]: i for i, s in committed_shards(path, m).items()}
    bad = sorted({by_name[p.shard] for p in problems if p.shard in by_name})
    if not bad:
        return []
    for i in bad:
        commit_path(path, i).unlink(missing_ok=True)
    m["complete"] = False
    m["shards"] = []
    save_manifest(path, m)
    if store is not None:  # the incomplete manifest first: from then on the records decide
        store.push(MANIFEST)
        store.remove(*(f"{COMMITS_DIR}/{commit_path(path, i).name}" for i in bad))
    return [s for s, i in by_name.items() if i in bad]
