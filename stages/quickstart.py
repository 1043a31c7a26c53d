"""`dskd quickstart`: the whole pipeline on a generated toy world, on a laptop CPU.

    dskd quickstart [--out quickstart-out] [--preset tiny|small] [--seeds 3]

Recipe: toy world → fine-tune the teacher (SFT) on its own rows plus train → cache the teacher
over train (and valid) → students from the cache (same vocabulary: SFT, KD, DSKD; another
vocabulary, same architecture: SFT, ULD, MinED, DSKD-CMA) → eval on test (sampled ROUGE-L and,
since the toy world knows the true answer distribution, exact excess KL to the truth) → print
the table. One training seed: paired-seed intervals are benchmarks/evidence.py's job. Every step is a call of the real stage with the
files a user's run has; this module only picks sizes and paths. A rerun skips finished steps (a
step is finished when its stage's final output exists: ``final/`` of a run, the cache manifest,
``results.json``), and the stages themselves resume interrupted work.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rich.console import Console

from dskd.pipeline.config import resolve, save_config

console = Console(stderr=True)


@dataclass
class QuickstartConfig:
    out: str = field(default="quickstart-out", metadata={"help": "directory for everything it writes"})
    preset: Literal["tiny", "small"] = field(default="small", metadata={
        "help": "tiny: ≤ 1 min on 2 CPU cores (the end-to-end test); small: ≤ 5 min, a teacher "
                "that knows more than its students (the paper's regime)"})
    seeds: int = field(default=0, metadata={
        "help": "sampling seeds for eval (the paper uses 5: 10..50); 0 = the preset's default"})
    world_seed: int = field(default=0, metadata={"help": "seed of the toy world (data, tokenizers, init)"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda or auto"})
    threads: int = field(default=1, metadata={
        "help": "torch CPU threads (0 = torch's default); the toy models gain nothing from "
                "more, and on a busy machine spinning threads make steps several times slower"})


@dataclass(frozen=True)
class Sizes:
    teacher_epochs: int
    student_epochs: int
    batch_size: int
    lr: float  # students; projectors get 2x (the paper's ratio)
    teacher_lr: float
    seeds: int
    max_new_tokens: int
    eval_limit: int | None
    template: str = "dskd"
    teacher_batch_size: int = 32


# small/evidence: student lr and epochs chosen once by an SFT-only validation sweep on the
# evidence world (`python benchmarks/evidence.py --sweep`, recorded in docs/results.md), then
# fixed for every method. Their prompts drop the DSKD template: it would be ~2/3 of every toy
# sequence, and the toy tasks need no instruction header.
SIZES = {
    "tiny": Sizes(teacher_epochs=2, student_epochs=1, batch_size=32, lr=3e-3, teacher_lr=3e-3,
                  seeds=1, max_new_tokens=32, eval_limit=40),
    "small": Sizes(teacher_epochs=1, student_epochs=10, batch_size=32, lr=3e-3, teacher_lr=3e-3,
                   seeds=1, max_new_tokens=32, eval_limit=100, template="none",
                   teacher_batch_size=64),
    "evidence": Sizes(teacher_epochs=2, student_epochs=20, batch_size=32, lr=3e-3,
                      teacher_lr=3e-3, seeds=1, max_new_tokens=32, eval_limit=None,
                      template="none", teacher_batch_size=64),
}

EVIDENCE_NOTE = (
    "One training seed per method here. For paired-seed intervals and verdicts on the paper's "
    "claims (KD > SFT, DSKD > KD, DSKD-CMA > ULD/MinED), see docs/results.md, produced by "
    "`python benchmarks/evidence.py --out OUT`.")

# name -> (student model key in the toy world, method, divergence): the one table of student runs.
# benchmarks/evidence.py trains all of them, in this order; the quickstart those in STUDENTS.
STUDENT_RUNS: dict[str, tuple[str, str, str]] = {
    "sft": ("student", "sft", "fkl"),
    "kd-fkl": ("student", "kd", "fkl"),
    "dskd-fkl": ("student", "dskd", "fkl"),
    "kd-rkl": ("student", "kd", "rkl"),
    "dskd-rkl": ("student", "dskd", "rkl"),
    "xvocab-sft": ("student_xvocab", "sft", "fkl"),
    "xvocab-uld": ("student_xvocab", "uld", "fkl"),
    "xvocab-mined": ("student_xvocab", "mined", "fkl"),
    "xvocab-dskd-cma": ("student_xvocab", "dskd-cma", "fkl"),
}
# the quickstart skips the rkl pair (a laptop's minutes; its claims live in docs/results.md)
STUDENTS = {name: run for name, run in STUDENT_RUNS.items() if name not in ("kd-rkl", "dskd-rkl")}


def truth_summary(truth: dict[str, dict[str, dict[str, Any]]]) -> str | None:
    """One sentence with the numbers the quickstart exists to show: the teacher and each
    distilled student against the SFT student of its vocabulary, on excess KL to the truth."""
    kl = {m: next(iter(per_set.values()))["excess_kl"] for m, per_set in truth.items() if per_set}
    if "teacher" not in kl or "sft" not in kl:
        return None
    parts = [f"teacher {kl['teacher']:.2f}, SFT student {kl['sft']:.2f}"]
    for key, sft in (("student", "sft"), ("student_xvocab", "xvocab-sft")):
        if sft not in kl:
            continue
        kd = [n for n, (k, method, _) in STUDENTS.items() if k == key and method != "sft" and n in kl]
        better = [f"{n} {kl[n]:.2f}" for n in kd if kl[n] < kl[sft]]
        what = "same vocabulary" if key == "student" else f"other vocabulary, vs {sft} {kl[sft]:.2f}"
        parts.append(f"distilled students closer to the truth than SFT ({what}): "
                     + (", ".join(better) if better else "none"))
    return ("Excess KL to the truth on the test split (nats/response, lower is better; one "
            "training seed): " + "; ".join(parts) + ".")


def _step(title: str, done: Path, fn: Any) -> Path:
    """Run one pipeline step unless its final output already exists (rerun = resume)."""
    if done.exists():
        console.print(f"[dim]✓ {title}: already done ({done})[/]")
        return done
    console.rule(f"[bold]{title}")
    t0 = time.perf_counter()
    fn()
    console.print(f"[green]✓ {title}[/] in {time.perf_counter() - t0:.1f}s")
    return done


def train_teacher(out: Path, world: Any, sz: Sizes, common: dict[str, Any]) -> Path:
    """Fine-tune the toy teacher on its own split (teacher-only rows + train), as the paper's
    teachers are fine-tuned before distillation."""
    from dskd.stages import distill

    run_dir = out / "runs" / "teacher"
    return _step("teacher: SFT on teacher_train", run_dir / "final", lambda: distill.run(resolve(
        distill.DistillConfig, {
            **common, "method": "sft", "student": str(world.teacher),
            "data": str(world.teacher_train), "valid_data": str(world.valid),
            "out": str(run_dir), "epochs": sz.teacher_epochs, "batch_size": sz.teacher_batch_size,
            "lr": sz.teacher_lr, "template": sz.template, "num_workers": 0, "resume": True})))


def cache_splits(out: Path, world: Any, teacher: Path, sz: Sizes, device: str,
                 **options: Any) -> dict[str, Path]:
    """Cache the teacher once: train split for distillation, valid split for validation.
    `options`: other cache-teacher settings (benchmarks/storage_curve.py's cache variants)."""
    from dskd.stages import cache_teacher

    caches = {}
    for split in ("train", "valid"):
        cache_dir = out / "cache" / split
        caches[split] = cache_dir
        _step(f"cache-teacher: {split}", cache_dir / "manifest.json",
              lambda cache_dir=cache_dir, split=split: cache_teacher.run(resolve(
                  cache_teacher.CacheTeacherConfig, {
                      "device": device, "teacher": str(teacher), "template": sz.template,
                      "data": str(getattr(world, split)), "out": str(cache_dir),
                      "top_k": 16, "shard_size": 256, **options})))
    return caches


def student_config(out: Path, name: str, student: Path, caches: dict[str, Path] | None,
                   sz: Sizes, common: dict[str, Any], method: str, divergence: str,
                   **extra: Any) -> dict[str, Any]:
    """The DistillConfig values of one student run (benchmarks compare them to a run's
    config.yaml to reuse it). Every method gets the same student lr, epochs and batch;
    projectors 2x the student's lr; `extra` overrides any of it."""
    source = {"cache": str(caches["train"]), "valid_cache": str(caches["valid"])} if caches else {}
    return {**common, "method": method, "divergence": divergence, "student": str(student),
            **source, "out": str(out / "runs" / name), "epochs": sz.student_epochs,
            "batch_size": sz.batch_size, "lr": sz.lr, "projector_lr": 2 * sz.lr,
            "num_workers": 0, "resume": True, **extra}


def train_student(out: Path, name: str, student: Path, caches: dict[str, Path] | None, sz: Sizes,
                  common: dict[str, Any], method: str, divergence: str, **extra: Any) -> Path:
    """One student from the train cache (benchmarks/evidence_grid.py trains many of them this
    way; caches None = SFT from `extra`'s data files), configured by student_config."""
    from dskd.stages import distill

    values = student_config(out, name, student, caches, sz, common, method, divergence, **extra)
    return _step(f"student {name}: {method} ({divergence})", out / "runs" / name / "final",
                 lambda: distill.run(resolve(distill.DistillConfig, values)))


def _cpu_seconds() -> float:
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def run(cfg: QuickstartConfig) -> Path:
    import torch
    from transformers.utils import logging as hf_logging

    from dskd.pipeline.toyworld import build_toy_world
    from dskd.stages import evaluate

    hf_logging.disable_progress_bar()  # per-file load/save bars of tiny models are noise here
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    sz = SIZES[cfg.preset]
    if cfg.threads > 0:  # measured in docs/benchmarks.md (quickstart threads)
        torch.set_num_threads(cfg.threads)
    t_start, cpu_start = time.perf_counter(), _cpu_seconds()

    # 1. the toy world: data, two tokenizer families, tiny random-init models
    console.rule("[bold]toy world")
    world = build_toy_world(out / "world", seed=cfg.world_seed, preset=cfg.preset)
    common = {"device": cfg.device, "seed": cfg.world_seed}

    # 2. fine-tune the teacher first, as the paper's teachers are
    teacher = train_teacher(out, world, sz, common)

    # 3. cache the teacher once: train split for distillation, valid split for validation
    caches = cache_splits(out, world, teacher, sz, cfg.device)

    # 4. students from the one cache, same vocabulary and another vocabulary
    finals = {"teacher": teacher}
    for name, (model_key, method, divergence) in STUDENTS.items():
        finals[name] = train_student(out, name, getattr(world, model_key), caches, sz, common,
                                     method, divergence)

    # 5. eval on the test split, the paper's protocol (sampled ROUGE-L over seeds)
    eval_dir = out / "eval"
    n_seeds = cfg.seeds or sz.seeds
    _step("eval: test split", eval_dir / "results.json", lambda: evaluate.run(resolve(
        evaluate.EvalConfig, {
            "model": [str(p) for p in finals.values()], "model_name": list(finals),
            "data": [str(world.test)], "name": ["toy-test"], "out": str(eval_dir),
            "seeds": [10 * (i + 1) for i in range(n_seeds)], "max_new_tokens": sz.max_new_tokens,
            "limit": sz.eval_limit, "template": sz.template, "device": cfg.device})))

    report_path = eval_dir / "report.md"
    report = report_path.read_text(encoding="utf-8")
    if EVIDENCE_NOTE not in report:
        truth = json.loads((eval_dir / "results.json").read_text(encoding="utf-8")).get("truth")
        line = truth_summary(truth) if truth else None
        report += "\n" + (line + "\n\n" if line else "") + EVIDENCE_NOTE + "\n"
        report_path.write_text(report, encoding="utf-8")
    console.rule("[bold]results")
    print(report)
    wall, cpu = time.perf_counter() - t_start, _cpu_seconds() - cpu_start
    # CPU seconds too: on a shared machine the wall time says more about the neighbours
    summary = {"preset": cfg.preset, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
               "torch_threads": torch.get_num_threads(), "report": str(eval_dir / "report.md"),
               "results": str(eval_dir / "results.json"), "runs": {k: str(v) for k, v in finals.items()}}
    (out / "quickstart.json").write_text(json.dumps(summary, indent=2) + "\n")
    console.print(f"[bold green]quickstart done[/] in {wall:.0f}s ({cpu:.0f} CPU-s) — report: "
                  f"{eval_dir / 'report.md'}, plots: {eval_dir}/*.png")
    return eval_dir / "report.md"
