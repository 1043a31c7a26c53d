"""Issue 15, the CLI as a practitioner meets it, through the real `dskd` app: one template rule
across distill / eval / report, --init-seed, plain log lines off a terminal with one "done" line,
`dskd eval --no-generate`, and the refusal of DSKD at --kd-rate 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from dskd.cli import app
from dskd.stages.cache_teacher import CacheTeacherConfig
from dskd.stages.cache_teacher import run as cache_run

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def world(toy_world, tmp_path_factory):
    """12 train / 8 valid rows; the valid cache made with template `none` (not dskd's default)."""
    d = tmp_path_factory.mktemp("practitioner")
    for split, n in (("train", 12), ("valid", 8)):
        lines = Path(getattr(toy_world, split)).read_text().splitlines()[:n]
        (d / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    cache_run(CacheTeacherConfig(teacher=str(toy_world.teacher), data=str(d / "valid.jsonl"),
                                 out=str(d / "vcache_none"), template="none", top_k=8,
                                 progress=False))
    return {"dir": d, "toy": toy_world, "train": d / "train.jsonl", "valid": d / "valid.jsonl",
            "vcache": d / "vcache_none"}


def distill_args(world, out, *extra: str) -> list[str]:
    return ["distill", "--student", str(world["toy"].student), "--out", str(out), "--method", "sft",
            "--data", str(world["train"]), "--batch-size", "4", "--max-steps", "2",
            "--num-workers", "0", "--log-interval", "1", "--no-tensorboard", "--seed", "3", *extra]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


# --------------------------------------------------------------------------- one template rule


@pytest.fixture(scope="module")
def sft_runs(world, tmp_path_factory):
    """Two SFT runs: one validated on the `none` cache (inherits its template), one plain."""
    d = tmp_path_factory.mktemp("runs")
    r = invoke(*distill_args(world, d / "sft_vcache", "--valid-cache", str(world["vcache"])))
    assert r.exit_code == 0, r.output
    r2 = invoke(*distill_args(world, d / "sft_plain"))
    assert r2.exit_code == 0, r2.output
    return {"vcache": d / "sft_vcache", "plain": d / "sft_plain", "output": r.output,
            "output_plain": r2.output}


def test_sft_from_data_takes_the_valid_cache_template_and_records_it(sft_runs):
    run = sft_runs["vcache"]
    assert "template none (from --valid-cache" in sft_runs["output"]
    assert "template dskd (from the default; no cache given)" in sft_runs["output_plain"]
    assert yaml.safe_load((run / "config.yaml").read_text())["template"] == "none"
    assert json.loads((run / "final" / "dskd_run.json").read_text())["template"] == "none"
    # validation ran on the cache (the student's CE: SFT has no teacher signal)
    assert any("valid_ce_loss" in json.loads(line)
               for line in (run / "metrics.jsonl").read_text().splitlines())


def test_an_explicit_template_other_than_the_valid_cache_is_refused(world, tmp_path):
    r = invoke(*distill_args(world, tmp_path / "x", "--valid-cache", str(world["vcache"]),
                             "--template", "dskd"))
    assert r.exit_code == 1
    assert "--valid-cache" in r.output and "template" in r.output


def test_eval_and_report_refuse_runs_trained_on_different_templates(world, sft_runs, tmp_path):
    models = ["--model", str(sft_runs["vcache"] / "final"), "--model", str(sft_runs["plain"] / "final")]
    r = invoke("eval", *models, "--data", str(world["valid"]), "--out", str(tmp_path / "e"),
               "--no-generate")
    assert r.exit_code == 1
    assert "different prompt templates" in r.output and "--allow-mixed-templates" in r.output
    r = invoke("eval", *models, "--data", str(world["valid"]), "--out", str(tmp_path / "e"),
               "--no-generate", "--allow-mixed-templates")
    assert r.exit_code == 0, r.output
    # one eval per model, then a report that would put them side by side
    for name in ("vcache", "plain"):
        r = invoke("eval", "--model", str(sft_runs[name] / "final"), "--data", str(world["valid"]),
                   "--out", str(tmp_path / name), "--no-generate")
        assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "vcache" / "results.json").read_text())
    assert res["config"]["template"] == "none"  # eval prompts it as it was trained
    assert res["models"]["sft_vcache"]["train_template"] == "none"
    rep = [str(tmp_path / "vcache"), str(tmp_path / "plain"), "--out", str(tmp_path / "rep")]
    r = invoke("report", *rep)
    assert r.exit_code == 1 and "different prompt templates" in r.output
    r = invoke("report", *rep, "--allow-mixed-templates")
    assert r.exit_code == 0, r.output
    assert "| sft_vcache |" in (tmp_path / "rep" / "report.md").read_text()


# --------------------------------------------------------------------------- --init-seed


def test_init_seed_reinitialises_the_student_from_its_config(world, tmp_path):
    from dskd.pipeline.train.models import load_student, load_tokenizer

    student = world["toy"].student
    tok, _ = load_tokenizer(student)
    saved = load_student(student, tok).state_dict()
    a, a2, b = (load_student(student, tok, init_seed=s).state_dict() for s in (1, 1, 2))
    key = next(k for k in saved if k.endswith("q_proj.weight") or "attn" in k and "weight" in k)
    assert torch.equal(a[key], a2[key])  # same seed, same init
    assert not torch.equal(a[key], b[key]) and not torch.equal(a[key], saved[key])
    # and through the real app: two --init-seed runs differ, the run records it
    for s in ("1", "2"):
        r = invoke(*distill_args(world, tmp_path / s, "--init-seed", s, "--max-steps", "1"))
        assert r.exit_code == 0, r.output
    w1, w2 = (load_file(str(tmp_path / s / "final" / "model.safetensors")) for s in ("1", "2"))
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)
    assert yaml.safe_load((tmp_path / "2" / "config.yaml").read_text())["init-seed"] == 2


# --------------------------------------------------------------------------- logs off a terminal


def test_logs_to_a_file_are_plain_lines_with_one_done_line(world, tmp_path):
    log = tmp_path / "log.txt"
    with log.open("w") as f:
        subprocess.run([sys.executable, "-m", "dskd.cli",
                        *distill_args(world, tmp_path / "r", "--max-steps", "3")],
                       stdout=f, stderr=subprocess.STDOUT, env=ENV, check=True, timeout=300)
    text = log.read_text()
    lines = text.splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert [s.split(" · ")[0] for s in steps] == ["step 1/3", "step 2/3", "step 3/3"], text
    assert all(" · loss " in s and " tok/s · ETA " in s for s in steps)
    assert "\r" not in text and "\x1b[" not in text  # no bar frames, no colour codes
    assert "Writing model shards" not in text and "Loading weights" not in text
    assert sum(line.startswith("done:") for line in lines) == 1, text


def test_cache_teacher_and_eval_log_plain_lines_to_a_file(world, tmp_path):
    """Off a terminal, cache-teacher and eval follow distill's rule: plain progress lines (count,
    rate, ETA), no bar frames, colour codes or third-party bars, one "done" line."""
    def logged(*args: str) -> list[str]:
        log = tmp_path / f"{args[0]}.log"
        with log.open("w") as f:
            subprocess.run([sys.executable, "-m", "dskd.cli", *args], stdout=f,
                           stderr=subprocess.STDOUT, env=ENV, check=True, timeout=300)
        text = log.read_text()
        assert "\r" not in text and "\x1b[" not in text, text
        assert "Loading weights" not in text and "Writing model shards" not in text
        assert sum(line.startswith("done:") for line in text.splitlines()) == 1, text
        return text.splitlines()

    lines = logged("cache-teacher", "--teacher", str(world["toy"].teacher), "--data",
                   str(world["train"]), "--out", str(tmp_path / "c"), "--shard-size", "8")
    assert any(line.startswith("cache-teacher [1/1] 12/12 examples · ") and " tok/s · " in line
               and " · ETA " in line for line in lines), lines
    lines = logged("eval", "--model", str(world["toy"].student), "--data", str(world["valid"]),
                   "--template", "none", "--limit", "2", "--seeds", "1", "--max-new-tokens", "4",
                   "--out", str(tmp_path / "e"))
    progress = [line for line in lines if line.endswith(tuple("0123456789?"))
                and " prompts/s · ETA " in line]
    assert progress and " · 2/2 prompts · " in progress[-1], lines


# --------------------------------------------------------------------------- eval --no-generate


def test_eval_no_generate_gives_nll_and_fidelity_without_generating(world, tmp_path):
    teacher = world["toy"].teacher
    r = invoke("eval", "--model", str(teacher), "--model", str(world["toy"].student),
               "--data", str(world["valid"]), "--template", "none", "--cache", str(world["vcache"]),
               "--out", str(tmp_path / "e"), "--no-generate")
    assert r.exit_code == 0, r.output
    out = tmp_path / "e"
    assert not (out / "generations.jsonl").exists()
    res = json.loads((out / "results.json").read_text())
    held, fid = res["heldout"], res["fidelity"]
    assert held["teacher"]["valid"]["examples"] == 8
    # the same responses, the same tokenization: held-out NLL == the cache's NLL
    assert held["teacher"]["valid"]["nll"] == pytest.approx(fid["teacher"]["nll"], rel=1e-4)
    assert held["student"]["valid"]["nll"] == pytest.approx(fid["student"]["nll"], rel=1e-4)
    assert held["teacher"]["valid"]["nll_tokens"] == fid["teacher"]["nll_tokens"] > 0
    assert fid["teacher"]["top1_agreement"] == pytest.approx(100.0)
    report = (out / "report.md").read_text()
    assert "Held-out NLL" in report and "## ROUGE-L" not in report
    # the toy rows carry their true probabilities: exact metrics need no generation either
    assert res["truth"]["student"]["valid"]["examples"] == 8
    assert res["truth"]["teacher"]["valid"]["excess_kl"] >= 0
    assert "## Against the truth" in report


# --------------------------------------------------------------------------- known collapses


def test_dskd_at_kd_rate_1_is_refused_naming_why_unless_forced(world, tmp_path):
    args = ["distill", "--student", str(world["toy"].student), "--out", str(tmp_path / "d"),
            "--teacher", str(world["toy"].teacher), "--data", str(world["train"]),
            "--method", "dskd", "--kd-rate", "1"]
    r = invoke(*args)
    assert r.exit_code == 1
    assert "collapse" in r.output and "--force" in r.output and "CE" in r.output
    r = invoke(*args, "--batch-size", "4", "--max-steps", "1", "--num-workers", "0",
               "--no-tensorboard", "--force")
    assert r.exit_code == 0, r.output
    assert "--force: --method dskd with --kd-rate 1 is known to collapse" in r.output
