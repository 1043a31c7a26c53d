"""Distill-stage setup: config checks before compute, the teacher side, the row sources.

Everything here runs before the first forward, and every refusal names the flag, file, shard or
fingerprint field at fault. The stage (`stages/distill.py`) calls these in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..cache.manifest import fingerprint_diff, load_manifest
from ..cache.spec import CacheError
from ..config import ConfigError
from ..data import BadRows, Example, load_examples
from ..losses.baselines import SFTLoss
from ..losses.divergences import SAMPLED_DIVERGENCES
from ..losses.registry import option_problems, signal_problem
from ..losses.signals import DistillLoss
from ..tokenize import TokenizeError, tokenize_example
from .distributed import barrier, local_share
from .models import hf_model, load_teacher, load_tokenizer
from .signal import TeacherHead, cache_head
from .sources import BatchBuilder, CacheSource, ExampleSource, check_shards_present

DEFAULT_TEMPLATE, DEFAULT_MAX_PROMPT_LEN, DEFAULT_MAX_LEN = "dskd", 256, 512
# Fingerprint fields a validation cache must share with the training cache (same teacher, head
# and token layout); the dataset, its size and the shard size may differ.
SAME_TEACHER_FIELDS = ("teacher_config", "teacher_weights", "tokenizer", "template",
                       "max_prompt_len", "max_len", "hidden_dtype", "top_k")


class CacheMismatchError(CacheError):
    """A cache that was made for other settings than this run; names the field."""


@dataclass
class RunInputs:
    """What the checks resolved: the mode, the text settings and the manifests."""

    mode: str  # "cache" | "online" | "data" (SFT from a file)
    template: str
    max_prompt_len: int
    max_len: int
    manifest: dict[str, Any] | None = None
    valid_manifest: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    template_from: str = "default"  # where the template came from, said at start


def check_config(cfg: Any) -> RunInputs:
    """Every problem with flags, paths and cache compatibility at once, before any model loads."""
    errs: list[str] = []
    notes: list[str] = []
    for name in ("student", "out"):
        if not getattr(cfg, name):
            errs.append(f"--{name} is required")
    if cfg.student and not (Path(cfg.student) / "config.json").is_file():
        errs.append(f"--student {cfg.student}: no config.json there; pass a HF model directory")
    if cfg.cache and cfg.teacher:
        errs.append("--cache and --teacher are two ways to get the teacher signal; give one")
    if cfg.teacher and not cfg.data:
        errs.append("--teacher (online distillation) needs --data, the training file")
    if cfg.method != "sft" and not (cfg.cache or cfg.teacher):
        errs.append(f"--method {cfg.method} needs a teacher: --cache DIR (offline) or --teacher DIR "
                    "(online)")
    if not (cfg.cache or cfg.data):
        errs.append("no training data: give --cache DIR or --data FILE")
    if cfg.teacher and not (Path(cfg.teacher) / "config.json").is_file():
        errs.append(f"--teacher {cfg.teacher}: no config.json there; pass a HF model directory")
    if cfg.valid_cache and not cfg.cache and cfg.method != "sft":
        errs.append("--valid-cache needs --cache (its teacher signal must match the training one)")
    if cfg.eval_rouge and not cfg.valid_data:
        errs.append("--eval-rouge generates on --valid-data; give it")
    if cfg.eval_rouge and (cfg.eval_samples < 0 or cfg.eval_max_new_tokens < 1):
        errs.append(f"--eval-samples {cfg.eval_samples} must be ≥ 0 and --eval-max-new-tokens "
                    f"{cfg.eval_max_new_tokens} ≥ 1")
    if cfg.eval_rouge and cfg.fsdp:
        errs.append("--eval-rouge is not supported with --fsdp (generation would need every rank)")
    if cfg.lora and cfg.fsdp:
        errs.append("--lora with --fsdp is not supported; LoRA students fit one device")
    for name in ("batch_size", "grad_accum", "epochs", "log_interval", "shuffle_buffer", "block_size"):
        if getattr(cfg, name) < 1:
            errs.append(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be ≥ 1")
    if cfg.batch_tokens is not None and cfg.batch_tokens < 2:
        errs.append(f"--batch-tokens {cfg.batch_tokens}: must be ≥ 2")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        errs.append(f"--max-steps {cfg.max_steps}: must be ≥ 1")
    if cfg.limit is not None and cfg.limit < 1:
        errs.append(f"--limit {cfg.limit}: must be ≥ 1")
    if cfg.num_workers < 0:
        errs.append(f"--num-workers {cfg.num_workers}: must be ≥ 0")
    if not 0.0 <= cfg.kd_rate <= 1.0:
        errs.append(f"--kd-rate {cfg.kd_rate}: must be in [0, 1] (loss = (1-α)·CE + α·KD)")
    collapse = collapse_reason(cfg.method, cfg.kd_rate)
    if collapse and not cfg.force:
        errs.append(collapse + "; use a lower --kd-rate (the paper: 0.5) or pass --force")
    elif collapse:
        notes.append("--force: " + collapse)

    manifest = valid_manifest = None
    fp: dict[str, Any] = {}
    if cfg.cache:
        try:
            manifest = load_manifest(cfg.cache)
            if not manifest.get("complete"):
                errs.append(f"--cache {cfg.cache}: the cache is incomplete; rerun the same "
                            "`dskd cache-teacher` command to finish it")
            else:
                check_shards_present(cfg.cache, manifest)
            fp = manifest["fingerprints"]
        except CacheError as e:
            errs.append(str(e))
    text_from = f"--cache {cfg.cache}"
    if cfg.valid_cache and not cfg.cache:  # SFT from --data, validated on a cache: one template
        try:
            valid_manifest = load_manifest(cfg.valid_cache)
            check_shards_present(cfg.valid_cache, valid_manifest)
            fp, text_from = valid_manifest["fingerprints"], f"--valid-cache {cfg.valid_cache}"
        except CacheError as e:
            errs.append(str(e))
    # Text settings: explicit flags must equal the cache's; unset ones inherit them.
    wanted = {"template": cfg.template, "max_prompt_len": cfg.max_prompt_len, "max_len": cfg.max_len}
    diff = fingerprint_diff({k: fp[k] for k in wanted if k in fp and wanted[k] is not None},
                            {k: v for k, v in wanted.items() if v is not None and k in fp})
    if diff:
        errs.append(f"{text_from} was made for other settings than this run: "
                    + "; ".join(diff) + ". Re-cache with these settings or drop the flags")
    template = cfg.template or fp.get("template", DEFAULT_TEMPLATE)
    template_from = ("--template" if cfg.template else text_from if "template" in fp
                     else "the default; no cache given")
    max_prompt_len = cfg.max_prompt_len or fp.get("max_prompt_len", DEFAULT_MAX_PROMPT_LEN)
    max_len = cfg.max_len or fp.get("max_len", DEFAULT_MAX_LEN)
    if max_prompt_len >= max_len:
        errs.append(f"--max-prompt-len {max_prompt_len} must be < --max-len {max_len} "
                    "(the response needs room)")
    errs += option_problems(cfg.method, vars(cfg), cfg.teacher_signal)
    signal_err = signal_problem(cfg.method, cfg.teacher_signal)
    if signal_err:
        errs.append(signal_err)
    elif manifest is not None and cfg.teacher_signal == "topk" and cfg.method != "sft" \
            and manifest["layout"].get("top_k", 0) == 0:
        errs.append(f"--teacher-signal topk: cache {cfg.cache} has no top-k (made with --top-k 0); "
                    "use --teacher-signal exact")
    elif cfg.teacher_signal == "sampled" and cfg.method != "sft":
        errs += _sampled_check(cfg, manifest)
    if manifest is not None and cfg.data and fp:
        errs += _dataset_check(cfg, fp, template)
    if cfg.valid_cache and manifest is not None:
        try:
            valid_manifest = load_manifest(cfg.valid_cache)
            check_shards_present(cfg.valid_cache, valid_manifest)
            vdiff = fingerprint_diff({k: fp.get(k) for k in SAME_TEACHER_FIELDS},
                                     {k: valid_manifest["fingerprints"].get(k)
                                      for k in SAME_TEACHER_FIELDS})
            if vdiff:
                errs.append(f"--valid-cache {cfg.valid_cache} does not match --cache: "
                            + "; ".join(vdiff))
            if cfg.teacher_signal == "sampled" and cfg.method != "sft":
                errs += [e.replace("--cache", "--valid-cache", 1) for e in
                         _sampled_check(cfg, valid_manifest, cfg.valid_cache)
                         if e.startswith("--cache")]
        except CacheError as e:
            errs.append(str(e))
    if errs:
        raise ConfigError("distill: " + "\n  ".join([""] + errs))
    mode = "cache" if cfg.cache else ("online" if cfg.teacher else "data")
    if cfg.method == "sft" and cfg.teacher:
        notes.append("--method sft ignores --teacher")
        mode = "data"
    if cfg.eval_rouge:
        notes.append("best checkpoint = highest validation ROUGE-L (greedy generation)")
    return RunInputs(mode, template, max_prompt_len, max_len, manifest, valid_manifest, notes,
                     template_from)


def collapse_reason(method: str, kd_rate: float) -> str | None:
    """Why a setting is known to collapse (None if it is not one of them)."""
    if method in ("dskd", "dskd-cma") and kd_rate >= 1.0:
        # measured in issue 15's world: held-out CE 2.24 against SFT's 0.95
        return (f"--method {method} with --kd-rate {kd_rate:g} is known to collapse: it drops the "
                "student's CE on the data, and its head is then trained only toward t2s_logits, "
                "which are made with that same head (stop-gradient), so nothing ties it to the "
                "labels")
    return None


def needs_teacher_tokenizer(cfg: Any) -> bool:
    """Methods that read the teacher's token strings: MinED and ETA map vocabularies, a pinv
    init across vocabularies finds the shared tokens."""
    return cfg.method in ("mined", "dskd-eta") or (
        cfg.method == "dskd-cma" and getattr(cfg, "projector_init", "auto") == "pinv")


def _sampled_check(cfg: Any, manifest: dict[str, Any] | None, path: str | None = None
                   ) -> list[str]:
    """--teacher-signal sampled: what the unbiased estimate needs (see docs/methods.md)."""
    errs = []  # (which methods take it: registry.TEACHER_SIGNALS, checked by the caller)
    if cfg.divergence not in SAMPLED_DIVERGENCES:
        errs.append(f"--teacher-signal sampled: --divergence {cfg.divergence} cannot be estimated "
                    "without bias from sampled ids (only forward KL is linear in the teacher's "
                    "probabilities, so count/N can stand in for them); use --divergence fkl, or "
                    "--teacher-signal topk / exact")
    if cfg.teacher:
        errs.append("--teacher-signal sampled reads the draws from a cache (cache-teacher "
                    "--sampled-targets N); online distillation takes --teacher-signal exact or topk")
    if manifest is not None:
        lay = manifest["layout"]
        where = path or cfg.cache
        if not lay.get("sampled_targets"):
            errs.append(f"--cache {where} has no sampled targets; rebuild it with `dskd "
                        "cache-teacher ... --sampled-targets 32`, or use --teacher-signal topk/exact")
        elif abs(lay["sampled_temperature"] - cfg.kd_temperature) > 1e-6 * cfg.kd_temperature:
            errs.append(f"--cache {where} drew its sampled targets at temperature "
                        f"{lay['sampled_temperature']:g}, but --kd-temperature is "
                        f"{cfg.kd_temperature:g}: the estimate is unbiased only when they are "
                        f"equal. Pass --kd-temperature {lay['sampled_temperature']:g}, or rebuild "
                        f"the cache with --sampled-temperature {cfg.kd_temperature:g}")
    return errs


@dataclass
class RougeSet:
    """What `--eval-rouge` generates on: the --valid-data prompts rendered with the run's resolved
    template (the cache's unless given) by the student tokenizer, and the resolved prompt cut."""

    examples: list[Example]
    max_prompt_len: int


def load_rouge_set(cfg: Any, inp: RunInputs, student_tok: Any) -> RougeSet | None:
    """The --eval-rouge examples, loaded before the first step so a problem (e.g. --template chat
    with a student tokenizer that has no chat template) stops the run before training, not after."""
    if not cfg.eval_rouge:
        return None
    try:
        examples = load_examples(cfg.valid_data, field_map=cfg.field_map, template=inp.template,
                                 on_bad_row=cfg.on_bad_row, tokenizer=student_tok,
                                 limit=cfg.eval_samples or None)
    except ValueError as e:
        raise ConfigError(f"distill: --eval-rouge on --valid-data {cfg.valid_data}: {e}") from None
    return RougeSet(examples, inp.max_prompt_len)


def _dataset_check(cfg: Any, fp: dict[str, Any], template: str) -> list[str]:
    """--data with --cache: the cache must have been made from exactly this data."""
    from ..cache.fingerprint import dataset_fingerprint

    try:
        exs = load_examples(cfg.data, field_map=cfg.field_map, template=template,
                            on_bad_row=cfg.on_bad_row, limit=cfg.limit)
    except ValueError as e:
        return [str(e)]
    mine = {"n_examples": len(exs),
            "dataset": dataset_fingerprint((e.id, e.prompt, e.response) for e in exs)}
    diff = fingerprint_diff({k: fp.get(k) for k in mine}, mine)
    return [f"--cache {cfg.cache} was not made from --data {cfg.data}: " + "; ".join(diff)] if diff else []


# --------------------------------------------------------------------------- the teacher side


@dataclass
class TeacherSide:
    mode: str  # "exact" | "topk" | "sampled" | "none"
    head: TeacherHead | None = None
    model: nn.Module | None = None  # online only
    tokenizer: Any = None
    hidden_size: int | None = None
    pad_id: int = 0
    sample_temperature: float | None = None  # sampled: the temperature the cache drew at


def build_teacher_side(cfg: Any, inp: RunInputs, student_tok: Any, device: torch.device) -> TeacherSide:
    if cfg.method == "sft":
        return TeacherSide("none")
    if inp.mode == "cache":
        m = inp.manifest
        tok = _cache_teacher_tokenizer(cfg.cache, m) if needs_teacher_tokenizer(cfg) else None
        return TeacherSide(cfg.teacher_signal, cache_head(cfg.cache, m, device), None, tok,
                           int(m["layout"]["hidden_size"]), 0,
                           m["layout"].get("sampled_temperature"))
    from ..teachers.head import head_from_model

    tok, _ = load_tokenizer(cfg.teacher)
    # as cache-teacher's HF backend: bf16 on GPU, fp32 on CPU (so online == cache, dtype-wise)
    dtype = torch.bfloat16 if device.type == "cuda" and cfg.precision != "fp32" else torch.float32
    model = load_teacher(cfg.teacher, device, dtype)
    h = head_from_model(model)
    s = float(h.logit_scale)
    head = TeacherHead(h.weight.float() * s, None if h.bias is None else h.bias.float() * s,
                       (h.embed if h.embed is not None else h.weight).float())
    return TeacherSide(cfg.teacher_signal, head, model, tok,
                       int(model.config.get_text_config().hidden_size), tok.pad_token_id)


def _cache_teacher_tokenizer(cache: str, manifest: dict[str, Any]) -> Any:
    """The teacher's tokenizer (MinED, ETA, cross-vocabulary pinv): the cache's own copy (older
    caches: the teacher dir it names)."""
    from ..cache.tokenizer import teacher_tokenizer_dir

    return load_tokenizer(teacher_tokenizer_dir(cache, manifest))[0]


def student_dims(student: nn.Module) -> int:
    return int(hf_model(student).config.get_text_config().hidden_size)


# --------------------------------------------------------------------------- sources


def cache_fields(cfg: Any, loss: DistillLoss) -> list[str]:
    """Per-token cache arrays this run reads (hidden is by far the largest; read it only if used)."""
    if cfg.method == "sft":
        return []
    if cfg.teacher_signal == "exact":
        return ["hidden"]
    fields = (["sampled_ids", "sampled_counts"] if cfg.teacher_signal == "sampled"
              else ["topk_ids", "topk_logprobs"]
              + (["tail_logprob"] if loss.needs_teacher_tail else []))  # renorm: no tail
    return fields + (["hidden"] if loss.needs_teacher_hidden else [])


def make_source(cfg: Any, inp: RunInputs, teacher: TeacherSide, student_tok: Any,
                loss: DistillLoss, split: str) -> Any:
    """(source, batch builder) for `split` ("train"); for "valid": (source, builder, loss
    override or None), or None when there is no validation set."""
    with_teacher = cfg.method != "sft"
    common = {"student_tokenizer": student_tok, "max_prompt_len": inp.max_prompt_len,
                  "max_len": inp.max_len, "same_length": cfg.method == "uld",
                  "mined_aligner": getattr(loss, "mined_aligner", None) if with_teacher else None}
    cache = cfg.cache if split == "train" else cfg.valid_cache
    data = cfg.data if split == "train" else cfg.valid_data
    if cache and (inp.mode == "cache" or not with_teacher):  # SFT may validate on a cache
        fields = cache_fields(cfg, loss)
        source = CacheSource(cache, fields, cache_mb=cfg.loader_cache_mb)
        # every shard checksummed once per node (split over its ranks) before any training
        source.verify_node_share(*local_share())
        barrier()
        if split == "train" and loss.needs_same_vocab:
            _check_same_vocab(source, student_tok, inp, cfg.method)
        build = BatchBuilder(**common, teacher_pad_id=0, teacher_fields=tuple(fields),
                             with_teacher=with_teacher, aligner=_aligner(cfg, loss, student_tok,
                                                                         teacher.tokenizer))
        return (source, build) if split == "train" else (source, build, None)
    if not data:
        return None
    examples, lengths = _load_tokenizable(data, cfg, inp, student_tok, teacher.tokenizer
                                          if inp.mode == "online" else None)
    online = inp.mode == "online" and with_teacher
    build = BatchBuilder(**common, teacher_tokenizer=teacher.tokenizer if online else None,
                         teacher_pad_id=teacher.pad_id, with_teacher=online,
                         aligner=_aligner(cfg, loss, student_tok, teacher.tokenizer) if online
                         else None)
    if split == "train":
        if online and loss.needs_same_vocab:
            _check_same_vocab_tokenizers(examples[0], student_tok, teacher.tokenizer, inp, cfg.method)
        return ExampleSource(examples, lengths), build
    # A KD run validated on a data file without teacher signal: report the student CE only.
    override = None if online or not with_teacher else SFTLoss()
    return ExampleSource(examples, lengths), build, override


def _aligner(cfg: Any, loss: DistillLoss, student_tok: Any, teacher_tok: Any) -> Any:
    """ETA's token aligner (runs in the loader workers), or None for other losses."""
    if not loss.needs_alignment:
        return None
    from ..token_align import Aligner

    return Aligner(student_tok, teacher_tok, cfg.alignment)


def _load_tokenizable(path: str, cfg: Any, inp: RunInputs, student_tok: Any,
                      teacher_tok: Any) -> tuple[list[Example], list[int]]:
    """Examples that both tokenizers can fit in --max-len (others follow --on-bad-row), with
    their student token counts."""
    bad = BadRows(path, cfg.on_bad_row)
    examples = load_examples(path, field_map=cfg.field_map, template=inp.template,
                             on_bad_row=cfg.on_bad_row, tokenizer=student_tok, bad_rows=bad,
                             limit=cfg.limit)
    kept, lengths = [], []
    for ex in examples:
        try:
            n = tokenize_example(ex, student_tok, inp.max_prompt_len, inp.max_len).num_tokens
            if teacher_tok is not None:
                tokenize_example(ex, teacher_tok, inp.max_prompt_len, inp.max_len)
            kept.append(ex)
            lengths.append(n)
        except TokenizeError as e:
            bad.handle(ex.row, str(e), ex.prompt[:200])
    if not kept:
        raise ConfigError(f"{path}: no example fits --max-len {inp.max_len}")
    if bad.skipped:  # one report per data file: skipped_rows.<file>.jsonl in the run dir
        report = bad.write_report(cfg.out)
        report.replace(report.with_name(f"skipped_rows.{Path(path).stem}.jsonl"))
    return kept, lengths


def _check_same_vocab(source: CacheSource, student_tok: Any, inp: RunInputs, method: str) -> None:
    """kd/dskd compare positions one to one: the student must tokenize like the teacher did."""
    from ..tokenize import tokenize_text

    row = source.reader().at(source.shards[0][0], 0)
    ids = tokenize_text(row.example_id, row.prompt, row.response, student_tok,
                        inp.max_prompt_len, inp.max_len).input_ids
    if ids != row.input_ids.tolist():
        raise ConfigError(f"--method {method} needs the teacher's vocabulary, but the student "
                          f"tokenizes example {row.example_id!r} differently from the cache "
                          "(different tokenizer). Use --method dskd-cma, uld or mined")


def _check_same_vocab_tokenizers(ex: Example, student_tok: Any, teacher_tok: Any,
                                 inp: RunInputs, method: str) -> None:
    a = tokenize_example(ex, student_tok, inp.max_prompt_len, inp.max_len).input_ids
    b = tokenize_example(ex, teacher_tok, inp.max_prompt_len, inp.max_len).input_ids
    if a != b:
        raise ConfigError(f"--method {method} needs the teacher's vocabulary, but student and "
                          f"teacher tokenize example {ex.id!r} differently. Use --method "
                          "dskd-cma, uld or mined")
