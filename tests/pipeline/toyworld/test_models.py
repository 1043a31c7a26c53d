"""Tiny model dirs: loadable with their tokenizer, vocab-sized logits, ids wired into configs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from dskd.pipeline.toyworld.models import ModelSpec, make_config

MODELS = {  # name: (model_type, tokenizer family)
    "teacher": ("llama", "bpe"),
    "student": ("llama", "bpe"),
    "student_gpt2": ("gpt2", "bpe"),
    "student_xvocab": ("llama", "spbpe"),
    "student_unigram": ("gpt2", "unigram"),
}


@pytest.fixture(scope="module")
def loaded(toy_world):
    out = {}
    for name in MODELS:
        path = getattr(toy_world, name)
        out[name] = (
            AutoModelForCausalLM.from_pretrained(path).eval(),
            AutoTokenizer.from_pretrained(path),
        )
    return out


@pytest.mark.parametrize("name", MODELS)
def test_model_dir_loads_and_gives_vocab_sized_logits(toy_world, loaded, name):
    model, tok = loaded[name]
    model_type, family = MODELS[name]
    assert model.config.model_type == model_type
    assert (getattr(toy_world, name) / "model.safetensors").is_file()
    # The dir's tokenizer is the family's tokenizer, byte for byte.
    assert (getattr(toy_world, name) / "tokenizer.json").read_bytes() == (
        toy_world.tokenizers[family] / "tokenizer.json"
    ).read_bytes()
    assert model.config.vocab_size == len(tok)
    ids = tok(["The owl is quiet.", "Name two colors."], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**ids, output_hidden_states=True)
    B, T = ids["input_ids"].shape
    assert out.logits.shape == (B, T, len(tok))
    assert out.hidden_states[-1].shape == (B, T, model.config.hidden_size)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("name", MODELS)
def test_special_ids_match_tokenizer(loaded, name):
    model, tok = loaded[name]
    gen = GenerationConfig.from_model_config(model.config)
    for cfg in (model.config, model.generation_config, gen):
        assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
            tok.bos_token_id,
            tok.eos_token_id,
            tok.pad_token_id,
        )


def test_llama_models_use_head_dim_64_for_vllm(loaded):
    for name in ("teacher", "student"):
        cfg = loaded[name][0].config
        assert cfg.head_dim == 64 and cfg.hidden_size == 64 * cfg.num_attention_heads


def test_teacher_is_larger_and_wider_than_students(loaded):
    def n_params(model):
        return sum(p.numel() for p in model.parameters())

    teacher = loaded["teacher"][0]
    assert 1_000_000 < n_params(teacher) < 3_000_000
    for name in ("student", "student_gpt2", "student_xvocab", "student_unigram"):
        student = loaded[name][0]
        assert 300_000 < n_params(student) < n_params(teacher) / 2
        assert student.config.hidden_size != teacher.config.hidden_size  # D_s != D_t


def test_teacher_generates_with_its_own_pad_and_eos(loaded):
    model, tok = loaded["teacher"]
    ids = tok(["What is 2 plus 3?"], return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert (
        out.shape[0] == 1
        and ids["input_ids"].shape[1] < out.shape[1] <= ids["input_ids"].shape[1] + 4
    )


def test_make_config_rejects_bad_specs():
    with pytest.raises(ValueError, match="head_dim"):
        make_config(ModelSpec("llama", 100, 1, 128), vocab_size=10, bos_id=0, eos_id=0, pad_id=1)
    with pytest.raises(ValueError, match="unknown arch"):
        make_config(ModelSpec("mamba", 64, 1, 128), vocab_size=10, bos_id=0, eos_id=0, pad_id=1)
