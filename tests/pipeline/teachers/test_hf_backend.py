"""transformers backend: hidden states are the LM head's input, padding-invariant, and
hidden @ head reproduces the model's own logits (the check the stage runs before writing)."""

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from dskd.pipeline.teachers import TeacherBackend
from dskd.pipeline.teachers.head import UnsupportedTeacherError, head_from_checkpoint
from dskd.pipeline.teachers.hf_backend import HFTeacher


def _save(model, path):
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    return _save(LlamaForCausalLM(cfg), tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=89, n_embd=32, n_layer=2, n_head=2, n_positions=128,
                     bos_token_id=0, eos_token_id=0)
    return _save(GPT2LMHeadModel(cfg), tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def teachers(llama_dir, gpt2_dir):
    return {"llama_dir": HFTeacher(llama_dir), "gpt2_dir": HFTeacher(gpt2_dir)}


SEQS = [[5, 9, 17, 3, 44, 2, 8, 61], [7, 7, 1], [12, 30, 55, 81, 4]]


@pytest.mark.parametrize("which", ["llama_dir", "gpt2_dir"])
def test_hidden_states_are_head_input_and_padding_invariant(which, teachers):
    t = teachers[which]
    assert isinstance(t, TeacherBackend)
    batch = t.hidden_states(SEQS)
    for s, h in zip(SEQS, batch):
        assert h.shape == (len(s), t.hidden_size) and h.dtype == torch.float32
        ref = t.model(torch.tensor([s]), output_hidden_states=True).hidden_states[-1][0]
        torch.testing.assert_close(h, ref, rtol=1e-5, atol=1e-5)  # batched+padded == alone


@pytest.mark.parametrize("which", ["llama_dir", "gpt2_dir"])
def test_hidden_at_head_reproduces_model_logits(which, teachers):
    t = teachers[which]
    err = t.check_head(SEQS)
    print(f"{which}: max |logits - hidden @ head| = {err:.3g}")
    assert err < 1e-4


@pytest.mark.parametrize("which", ["llama_dir", "gpt2_dir"])
def test_head_from_checkpoint_equals_head_of_loaded_model(which, request, teachers):
    a, b = teachers[which].head(), head_from_checkpoint(request.getfixturevalue(which))
    assert torch.equal(a.weight, b.weight)
    assert (a.embed is None) == (b.embed is None)  # gpt2 ties, this llama does not
    if a.embed is not None:
        assert torch.equal(a.embed, b.embed)


def test_a_logit_transform_the_cache_does_not_record_is_refused(llama_dir):
    t = HFTeacher(llama_dir)
    w = t.model.lm_head.weight
    t.model.lm_head.forward = lambda x: 20 * torch.tanh(F.linear(x, w) / 20)  # soft-capping
    with pytest.raises(UnsupportedTeacherError, match="does not reproduce the logits"):
        t.check_head(SEQS)


def test_soft_capped_architecture_is_refused_up_front(tmp_path):
    cfg = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                       final_logit_softcapping=30.0)
    path = _save(Gemma2ForCausalLM(cfg), tmp_path / "gemma2")
    with pytest.raises(UnsupportedTeacherError, match="final_logit_softcapping=30.0"):
        HFTeacher(path)
    with pytest.raises(UnsupportedTeacherError, match="soft-caps"):
        head_from_checkpoint(path)
