"""`dskd distill` on the toy world: SFT from a file, cache == online (the exactness proof), resume,
refusals of bad input, special tokens, LoRA, validation/best; slow: SIGKILL + resume, torchrun
(DDP, FSDP2) vs one process, the method matrix."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from dskd.pipeline.config import ConfigError, load_config
from dskd.pipeline.losses.registry import (
    DIVERGENCES,
    METHODS,
    OPTION_SCOPES,
    SIGNALS,
    LossOptions,
    option_problems,
)
from dskd.pipeline.train.checkpoint import list_checkpoints
from dskd.pipeline.train.logger import read_metrics
from dskd.pipeline.train.resume import ResumeMismatchError
from dskd.stages.cache_teacher import CacheTeacherConfig
from dskd.stages.cache_teacher import run as cache_run
from dskd.stages.distill import DistillConfig, run

N_TRAIN, N_VALID = 40, 12


@pytest.fixture(scope="module")
def world(toy_world, tmp_path_factory):
    """Small train/valid files and their caches (fp16 hidden, top-16), 3 train shards."""
    d = tmp_path_factory.mktemp("distill")
    for split, n in (("train", N_TRAIN), ("valid", N_VALID)):
        lines = Path(getattr(toy_world, split)).read_text().splitlines()[:n]
        (d / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        cache_run(CacheTeacherConfig(teacher=str(toy_world.teacher), data=str(d / f"{split}.jsonl"),
                                     out=str(d / f"cache_{split}"), shard_size=16, top_k=16,
                                     batch_tokens=4096, progress=False))
    return {"dir": d, "toy": toy_world, "train": d / "train.jsonl", "valid": d / "valid.jsonl",
            "cache": d / "cache_train", "vcache": d / "cache_valid"}


def cfg(world, out, **kw) -> DistillConfig:
    base = {"student": str(world["toy"].student), "out": str(out), "batch_size": 4, "max_steps": 3,
                "eval_interval": 1000, "save_interval": 1000, "num_workers": 0, "log_interval": 1,
                "tensorboard": False, "seed": 3}
    return DistillConfig(**(base | kw))


def train_rows(run_dir) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "loss" in r]


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))


def max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# --------------------------------------------------------------------------- basics


def test_sft_from_a_data_file_writes_a_loadable_student(world, tmp_path):
    out = run(cfg(world, tmp_path / "sft", method="sft", data=str(world["train"]),
                  valid_data=str(world["valid"]), eval_interval=2, save_interval=2))
    assert out == tmp_path / "sft" / "final"
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(tok)
    rows = read_metrics(tmp_path / "sft")
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for key in ("ce_loss", "lr", "grad_norm", "tokens_per_s", "label_tokens", "data_wait"):
        assert all(key in r for r in steps)
    assert all(0 <= r["data_wait"] <= 1 for r in steps)  # a share of the wall time
    assert steps[0]["loss"] == pytest.approx(steps[0]["ce_loss"])  # SFT: loss is the CE
    assert [r["step"] for r in rows if "valid_loss" in r] == [2, 3]
    assert [p.name for p in list_checkpoints(tmp_path / "sft")] == ["step-00000002", "step-00000003"]
    assert (tmp_path / "sft" / "config.yaml").is_file()


def test_lr_schedule_and_two_param_groups_are_logged(world, tmp_path):
    run(cfg(world, tmp_path / "r", cache=str(world["cache"]), method="dskd", max_steps=4,
            warmup_steps=1, valid_data=str(world["valid"]), eval_interval=4))
    # a data file validates a cache run on the student CE only (it has no teacher signal)
    (ev,) = [r for r in read_metrics(tmp_path / "r") if "valid_loss" in r]
    assert ev["valid_loss"] == pytest.approx(ev["valid_ce_loss"]) and "valid_kd_loss" not in ev
    rows = train_rows(tmp_path / "r")
    assert rows[0]["lr"] == pytest.approx(5e-4) and rows[0]["projector_lr"] == pytest.approx(1e-3)
    assert rows[-1]["lr"] < rows[1]["lr"]  # cosine decay after warmup
    assert {"t2s_ce_loss", "t2s_kd_loss", "s2t_kd_loss", "kd_loss"} <= rows[0].keys()


# --------------------------------------------------------------------------- exactness


def test_cache_exact_equals_online_teacher(world, tmp_path):
    """The proof that the cache loses nothing: DSKD from the cache and DSKD with the live teacher
    give the same losses and weights. The cache stores fp16 hidden states, so the online run
    rounds its live hidden states to fp16 too; the two then differ only where a live fp32 value
    (batched with other padding than at cache time) rounds to the neighbouring fp16 number.
    Against the unrounded fp32 teacher the difference is the fp16 storage error itself."""
    common = {"method": "dskd", "max_steps": 4}
    run(cfg(world, tmp_path / "cache", cache=str(world["cache"]), **common))
    run(cfg(world, tmp_path / "on16", teacher=str(world["toy"].teacher), data=str(world["train"]),
            online_hidden_dtype="fp16", **common))
    run(cfg(world, tmp_path / "on32", teacher=str(world["toy"].teacher), data=str(world["train"]),
            **common))
    c, o16, o32 = (train_rows(tmp_path / n) for n in ("cache", "on16", "on32"))
    assert len(c) == 4
    diffs = {n: max(abs(x[k] - y[k]) for x, y in zip(c, o) for k in ("loss", "t2s_kd_loss"))
             for n, o in (("fp16", o16), ("fp32", o32))}
    print("max |loss term diff| cache vs online:", diffs)
    for a, b, f in zip(c, o16, o32):
        for k in ("loss", "ce_loss", "t2s_ce_loss", "t2s_kd_loss", "s2t_kd_loss"):
            assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-6), (a["step"], k)
            assert f[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (a["step"], k)
    w16 = max_diff(weights(tmp_path / "cache"), weights(tmp_path / "on16"))
    w32 = max_diff(weights(tmp_path / "cache"), weights(tmp_path / "on32"))
    print(f"max |weight diff| after 4 steps: online fp16 {w16:.2e}, online fp32 {w32:.2e}")
    assert w16 < 2e-5 and w32 < 2e-4  # Adam turns tiny grad differences into ~lr-sized ones


def test_cache_equals_online_for_dskd_cma_with_padded_batches(world, tmp_path):
    """CMA's official stds run over the whole padded teacher batch, so what padded rows hold
    matters: cache and online must hold the same (0) there. Batches of 4 examples of unequal
    length are padded; the traced ids prove it."""
    from dskd.pipeline.cache.reader import CacheReader

    common = {"method": "dskd-cma", "max_steps": 3, "student": str(world["toy"].student_xvocab),
              "trace_examples": True}
    run(cfg(world, tmp_path / "cache", cache=str(world["cache"]), **common))
    run(cfg(world, tmp_path / "on16", teacher=str(world["toy"].teacher), data=str(world["train"]),
            online_hidden_dtype="fp16", **common))
    lengths = {r.example_id: len(r.input_ids) for r in CacheReader(world["cache"], fields=[])}
    steps = [json.loads(x) for x in (tmp_path / "cache" / "examples.rank0.jsonl").read_text().splitlines()]
    assert all(len({lengths[i] for i in s["ids"]}) > 1 for s in steps)  # every batch is padded
    c, o = train_rows(tmp_path / "cache"), train_rows(tmp_path / "on16")
    assert len(c) == len(o) == 3
    for a, b in zip(c, o):
        for k in ("loss", "ce_loss", "t2s_ce_loss", "t2s_kd_loss", "s2t_kd_loss"):
            assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-6), (a["step"], k)
    assert max_diff(weights(tmp_path / "cache"), weights(tmp_path / "on16")) < 2e-5


@pytest.mark.parametrize("dense_mb", [1024, 0])  # teacher logits materialised / per chunk
def test_bf16_autocast_leaves_the_teacher_logits_the_loss_sees_in_fp32(world, tmp_path,
                                                                       monkeypatch, dense_mb):
    """--precision bf16 runs the student under autocast (on CPU here, as on GPU), but the exact
    teacher logits hidden @ head that reach the loss must be the float32 ones, bit for bit."""
    import dskd.stages.distill as stage
    from dskd.pipeline.losses.common import head_logits

    assert isinstance(stage._autocast("bf16", torch.device("cpu")), torch.autocast)
    seen, build_loss = [], stage.build_loss

    def spying(*a, **k):
        loss = build_loss(*a, **k)
        forward = loss.forward

        def spy(student, teacher, denom):
            target = teacher.dense_target()
            got = target if torch.is_tensor(target) else target.materialize()
            with torch.autocast("cpu", enabled=False):
                want = head_logits(teacher.hidden, teacher.head_weight, teacher.head_bias,
                                   teacher.head_logit_scale)
            seen.append((got, want))
            return forward(student, teacher, denom)

        loss.forward = spy
        return loss

    monkeypatch.setattr(stage, "build_loss", spying)
    run(cfg(world, tmp_path / "r", cache=str(world["cache"]), method="kd", max_steps=1,
            precision="bf16", dense_logits_max_mb=dense_mb))
    assert seen
    for got, want in seen:
        assert got.dtype == torch.float32
        assert torch.equal(got, want)


def test_topk_signal_runs_from_the_cache_and_online(world, tmp_path):
    common = {"method": "kd", "teacher_signal": "topk", "max_steps": 2, "online_top_k": 16}
    run(cfg(world, tmp_path / "c", cache=str(world["cache"]), **common))
    run(cfg(world, tmp_path / "o", teacher=str(world["toy"].teacher), data=str(world["train"]),
            online_hidden_dtype="fp16", **common))
    c, o = train_rows(tmp_path / "c"), train_rows(tmp_path / "o")
    for a, b in zip(c, o):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    exact = run(cfg(world, tmp_path / "e", cache=str(world["cache"]), method="kd", max_steps=2))
    assert exact.is_dir()
    # the top-16 KD term is a different (sparse) objective than the full-vocabulary one
    assert train_rows(tmp_path / "e")[0]["kd_loss"] != pytest.approx(c[0]["kd_loss"], rel=1e-3)


# --------------------------------------------------------------------------- resume


def test_resume_from_an_earlier_checkpoint_reaches_the_same_weights(world, tmp_path):
    args = {"cache": str(world["cache"]), "method": "dskd", "max_steps": 6, "save_interval": 2,
                "keep_last": 5, "shuffle_buffer": 8, "block_size": 4}
    run(cfg(world, tmp_path / "r", **args))
    ref = weights(tmp_path / "r")
    ref_rows = train_rows(tmp_path / "r")
    # Lose everything after step 4, as a crash during step 5 or 6 would.
    shutil.rmtree(tmp_path / "r" / "final")
    shutil.rmtree(tmp_path / "r" / "checkpoints" / "step-00000006")
    with pytest.raises(ValueError, match="--resume"):
        run(cfg(world, tmp_path / "r", **args))
    run(cfg(world, tmp_path / "r", resume=True, **args))
    assert max_diff(ref, weights(tmp_path / "r")) == 0.0
    assert [r["loss"] for r in train_rows(tmp_path / "r")] == [r["loss"] for r in ref_rows]


def test_resume_with_other_settings_is_refused_naming_them(world, tmp_path):
    args = {"cache": str(world["cache"]), "method": "kd", "max_steps": 2, "save_interval": 2}
    run(cfg(world, tmp_path / "r", **args))
    rows = read_metrics(tmp_path / "r")
    with pytest.raises(ResumeMismatchError) as e:
        run(cfg(world, tmp_path / "r", resume=True, **(args | {"seed": 4, "lr": 1e-3,
                                                                "batch_size": 8, "max_steps": 3})))
    msg = str(e.value)
    for part in ("step-00000002", "seed: checkpoint 3, this run 4", "lr: checkpoint 0.0005",
                 "max-steps: checkpoint 2, this run 3", "global batch", "= 4, this run 8 × 1 × 1"):
        assert part in msg
    assert read_metrics(tmp_path / "r") == rows  # refused before anything ran
    # where files are, how data is loaded and how often to log are safe to change; so are --force
    # (no part of the plan) and --init-seed (the checkpoint's weights win; its seed is kept)
    run(cfg(world, tmp_path / "r", resume=True, **(args | {"log_interval": 5, "keep_last": 3,
                                                            "force": True, "init_seed": 9})))
    got = load_config(DistillConfig, tmp_path / "r" / "config.yaml")
    assert got.init_seed is None and got.force


def test_resume_with_the_same_global_batch_split_differently(world, tmp_path):
    """Saved at 1 × --batch-size 8, resumed as --batch-size 4 --grad-accum 2: the position is
    re-expressed in examples, so the run continues where it stopped (no example repeated or
    skipped) and ends where the uninterrupted run did, up to float summation order."""
    args = {"cache": str(world["cache"]), "method": "dskd", "max_steps": 6, "save_interval": 2,
            "keep_last": 5}
    run(cfg(world, tmp_path / "r", batch_size=8, **args))
    ref, ref_rows = weights(tmp_path / "r"), train_rows(tmp_path / "r")
    shutil.rmtree(tmp_path / "r" / "final")
    for step in (4, 6):
        shutil.rmtree(tmp_path / "r" / "checkpoints" / f"step-0000000{step}")
    run(cfg(world, tmp_path / "r", batch_size=4, grad_accum=2, resume=True, **args))
    rows = train_rows(tmp_path / "r")
    assert [r["step"] for r in rows] == list(range(1, 7))
    for a, b in zip(ref_rows, rows):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["label_tokens"] == a["label_tokens"]
    assert max_diff(ref, weights(tmp_path / "r")) < 1e-5


# --------------------------------------------------------------------------- bad input


def test_a_cache_made_for_other_settings_is_refused_before_compute(world, tmp_path):
    with pytest.raises(ConfigError, match=r"max_len: cache has 512, this run has 128"):
        run(cfg(world, tmp_path / "a", cache=str(world["cache"]), max_len=128))
    with pytest.raises(ConfigError, match=r"template: cache has 'dskd', this run has 'none'"):
        run(cfg(world, tmp_path / "b", cache=str(world["cache"]), template="none"))
    with pytest.raises(ConfigError, match=r"n_examples: cache has 40, this run has 12"):
        run(cfg(world, tmp_path / "c", cache=str(world["cache"]), data=str(world["valid"])))
    assert not (tmp_path / "a" / "metrics.jsonl").exists()


def test_a_valid_cache_of_another_teacher_is_refused(world, tmp_path):
    other = tmp_path / "other"
    cache_run(CacheTeacherConfig(teacher=str(world["toy"].student), data=str(world["valid"]),
                                 out=str(other), shard_size=16, top_k=16, progress=False))
    with pytest.raises(ConfigError, match=r"--valid-cache .* teacher_config: cache has"):
        run(cfg(world, tmp_path / "r", cache=str(world["cache"]), valid_cache=str(other)))


def test_missing_or_corrupt_shard_stops_with_its_name(world, tmp_path):
    bad = tmp_path / "cache"
    shutil.copytree(world["cache"], bad)
    shutil.rmtree(bad / "shards" / "shard-00001")
    with pytest.raises(ConfigError, match="shard shard-00001 is missing"):
        run(cfg(world, tmp_path / "r1", cache=str(bad)))
    shutil.rmtree(bad)
    shutil.copytree(world["cache"], bad)
    hidden = next(p for p in (bad / "shards" / "shard-00002" / "hidden" / "c").rglob("*")
                  if p.is_file())
    hidden.write_bytes(hidden.read_bytes()[:100])  # truncated on disk
    with pytest.raises(ConfigError, match="shard shard-00002 is corrupt"):
        run(cfg(world, tmp_path / "r2", cache=str(bad)))


@pytest.mark.parametrize("method,student,online", [
    ("uld", "student_xvocab", False), ("dskd", "student", False),
    ("dskd-cma", "student_xvocab", False), ("uld", "student_xvocab", True)])
def test_method_and_teacher_signal_that_do_not_fit_are_refused_before_compute(
        world, tmp_path, method, student, online):
    teacher = ({"teacher": str(world["toy"].teacher), "data": str(world["train"])} if online
               else {"cache": str(world["cache"])})
    with pytest.raises(ConfigError) as e:
        run(cfg(world, tmp_path / "r", method=method, teacher_signal="topk",
                student=str(getattr(world["toy"], student)), **teacher))
    msg = " ".join(str(e.value).split())
    assert f"--method {method} cannot learn from --teacher-signal topk" in msg
    assert "use --teacher-signal exact" in msg and "kd: exact, topk" in msg
    assert not (tmp_path / "r").exists()  # refused before the run dir, the models or a step


def _check_cma(loss, _):
    assert loss.teacher_divergence == "js" and not loss.accuracy_filter
    assert loss.norm == "supervised" and loss.opts.target_temperature == 1.5


def _check_dskd(loss, _):
    assert loss.accuracy_filter and not hasattr(loss, "query") and loss.teacher_divergence == "js"


def _check_kd(loss, _):
    assert loss.opts.sparse_tail == "renorm" and loss.teacher_target == "sparse"
    assert loss.chunk_rows == 5


def _check_mined(loss, toks):
    from dskd.pipeline.losses.mined import build_vocab_map

    first = build_vocab_map(*toks, "first").stu2tea
    assert torch.equal(loss.vocab_map.stu2tea, first)
    assert not torch.equal(first, build_vocab_map(*toks, "closest").stu2tea)


@pytest.mark.parametrize("method,student,flags,check", [
    ("dskd-cma", "student_xvocab", ["--teacher-space-divergence", "same", "--accuracy-filter",
                                    "off", "--teacher-temperature", "1.5", "--cma-norm",
                                    "supervised"], _check_cma),
    ("dskd", "student", ["--teacher-space-divergence", "same", "--accuracy-filter", "on",
                         "--no-unused-query-projector"], _check_dskd),
    ("kd", "student", ["--teacher-signal", "topk", "--sparse-tail", "renorm", "--chunk-rows",
                       "5"], _check_kd),
    ("mined", "student_xvocab", ["--mined-stu2tea", "first"], _check_mined),
])
def test_documented_loss_options_reach_the_loss(world, tmp_path, method, student, flags, check):
    """Every loss option docs/methods.md describes is a `dskd distill` flag: a run with it
    records it in config.yaml, and the loss the stage builds from that config
    (stages.distill.loss_options) has it."""
    from typer.testing import CliRunner

    from dskd.cli import app
    from dskd.pipeline.config import load_config
    from dskd.pipeline.losses.registry import LossOptions, build_loss
    from dskd.pipeline.train.models import load_tokenizer
    from dskd.stages.distill import loss_options

    out = tmp_path / "r"
    r = CliRunner().invoke(app, ["distill", "--cache", str(world["cache"]), "--student",
                                 str(getattr(world["toy"], student)), "--out", str(out),
                                 "--method", method, "--divergence", "js", "--max-steps", "1",
                                 "--batch-size", "2", "--num-workers", "0", "--no-tensorboard",
                                 *flags])
    assert r.exit_code == 0, r.output
    got = load_config(DistillConfig, out / "config.yaml")
    opts = loss_options(got)
    # every loss option is a flag (teacher_target follows --teacher-signal)
    assert {f.name for f in dataclasses.fields(LossOptions)} <= set(opts)
    toks = tuple(load_tokenizer(str(p))[0] for p in (getattr(world["toy"], student),
                                                     world["toy"].teacher))
    loss = build_loss(method, got.divergence, d_student=8, d_teacher=12, student_tokenizer=toks[0],
                      teacher_tokenizer=toks[1], **opts)
    check(loss, toks)


def test_loss_options_the_method_does_not_read_are_refused(world, tmp_path):
    """A non-default option the method ignores would be silently dropped: refused, at once."""
    with pytest.raises(ConfigError) as e:
        run(cfg(world, tmp_path / "r", cache=str(world["cache"]), method="kd",
                cma_norm="supervised", unused_query_projector=False, sparse_tail="renorm"))
    msg = " ".join(str(e.value).split())
    assert "--cma-norm supervised does nothing with --method kd (read by dskd-cma only)" in msg
    assert "--no-unused-query-projector does nothing with --method kd (read by dskd only)" in msg
    assert "--sparse-tail renorm does nothing without --teacher-signal topk" in msg
    assert not (tmp_path / "r").exists()


def _other_value(hint, default):
    """A value of this flag's type that is not its default."""
    if typing.get_origin(hint) is typing.Literal:
        return next(v for v in typing.get_args(hint) if v != default)
    if isinstance(default, bool):
        return not default
    return 7 if default is None else default + 0.25


def test_every_loss_option_flag_is_in_the_one_scope_table():
    """Every loss option flag of `dskd distill` (LossOptions fields and the method-only flags) has
    an OptionScope, and each narrow scope refuses exactly the methods/signals outside it."""
    hints = typing.get_type_hints(DistillConfig)
    flags = {f.name: f.default for f in dataclasses.fields(DistillConfig)}
    loss_fields = {f.name for f in dataclasses.fields(LossOptions)}
    assert loss_fields <= set(OPTION_SCOPES)  # a new LossOptions field needs its scope
    assert set(OPTION_SCOPES) - {"teacher_target"} <= set(flags)  # each entry is a real flag
    for name, scope in OPTION_SCOPES.items():
        if name == "teacher_target":
            continue
        value = _other_value(hints[name], flags[name])
        for method, sig, div in itertools.product(METHODS, SIGNALS, DIVERGENCES):
            values = {"divergence": div, name: value}
            problems = option_problems(method, values, sig)
            # this flag's problem (a non-default --divergence may have its own), named by flag
            got = [p for p in problems if p.split()[0].removeprefix("--").removeprefix("no-")
                   == name.replace("_", "-")]
            refused = (method not in scope.methods or sig not in scope.signals
                       or values["divergence"] not in scope.divergences)
            assert bool(got) == refused, (name, method, sig, div, problems)


@pytest.mark.parametrize("method,div,values,reader", [
    ("sft", "fkl", {"kd_rate": 0.9}, "--method sft (read by kd, dskd,"),
    ("sft", "fkl", {"kd_temperature": 3.0}, "--method sft (read by kd, dskd,"),
    ("uld", "fkl", {"kd_temperature": 3.0}, "--method uld (read by kd, dskd,"),
    ("sft", "fkl", {"divergence": "rkl"}, "--method sft (read by kd, dskd,"),
    ("uld", "fkl", {"skew_lambda": 0.3}, "--method uld (read by kd, dskd,"),
    ("kd", "fkl", {"skew_lambda": 0.3}, "--divergence fkl (read by --divergence skl or srkl only)"),
    ("dskd", "akl", {"skew_lambda": 0.3}, "--divergence akl (read by --divergence skl or srkl"),
    ("mined", "srkl", {"adaptive_kl_alpha": 0.7}, "--divergence srkl (read by --divergence akl"),
    ("sft", "fkl", {"sparse_tail": "renorm"}, "--method sft (read by kd, mined only)"),
])
def test_kd_options_nothing_reads_are_refused_naming_the_readers(method, div, values, reader):
    got = option_problems(method, {"divergence": div, **values}, "topk")
    assert len(got) == 1 and reader in got[0] and got[0].endswith("drop it"), got


@pytest.mark.parametrize("method,div,sig,values", [
    ("kd", "fkl", "exact", {"kd_rate": 0.9, "kd_temperature": 1.0}),
    ("kd", "fkl", "sampled", {"kd_temperature": 1.0}),
    ("uld", "fkl", "exact", {"kd_rate": 0.9}),  # ULD's L1 term has a weight but no τ
    ("mined", "rkl", "topk", {"kd_temperature": 3.0, "sparse_tail": "renorm"}),
    ("kd", "skl", "topk", {"skew_lambda": 0.3}),
    ("dskd-cma", "srkl", "exact", {"skew_lambda": 0.3, "kd_rate": 0.7}),
    ("dskd-v2", "akl", "exact", {"adaptive_kl_alpha": 0.7, "kd_temperature": 1.5}),
    ("mined", "akl", "exact", {"adaptive_kl_alpha": 0.7}),
])
def test_kd_options_are_accepted_where_the_loss_reads_them(method, div, sig, values):
    assert option_problems(method, {"divergence": div, **values}, sig) == []


def test_sft_with_kd_options_is_refused_before_any_compute(world, tmp_path):
    with pytest.raises(ConfigError) as e:
        run(cfg(world, tmp_path / "r", data=str(world["train"]), method="sft",
                kd_temperature=3.0, kd_rate=0.9))
    msg = " ".join(str(e.value).split())
    assert "--kd-temperature 3.0 does nothing with --method sft" in msg
    assert "--kd-rate 0.9 does nothing with --method sft" in msg
    assert not (tmp_path / "r").exists()


def test_same_vocab_methods_refuse_a_cross_vocab_student(world, tmp_path):
    with pytest.raises(ConfigError, match="dskd-cma, uld or mined"):
        run(cfg(world, tmp_path / "r", cache=str(world["cache"]), method="dskd",
                student=str(world["toy"].student_xvocab)))


def test_cross_vocab_dskd_cma_from_the_cache(world, tmp_path):
    run(cfg(world, tmp_path / "r", cache=str(world["cache"]), method="dskd-cma", max_steps=2,
            student=str(world["toy"].student_xvocab)))
    rows = train_rows(tmp_path / "r")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert rows[0]["s2t_kd_loss"] > 0


def _strip_special(src: Path, dst: Path, drop: str) -> None:
    """A copy of a model dir whose tokenizer has no `drop` token (eos or pad)."""
    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(dst)
    setattr(tok, f"{drop}_token", None)
    if drop == "eos":
        tok.pad_token = None  # the toy pad is a special token of its own; drop both
    tok.save_pretrained(dst)
    tok = AutoTokenizer.from_pretrained(dst)
    assert getattr(tok, f"{drop}_token_id") is None


@pytest.mark.parametrize("drop", ["pad", "eos"])
def test_student_tokenizer_without_special_tokens_gets_them_and_is_told(world, tmp_path, capsys,
                                                                         drop):
    student = tmp_path / "student"
    _strip_special(world["toy"].student, student, drop)
    out = run(cfg(world, tmp_path / "r", student=str(student), method="sft",
                  data=str(world["train"]), max_steps=1))
    err = " ".join(capsys.readouterr().err.split())
    assert f"{'EOS' if drop == 'eos' else 'pad'} token was missing" in err
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token_id is not None and tok.pad_token_id is not None
    assert AutoModelForCausalLM.from_pretrained(out).get_input_embeddings().num_embeddings == len(tok)


def test_config_problems_are_listed_together(world, tmp_path):
    with pytest.raises(ConfigError) as e:
        run(DistillConfig(out="", method="dskd", batch_size=0))
    msg = str(e.value)
    for part in ("--student is required", "--out is required", "needs a teacher", "--batch-size 0"):
        assert part in msg


# --------------------------------------------------------------------------- LoRA, validation


def test_lora_student_trains_only_adapters_and_final_is_merged(world, tmp_path):
    out = run(cfg(world, tmp_path / "r", cache=str(world["cache"]), method="dskd", lora=True,
                  lora_r=4, lora_alpha=8, max_steps=2, save_interval=2))
    adapter = tmp_path / "r" / "checkpoints" / "step-00000002" / "student"
    assert (adapter / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(world["toy"].student)
    changed = [n for n, p in merged.named_parameters()
               if not torch.equal(p, dict(base.named_parameters())[n])]
    assert changed and all("proj" in n for n in changed)  # only adapted linears moved


def test_validation_and_rouge_select_the_best_checkpoint(world, tmp_path):
    run(cfg(world, tmp_path / "r", cache=str(world["cache"]), valid_cache=str(world["vcache"]),
            valid_data=str(world["valid"]), eval_rouge=True, eval_samples=3,
            eval_max_new_tokens=8, method="dskd", max_steps=4, eval_interval=2, save_interval=2,
            keep_last=1))
    evals = [r for r in read_metrics(tmp_path / "r") if "valid_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(0 <= r["valid_rougeL"] <= 100 for r in evals)
    best = json.loads((tmp_path / "r" / "checkpoints" / "best.json").read_text())
    assert best["metric"] == "valid_rougeL"
    kept = {p.name for p in list_checkpoints(tmp_path / "r")}
    assert best["checkpoint"] in kept and "step-00000004" in kept


def _spy_generation(monkeypatch) -> list[tuple[list[str], int]]:
    import dskd.pipeline.generate as gen

    calls, real = [], gen.generate_transformers

    def spy(model, tok, prompts, ids, **kw):
        calls.append((list(prompts), kw["max_prompt_len"]))
        return real(model, tok, prompts, ids, **kw)

    monkeypatch.setattr(gen, "generate_transformers", spy)
    return calls


def test_eval_rouge_renders_and_cuts_prompts_as_the_cache_did(world, tmp_path, monkeypatch):
    """No --template / --max-prompt-len: --eval-rouge inherits the cache's, as training does."""
    from dskd.pipeline.data import load_examples

    cache = tmp_path / "cache"
    cache_run(CacheTeacherConfig(teacher=str(world["toy"].teacher), data=str(world["valid"]),
                                 out=str(cache), template="none", max_prompt_len=24,
                                 shard_size=16, progress=False))
    calls = _spy_generation(monkeypatch)
    run(cfg(world, tmp_path / "r", cache=str(cache), valid_data=str(world["valid"]),
            eval_rouge=True, eval_samples=3, eval_max_new_tokens=4, method="kd", max_steps=1))
    want = [e.prompt for e in load_examples(world["valid"], template="none", limit=3)]
    assert calls == [(want, 24)]


def test_eval_rouge_with_template_chat_uses_the_student_chat_template(world, tmp_path,
                                                                     monkeypatch):
    student = tmp_path / "student"
    shutil.copytree(world["toy"].student, student)
    tok = AutoTokenizer.from_pretrained(student)
    tok.chat_template = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    tok.save_pretrained(student)
    calls = _spy_generation(monkeypatch)
    run(cfg(world, tmp_path / "r", student=str(student), method="sft", data=str(world["train"]),
            template="chat", valid_data=str(world["valid"]), eval_rouge=True, eval_samples=2,
            eval_max_new_tokens=4, max_steps=1))
    ((prompts, _),) = calls
    assert len(prompts) == 2 and all(p.startswith("user: ") and p.endswith("assistant:")
                                     for p in prompts)
    assert "valid_rougeL" in read_metrics(tmp_path / "r")[-1]


def test_eval_rouge_problems_stop_the_run_before_the_first_step(world, tmp_path):
    """With --valid-cache, --valid-data is read only for ROUGE-L: a bad row there, or a bad
    generation setting, must stop the run at the start, not after training."""
    bad = tmp_path / "valid.jsonl"
    bad.write_text(Path(world["valid"]).read_text() + json.dumps({"instruction": "no answer"}) + "\n")
    common = {"cache": str(world["cache"]), "valid_cache": str(world["vcache"]), "eval_rouge": True}
    with pytest.raises(ConfigError, match=r"--eval-rouge on --valid-data .*valid.jsonl.*row 12"):
        run(cfg(world, tmp_path / "a", valid_data=str(bad), **common))
    with pytest.raises(ConfigError, match=r"--eval-max-new-tokens 0"):
        run(cfg(world, tmp_path / "b", valid_data=str(world["valid"]), eval_max_new_tokens=0,
                **common))
    assert not (tmp_path / "a" / "metrics.jsonl").exists()
    assert not (tmp_path / "b" / "metrics.jsonl").exists()


# --------------------------------------------------------------------------- slow: processes


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dskd.cli", "distill", *args]


def _args(world, out, **kw) -> list[str]:
    base = {"student": world["toy"].student, "out": out, "cache": world["cache"],
            "method": "dskd", "batch-size": 4, "num-workers": 0, "log-interval": 1, "seed": 3,
            "eval-interval": 1000, "no-tensorboard": None} | kw
    return [x for k, v in base.items() for x in ([f"--{k}"] if v is None else [f"--{k}", str(v)])]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_the_same_weights(world, tmp_path):
    args = {"max-steps": 8, "save-interval": 3, "num-workers": 1}
    subprocess.run(_cli(*_args(world, tmp_path / "a", **args)), check=True, env=ENV,
                   capture_output=True)
    b = tmp_path / "b"
    proc = subprocess.Popen(_cli(*_args(world, b, **args)), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not any(r.get("step") == 5 for r in read_metrics(b)):
        assert proc.poll() is None and time.time() < deadline, "run ended before the kill"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (b / "final").exists() and list_checkpoints(b)[-1].name == "step-00000003"
    subprocess.run(_cli(*_args(world, b, resume=None, **args)), check=True, env=ENV,
                   capture_output=True)
    assert max_diff(weights(tmp_path / "a"), weights(b)) == 0.0
    assert [r["step"] for r in train_rows(b)] == list(range(1, 9))


def _assert_same_run(one: Path, two: Path, steps: int) -> None:
    """Two runs of the same plan: the same losses and label tokens per step, the same weights."""
    a, b = train_rows(one), train_rows(two)
    assert len(a) == len(b) == steps
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["label_tokens"] == x["label_tokens"]
    assert max_diff(weights(one), weights(two)) < 1e-5


def _torchrun(n: int, args: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
           "-m", "dskd.cli", "distill", *args]
    res = subprocess.run(cmd, check=False, env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True])
def test_torchrun_two_processes_match_one(world, tmp_path, fsdp):
    """2 processes × batch 4 == 1 process × batch 8: same global batches, each example once per
    epoch (40 rows → 5 global batches of 8), same losses and weights."""
    steps = 7  # one epoch is 5 steps: crosses into the second epoch
    one = _args(world, tmp_path / "one", **{"batch-size": 8, "max-steps": steps,
                                            "trace-examples": None, "save-interval": 3})
    two = _args(world, tmp_path / "two", **{"batch-size": 4, "max-steps": steps,
                                            "trace-examples": None, "save-interval": 3})
    subprocess.run(_cli(*one), check=True, env=ENV, capture_output=True)
    _torchrun(2, two + (["--fsdp"] if fsdp else []))
    seen: dict[int, list[str]] = {}
    for rank in (0, 1):
        for line in (tmp_path / "two" / f"examples.rank{rank}.jsonl").read_text().splitlines():
            row = json.loads(line)
            seen.setdefault(row["epoch"], []).extend(row["ids"])
    assert len(seen[0]) == N_TRAIN and len(set(seen[0])) == N_TRAIN  # none missing, none twice
    _assert_same_run(tmp_path / "one", tmp_path / "two", steps)


@pytest.mark.slow
def test_two_nodes_match_one(world, tmp_path, torchrun_two_nodes):
    """`torchrun --nnodes 2` (two agents, c10d rendezvous on 127.0.0.1), 1 process × batch 4
    per node == 1 process × batch 8: same losses and weights, across an epoch boundary."""
    steps = 7
    one = _args(world, tmp_path / "one", **{"batch-size": 8, "max-steps": steps, "save-interval": 3})
    two = _args(world, tmp_path / "two", **{"batch-size": 4, "max-steps": steps, "save-interval": 3,
                                            "num-workers": 1})
    subprocess.run(_cli(*one), check=True, env=ENV, capture_output=True)
    torchrun_two_nodes(["-m", "dskd.cli", "distill", *two], ENV)
    _assert_same_run(tmp_path / "one", tmp_path / "two", steps)


@pytest.mark.slow
def test_torchrun_resume_after_kill(world, tmp_path):
    two = _args(world, tmp_path / "two", **{"max-steps": 6, "save-interval": 2})
    _torchrun(2, two)
    ref = weights(tmp_path / "two")
    shutil.rmtree(tmp_path / "two" / "final")
    shutil.rmtree(tmp_path / "two" / "checkpoints" / "step-00000006")
    _torchrun(2, two + ["--resume"])
    assert max_diff(ref, weights(tmp_path / "two")) == 0.0


@pytest.mark.slow
def test_torchrun_checkpoint_resumes_on_one_process(world, tmp_path):
    """docs/distributed.md: a run saved by 2 processes × --batch-size 4 resumes on 1 process ×
    --batch-size 4 --grad-accum 2 (the same global batch; the position re-expressed in examples)
    and ends where the uninterrupted 2-process run did."""
    two = _args(world, tmp_path / "r", **{"max-steps": 6, "save-interval": 2, "keep-last": 5})
    _torchrun(2, two)
    ref, ref_rows = weights(tmp_path / "r"), train_rows(tmp_path / "r")
    shutil.rmtree(tmp_path / "r" / "final")
    for step in (4, 6):
        shutil.rmtree(tmp_path / "r" / "checkpoints" / f"step-0000000{step}")
    one = _args(world, tmp_path / "r", **{"max-steps": 6, "save-interval": 2, "keep-last": 5,
                                          "grad-accum": 2, "resume": None})
    subprocess.run(_cli(*one), check=True, env=ENV, capture_output=True)
    rows = train_rows(tmp_path / "r")
    assert [r["step"] for r in rows] == list(range(1, 7))
    for a, b in zip(ref_rows, rows):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert max_diff(ref, weights(tmp_path / "r")) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("method,student,extra", [
    ("kd", "student", {"divergence": "rkl"}),
    ("dskd", "student_gpt2", {"divergence": "akl"}),
    ("dskd", "student", {"divergence": "js"}),
    ("mined", "student_xvocab", {"teacher_signal": "topk"}),
    ("uld", "student_xvocab", {}),
    ("mined", "student_xvocab", {}),
    ("dskd-cma", "student_xvocab", {"divergence": "srkl", "grad_accum": 2}),
])
def test_method_matrix_trains(world, tmp_path, method, student, extra):
    run(cfg(world, tmp_path / "r", cache=str(world["cache"]), method=method, max_steps=3,
            student=str(getattr(world["toy"], student)), **extra))
    rows = train_rows(tmp_path / "r")
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"] + 1.0  # no blow-up


def test_token_budget_batching(world, tmp_path):
    run(cfg(world, tmp_path / "r", method="sft", data=str(world["train"]), batch_tokens=300,
            max_steps=None, epochs=1, trace_examples=True))
    traced = [json.loads(x) for x in (tmp_path / "r" / "examples.rank0.jsonl").read_text().splitlines()]
    ids = [i for row in traced for i in row["ids"]]
    assert len(ids) == N_TRAIN == len(set(ids))
    assert len(traced) > N_TRAIN // 8  # short micro-batches: the budget, not a count, cut them


@pytest.fixture(scope="module")
def teacherless_cache(world, tmp_path_factory):
    """A cache copied to another place, its teacher directory deleted."""
    d = tmp_path_factory.mktemp("teacherless")
    shutil.copytree(world["toy"].teacher, d / "teacher")
    cache_run(CacheTeacherConfig(teacher=str(d / "teacher"), data=str(world["train"]),
                                 out=str(d / "made"), limit=8, top_k=8, progress=False))
    shutil.copytree(d / "made", d / "elsewhere" / "cache")
    shutil.rmtree(d / "made")
    shutil.rmtree(d / "teacher")
    return d / "elsewhere" / "cache"


_TOKENIZER_RUNS = [("mined", {}), ("dskd-eta", {}), ("dskd-cma", {"projector_init": "pinv"})]


@pytest.mark.parametrize("method,extra", _TOKENIZER_RUNS + [
    pytest.param(m, {}, marks=pytest.mark.slow) for m in METHODS if (m, {}) not in _TOKENIZER_RUNS])
def test_a_copied_cache_without_its_teacher_trains_every_method(world, teacherless_cache, tmp_path,
                                                                method, extra):
    """The cache carries what every method needs (MinED, ETA, cross-vocabulary pinv: the
    teacher's tokenizer), so each trains from a copy whose teacher directory is gone. The
    methods that read the teacher's tokenizer run in the default tier, the rest in the slow one."""
    cross_vocab = ("dskd-cma", "dskd-eta", "uld", "mined")  # the others need the same vocab
    student = "student_xvocab" if method in cross_vocab else "student"
    run(cfg(world, tmp_path / "r", cache=str(teacherless_cache), method=method, max_steps=1,
            batch_size=2, student=str(getattr(world["toy"], student)), **extra))
    assert len(train_rows(tmp_path / "r")) == 1
    assert (tmp_path / "r" / "final" / "model.safetensors").is_file()
