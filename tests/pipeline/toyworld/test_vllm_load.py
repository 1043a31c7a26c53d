"""The toy teacher loads in vLLM's CPU engine and decodes like transformers (tier `-m vllm`).

Run in the vLLM venv (built by `.ci/install_vllm.sh`):
    DSKD_REQUIRE_VLLM=1 .venv-vllm/bin/python -m pytest -m vllm tests/pipeline/toyworld/test_vllm_load.py
With DSKD_REQUIRE_VLLM=1 a missing vllm is an error, not a skip.
"""

from __future__ import annotations

import gc
import importlib.util
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the toy models need almost none

PROMPTS = ["Describe an owl in one sentence.\n", "What is 12 plus 30?\n"]
NEW_TOKENS = 6


@pytest.mark.vllm
def test_toy_teacher_greedy_decoding_matches_transformers(toy_world):
    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("DSKD_REQUIRE_VLLM") == "1":
            pytest.fail("DSKD_REQUIRE_VLLM=1 but `import vllm` fails: the vLLM venv is broken")
        pytest.skip("vllm not installed (the vLLM tier runs in .venv-vllm)")
    from vllm import LLM, SamplingParams

    tok = AutoTokenizer.from_pretrained(toy_world.teacher)
    model = AutoModelForCausalLM.from_pretrained(toy_world.teacher).eval()
    expected = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        expected.append(out[0, ids.shape[1] :].tolist())

    llm = LLM(
        model=str(toy_world.teacher), dtype="float32", max_model_len=512, enforce_eager=True, seed=0
    )
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    got = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params)]
    del llm  # shut the engine down while pytest still captures its logging
    gc.collect()
    # Random weights give near-flat logits, so a rare argmax tie could differ; all tokens agree
    # in practice (fp32 on both sides), and at least the first step must.
    assert [g[0] for g in got] == [e[0] for e in expected]
    assert got == expected
