"""The evidence table: does DSKD beat vanilla KD per divergence, and DSKD-CMA beat ULD and MinED?

    python benchmarks/results.py --out /tmp/dskd-results [--preset small] [--divergences fkl,rkl,...]
        [--seeds 3] [--write-doc docs/results.md]

Runs `dskd quickstart` (teacher SFT, one train cache, the 7 default students, eval), then trains
KD and DSKD students for every extra divergence from the same cache, evaluates every model on the
test split with the paper's protocol (sampled ROUGE-L, one run per seed), and writes a markdown
table with the command that produced it. Reruns skip finished runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from dskd.pipeline.config import resolve
from dskd.pipeline.toyworld import build_toy_world
from dskd.stages import evaluate, quickstart
from dskd.stages.report import markdown_table, score_table

ALL_DIVERGENCES = ["fkl", "rkl", "js", "skl", "srkl", "akl", "tvd"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", default="small", choices=["tiny", "small"])
    ap.add_argument("--divergences", default=",".join(ALL_DIVERGENCES))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--write-doc", type=Path, default=None)
    a = ap.parse_args()
    t0 = time.perf_counter()

    qs = quickstart.QuickstartConfig(out=str(a.out), preset=a.preset, seeds=a.seeds)
    quickstart.run(qs)
    sz = quickstart.SIZES[a.preset]
    world = build_toy_world(a.out / "world", seed=qs.world_seed, preset=a.preset)
    caches = {s: a.out / "cache" / s for s in ("train", "valid")}
    common = {"device": qs.device, "seed": qs.world_seed}

    finals = {"teacher": a.out / "runs" / "teacher" / "final"}
    finals |= {n: a.out / "runs" / n / "final" for n in quickstart.STUDENTS}
    for div in a.divergences.split(","):
        for method in ("kd", "dskd"):
            name = f"{method}-{div}"
            finals[name] = quickstart.train_student(a.out, world, caches, sz, common, name,
                                                    "student", method, div)

    eval_dir = a.out / "eval-all"
    evaluate.run(resolve(evaluate.EvalConfig, {
        "model": [str(p) for p in finals.values()], "model_name": list(finals),
        "data": [str(world.test)], "name": ["toy-test"], "out": str(eval_dir),
        "seeds": [10 * (i + 1) for i in range(a.seeds)], "max_new_tokens": sz.max_new_tokens,
        "limit": sz.eval_limit, "device": qs.device}))
    results = json.loads((eval_dir / "results.json").read_text())
    table, cols = score_table(results["scores"])
    wall = time.perf_counter() - t0
    doc = render(a, table, cols, wall)
    print(doc)
    if a.write_doc:
        a.write_doc.write_text(doc)


def render(a: argparse.Namespace, table: dict, cols: list[str], wall: float) -> str:
    def mean(name: str) -> float | None:
        cell = table.get(name, {}).get(cols[0])
        return None if cell is None else cell[0]

    lines = ["# Results on the toy world", "",
             f"Command: `python benchmarks/results.py --out OUT --preset {a.preset} "
             f"--divergences {a.divergences} --seeds {a.seeds}` "
             f"({wall / 60:.0f} min on {platform.machine()} with 2 CPU cores).", "",
             "ROUGE-L (×100) on the toy test split, sampled decoding, mean ± std over "
             f"{a.seeds} sampling seeds (one training run per method).", "",
             markdown_table(table, cols), "", "## The paper's claims, checked", ""]
    for div in a.divergences.split(","):
        kd, ds = mean(f"kd-{div}"), mean(f"dskd-{div}")
        if kd is not None and ds is not None:
            lines.append(f"- DSKD > KD with {div}: {'holds' if ds > kd else 'does NOT hold'} "
                         f"({ds:.2f} vs {kd:.2f})")
    cma = mean("xvocab-dskd-cma")
    for other in ("xvocab-uld", "xvocab-mined"):
        o = mean(other)
        if cma is not None and o is not None:
            lines.append(f"- DSKD-CMA > {other.split('-')[1].upper()}: "
                         f"{'holds' if cma > o else 'does NOT hold'} ({cma:.2f} vs {o:.2f})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
