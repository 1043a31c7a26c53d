"""`dskd quickstart`: the whole pipeline on a generated toy world, on a laptop CPU.

    dskd quickstart [--out quickstart-out] [--preset tiny|small] [--seeds 3]

Recipe: toy world → fine-tune the teacher (SFT) → cache the teacher over train (and valid, for
fidelity) → students from the cache (same vocabulary: SFT, KD, DSKD; other vocabulary: SFT, ULD,
MinED, DSKD-CMA) → eval on test → print the table. Every step is a call of the real stage with the
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
        "help": "tiny: ≤ 2 min on 2 CPU cores (used by the end-to-end test); small: ≤ 10 min, "
                "sized so methods can be told apart"})
    seeds: int = field(default=0, metadata={
        "help": "sampling seeds for eval (the paper uses 5: 10..50); 0 = the preset's default"})
    world_seed: int = field(default=0, metadata={"help": "seed of the toy world (data, tokenizers, init)"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda or auto"})


@dataclass(frozen=True)
class Sizes:
    teacher_epochs: int
    student_epochs: int
    batch_size: int
    lr: float
    teacher_lr: float
    seeds: int
    max_new_tokens: int
    eval_limit: int | None


SIZES = {
    "tiny": Sizes(teacher_epochs=2, student_epochs=1, batch_size=32, lr=3e-3, teacher_lr=3e-3,
                  seeds=1, max_new_tokens=32, eval_limit=40),
    "small": Sizes(teacher_epochs=6, student_epochs=4, batch_size=32, lr=2e-3, teacher_lr=2e-3,
                   seeds=3, max_new_tokens=48, eval_limit=150),
}

# name -> (student model key in the toy world, method, divergence)
STUDENTS: dict[str, tuple[str, str, str]] = {
    "sft": ("student", "sft", "fkl"),
    "kd-fkl": ("student", "kd", "fkl"),
    "dskd-fkl": ("student", "dskd", "fkl"),
    "xvocab-sft": ("student_xvocab", "sft", "fkl"),
    "xvocab-uld": ("student_xvocab", "uld", "fkl"),
    "xvocab-mined": ("student_xvocab", "mined", "fkl"),
    "xvocab-dskd-cma": ("student_xvocab", "dskd-cma", "fkl"),
}


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


def train_student(out: Path, world: Any, caches: dict[str, Path], sz: Sizes, common: dict[str, Any],
                  name: str, model_key: str, method: str, divergence: str) -> Path:
    """One student from the train cache (benchmarks/results.py trains more of them this way)."""
    from dskd.stages import distill

    run_dir = out / "runs" / name
    return _step(f"student {name}: {method} ({divergence})", run_dir / "final",
                 lambda: distill.run(resolve(distill.DistillConfig, {
                     **common, "method": method, "divergence": divergence,
                     "student": str(getattr(world, model_key)), "cache": str(caches["train"]),
                     "valid_cache": str(caches["valid"]), "out": str(run_dir),
                     "epochs": sz.student_epochs, "batch_size": sz.batch_size, "lr": sz.lr,
                     "num_workers": 0, "resume": True})))


def run(cfg: QuickstartConfig) -> Path:
    from transformers.utils import logging as hf_logging

    from dskd.pipeline.toyworld import build_toy_world
    from dskd.stages import cache_teacher, distill, evaluate

    hf_logging.disable_progress_bar()  # per-file load/save bars of tiny models are noise here
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    sz = SIZES[cfg.preset]
    t_start = time.perf_counter()

    # 1. the toy world: data, two tokenizer families, tiny random-init models
    console.rule("[bold]toy world")
    world = build_toy_world(out / "world", seed=cfg.world_seed, preset=cfg.preset)
    common = {"device": cfg.device, "seed": cfg.world_seed}

    # 2. fine-tune the teacher first, as the paper's teachers are
    teacher_run = out / "runs" / "teacher"
    teacher = teacher_run / "final"
    _step("teacher: SFT on train", teacher, lambda: distill.run(resolve(distill.DistillConfig, {
        **common, "method": "sft", "student": str(world.teacher), "data": str(world.train),
        "valid_data": str(world.valid), "out": str(teacher_run), "epochs": sz.teacher_epochs,
        "batch_size": sz.batch_size, "lr": sz.teacher_lr, "num_workers": 0, "resume": True})))

    # 3. cache the teacher once: train split for distillation, valid split for fidelity
    caches = {}
    for split in ("train", "valid"):
        cache_dir = out / "cache" / split
        caches[split] = cache_dir
        _step(f"cache-teacher: {split}", cache_dir / "manifest.json",
              lambda cache_dir=cache_dir, split=split: cache_teacher.run(resolve(
                  cache_teacher.CacheTeacherConfig, {
                      "device": cfg.device, "teacher": str(teacher),
                      "data": str(getattr(world, split)), "out": str(cache_dir),
                      "top_k": 16, "shard_size": 256})))

    # 4. students from the one cache, same vocabulary and another vocabulary
    finals = {"teacher": teacher}
    for name, (model_key, method, divergence) in STUDENTS.items():
        finals[name] = train_student(out, world, caches, sz, common, name, model_key, method, divergence)

    # 5. eval on the test split, the paper's protocol (sampled ROUGE-L over seeds)
    eval_dir = out / "eval"
    n_seeds = cfg.seeds or sz.seeds
    _step("eval: test split", eval_dir / "results.json", lambda: evaluate.run(resolve(
        evaluate.EvalConfig, {
            "model": [str(p) for p in finals.values()], "model_name": list(finals),
            "data": [str(world.test)], "name": ["toy-test"], "out": str(eval_dir),
            "seeds": [10 * (i + 1) for i in range(n_seeds)], "max_new_tokens": sz.max_new_tokens,
            "limit": sz.eval_limit, "device": cfg.device})))

    report = (eval_dir / "report.md").read_text(encoding="utf-8")
    console.rule("[bold]results")
    print(report)
    wall = time.perf_counter() - t_start
    summary = {"preset": cfg.preset, "wall_s": round(wall, 1), "report": str(eval_dir / "report.md"),
               "results": str(eval_dir / "results.json"), "runs": {k: str(v) for k, v in finals.items()}}
    (out / "quickstart.json").write_text(json.dumps(summary, indent=2) + "\n")
    console.print(f"[bold green]quickstart done[/] in {wall:.0f}s — report: {eval_dir / 'report.md'}, "
                  f"plots: {eval_dir}/*.png")
    return eval_dir / "report.md"
