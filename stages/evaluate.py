"""`dskd eval`: generate with each model on each eval set, once per seed, and score like the paper.

    dskd eval --model runs/sft/final --model runs/dskd/final --data dolly_test.jsonl \
        --data vicuna.jsonl --out eval/ [--seeds 10,20,30,40,50] [--decoding greedy]

Recipe: check every input (all problems at once, before any model loads) → load eval sets →
per model: generate (one part file per model × set × seed, so a killed run resumes) → score →
fidelity against a held-out teacher cache (optional) → exact metrics against the truth for
eval sets that record `probs` (pipeline/truth.py) → generations.jsonl, results.json, report.md
and PNGs, config.yaml.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from dskd.pipeline import generate as gen
from dskd.pipeline import metrics, plots, truth
from dskd.pipeline.cache.remote import check_url, is_url, local_path
from dskd.pipeline.config import atomic_write_text, save_config
from dskd.pipeline.data import BadRows, DataError, Example, load_examples
from dskd.pipeline.train.checkpoint import CKPT_SUBDIR, best_info
from dskd.pipeline.train.logger import stage_progress

from . import report as report_mod

console = Console(stderr=True)
FILE_WIDTH = 10_000  # columns of the summary outside a terminal (_print_unwrapped): never wraps
GENERATIONS_FILE = "generations.jsonl"
PARTS_DIR = ".parts"  # one finished (model, eval set, seed) per file; reused on rerun


class EvalError(ValueError):
    """Eval inputs that cannot be used; the message lists each problem and what to do."""


@dataclass
class EvalConfig:
    model: list[str] = field(default_factory=list, metadata={
        "help": "model dir (save_pretrained, with tokenizer), LoRA checkpoint, or distill run "
                "dir (its best checkpoint, else final/); repeat for several models"})
    data: list[str] = field(default_factory=list, metadata={
        "help": "eval set file (jsonl/json/parquet/csv/HF dir); repeat for several sets"})
    out: str = field(default="", metadata={"help": "output dir"})
    name: list[str] = field(default_factory=list, metadata={
        "help": "eval set names, one per --data (default: each file's name without extension)"})
    model_name: list[str] = field(default_factory=list, metadata={
        "help": "model names for tables, one per --model (default: the run dir's name)"})
    seeds: list[int] = field(default_factory=lambda: [10, 20, 30, 40, 50], metadata={
        "help": "one generation run per seed (the paper: 10,20,30,40,50)"})
    decoding: Literal["sample", "greedy"] = field(default="sample", metadata={
        "help": "sample: temperature 1, top-p 1, top-k 0 (the paper); greedy: deterministic view"})
    max_new_tokens: int = field(default=256, metadata={"help": "max generated tokens"})
    max_prompt_len: int = field(default=256, metadata={
        "help": "prompt tokens kept (the first N, as in training)"})
    no_repeat_ngram_size: int = field(default=6, metadata={
        "help": "ban repeating n-grams of this size (0 disables; the paper: 6)"})
    batch_size: int = field(default=16, metadata={
        "help": "prompts per generate call (results do not depend on it)"})
    backend: Literal["transformers", "vllm"] = field(default="transformers", metadata={
        "help": "generation backend (vllm needs the vllm extra: pip install dskd with vllm)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={
        "help": "model dtype (auto: as saved)"})
    template: Literal["dskd", "chat", "none"] | None = field(default=None, metadata={
        "help": "prompt template (default: the one `dskd distill` recorded for the models, "
                "else dskd)"})
    allow_mixed_templates: bool = field(default=False, metadata={
        "help": "put models trained on different prompt templates side by side (refused "
                "otherwise: the comparison would be unfair)"})
    generate: bool = field(default=True, metadata={
        "help": "generate and score ROUGE-L / exact match; --no-generate: only the held-out "
                "NLL of --data's responses and the --cache fidelity, in seconds"})
    field_map: str | None = field(default=None, metadata={
        "help": "column mapping canonical=column,... for unusual eval files"})
    on_bad_row: Literal["error", "skip"] = field(default="error", metadata={
        "help": "bad eval rows: stop, or skip and list them in skipped_rows.jsonl"})
    limit: int | None = field(default=None, metadata={
        "help": "use only the first N examples of each set and of --cache (quick checks)"})
    cache: str | None = field(default=None, metadata={
        "help": "teacher cache (dir or store URL, s3://…) of a held-out split: adds KL(T‖S), "
                "top-1 agreement, NLL/PPL"})


# --------------------------------------------------------------------------- inputs


_FINAL = re.compile(r"^(final|best|last|latest)$")
_STEP = re.compile(r"^(?:step|checkpoint|global_step)-?0*(\d+)$")


def resolve_model(path: str | Path) -> tuple[Path, str | None]:
    """The model dir `--model PATH` evaluates, and a note saying which when PATH is a run dir.

    A distill checkpoint dir (RUN/checkpoints/step-N) holds its model in `student/` (LoRA: the
    adapter). A run dir gives its best checkpoint when the run selected one
    (checkpoints/best.json: best validation ROUGE-L with --eval-rouge, else validation CE), as
    the paper evaluates; otherwise its final/.
    """
    p = Path(path)
    if (p / "config.json").is_file() or (p / "adapter_config.json").is_file():
        return p, None
    if (p / "student").is_dir():
        return p / "student", None
    if not ((p / "final").is_dir() or (p / CKPT_SUBDIR).is_dir()):
        return p, None
    best, why = best_info(p), "the run selected no best checkpoint"
    if best is not None:
        d = p / CKPT_SUBDIR / best["checkpoint"] / "student"
        if d.is_dir():
            return d, (f"{p}: evaluating {CKPT_SUBDIR}/{best['checkpoint']}, the run's best "
                       f"checkpoint ({best['metric']} {best['value']:.4g} at step {best['step']}); "
                       f"give {p / 'final'} for the last step")
        why = f"its best checkpoint {best['checkpoint']} is gone"
    return p / "final", f"{p}: evaluating final/ ({why})"


def resolve_model_dir(path: str | Path) -> Path:
    return resolve_model(path)[0]


def model_display_name(model_dir: str | Path) -> str:
    """The run's name: `.../run-dskd/final` → run-dskd; `.../run-dskd/checkpoints/step-120/student`
    → run-dskd@step-120; a plain model dir → its own name."""
    p = Path(model_dir).resolve()
    if p.name == "student" and _STEP.match(p.parent.name):
        p = p.parent
    if _FINAL.match(p.name):
        return p.parent.name
    m = _STEP.match(p.name)
    if m:
        run = p.parent.parent if p.parent.name == "checkpoints" else p.parent
        return f"{run.name}@step-{int(m.group(1))}"
    return p.name


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_fingerprint(model_dir: Path) -> dict[str, Any]:
    """sha256 of config.json / adapter_config.json and every *.safetensors, and one over them."""
    names = [n for n in ("config.json", "adapter_config.json") if (model_dir / n).is_file()]
    names += sorted(p.name for p in model_dir.glob("*.safetensors"))
    files = {n: _sha256_file(model_dir / n) for n in names}
    total = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"sha256": total, "files": files}


def _file_sha(path: str) -> str | None:
    p = Path(path)
    return _sha256_file(p) if p.is_file() else None


def check_inputs(cfg: EvalConfig) -> None:
    """Every problem with the flags, at once, before any model loads."""
    problems = []
    if not cfg.model:
        problems.append("no --model given")
    if not cfg.data and (cfg.generate or not cfg.cache):
        problems.append("no --data given" + ("" if cfg.generate else " (nor --cache)"))
    if not cfg.out:
        problems.append("no --out given")
    if not cfg.seeds and cfg.decoding == "sample":
        problems.append("--seeds is empty")
    if cfg.name and len(cfg.name) != len(cfg.data):
        problems.append(f"{len(cfg.name)} --name for {len(cfg.data)} --data; give one per set")
    if cfg.model_name and len(cfg.model_name) != len(cfg.model):
        problems.append(f"{len(cfg.model_name)} --model-name for {len(cfg.model)} --model")
    if cfg.max_new_tokens < 1 or cfg.max_prompt_len < 1 or cfg.batch_size < 1:
        problems.append("--max-new-tokens, --max-prompt-len and --batch-size must be ≥ 1")
    for m in cfg.model:
        try:
            d = gen.check_model_dir(resolve_model_dir(m))
            if cfg.backend == "vllm" and gen.adapter_base(d) is not None:
                problems.append(f"--backend vllm cannot load the LoRA adapter {d}; use --backend "
                                "transformers, or evaluate the run's final/ (LoRA merged)")
        except gen.ModelLoadError as e:
            problems.append(str(e))
    for d in cfg.data:
        if not Path(d).exists():
            problems.append(f"eval set {d} does not exist")
    names = set_names(cfg)
    if len(set(names)) != len(names):
        problems.append(f"eval set names {names} are not unique; pass --name for each --data")
    mnames = model_names(cfg)
    if len(set(mnames)) != len(mnames):
        problems.append(f"model names {mnames} are not unique; pass --model-name for each --model")
    if cfg.backend == "vllm" and not gen.vllm_available():
        problems.append("--backend vllm: vLLM is not installed (pip install 'dskd[vllm]')")
    if cfg.cache and is_url(cfg.cache) and (bad := check_url(cfg.cache)):
        problems.append(f"--cache {bad}")
    elif cfg.cache and not is_url(cfg.cache) and not local_path(cfg.cache).is_dir():
        problems.append(f"--cache {cfg.cache} is not a directory")
    trained = {model_display_name(m): t for m, t in training_templates(cfg).items() if t}
    if len(set(trained.values())) > 1 and not cfg.allow_mixed_templates:
        problems.append("the models were trained on different prompt templates ("
                        + ", ".join(f"{m}: {t}" for m, t in trained.items()) + "), so side by "
                        "side they are not comparable; retrain with one --template, or pass "
                        "--allow-mixed-templates")
    if problems:
        raise EvalError("cannot run eval:\n  - " + "\n  - ".join(problems))


def training_template(model_dir: str | Path) -> str | None:
    """The prompt template `dskd distill` trained a model with: final/dskd_run.json, else the
    run dir's config.yaml above a checkpoint (None: not a dskd run, or not recorded)."""
    p = resolve_model_dir(model_dir)
    if (p / "dskd_run.json").is_file():
        return json.loads((p / "dskd_run.json").read_text()).get("template")
    for d in list(p.parents)[:3]:
        if (d / "config.yaml").is_file() and (d / "metrics.jsonl").is_file():  # a distill run
            return (yaml.safe_load((d / "config.yaml").read_text()) or {}).get("template")
    return None


def training_templates(cfg: EvalConfig) -> dict[str, str | None]:
    return {m: training_template(m) for m in cfg.model if Path(m).is_dir()}


def resolve_template(cfg: EvalConfig) -> str:
    """--template, else the models' one training template, else dskd."""
    if cfg.template:
        return cfg.template
    known = {t for t in training_templates(cfg).values() if t}
    return known.pop() if len(known) == 1 else "dskd"


def set_names(cfg: EvalConfig) -> list[str]:
    return list(cfg.name) if cfg.name else [Path(d).name.split(".")[0] or d for d in cfg.data]


def model_names(cfg: EvalConfig) -> list[str]:
    return list(cfg.model_name) if cfg.model_name else [model_display_name(resolve_model_dir(m))
                                                         for m in cfg.model]


def load_eval_set(path: str, cfg: EvalConfig, out_dir: Path, tokenizer: Any = None) -> list[Example]:
    """Examples of one eval set; every example needs ≥ 1 non-empty reference."""
    bad = BadRows(path, cfg.on_bad_row)
    try:
        examples = load_examples(path, field_map=cfg.field_map, template=cfg.template,
                                 on_bad_row=cfg.on_bad_row, tokenizer=tokenizer, limit=cfg.limit,
                                 bad_rows=bad)
    except DataError as e:
        raise EvalError(f"eval set {path}: {e}. An eval file needs a prompt (or instruction) and "
                        "a reference answer per row (response/output, or a references list).") from None
    bad.write_report(out_dir)
    for ex in examples:
        if not ex.references or not any(r.strip() for r in ex.references):
            raise EvalError(f"eval set {path}: row {ex.row} has no reference answer")
    return examples


# --------------------------------------------------------------------------- generation


class _RateColumn(ProgressColumn):
    def render(self, task: Any) -> Text:
        return Text(f"{task.speed:.1f} prompts/s" if task.speed else "– prompts/s", style="cyan")


def _progress() -> Any:
    """The generation bar, or plain lines when stderr is not a terminal (as every stage)."""
    return stage_progress(lambda: Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
        TimeRemainingColumn(), console=console, transient=False),
        "{description} · {completed}/{total} prompts · {rate:.1f} prompts/s · ETA {eta}")


def _device(pref: str) -> str:
    if pref == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return pref


def _protocol(cfg: EvalConfig) -> dict[str, Any]:
    greedy = cfg.decoding == "greedy"
    return {
        "decoding": cfg.decoding,
        "temperature": None if greedy else 1.0,
        "top_p": None if greedy else 1.0,
        "top_k": None if greedy else 0,
        # vLLM has no n-gram ban: say so rather than claim the paper's setting
        "no_repeat_ngram_size": None if cfg.backend == "vllm" else cfg.no_repeat_ngram_size,
        "seeds": _seeds(cfg),
        "max_new_tokens": cfg.max_new_tokens,
        "max_prompt_len": cfg.max_prompt_len,
        "backend": cfg.backend,
        "template": cfg.template,
        "sampler": None if greedy else ("per-prompt Gumbel-max" if cfg.backend == "transformers"
                                        else "vLLM per-request seed"),
    }


def _seeds(cfg: EvalConfig) -> list[int]:
    # Greedy ignores the seed: one run, whatever --seeds says.
    return [cfg.seeds[0] if cfg.seeds else 0] if cfg.decoding == "greedy" else list(cfg.seeds)


def _part_path(out: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return out / PARTS_DIR / f"{digest}.jsonl"


def _read_part(path: Path, ids: list[str]) -> list[str] | None:
    """A finished part's texts in `ids` order, or None when it is missing or does not match."""
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    by_id = {r["id"]: r["text"] for r in rows}
    if len(rows) != len(ids) or set(by_id) != set(ids):
        return None
    return [by_id[i] for i in ids]


class _Generator:
    """One loaded model behind either backend, with the call the stage needs."""

    def __init__(self, model_dir: Path, cfg: EvalConfig):
        self.cfg = cfg
        if cfg.backend == "vllm":
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
            self.llm = gen.load_vllm(model_dir, seed=cfg.seeds[0] if cfg.seeds else 0,
                                     dtype=cfg.dtype)
        else:
            self.model, self.tokenizer = gen.load_model(model_dir, _device(cfg.device), cfg.dtype)

    def __call__(self, examples: list[Example], seed: int, on_batch: Any) -> list[str]:
        c = self.cfg
        prompts, ids = [e.prompt for e in examples], [e.id for e in examples]
        if c.backend == "vllm":
            texts = gen.generate_vllm(self.llm, self.tokenizer, prompts, ids, seed=seed,
                                      decoding=c.decoding, max_new_tokens=c.max_new_tokens,
                                      max_prompt_len=c.max_prompt_len)
            on_batch(len(texts))
            return texts
        return gen.generate_transformers(
            self.model, self.tokenizer, prompts, ids, seed=seed, decoding=c.decoding,
            max_new_tokens=c.max_new_tokens, max_prompt_len=c.max_prompt_len,
            batch_size=c.batch_size, no_repeat_ngram_size=c.no_repeat_ngram_size,
            on_batch=on_batch)

    def close(self) -> None:
        for attr in ("model", "llm"):
            if hasattr(self, attr):
                delattr(self, attr)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------- stage


def run(cfg: EvalConfig) -> Path:
    check_inputs(cfg)
    cfg = dataclasses.replace(cfg, template=resolve_template(cfg))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    names, mnames = set_names(cfg), model_names(cfg)
    resolved = [resolve_model(m) for m in cfg.model]
    model_dirs = [d for d, _ in resolved]
    for _, note in resolved:
        if note:
            console.print(f"[yellow]model:[/] {note}")
    seeds = _seeds(cfg)
    protocol = _protocol(cfg)

    # Eval sets, loaded once (per model only for the chat template, which needs its tokenizer).
    sets: dict[str, list[Example]] = {}
    if cfg.template != "chat":
        sets = {n: load_eval_set(d, cfg, out) for n, d in zip(names, cfg.data)}

    models_info: dict[str, Any] = {}
    for mname, given, (mdir, note) in zip(mnames, cfg.model, resolved):
        run_metrics = plots.find_run_metrics(mdir, levels_up=3 if mdir.name == "student" else 2)
        models_info[mname] = {"path": str(mdir), "given": given, "selection": note,
                              "fingerprint": model_fingerprint(mdir),
                              "metrics_jsonl": str(run_metrics) if run_metrics else None,
                              "train_template": training_template(mdir)}
        if models_info[mname]["train_template"] not in (None, cfg.template):
            console.print(f"[yellow]warning:[/] {mname} was trained on template "
                          f"{models_info[mname]['train_template']}; prompting it with "
                          f"--template {cfg.template}")
    if not cfg.generate:
        return score_without_generation(cfg, out, dict(zip(mnames, model_dirs)), models_info)

    texts, example_sets, fidelity, truth_scores = generate_all(
        cfg, out, sets, dict(zip(mnames, model_dirs)), models_info, seeds, protocol)

    # generations.jsonl: every text, in (model, set, seed, example) order
    lines = []
    for (mname, sname, seed), got in texts.items():
        for ex, t in zip(example_sets[mname][sname], got):
            lines.append(json.dumps({"model": mname, "eval_set": sname, "id": ex.id, "seed": seed,
                                     "text": t}, ensure_ascii=False))
    atomic_write_text(out / GENERATIONS_FILE, "\n".join(lines) + "\n")

    scores = score_all(texts, example_sets, mnames, names, seeds)

    results = {
        "format": "dskd-eval/1",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": dataclasses.asdict(cfg),
        "protocol": protocol,
        "models": models_info,
        "eval_sets": {n: {"path": d, "sha256": _file_sha(d),
                          "examples": len(example_sets[mnames[0]][n])}
                      for n, d in zip(names, cfg.data)},
        "scores": scores,
        "fidelity": fidelity,
        "truth": truth_scores,
        "versions": {"torch": torch.__version__, "transformers": _version("transformers"),
                     "rouge_score": _version("rouge-score"), "python": platform.python_version()},
    }
    atomic_write_text(out / report_mod.RESULTS_FILE, json.dumps(results, indent=2) + "\n")
    report_mod.write_report(results, out)
    _print_summary(scores, names, truth_scores)
    return out / report_mod.RESULTS_FILE


def score_without_generation(cfg: EvalConfig, out: Path, models: dict[str, Path],
                             models_info: dict[str, Any]) -> Path:
    """--no-generate: per model, the held-out NLL of each eval set's responses and the fidelity
    against --cache (and the exact metrics, where the data carries true probabilities)."""
    from dskd.pipeline.cache.manifest import load_manifest
    from dskd.pipeline.train.setup import DEFAULT_MAX_LEN

    tf = dataclasses.replace(cfg, backend="transformers")  # scoring needs the full logits
    # training's tokenization limits: the cache's with --cache (so both NLLs agree), else
    # --max-prompt-len and distill's default sequence length
    limits = (metrics.cache_limits(load_manifest(cfg.cache)) if cfg.cache
              else (cfg.max_prompt_len, DEFAULT_MAX_LEN))
    heldout: dict[str, dict[str, Any]] = {}
    truth_scores: dict[str, dict[str, Any]] = {}
    fidelity: dict[str, Any] | None = {} if cfg.cache else None
    ref_tok = None  # per-token truth metrics use one tokenizer for every model: the first's
    for mname, mdir in models.items():
        model = _Generator(mdir, tf)
        ref_tok = ref_tok or model.tokenizer
        heldout[mname] = {}
        for sname, path in zip(set_names(cfg), cfg.data):
            tok = model.tokenizer if cfg.template == "chat" else None
            examples = load_eval_set(path, cfg, out, tok)
            heldout[mname][sname] = metrics.heldout_nll(
                examples, model.model, model.tokenizer, max_prompt_len=limits[0],
                max_len=limits[1], batch_size=cfg.batch_size)
            exact = truth_metrics(path, examples, model.model, model.tokenizer, ref_tok,
                                  limits[0], cfg.batch_size)
            if exact is not None:
                truth_scores.setdefault(mname, {})[sname] = exact
        if fidelity is not None:
            fidelity[mname] = cache_fidelity(tf, mdir, model)
        model.close()
    results = {
        "format": "dskd-eval/1",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": dataclasses.asdict(cfg),
        "protocol": None,  # nothing generated
        "models": models_info,
        "eval_sets": {n: {"path": d, "sha256": _file_sha(d)}
                      for n, d in zip(set_names(cfg), cfg.data)},
        "scores": {},
        "heldout": heldout,
        "truth": truth_scores or None,
        "fidelity": fidelity,
        "versions": {"torch": torch.__version__, "transformers": _version("transformers"),
                     "python": platform.python_version()},
    }
    atomic_write_text(out / report_mod.RESULTS_FILE, json.dumps(results, indent=2) + "\n")
    report_mod.write_report(results, out)
    if heldout and cfg.data:
        _print_unwrapped(report_mod.heldout_table(heldout))
    return out / report_mod.RESULTS_FILE


def truth_metrics(path: str, examples: list[Example], model: Any, tok: Any,
                  reference_tokenizer: Any = None, max_prompt_len: int = 256,
                  batch_size: int = 16) -> dict | None:
    """Exact metrics against the data's true answer probabilities (`probs`, e.g. the toy
    world's) for one model on one eval set; None for data without probs."""
    del path  # kept for the --no-generate call site; the examples carry everything
    model.eval()
    return truth.truth_metrics(model, tok, examples, reference_tokenizer=reference_tokenizer,
                               max_prompt_len=max_prompt_len, batch_size=batch_size)


def generate_all(cfg: EvalConfig, out: Path, sets: dict[str, list[Example]],
                 models: dict[str, Path], models_info: dict[str, Any], seeds: list[int],
                 protocol: dict[str, Any]) -> tuple[dict, dict, dict | None, dict | None]:
    """Every (model, set, seed) generation (finished parts reused), plus fidelity per model.

    Returns texts[(model, set, seed)] = [text per example], example_sets[model][set], the
    fidelity dict (None without --cache) and truth[model][set] (None when no set has `probs`).
    A model is loaded only if something is left to do.
    """
    names = set_names(cfg)
    part_protocol = {k: v for k, v in protocol.items() if k != "seeds"}  # adding a seed keeps parts
    texts: dict[tuple[str, str, int], list[str]] = {}
    example_sets: dict[str, dict[str, list[Example]]] = {}
    fidelity: dict[str, Any] | None = {} if cfg.cache else None
    truth_scores: dict[str, Any] = {}
    ref_tok = None  # per-token truth metrics use one tokenizer for every model: the first's
    total = len(models) * len(seeds) * sum(len(v) for v in sets.values())
    with _progress() as progress:
        task = progress.add_task("generating", total=total or None)
        for mname, mdir in models.items():
            generator = None
            if cfg.template == "chat":  # the prompt text depends on each model's chat template
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(str(mdir))
                sets = {n: load_eval_set(d, cfg, out, tok) for n, d in zip(names, cfg.data)}
                progress.update(task, total=len(models) * len(seeds)
                                * sum(len(v) for v in sets.values()))
            example_sets[mname] = sets
            for sname, examples in sets.items():
                ids = [e.id for e in examples]
                for seed in seeds:
                    key = {"model": models_info[mname]["fingerprint"]["sha256"], "set": sname,
                           "set_ids": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
                           "prompts": hashlib.sha256("\n".join(e.prompt for e in examples)
                                                     .encode()).hexdigest(),
                           "seed": seed, "protocol": part_protocol}
                    part = _part_path(out, key)
                    got = _read_part(part, ids)
                    progress.update(task, description=f"{mname} · {sname} · seed {seed}")
                    if got is None:
                        generator = generator or _Generator(mdir, cfg)
                        got = generator(examples, seed, lambda n: progress.advance(task, n))
                        atomic_write_text(part, "".join(
                            json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n"
                            for i, t in zip(ids, got)))
                    else:
                        progress.advance(task, len(ids))
                    texts[(mname, sname, seed)] = got
            if fidelity is not None:
                progress.update(task, description=f"{mname} · fidelity on {Path(cfg.cache).name}")
                fidelity[mname] = cache_fidelity(cfg, mdir, generator)
            if any(e.probs is not None for v in sets.values() for e in v):
                progress.update(task, description=f"{mname} · exact metrics against the truth")
                if ref_tok is None:
                    ref_tok = gen.load_tokenizer(str(next(iter(models.values()))))[0]
                truth_scores[mname] = set_truth_scores(cfg, mdir, generator, sets, ref_tok)
            if generator is not None:
                generator.close()
    return texts, example_sets, fidelity, truth_scores or None


def set_truth_scores(cfg: EvalConfig, model_dir: Path, generator: _Generator | None,
                     sets: dict[str, list[Example]], reference_tokenizer: Any) -> dict[str, Any]:
    """Exact excess KL / validity / excess NLL of one model on each eval set that has `probs`.

    Needs no generation (teacher-forced log-probabilities of the references).
    """
    if getattr(generator, "model", None) is not None and cfg.backend == "transformers":
        model, tok = generator.model, generator.tokenizer
    else:  # vLLM gives no logits of given sequences: score with transformers
        model, tok = gen.load_model(model_dir, _device(cfg.device), cfg.dtype)
    out = {}
    for sname, examples in sets.items():
        got = truth_metrics("", examples, model, tok, reference_tokenizer, cfg.max_prompt_len,
                            cfg.batch_size)
        if got is not None:
            out[sname] = got
    return out


def cache_fidelity(cfg: EvalConfig, model_dir: Path, generator: _Generator | None) -> dict:
    """KL(T‖S), top-1 agreement and NLL/PPL of one model on the held-out cache `cfg.cache`."""
    from dskd.pipeline.cache.reader import CacheReader, load_head

    reader = CacheReader(cfg.cache, fields=["hidden"], verify_checksums=True)
    if generator is not None and cfg.backend == "transformers":
        model, tok = generator.model, generator.tokenizer
    else:  # vLLM gives no logits of the whole sequence: score with transformers
        model, tok = gen.load_model(model_dir, _device(cfg.device), cfg.dtype)
    device = next(model.parameters()).device
    head = load_head(cfg.cache, device=str(device))
    manifest = reader.manifest
    first = [ex for _, ex in zip(range(8), reader)]
    same, how = metrics.cache_vocab_match(tok, model_dir, manifest, first)
    max_prompt_len, max_len = metrics.cache_limits(manifest)  # the cache's, not --max-prompt-len
    out = metrics.cache_fidelity(
        reader, head["lm_head.weight"], model, tok, same_vocab=same,
        max_prompt_len=max_prompt_len, max_len=max_len, head_bias=head.get("lm_head.bias"),
        logit_scale=float(manifest.get("head", {}).get("logit_scale", 1.0)), limit=cfg.limit,
        batch_size=cfg.batch_size)
    out["vocabulary"] = how
    return out


def score_all(texts: dict[tuple[str, str, int], list[str]],
              example_sets: dict[str, dict[str, list[Example]]],
              mnames: list[str], names: list[str], seeds: list[int]) -> dict:
    """scores[model][set][metric] = {per_seed, mean, std}; plus an Average over sets."""
    scores: dict[str, dict] = {}
    for mname in mnames:
        row: dict[str, dict] = {}
        for sname in names:
            refs = [list(e.references) for e in example_sets[mname][sname]]
            per_seed = {seed: metrics.score_texts(texts[(mname, sname, seed)], refs)
                        for seed in seeds}
            row[sname] = {m: metrics.summarize_seeds({s: v[m] for s, v in per_seed.items()})
                          for m in report_mod.METRIC_TITLES}
        if len(names) > 1:
            row[report_mod.AVERAGE] = {
                m: metrics.average_over_sets([row[s][m] for s in names])
                for m in report_mod.METRIC_TITLES}
        scores[mname] = row
    return scores


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _print_summary(scores: dict, names: list[str], truth_scores: dict | None = None) -> None:
    from rich.table import Table

    if truth_scores:  # the exact numbers first, as in report.md
        t = Table(title="Against the truth (exact; lower excess KL is better)")
        t.add_column("model")
        for _, title in report_mod.TRUTH_COLUMNS:
            t.add_column(title, justify="right")
        for name, cells in report_mod.truth_rows(truth_scores):
            t.add_row(name, *cells)
        _print_unwrapped(t)
    table, columns = report_mod.score_table(scores, "rougeL")
    t = Table(title="ROUGE-L (mean ± std over seeds)")
    t.add_column("model")
    for c in columns:
        t.add_column(c, justify="right")
    for m, row in table.items():
        t.add_row(m, *[report_mod._fmt(row.get(c)) for c in columns])
    _print_unwrapped(t)
    _print_unwrapped(report_mod.ROUGE_NOTE, highlight=False)


def _print_unwrapped(renderable: Any, **kw: Any) -> None:
    """console.print, except into a file or pipe (stderr redirected): there Rich would lay the
    output out at 80 columns, cutting table cells to "…" and wrapping lines, so it is printed at
    its own full width instead. A terminal gets its own width (it may wrap)."""
    if console.is_terminal:
        console.print(renderable, **kw)
        return
    wide = Console(stderr=True, width=FILE_WIDTH, no_color=console.no_color)
    wide.print(renderable, **kw)

