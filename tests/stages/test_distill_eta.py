"""`dskd distill --method dskd-eta / dskd-v2` from a teacher cache: the toy world (cross- and
same-vocabulary students), and a Qwen2-architecture teacher → GPT-2-architecture student built
from configs with the real tokenizers of ../shared/tokenizers (tiny random weights)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dskd.pipeline.config import ConfigError
from dskd.pipeline.train.logger import read_metrics
from dskd.stages.cache_teacher import CacheTeacherConfig
from dskd.stages.cache_teacher import run as cache_run
from dskd.stages.distill import DistillConfig, run

ETA_TERMS = {"t2s_ce_loss", "t2s_kd_loss", "s2t_kd_loss", "align_ratio", "t2s_agreement"}


def _cfg(student: Path, cache: Path | None, out: Path, **kw) -> DistillConfig:
    base = {"student": str(student), "cache": cache and str(cache), "out": str(out), "batch_size": 4,
            "max_steps": 2, "eval_interval": 1000, "save_interval": 1000, "num_workers": 0,
            "log_interval": 1, "tensorboard": False, "seed": 3}
    return DistillConfig(**(base | kw))


def _rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "loss" in r]


def _finite(rows: list[dict]) -> bool:
    return all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


@pytest.fixture(scope="module")
def toy(toy_world, tmp_path_factory):
    d = tmp_path_factory.mktemp("eta_toy")
    lines = Path(toy_world.train).read_text().splitlines()[:12]
    (d / "train.jsonl").write_text("\n".join(lines) + "\n")
    cache_run(CacheTeacherConfig(teacher=str(toy_world.teacher), data=str(d / "train.jsonl"),
                                 out=str(d / "cache"), shard_size=16, top_k=8,
                                 batch_tokens=4096, progress=False))
    return {"toy": toy_world, "cache": d / "cache", "data": d / "train.jsonl"}


@pytest.mark.parametrize("alignment", ["official", pytest.param("offsets", marks=pytest.mark.slow)])
def test_dskd_eta_trains_a_cross_vocab_student_from_the_toy_cache(toy, tmp_path, alignment):
    out = tmp_path / "eta"
    run(_cfg(toy["toy"].student_xvocab, toy["cache"], out, method="dskd-eta", alignment=alignment))
    rows = _rows(out)
    assert len(rows) == 2 and _finite(rows) and ETA_TERMS <= rows[0].keys()
    assert 0 < rows[0]["align_ratio"] <= 1 and rows[0]["s2t_kd_loss"] > 0
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_dskd_eta_from_the_cache_equals_online(toy, tmp_path):
    """Same alignment, predictions and losses whether the teacher rows come from the cache or
    from the live teacher (rounded to the cache's fp16, as in test_distill's exactness proof)."""
    common = {"method": "dskd-eta", "max_steps": 2}
    run(_cfg(toy["toy"].student_xvocab, toy["cache"], tmp_path / "cache", **common))
    run(_cfg(toy["toy"].student_xvocab, None, tmp_path / "online", teacher=str(toy["toy"].teacher),
             data=str(toy["data"]), online_hidden_dtype="fp16", **common))
    for a, b in zip(_rows(tmp_path / "cache"), _rows(tmp_path / "online"), strict=True):
        for k in ("loss", "t2s_ce_loss", "t2s_kd_loss", "s2t_kd_loss", "align_ratio"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a["step"], k)


def test_dskd_v2_trains_a_same_vocab_student_and_resumes(toy, tmp_path):
    out = tmp_path / "v2"
    args = {"method": "dskd-v2", "max_steps": 3, "save_interval": 1, "keep_last": 3}
    run(_cfg(toy["toy"].student, toy["cache"], out, **args))
    rows = _rows(out)
    assert _finite(rows) and {"t2s_agreement", "t_acc", "s2t_agreement"} <= rows[0].keys()
    # Lose step 3, as a crash during it would; the resume must keep the same plan (max_steps).
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoints" / "step-00000003")
    # the pinv s2t map is rebuilt, not saved: a resumed run loads the saved projectors strictly
    run(_cfg(toy["toy"].student, toy["cache"], out, resume=True, **args))
    assert [r["step"] for r in _rows(out)] == [1, 2, 3]


def test_options_a_method_does_not_read_are_refused(toy, tmp_path):
    with pytest.raises(ConfigError, match="--alignment offsets does nothing with --method dskd-cma "
                       r"\(read by dskd-eta only\)"):
        run(_cfg(toy["toy"].student_xvocab, toy["cache"], tmp_path / "r", method="dskd-cma",
                 alignment="offsets"))
    with pytest.raises(ConfigError, match="--projector-init pinv does nothing with --method kd "
                       r"\(read by dskd, dskd-cma, dskd-v2, dskd-eta only\)"):
        run(_cfg(toy["toy"].student, toy["cache"], tmp_path / "r", method="kd",
                 projector_init="pinv"))


@pytest.mark.slow
def test_pinv_projector_init_reaches_dskd_and_dskd_cma(toy, tmp_path):
    for method, student in (("dskd", toy["toy"].student), ("dskd-cma", toy["toy"].student_xvocab)):
        out = tmp_path / method
        run(_cfg(student, toy["cache"], out, method=method, projector_init="pinv", max_steps=1))
        assert _finite(_rows(out))


# --------------------------------------------------------------------------- real tokenizers

TEXTS = [
    ("Explain what a café is.", "A café is a small restaurant.\nIt serves coffee and cake."),
    ("List two cities.", "Zürich and Kraków.\n\nBoth are old cities."),
    ("What do bees make?", "Bees make honey and wax; they also pollinate flowers."),
    ("Write a greeting.", "Hello there! Nice to meet you."),
    ("Name a dessert.", "Crème brûlée, a French dessert."),
    ("Count to three.", "One, two, three."),
]


@pytest.fixture(scope="module")
def real(shared_dir, tmp_path_factory):
    """Tiny random Qwen2 teacher (qwen2 tokenizer) and GPT-2 student (gpt2 tokenizer), and a
    cache of the teacher."""
    from transformers import (
        AutoTokenizer,
        GPT2Config,
        GPT2LMHeadModel,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    d = tmp_path_factory.mktemp("eta_real")
    torch.manual_seed(0)
    t_tok = AutoTokenizer.from_pretrained(str(shared_dir / "tokenizers" / "qwen2"))
    teacher = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
        tie_word_embeddings=False, eos_token_id=t_tok.eos_token_id))
    teacher.save_pretrained(d / "teacher")
    t_tok.save_pretrained(d / "teacher")
    s_tok = AutoTokenizer.from_pretrained(str(shared_dir / "tokenizers" / "gpt2"))
    student = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_embd=16, n_layer=1, n_head=2,
                                         n_positions=256))
    student.save_pretrained(d / "student")
    s_tok.save_pretrained(d / "student")
    data = d / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": p, "response": r}) + "\n" for p, r in TEXTS))
    cache_run(CacheTeacherConfig(teacher=str(d / "teacher"), data=str(data), out=str(d / "cache"),
                                 shard_size=8, top_k=4, batch_tokens=4096, progress=False))
    return d


@pytest.mark.slow
def test_dskd_eta_gpt2_student_from_a_qwen2_teacher_cache(real, tmp_path):
    ratios = {}
    for alignment in ("official", "offsets"):
        out = tmp_path / alignment
        run(_cfg(real / "student", real / "cache", out, method="dskd-eta", alignment=alignment,
                 batch_size=6, max_steps=2))
        rows = _rows(out)
        assert len(rows) == 2 and _finite(rows) and ETA_TERMS <= rows[0].keys()
        ratios[alignment] = rows[0]["align_ratio"]
    # GPT-2 and Qwen2 share the byte alphabet, so the official rule recovers too; offsets
    # never align fewer (digits after a lone space token align more)
    assert 0 < ratios["official"] <= ratios["offsets"] <= 1
