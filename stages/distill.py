"""Train a student from a teacher cache (or online from a live teacher, or by plain SFT).

    dskd distill --cache runs/cache --student models/student --out runs/dskd --method dskd
    dskd distill --data train.jsonl --student models/teacher --out runs/teacher-sft --method sft
    dskd distill --data train.jsonl --teacher models/teacher --student models/student --out runs/online
    torchrun --nproc-per-node 2 -m dskd.cli distill ...        (DDP; add --fsdp to shard the student)

The recipe: config checks → teacher side → student → loss → data → optimizer → resume → loop →
final student. The loop is one function below, in the order it runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from rich.console import Console

from dskd.pipeline.config import save_config, to_dict
from dskd.pipeline.failpoints import failpoint
from dskd.pipeline.losses.registry import (
    DUAL_SPACE,
    LossOptions,
    build_loss,
    resolve_projector_init,
)
from dskd.pipeline.train import checkpoint as ckpt
from dskd.pipeline.train import distributed as dist
from dskd.pipeline.train import resume
from dskd.pipeline.train.distiller import Distiller, autocast_off
from dskd.pipeline.train.loader import BatchStream, PlanConfig, to_device
from dskd.pipeline.train.logger import METRICS_FILE, MetricsLogger, train_progress, truncate_metrics
from dskd.pipeline.train.models import (
    LoraOptions,
    gathered_state,
    load_student,
    load_tokenizer,
    save_student,
    write_student,
)
from dskd.pipeline.train.optim import LRSchedule, build_optimizer
from dskd.pipeline.train.setup import (
    RougeSet,
    RunInputs,
    TeacherSide,
    build_teacher_side,
    check_config,
    load_rouge_set,
    make_source,
    student_dims,
)
from dskd.pipeline.train.signal import (
    align_head_vocab,
    build_signal,
    round_hidden,
    teacher_forward,
    topk_from_hidden,
)

console = Console(stderr=True, soft_wrap=True)

Method = Literal["sft", "kd", "dskd", "dskd-cma", "dskd-v2", "dskd-eta", "uld", "mined"]
Divergence = Literal["fkl", "rkl", "js", "skl", "srkl", "akl", "tvd"]


@dataclass
class DistillConfig:
    # --- what to train on
    student: str = field(default="", metadata={"help": "student model dir (HF, with tokenizer)"})
    out: str = field(default="", metadata={"help": "run dir: checkpoints/, final/, metrics.jsonl"})
    cache: str | None = field(default=None, metadata={
        "help": "teacher cache (stage 1): a dir or a store URL (s3://bucket/prefix, gs://…)"})
    teacher: str | None = field(default=None, metadata={
        "help": "teacher model dir: distill ONLINE (teacher forward in the loop) from --data"})
    data: str | None = field(default=None, metadata={
        "help": "training data file: SFT (--method sft) or online with --teacher; with --cache, "
                "checked to be the data the cache was made from"})
    valid_cache: str | None = field(default=None, metadata={
        "help": "held-out cache for the validation loss (same teacher and template as --cache); "
                "an SFT run from --data takes its template from it"})
    valid_data: str | None = field(default=None, metadata={
        "help": "held-out data file, with any source (cache, online, SFT): validation loss "
                "(the full loss online, else the student's CE) and the --eval-rouge generations"})
    field_map: str | None = field(default=None, metadata={
        "help": "data columns as canonical=column,... (see pipeline/data.py)"})
    template: Literal["dskd", "chat", "none"] | None = field(default=None, metadata={
        "help": "prompt template for data files; with --cache/--valid-cache it must match the "
                "cache's (default: the cache's, else dskd); printed at start, recorded in "
                "config.yaml and final/dskd_run.json"})
    max_prompt_len: int | None = field(default=None, metadata={
        "help": "prompt tokens kept (default: the cache's, else 256)"})
    max_len: int | None = field(default=None, metadata={
        "help": "sequence tokens kept (default: the cache's, else 512)"})
    limit: int | None = field(default=None, metadata={
        "help": "use only the first N examples of --data / --valid-data"})
    on_bad_row: Literal["error", "skip"] = field(default="error", metadata={
        "help": "a bad data row stops the run (error) or is skipped and reported (skip)"})
    # --- method
    method: Method = field(default="dskd", metadata={"help": "distillation method"})
    divergence: Divergence = field(default="fkl", metadata={"help": "KD divergence"})
    teacher_signal: Literal["exact", "topk", "sampled"] = field(default="exact", metadata={
        "help": "exact: full teacher logits = cached hidden × cached head; topk: cached top-k + "
                "tail only (cheap); sampled: the cache's RS-KD draws (kd + fkl only, unbiased)"})
    kd_rate: float = field(default=0.5, metadata={
        "help": "α: loss = (1-α)·CE + α·KD (DSKD at 1 collapses: refused without --force)"})
    kd_temperature: float = field(default=2.0, metadata={
        "help": "τ of every KD divergence (official DSKD: 2.0); with --teacher-signal sampled it "
                "must equal the cache's --sampled-temperature (cache-teacher's default is 1.0)"})
    skew_lambda: float = field(default=0.1, metadata={"help": "λ of skl/srkl"})
    adaptive_kl_alpha: float = field(default=0.5, metadata={"help": "head/tail split of akl"})
    projector_init: Literal["auto", "random", "pinv"] = field(default="auto", metadata={
        "help": "dual-space projectors: random, or pinv (DSKDv2 pseudo-inverse over the shared "
                "tokens); auto = the official choice: pinv for dskd-v2/dskd-eta, else random"})
    alignment: Literal["official", "offsets"] = field(default="official", metadata={
        "help": "dskd-eta token alignment: official (DSKDv2 string rule) or offsets (same "
                "characters of the text; recovers after a newline or accent)"})
    t2s_agreement: float = field(default=1.0, metadata={
        "help": "dskd-v2/dskd-eta: student-space KD only on rows where the projected teacher "
                "agrees with the teacher, while the agreeing share is ≤ this (official 1.0: always)"})
    # --- loss options (docs/methods.md; the defaults are the official code's behaviour)
    teacher_space_divergence: Literal["official", "same"] = field(default="official", metadata={
        "help": "dskd/dskd-cma teacher-space KD: official = always forward KL; same = "
                "--divergence in both spaces (the paper's reading; dskd-v2/dskd-eta always)"})
    accuracy_filter: Literal["official", "on", "off"] = field(default="official", metadata={
        "help": "student-space KD only where argmax t2s_logits = label; official: on for "
                "dskd-cma, off for dskd"})
    teacher_temperature: float = field(default=1.0, metadata={
        "help": "dskd-cma: extra divisor of the student-space KD target (official: 1.0)"})
    unused_query_projector: bool = field(default=True, metadata={
        "help": "dskd: also build the official query projector, which is never used or trained"})
    cma_norm: Literal["official", "supervised"] = field(default="official", metadata={
        "help": "dskd-cma key/value std: official = over the whole padded batch (depends on "
                "padding); supervised = over the teacher's supervised rows only"})
    mined_stu2tea: Literal["closest", "first"] = field(default="closest", metadata={
        "help": "mined: the teacher id each student id takes (first = official)"})
    sparse_tail: Literal["bucket", "renorm"] = field(default="bucket", metadata={
        "help": "--teacher-signal topk: teacher mass outside the top-k as one tail bucket, or "
                "dropped and both sides renormalised over the k ids"})
    chunk_rows: int | None = field(default=None, metadata={
        "help": "token rows per chunk of vocabulary-sized loss math (default: ~64 MiB each)"})
    online_top_k: int = field(default=64, metadata={
        "help": "online --teacher-signal topk: k of the live top-k"})
    online_hidden_dtype: Literal["fp32", "fp16", "bf16"] = field(default="fp32", metadata={
        "help": "online: round live teacher hidden states as a cache of this dtype stores them "
                "(to compare a cache with its online reference bit for bit)"})
    # --- optimisation (paper's GPT-2 setting)
    epochs: int = field(default=20, metadata={"help": "passes over the training set"})
    max_steps: int | None = field(default=None, metadata={
        "help": "stop after this many optimizer steps (overrides --epochs for the schedule)"})
    batch_size: int = field(default=32, metadata={"help": "examples per micro-batch per process"})
    batch_tokens: int | None = field(default=None, metadata={
        "help": "instead of --batch-size: padded tokens per micro-batch per process (cache: "
                "counted in teacher tokens)"})
    grad_accum: int = field(default=1, metadata={
        "help": "micro-batches per optimizer step (global batch = batch × accum × processes)"})
    lr: float = field(default=5e-4, metadata={"help": "student learning rate"})
    projector_lr: float = field(default=1e-3, metadata={"help": "projector learning rate"})
    min_lr: float = field(default=1e-7, metadata={"help": "floor of the cosine schedule"})
    lr_schedule: Literal["cosine", "constant"] = field(default="cosine", metadata={
        "help": "after warmup: cosine to --min-lr, or constant"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "max grad norm (0 = no clipping)"})
    seed: int = field(default=42, metadata={
        "help": "seeds the data order, dropout and the init of the projectors and LoRA "
                "adapters; the student's weights stay as saved in --student (see --init-seed)"})
    init_seed: int | None = field(default=None, metadata={
        "help": "re-initialise the student from its config.json with this seed (its saved "
                "weights are not used); to vary the student's init"})
    precision: Literal["auto", "fp32", "bf16"] = field(default="auto", metadata={
        "help": "auto: bf16 autocast on GPU, fp32 on CPU"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    # --- once in a while
    eval_interval: int = field(default=0, metadata={
        "help": "validate every N steps (0 = at the end of each epoch)"})
    save_interval: int = field(default=0, metadata={
        "help": "checkpoint every N steps (0 = at the end of each epoch); always at the end"})
    keep_last: int = field(default=2, metadata={"help": "checkpoints kept (plus the best)"})
    log_interval: int = field(default=10, metadata={
        "help": "log to metrics.jsonl (and, when stderr is not a terminal, a progress line) "
                "every N steps"})
    eval_rouge: bool = field(default=False, metadata={
        "help": "also generate (greedy) on --valid-data and score ROUGE-L, selecting the best "
                "checkpoint; prompts use the resolved template and prompt length (from the cache "
                "unless given) and the student tokenizer"})
    eval_samples: int = field(default=0, metadata={"help": "examples for ROUGE-L (0 = all)"})
    eval_max_new_tokens: int = field(default=128, metadata={"help": "ROUGE-L generation length"})
    resume: bool = field(default=False, metadata={
        "help": "continue from the newest complete checkpoint in --out (fresh start if none)"})
    overwrite: bool = field(default=False, metadata={"help": "delete an existing run in --out"})
    # --- data loading
    num_workers: int = field(default=2, metadata={"help": "DataLoader workers per process"})
    shuffle: bool = field(default=True, metadata={"help": "shuffle the training order"})
    shuffle_buffer: int = field(default=1024, metadata={"help": "rows in the shuffle buffer"})
    block_size: int = field(default=256, metadata={"help": "consecutive rows shuffled as a block"})
    loader_cache_mb: int = field(default=256, metadata={
        "help": "per loader process: decoded cache blocks kept in memory (bounds RSS)"})
    dense_logits_max_mb: int = field(default=1024, metadata={
        "help": "exact signal: materialise teacher logits up to this size, else chunk them"})
    # --- scale-out
    fsdp: bool = field(default=False, metadata={"help": "shard the student with FSDP2"})
    lora: bool = field(default=False, metadata={"help": "train a LoRA adapter (peft)"})
    lora_r: int = field(default=256, metadata={"help": "LoRA rank (paper: 256)"})
    lora_alpha: int = field(default=8, metadata={"help": "LoRA alpha (paper: 8)"})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout (paper: 0.1)"})
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"], metadata={
        "help": "modules LoRA adapts"})
    tensorboard: bool = field(default=True, metadata={"help": "TensorBoard logs if installed"})
    trace_examples: bool = field(default=False, metadata={
        "help": "write RUN_DIR/examples.rankR.jsonl: example ids of every step (audits the order)"})
    force: bool = field(default=False, metadata={
        "help": "run settings known to collapse (e.g. DSKD with --kd-rate 1) with a warning "
                "instead of refusing them"})


def run(cfg: DistillConfig) -> Path:
    env = dist.init_distributed(cfg.device)
    held: list[int] = []  # the run-dir lock, released however train() ends
    try:
        return train(cfg, env, held)
    finally:
        for fd in held:
            os.close(fd)
        dist.cleanup()


def train(cfg: DistillConfig, env: dist.DistEnv, held: list[int] | None = None) -> Path:
    out = Path(cfg.out)
    say = console.print if env.is_main else (lambda *a, **k: None)

    # ---- checks before compute: every problem at once, then the inputs they resolved
    inp: RunInputs = check_config(cfg)
    # one resolved template and lengths from here on: config.yaml and dskd_run.json record them
    cfg = dataclasses.replace(cfg, template=inp.template, max_prompt_len=inp.max_prompt_len,
                              max_len=inp.max_len)
    if env.is_main:  # one run per RUN_DIR at a time (two would interleave checkpoints)
        (held if held is not None else []).append(ckpt.lock_run_dir(out))
    resume_from = _prepare_run_dir(cfg, out, env)
    say(f"template {inp.template} (from {inp.template_from}) · max-prompt-len "
        f"{inp.max_prompt_len} · max-len {inp.max_len}")
    ckpt_state = ckpt.load_checkpoint(resume_from) if resume_from else None
    if ckpt_state:  # the same plan (order, schedule, objective), or refuse naming what differs
        resume.check_plan(resume_from.name, ckpt_state["trainer"], cfg, env.world_size)
        cfg, start_notes = resume.keep_start_settings(ckpt_state["trainer"], cfg)
        inp.notes += start_notes
    for note in inp.notes:
        say(f"[yellow]note:[/] {note}")

    # ---- teacher side (cache reader + head, or live teacher, or none for SFT)
    device = env.device
    student_tok, tok_notes = load_tokenizer(cfg.student)
    for note in tok_notes:  # a student tokenizer without EOS/pad gets one, and the user is told
        say(f"[yellow]student tokenizer:[/] {note}")
    rouge = load_rouge_set(cfg, inp, student_tok)  # before any model loads: fails early
    teacher: TeacherSide = build_teacher_side(cfg, inp, student_tok, device)

    # ---- student, loss (projectors), the trainable unit
    ckpt.seed_everything(cfg.seed)
    lora = LoraOptions(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                       tuple(cfg.lora_target_modules)) if cfg.lora else None
    student = load_student(cfg.student, student_tok, lora=lora, init_seed=cfg.init_seed,
                           weights_dir=ckpt_state["student_dir"] if ckpt_state else None,
                           adapter_dir=ckpt_state["student_dir"] if ckpt_state and lora else None)
    if teacher.head is not None and cfg.method in ("kd",):  # padded vocabularies (Qwen's case)
        teacher.head, note = align_head_vocab(teacher.head, student.get_output_embeddings().weight.shape[0],
                                              len(student_tok))
        if note:
            say(f"[yellow]note:[/] {note}")
    loss_fn = build_loss(cfg.method, cfg.divergence, d_student=student_dims(student),
                         d_teacher=teacher.hidden_size, student_tokenizer=student_tok,
                         teacher_tokenizer=teacher.tokenizer,
                         student_head_weight=student.get_output_embeddings().weight,
                         teacher_head_weight=None if teacher.head is None else teacher.head.weight,
                         **loss_options(cfg))
    if getattr(loss_fn, "query", None) is not None and cfg.method == "dskd":
        loss_fn.query.requires_grad_(False)  # the official unused projector: no grad, no DDP sync
    model = Distiller(student, loss_fn).to(device)
    if ckpt_state:
        loss_fn.load_state_dict(ckpt_state["projectors"])
    if cfg.fsdp:
        model = dist.wrap_fsdp2(model, student, env)
    else:
        model = dist.wrap_ddp(model, env)

    # ---- data: one stream over the training rows, one over the validation rows
    plan = PlanConfig(batch_size=cfg.batch_size, world_size=env.world_size, seed=cfg.seed,
                      shuffle=cfg.shuffle, shuffle_buffer=cfg.shuffle_buffer,
                      block_size=cfg.block_size, batch_tokens=cfg.batch_tokens)
    source, build = make_source(cfg, inp, teacher, student_tok, loss_fn, split="train")
    stream = BatchStream(source, plan, env.rank, build, grad_accum=cfg.grad_accum,
                         num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                         lengths=source.lengths() if cfg.batch_tokens else None)
    valid = make_source(cfg, inp, teacher, student_tok, loss_fn, split="valid")
    say(f"[bold]distill[/] {cfg.method} ({cfg.divergence}, signal {teacher.mode}) · "
        f"{source.num_rows} train rows · {stream.steps_per_epoch} steps/epoch · "
        f"{env.world_size} process(es) on {device}")
    if cfg.method in DUAL_SPACE:  # what 'auto' resolved to, and ETA's alignment rule
        say(f"projectors: {resolve_projector_init(cfg.method, cfg.projector_init)} init"
            + (f" · alignment {cfg.alignment}" if cfg.method == "dskd-eta" else ""))

    # ---- optimizer (student + projectors) and schedule (now that the step count is known)
    total_steps = cfg.max_steps or stream.total_steps(cfg.epochs)
    optimizer = build_optimizer(dist.unwrap(model).student, loss_fn, lr=cfg.lr,
                                projector_lr=cfg.projector_lr, weight_decay=cfg.weight_decay)
    schedule = LRSchedule(total_steps, cfg.warmup_steps, cfg.min_lr, cfg.lr_schedule)
    step, best = 0, None
    if ckpt_state:  # ---- resume: optimizer, data position, RNG of this rank
        saved = ckpt_state["trainer"]
        _load_optimizer(model, optimizer, ckpt_state["optimizer"])
        step, best = saved["step"], saved.get("best")
        resume.check_schedule(resume_from.name, saved, schedule.state_dict(), source.num_rows)
        # the same examples into the epoch, as this run's micro-batches (processes may differ)
        stream.seek(**resume.map_position(saved, env.world_size, cfg.batch_size,
                                          stream.micro_per_epoch(saved["position"]["epoch"]),
                                          source.num_rows))
        rngs = ckpt_state["rng"]
        ckpt.set_rng_state(rngs[env.rank] if len(rngs) == env.world_size else rngs[0])
        if env.is_main:  # logs of steps after the checkpoint are redone: drop them
            for f in [METRICS_FILE] + [p.name for p in out.glob("examples.rank*.jsonl")]:
                truncate_metrics(out, step, f)
        say(f"resumed from {resume_from.name} (step {step}, epoch {saved['position']['epoch']})")
    if env.is_main:
        save_config(cfg, out)
    logger = MetricsLogger(out, enabled=env.is_main, tensorboard=cfg.tensorboard)
    autocast = _autocast(cfg.precision, device)

    # ---- the loop
    start_step, epoch_done = step, False
    batches = stream.steps()
    # held for the whole loop, closed after it
    trace = open(out / f"examples.rank{env.rank}.jsonl", "a") if cfg.trace_examples else None  # noqa: SIM115
    tokens_seen, data_wait, t_last = 0, 0.0, time.perf_counter()
    progress = train_progress(env.is_main)
    task = progress.add_task("distill", total=total_steps, completed=step, loss=float("nan"), tps=0)
    with progress:
        while True:
            last = step >= total_steps
            lr = schedule.apply(optimizer, step)

            # once in a while (every N steps, or 0 = each epoch end): validate (keep the best),
            # checkpoint; both always after the last step
            if step > start_step and (_due(step, cfg.eval_interval, epoch_done) or last):
                metrics = evaluate(model, valid, teacher, cfg, env, autocast, student_tok, rouge)
                if metrics:
                    logger.log(step, metrics)
                value = metrics.get(_best_key(cfg))
                if value is not None and (best is None or _better(cfg, value, best["value"])):
                    best = {"step": step, "metric": _best_key(cfg), "value": value}
            if step > start_step and (_due(step, cfg.save_interval, epoch_done) or last):
                _save(out, step, model, student_tok, optimizer, schedule, stream, best, cfg, env)
            if last:
                break

            # forward / backward over the step's micro-batches (gradient accumulation)
            t_wait = time.perf_counter()
            epoch, group = next(batches)
            data_wait += time.perf_counter() - t_wait  # the loop idle, waiting for the loader
            if trace is not None:
                trace.write(json.dumps({"step": step + 1, "epoch": epoch, "ids": [
                    i for mb in group if not mb.padding for i in mb.example_ids]}) + "\n")
            n_label = dist.all_reduce_sum(torch.tensor(
                float(sum(int(mb.tensors["labels"].ne(-100).sum()) for mb in group)))).item()
            # official batch_denom: label tokens of the global batch / (accum × world)
            batch_denom = max(n_label, 1.0) / (len(group) * env.world_size)
            sums: dict[str, torch.Tensor] = {}  # kept on the device: no sync per micro-batch
            for i, mb in enumerate(group):
                tokens_seen += int(mb.tensors["attention_mask"].sum())  # CPU tensor, no sync
                t = to_device(mb.tensors, device)
                with _grad_sync(model, i == len(group) - 1), autocast:
                    signal = teacher_signal(teacher, t, cfg, loss_fn)
                    res = model(t, signal, batch_denom)
                # Σ_micro loss/accum, averaged over ranks by DDP = Σ loss_sum / n_label
                (res.loss / len(group)).backward()
                for k, v in res.terms.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().double()
            grad_norm = _clip(model, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            failpoint("train.step")  # fault-injection tests kill here (between two steps)
            epoch_done = stream.micro >= stream.micro_per_epoch(epoch)

            # log every term as a mean per label token of the global batch
            if step % cfg.log_interval == 0 or step == total_steps or step == start_step + 1:
                keys = sorted(sums)
                red = dist.all_reduce_sum(torch.stack(
                    [sums[k].to(device) for k in keys]
                    + [torch.tensor(float(tokens_seen), dtype=torch.float64, device=device)]
                    + [grad_norm.to(device, torch.float64)])).cpu()
                now = time.perf_counter()
                tps = red[-2].item() / max(now - t_last, 1e-9)
                row = {k: red[j].item() / max(n_label, 1.0) for j, k in enumerate(keys)}
                row["loss"] = row.pop("loss_sum")
                row.update(epoch=epoch, lr=lr, projector_lr=optimizer.param_groups[1]["lr"],
                           grad_norm=red[-1].item() / env.world_size,  # the same on every rank
                           tokens_per_s=tps, label_tokens=n_label,
                           # share of this rank's wall time spent waiting for batches: near 0
                           # when the loader keeps ahead (validation time counts as not waiting)
                           data_wait=data_wait / max(now - t_last, 1e-9))
                logger.log(step, row)
                progress.update(task, completed=step, loss=row["loss"], tps=tps)
                tokens_seen, data_wait, t_last = 0, 0.0, now
            else:
                progress.update(task, completed=step)

    # ---- outputs: the final student as a plain HF dir (LoRA merged), then close
    save_student(dist.unwrap(model).student, student_tok, out / "final.tmp", is_main=env.is_main,
                 merge_lora=True)
    if env.is_main:
        ckpt.publish_dir(out / "final.tmp", out / "final")
        (out / "final" / "dskd_run.json").write_text(json.dumps(
            {"step": step, "method": cfg.method, "best": best, "template": inp.template,
             "max_prompt_len": inp.max_prompt_len, "max_len": inp.max_len}, indent=2) + "\n")
    dist.barrier()
    logger.close()
    if trace is not None:
        trace.close()
    # `dskd distill` prints the one "done: …/final" line; here, what final/ holds
    say(f"final/ = step {step}" + (f"; best {best['metric']} {best['value']:.4f} at step "
                                   f"{best['step']}" if best else ""))
    return out / "final"


# --------------------------------------------------------------------------- helpers of the loop


def loss_options(cfg: DistillConfig) -> dict[str, Any]:
    """Every LossOptions field this config sets (same names), plus the teacher form its
    --teacher-signal implies: the one place flags become loss options."""
    opts = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(LossOptions)
            if hasattr(cfg, f.name)}
    opts["teacher_target"] = {"topk": "sparse", "sampled": "sampled"}.get(cfg.teacher_signal, "dense")
    return opts


def teacher_signal(teacher: TeacherSide, t: dict[str, Any], cfg: DistillConfig, loss_fn) -> Any:
    """The micro-batch's TeacherSignal: from the cached rows, or from the live teacher. Built
    with autocast off: the exact signal's hidden @ head must stay float32 under bf16 training."""
    if teacher.mode == "none":
        return None
    with autocast_off(t["teacher_labels"].device):
        return _teacher_signal(teacher, t, cfg, loss_fn)


def _teacher_signal(teacher: TeacherSide, t: dict[str, Any], cfg: DistillConfig, loss_fn) -> Any:
    if teacher.model is not None:  # online: teacher forward now, then the same signal code
        h = round_hidden(teacher_forward(teacher.model, t), cfg.online_hidden_dtype)
        t["teacher_hidden"] = h
        if teacher.mode == "topk":
            t.update(topk_from_hidden(h, t["teacher_labels"], teacher.head, cfg.online_top_k))
    return build_signal(t, teacher.head, mode=teacher.mode,
                        needs_hidden=loss_fn.needs_teacher_hidden,
                        needs_embed=loss_fn.needs_teacher_embeddings,
                        dense_max_bytes=cfg.dense_logits_max_mb << 20,
                        sample_temperature=teacher.sample_temperature)


@torch.no_grad()
def evaluate(model, valid, teacher: TeacherSide, cfg: DistillConfig, env: dist.DistEnv,
             autocast, student_tok, rouge: RougeSet | None = None) -> dict[str, float]:
    """Validation loss terms (per label token) and, if asked, generation ROUGE-L."""
    out: dict[str, float] = {}
    if valid is None:
        return out
    source, build, override = valid
    model.eval()
    plan = PlanConfig(batch_size=cfg.batch_size, world_size=env.world_size, shuffle=False)
    stream = BatchStream(source, plan, env.rank, build, grad_accum=1, num_workers=0)
    sums: dict[str, float] = {}
    batches = stream.steps()
    for _ in range(stream.steps_per_epoch):
        _, (mb,) = next(batches)
        t = to_device(mb.tensors, env.device)
        with autocast:
            sig = None if override else teacher_signal(teacher, t, cfg, dist.unwrap(model).loss)
            o = model(t, sig, 1.0, loss=override)
        for k, v in o.terms.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        sums["_tokens"] = sums.get("_tokens", 0.0) + float(t["labels"].ne(-100).sum())
    keys = sorted(sums)
    red = dist.all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64))
    got = dict(zip(keys, red.tolist()))
    n = max(got.pop("_tokens"), 1.0)
    out = {f"valid_{k}": v / n for k, v in got.items()}
    out["valid_loss"] = out.pop("valid_loss_sum")
    if rouge is not None and env.is_main:
        out["valid_rougeL"] = _rouge(dist.unwrap(model).student, student_tok, rouge, cfg)
    if cfg.eval_rouge and env.distributed:
        out["valid_rougeL"] = dist.broadcast_object(out.get("valid_rougeL"))
    dist.reshard(model)  # FSDP2: a forward without backward leaves the root un-sharded
    model.train()
    return out


def _rouge(student, tok, rouge: RougeSet, cfg: DistillConfig) -> float:
    """Greedy generation on the --eval-rouge set, mean max-over-references ROUGE-L (× 100)."""
    from dskd.pipeline.generate import generate_transformers
    from dskd.pipeline.metrics import rouge_l

    examples = rouge.examples
    with torch.random.fork_rng(devices=[]):  # generation must not move the training RNG
        tok.padding_side = "left"
        try:
            texts = generate_transformers(student, tok, [e.prompt for e in examples],
                                          [e.id for e in examples], seed=cfg.seed,
                                          decoding="greedy",
                                          max_new_tokens=cfg.eval_max_new_tokens,
                                          max_prompt_len=rouge.max_prompt_len,
                                          batch_size=cfg.batch_size)
        finally:
            tok.padding_side = "right"
    scores = [rouge_l(t, e.references) for t, e in zip(texts, examples)]
    return 100.0 * sum(scores) / max(1, len(scores))  # rouge_l is in [0, 1]


def _due(step: int, interval: int, epoch_done: bool) -> bool:
    return step % interval == 0 if interval > 0 else epoch_done


def _best_key(cfg: DistillConfig) -> str:
    return "valid_rougeL" if cfg.eval_rouge else "valid_ce_loss"


def _better(cfg: DistillConfig, new: float, old: float) -> bool:
    return new > old if cfg.eval_rouge else new < old


def _autocast(precision: str, device: torch.device):
    if device.type == "cuda" and precision in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _grad_sync(model, sync: bool):
    """All-reduce gradients only on the last micro-batch of a step (DDP no_sync / FSDP2 flag)."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    elif not sync and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def _clip(model, max_norm: float) -> torch.Tensor:
    """Clip to `max_norm` (0 = no clipping); the total grad norm before clipping, as a tensor
    (read only when logged: no device sync per step)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(norm, "full_tensor"):  # FSDP2 DTensor
        norm = norm.full_tensor()
    return norm.detach()


def _prepare_run_dir(cfg: DistillConfig, out: Path, env: dist.DistEnv) -> Path | None:
    """The checkpoint to resume from, if any; refuses to mix a new run into an old one."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    latest = ckpt.latest_checkpoint(out)
    if cfg.resume and latest is not None:
        return latest
    if (latest is not None or (out / "final").exists()) and not cfg.overwrite:
        raise ValueError(f"--out {out} already holds a run; pass --resume to continue it or "
                         "--overwrite to start over")
    dist.barrier()  # every rank has looked before rank 0 clears
    if env.is_main:  # a fresh start: no logs or checkpoints of an earlier attempt may remain
        stale = [ckpt.CKPT_SUBDIR, "final", METRICS_FILE, "tensorboard",
                 *[p.name for p in out.glob("examples.rank*.jsonl")]]
        for name in stale:
            p = out / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    dist.barrier()
    return None


def _save(out, step, model, tok, optimizer, schedule, stream, best, cfg, env) -> None:
    """Checkpoint `step`: every rank gathers (FSDP2: full tensors; RNG, data positions), rank 0
    writes atomically, marks the best and prunes to --keep-last."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    inner = dist.unwrap(model)
    osd = get_optimizer_state_dict(inner, optimizer,
                                   options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    projectors = {k: _full(v) for k, v in inner.loss.state_dict().items()}
    student_state = gathered_state(inner.student)
    rngs = dist.all_gather_object(ckpt.rng_state())
    positions = dist.all_gather_object(stream.worker_positions())
    if env.is_main:
        trainer = {"step": step, "position": stream.position, "rows": stream.source.num_rows,
                   "best": best,
                   "schedule": schedule.state_dict(), "world_size": env.world_size,
                   "rank_worker_positions": positions, "config": to_dict(cfg)}
        ckpt.save_checkpoint(out, step, save_student=lambda d: write_student(
            inner.student, tok, d, student_state), projectors=projectors, optimizer=osd,
            trainer=trainer, rng=rngs)
        if best is not None and best["step"] == step:
            ckpt.mark_best(out, step, best["metric"], best["value"])
        ckpt.prune_checkpoints(out, cfg.keep_last)
    dist.barrier()


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain CPU tensor from a (maybe FSDP2-sharded) parameter (collective when sharded)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()


def _load_optimizer(model, optimizer, state) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(dist.unwrap(model), optimizer, state,
                             options=StateDictOptions(full_state_dict=True))
