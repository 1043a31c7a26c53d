"""Student runs on an evidence world: arms × paired seeds, scored exactly against the truth.

    from evidence_grid import Arm, run_grid, per_seed, paired, method_table   # benchmarks/ on sys.path
    records = run_grid(Path("ev0"), [Arm("kd-a0.9", "kd", overrides={"kd_rate": 0.9})],
                       seeds=[1, 2, 3], out=Path("grid-out"), workers=2)

The one place that trains and scores students for benchmarks/evidence.py and the studies built
on its world (sensitivity, storage–accuracy): each reads the evidence dir's world, teacher caches
and per-seed inits (``DIR/{world,cache,inits}``) and writes its own runs under ``out/runs``, so
a study can run beside an evidence run in progress without writing into it.

Seed s = the evidence run's fresh student init ``inits/<model>-s<s>`` and data order s, so a
grid's records pair with evidence.json's (``per_seed``/``paired`` give the per-seed structure).
Finished runs (``truth.json`` next to ``final/``) are skipped on rerun; an arm whose resolved
DistillConfig equals a finished evidence run's (``runs/<name>-s<s>/config.yaml``, all but
``out``) reuses that run's truth.json instead of training again (the record names it in
``reused_from``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from dskd.pipeline.data import load_examples
from dskd.pipeline.toyworld import ToyWorld, fresh_student
from dskd.pipeline.truth import truth_metrics
from dskd.pipeline.verdicts import paired_test
from dskd.stages import quickstart as qs

PRESET = "evidence"
METRIC = "excess_kl"  # nats per response, lower is better
STUDENT_EXTRA = {"save_interval": 10**9, "eval_interval": 10**9}  # validate/save once, at the end
TABLE_METRICS = ("excess_kl", "excess_kl_per_token", "validity", "excess_nll")
# left unset, distill fills these from its inputs (which are compared) and records the result in
# config.yaml (stages/distill.py, after check_config); unset matches whatever was recorded
RESOLVED_AT_RUN = ("template", "max-prompt-len", "max-len")


@dataclass(frozen=True)
class Arm:
    """One training recipe; the grid runs it once per seed as ``<name>-s<seed>``.

    overrides: extra DistillConfig fields (underscored names, e.g. {"kd_rate": 0.9}) on top of
    the evidence settings (stages/quickstart.SIZES["evidence"]); cache: a dir holding ``train/``
    and ``valid/`` teacher caches to distil from instead of the evidence dir's ``cache/``.
    """

    name: str
    method: str
    divergence: str = "fkl"
    model: str = "student"  # the toy world's model key: student (bpe) or student_xvocab (spbpe)
    overrides: Mapping[str, Any] = field(default_factory=dict)
    cache: str | None = None


def vocab_of(model: str) -> str:
    return "bpe" if model == "student" else "spbpe"


# --------------------------------------------------------------------------- one run


def scores(model_dir: Path, world: Any, sz: qs.Sizes, ref_tok: Any) -> dict[str, Any]:
    """Exact metrics on valid and test, cached next to the run (a rerun reads them back)."""
    done = model_dir.parent / "truth.json"
    if done.is_file():
        return json.loads(done.read_text())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = {split: truth_metrics(model, tok, load_examples(getattr(world, split),
                                                          template=sz.template),
                                reference_tokenizer=ref_tok)
           for split in ("valid", "test")}
    out["params"] = sum(p.numel() for p in model.parameters())
    done.write_text(json.dumps(out, indent=2) + "\n")
    return out


def init_worker(threads: int) -> None:
    # Tiny models gain nothing from intra-op threads, and on a shared machine spinning OpenMP
    # threads make a step ~10x slower; two 1-thread workers use two cores instead.
    torch.set_num_threads(threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def student_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train (or reuse) one student and score it; runs in a worker process.

    job: world, out, run, init, caches ({"train", "valid"} or None = SFT from the data files),
    sizes (None = the preset's), common, method, divergence, extra (DistillConfig overrides).
    """
    from transformers import AutoTokenizer

    world = ToyWorld.load(job["world"])
    sz = qs.SIZES[PRESET]
    if job["caches"] is None:  # SFT from the data files
        final = qs.train_student(Path(job["out"]), job["run"], Path(job["init"]), None,
                                 job["sizes"] or sz, job["common"], job["method"],
                                 job["divergence"], data=str(world.train),
                                 valid_data=str(world.valid), **job["extra"])
    else:
        final = qs.train_student(Path(job["out"]), job["run"], Path(job["init"]),
                                 {k: Path(v) for k, v in job["caches"].items()},
                                 job["sizes"] or sz, job["common"], job["method"],
                                 job["divergence"], **job["extra"])
    ref_tok = AutoTokenizer.from_pretrained(world.tokenizers["bpe"])
    return {**job, "scores": scores(final, world, sz, ref_tok)}


def run_jobs(jobs: list[dict[str, Any]], workers: int, threads: int) -> list[dict[str, Any]]:
    """student_job over `jobs` (in order), `workers` spawned processes of `threads` each."""
    if not jobs:
        return []
    if workers <= 1:
        init_worker(threads)
        return [student_job(j) for j in jobs]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                             initializer=init_worker, initargs=(threads,)) as pool:
        return list(pool.map(student_job, jobs))


# --------------------------------------------------------------------------- the grid


def _caches(evidence: Path, arm: Arm) -> dict[str, Path]:
    root = Path(arm.cache) if arm.cache else evidence / "cache"
    caches = {split: root / split for split in ("train", "valid")}
    missing = [str(c) for c in caches.values() if not (c / "manifest.json").is_file()]
    if missing:
        raise FileNotFoundError(
            f"arm {arm.name}: no finished teacher cache at {', '.join(missing)}; run "
            f"`python benchmarks/evidence.py --out {evidence}` first (it caches the teacher "
            "before training any student) or point Arm.cache at a dir with train/ and valid/")
    return caches


def _init(world: ToyWorld, evidence: Path, out: Path, model: str, seed: int) -> Path:
    """The evidence run's init for this seed; one made the same way under `out` if it has none."""
    shared = evidence / "inits" / f"{model}-s{seed}"
    if (shared / "model.safetensors").is_file():
        return shared
    return fresh_student(world, model, seed, out / "inits" / f"{model}-s{seed}")


def _config(job: dict[str, Any]) -> dict[str, Any]:
    """The run's resolved DistillConfig as config.yaml holds it (YAML round trip), minus out."""
    from dskd.pipeline.config import resolve, to_dict
    from dskd.stages.distill import DistillConfig

    values = qs.student_config(Path(job["out"]), job["run"], Path(job["init"]),
                               {k: Path(v) for k, v in job["caches"].items()},
                               qs.SIZES[PRESET], job["common"], job["method"], job["divergence"],
                               **job["extra"])
    cfg = yaml.safe_load(yaml.safe_dump(to_dict(resolve(DistillConfig, values)), sort_keys=False))
    cfg.pop("out", None)
    return cfg


def _reusable(evidence: Path, job: dict[str, Any], seed: int) -> Path | None:
    """A finished evidence run of this seed with the same resolved config, if there is one."""
    want = None
    for run_dir in sorted((evidence / "runs").glob(f"*-s{seed}")):
        if not ((run_dir / "truth.json").is_file() and (run_dir / "config.yaml").is_file()):
            continue
        have = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        have.pop("out", None)
        want = want if want is not None else _config(job)
        shared = set(want) & set(have)  # a field added since that run cannot have been used
        if all(want[k] == have[k] or (k in RESOLVED_AT_RUN and want[k] is None)
               for k in shared):
            return run_dir
    return None


def record(job: dict[str, Any], got: dict[str, Any]) -> dict[str, Any]:
    """One per-run record, the shape of evidence.json's ``records``."""
    return {"run": job["run"], "method_name": job["name"], "method": job["method"],
            "divergence": job["divergence"], "vocab": vocab_of(job["key"]), "model": job["key"],
            "seed": job["seed"], "params": got["params"], "valid": got["valid"],
            "test": got["test"], "overrides": dict(job["overrides"]),
            "cache": job["caches"]["train"], "reused_from": job.get("reused_from")}


def add_run_args(ap: Any, seeds_help: str = "training seeds 1..N (paired), ≥ 2") -> None:
    """The options every study on an evidence world shares (evidence, sensitivity, storage
    curve): how many paired seeds, and how the student runs are spread over processes."""
    ap.add_argument("--seeds", type=int, default=5, help=seeds_help)
    ap.add_argument("--workers", type=int, default=2, help="student runs in parallel (processes)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")


def check_run_args(ap: Any, a: Any) -> None:
    if a.seeds < 2:
        ap.error("--seeds must be ≥ 2: a paired interval needs two seeds")


def doc_sections(text: str) -> list[str]:
    """The `## ` sections of a markdown doc, each from its heading line up to the next one."""
    return ["## " + p for p in ("\n" + text).split("\n## ")[1:]]


def put_section(text: str, section: str) -> str:
    """`text` with its `## ` section of `section`'s heading replaced by `section` (the first
    one, in place), else with `section` appended; the rest of `text` is kept as it is. The one
    way the studies' generated pages keep or replace sections (evidence.py, storage_curve.py)."""
    parts = ("\n" + text).split("\n## ")
    heading = section.split("\n", 1)[0]
    for i, p in enumerate(parts[1:], 1):
        if "## " + p.split("\n", 1)[0] == heading:
            parts[i] = section.removeprefix("## ").rstrip("\n") + "\n"
            return "\n## ".join(parts)[1:]
    return text.rstrip("\n") + ("\n\n" if text else "") + section


def run_grid(evidence: Path, arms: Sequence[Arm], seeds: Sequence[int], out: Path,
             workers: int = 2, threads: int = 1, reuse: bool = True,
             train: bool = True) -> list[dict[str, Any]]:
    """Train and score every arm under every seed; one record per (arm, seed), seed-major.

    evidence: a finished or running ``benchmarks/evidence.py --out`` dir (its world and the
    caches an arm distils from must exist); out: where new runs go (``out/runs/<arm>-s<seed>``;
    may be `evidence` itself, as evidence.py's own run is). reuse: take a finished evidence run
    with the same resolved config instead of training (off when out is the evidence dir).
    train=False: collect only, records of the runs finished so far (a grid still running, or
    cut short), so some (arm, seed) may be missing.
    """
    evidence, out = Path(evidence).resolve(), Path(out).resolve()
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"arm names must be unique: {names}")
    world = ToyWorld.load(evidence / "world")
    sz = qs.SIZES[PRESET]
    common = {"device": "cpu", "template": sz.template, "tensorboard": False}
    reuse = reuse and out != evidence
    jobs, reused = [], []
    for s in seeds:
        for arm in arms:
            caches = _caches(evidence, arm)
            job = {"world": str(world.root), "out": str(out), "run": f"{arm.name}-s{s}",
                   "init": str(_init(world, evidence, out, arm.model, s)),
                   "caches": {k: str(v) for k, v in caches.items()}, "sizes": None,
                   "common": {**common, "seed": s}, "method": arm.method,
                   "divergence": arm.divergence, "extra": {**STUDENT_EXTRA, **arm.overrides},
                   "name": arm.name, "key": arm.model, "seed": s,
                   "overrides": dict(arm.overrides)}
            own = out / "runs" / job["run"] / "truth.json"
            match = _reusable(evidence, job, s) if reuse and not own.is_file() else None
            if match is not None:
                job["reused_from"] = str(match)
                reused.append(job)
            elif train or own.is_file():
                jobs.append(job)
    done = {j["run"]: j for j in run_jobs(jobs, workers, threads)}
    for j in reused:
        done[j["run"]] = {**j, "scores": json.loads(
            (Path(j["reused_from"]) / "truth.json").read_text())}
    return [record(done[f"{a.name}-s{s}"], done[f"{a.name}-s{s}"]["scores"])
            for s in seeds for a in arms if f"{a.name}-s{s}" in done]


# --------------------------------------------------------------------------- paired summaries


def per_seed(records: Sequence[Mapping[str, Any]], metric: str = METRIC,
             split: str = "test") -> dict[str, dict[int, float]]:
    """per_seed[name][seed] = metric: the paired structure verdicts.judge reads."""
    out: dict[str, dict[int, float]] = {}
    for r in records:
        out.setdefault(r["method_name"], {})[r["seed"]] = r[split][metric]
    return out


def paired(records: Sequence[Mapping[str, Any]], better: str, worse: str,
           metric: str = METRIC, split: str = "test") -> dict[str, Any]:
    """Paired difference worse − better over the seeds both have (> 0: `better` is lower)."""
    ps = per_seed(records, metric, split)
    seeds = sorted(set(ps[better]) & set(ps[worse]))
    return {"better": better, "worse": worse, "seeds": seeds,
            **paired_test([ps[worse][s] - ps[better][s] for s in seeds])}


def method_table(records: Sequence[Mapping[str, Any]], metrics: Sequence[str] = TABLE_METRICS,
                 split: str = "test") -> dict[str, dict[str, tuple[float, float]]]:
    """table[name][metric] = (mean, 95% t half-width over seeds); 0 half-width for one seed."""
    table: dict[str, dict[str, tuple[float, float]]] = {}
    for name in dict.fromkeys(r["method_name"] for r in records):
        rows = [r[split] for r in records if r["method_name"] == name]
        table[name] = {}
        for m in metrics:
            vals = [row[m] for row in rows]
            if len(vals) > 1:
                t = paired_test(vals)
                table[name][m] = (t["mean"], t["ci95"][1] - t["mean"])
            else:
                table[name][m] = (vals[0], 0.0)
    return table
