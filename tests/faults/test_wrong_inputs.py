"""Fault suite, wrong inputs: a teacher vocabulary padded past its tokenizer (the Qwen
151936/152064-vs-151646 case), and NaN in the teacher's outputs."""


import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.faults


def _teacher_copy(world, dst, edit):
    model = AutoModelForCausalLM.from_pretrained(world.teacher)
    tok = AutoTokenizer.from_pretrained(world.teacher)
    edit(model, tok)
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


@pytest.mark.parametrize("method", ["kd", pytest.param("dskd", marks=pytest.mark.slow)])
def test_teacher_vocab_padded_past_the_tokenizer(fx, toy_world, tmp_path, method):
    teacher = _teacher_copy(toy_world, tmp_path / "padded", lambda m, tok: m.resize_token_embeddings(
        len(tok) + 9, mean_resizing=False))
    cache = tmp_path / "cache"
    r = fx.cli("cache-teacher", "--teacher", str(teacher), "--data", str(toy_world.train),
               "--out", str(cache), "--limit", "16", "--top-k", "8", "--no-progress", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    r = fx.cli("distill", "--cache", str(cache), "--student", str(toy_world.student),
               "--out", str(tmp_path / "run"), "--method", method, "--max-steps", "2",
               "--num-workers", "0", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    if method == "kd":  # the user is told what was done with the padding rows
        assert "padding rows past the tokenizer are cut" in r.stdout + r.stderr


def test_a_different_vocabulary_is_not_mistaken_for_padding(fx, toy_world, tmp_path):
    r = fx.cli("distill", "--teacher", str(toy_world.teacher), "--student", str(toy_world.student_xvocab),
               "--data", str(toy_world.train), "--out", str(tmp_path / "run"), "--method", "kd",
               "--max-steps", "1", "--num-workers", "0", "--device", "cpu", "--limit", "8")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "dskd-cma" in r.stderr


def test_nan_in_teacher_outputs_commits_nothing(fx, toy_world, tmp_path):
    def poison(model, tok):
        with torch.no_grad():
            model.model.layers[-1].mlp.down_proj.weight[0, 0] = float("nan")

    teacher = _teacher_copy(toy_world, tmp_path / "nan", poison)
    cache = tmp_path / "cache"
    r = fx.cli("cache-teacher", "--teacher", str(teacher), "--data", str(toy_world.train),
               "--out", str(cache), "--limit", "16", "--no-progress", "--device", "cpu")
    assert r.returncode == 1, r.stderr[-2000:]
    assert "nan" in r.stderr.lower() and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not list((cache / "commits").glob("*.json")) if (cache / "commits").exists() else True
