"""vLLM teacher backend vs transformers on a tiny random Llama (tier `-m vllm`).

Run in the vLLM venv (built by `.ci/install_vllm.sh`):
    DSKD_REQUIRE_VLLM=1 .venv-vllm/bin/python -m pytest -m vllm tests/pipeline/teachers/test_vllm_backend.py
In the main venv these tests are deselected (and would skip: no vllm there). With
DSKD_REQUIRE_VLLM=1 a missing vllm is an error, so a broken vLLM venv cannot pass as "skipped".
"""

import importlib.util
import os

import numpy as np
import pytest
import torch

from dskd.pipeline.teachers.head import head_step
from dskd.pipeline.teachers.hf_backend import HFTeacher
from dskd.pipeline.teachers.vllm_backend import VLLMTeacher

HAS_VLLM = importlib.util.find_spec("vllm") is not None

# Engine on CPU: a small KV cache (GiB), no core pinning fights with other processes.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 400
CHUNK = 64  # max tokens per engine step: sequences longer than this go through chunked prefill
LENGTHS = [1, 2, 7, 33, 64, 100, 150]  # 100 and 150 are chunked (CHUNK = 64)
ATOL = 1e-4  # fp32 both sides; measured max abs error ~1e-6


def _require_vllm() -> None:
    if HAS_VLLM:
        return
    if os.environ.get("DSKD_REQUIRE_VLLM") == "1":
        pytest.fail("DSKD_REQUIRE_VLLM=1 but `import vllm` fails: the vLLM venv is broken")
    pytest.skip("vllm not installed (the vLLM tier runs in .venv-vllm)")


def _tiny_llama(out_dir):
    """A 2-layer Llama (D_t=128, head_dim 64: vLLM's CPU attention needs head_dim >= 32)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    words = " ".join(f"w{i}" for i in range(VOCAB - 3))
    tok.train_from_iterator([words], trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(out_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(fast), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # random norm gains: a missing/extra/L2 normalisation cannot match
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 2.0)
    model.save_pretrained(out_dir)
    return model


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """(VLLMTeacher, HF model) on one tiny Llama; one engine for the whole module (~25 s on CPU)."""
    _require_vllm()
    model_dir = tmp_path_factory.mktemp("tiny_llama")
    hf = _tiny_llama(model_dir)
    vt = VLLMTeacher(
        model_dir, dtype="float32", max_model_len=256, gpu_memory_utilization=0.1,
        enforce_eager=True, max_num_batched_tokens=CHUNK, max_num_seqs=4,
    )
    yield vt, hf
    vt.close()
    with pytest.raises(RuntimeError, match="after close"):
        vt.hidden_states([[1, 2]])


def _hf_hidden(hf, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[-1][0].float().numpy()  # (n, D_t), post final norm


def _batch(seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, size=n).tolist() for n in LENGTHS]


@pytest.mark.vllm
def test_hidden_states_match_transformers(teacher, record_property):
    vt, hf = teacher
    batch = _batch()
    got = vt.hidden_states(batch)  # all lengths in one call: batched + chunked prefill
    assert vt.hidden_size == hf.config.hidden_size
    max_err = 0.0
    for ids, h in zip(batch, got, strict=True):
        ref = _hf_hidden(hf, ids)
        assert h.dtype == np.float32 and h.shape == ref.shape == (len(ids), 128)
        np.testing.assert_allclose(h, ref, atol=ATOL, rtol=0)
        max_err = max(max_err, float(np.abs(h - ref).max()))
    record_property("vllm_vs_hf_max_abs_err", max_err)
    print(f"vLLM vs transformers max abs error: {max_err:.3g}")
    # Not the pre-norm residual stream, not L2-normalised (the pooler's default).
    pre_norm = hf(torch.tensor([batch[3]]), output_hidden_states=True).hidden_states[-2][0]
    assert np.abs(got[3] - pre_norm.detach().numpy()).max() > 100 * ATOL
    assert not np.allclose(np.linalg.norm(got[3], axis=-1), 1.0, atol=1e-2)


@pytest.mark.vllm
def test_head_step_matches_transformers_backend(teacher):
    """Both backends through the shared head step: same top-k ids, log-probs, lse."""
    vt, hf = teacher
    assert vt.device == torch.device("cpu") and vt.dtype == torch.float32
    head = vt.head()
    np.testing.assert_array_equal(head.weight.numpy(), hf.lm_head.weight.detach().numpy())
    hf_backend = HFTeacher(vt.model_dir, device="cpu", dtype=torch.float32)
    batch = _batch(seed=2)
    for ids, hv, hh in zip(batch, vt.hidden_states(batch), hf_backend.hidden_states(batch),
                           strict=True):
        nxt = torch.tensor(ids[1:] + [0])
        a = head_step(torch.as_tensor(hv).to(vt.device), nxt, head, top_k=8)
        b = head_step(hh, nxt, hf_backend.head(), top_k=8)
        torch.testing.assert_close(a.lse, b.lse, atol=ATOL, rtol=0)
        torch.testing.assert_close(a.topk_logprobs, b.topk_logprobs, atol=ATOL, rtol=0)
        torch.testing.assert_close(a.next_logprob, b.next_logprob, atol=ATOL, rtol=0)
        # ids may swap only where two logits tie to within fp error
        same = (a.topk_ids == b.topk_ids).float().mean().item()
        assert same > 0.99, same
    hf_backend.close()


@pytest.mark.vllm
def test_batching_does_not_change_results(teacher):
    vt, _ = teacher
    batch = _batch(seed=1)
    together = vt.hidden_states(batch)
    reversed_ = vt.hidden_states(batch[::-1])[::-1]
    for ids, a, b in zip(batch, together, reversed_, strict=True):
        alone = vt.hidden_states([ids])[0]
        np.testing.assert_allclose(a, alone, atol=ATOL, rtol=0)
        np.testing.assert_allclose(b, alone, atol=ATOL, rtol=0)
    # Repeated prefixes must not be served from the prefix cache with rows missing.
    twice = vt.hidden_states([batch[5], batch[5][:40] + batch[4]])
    assert twice[1].shape == (40 + len(batch[4]), 128)
    np.testing.assert_allclose(twice[1][:40], twice[0][:40], atol=ATOL, rtol=0)


@pytest.mark.vllm
def test_bad_sequences_get_clear_errors(teacher):
    vt, _ = teacher
    with pytest.raises(ValueError, match="sequence 1 is empty|sequence 1 of the batch is empty"):
        vt.hidden_states([[5, 6], []])
    with pytest.raises(ValueError, match="sequence 0 has 257 tokens.*max_model_len 256"):
        vt.hidden_states([[5] * 257])
    assert vt.hidden_states([]) == []
    with pytest.raises(ValueError, match="first visible GPU"):  # before any engine starts
        VLLMTeacher(vt.model_dir, head_device="cuda:1")


def test_model_dir_without_config_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        VLLMTeacher(tmp_path)


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed here")
def test_missing_vllm_names_the_install_command(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ImportError, match=r"pip install 'dskd\[vllm\]'"):
        VLLMTeacher(tmp_path)
