"""`cache-teacher --backend vllm` vs `--backend transformers` on the toy world (tier `-m vllm`).

Run in the vLLM venv: DSKD_REQUIRE_VLLM=1 .venv-vllm/bin/python -m pytest -m vllm tests/stages/
Both caches are read back with the cache reader and must agree: same examples and token ids,
hidden states within fp16 storage rounding, top-k / lse / log-probs within fp32 rounding. The
teacher is a float32 checkpoint cached with the default --teacher-dtype (auto): dskd must resolve
that to float32 for vLLM too (vLLM's own "auto" would run it in float16, ~1e-3 off).
"""

import importlib.util
import os

import numpy as np
import pytest

from dskd.pipeline.cache.reader import open_cache
from dskd.pipeline.cache.spec import CHECKSUM
from dskd.pipeline.teachers import checkpoint_dtype
from dskd.stages.cache_teacher import CacheTeacherConfig, run

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache for the CPU engine

LIMIT = 48  # examples; 2 shards of 32 rows -> resume/commit code runs for both backends
ATOL = 1e-4  # fp32 compute on both sides (measured ~1e-6)


@pytest.mark.vllm
def test_vllm_cache_matches_transformers_cache(toy_world, tmp_path):
    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("DSKD_REQUIRE_VLLM") == "1":
            pytest.fail("DSKD_REQUIRE_VLLM=1 but `import vllm` fails: the vLLM venv is broken")
        pytest.skip("vllm not installed (the vLLM tier runs in .venv-vllm)")
    assert checkpoint_dtype(toy_world.teacher) == "float32"
    caches = {}
    for backend in ("transformers", "vllm"):
        cfg = CacheTeacherConfig(  # default --teacher-dtype: auto
            teacher=str(toy_world.teacher), data=str(toy_world.train), out=str(tmp_path / backend),
            backend=backend, limit=LIMIT, shard_size=32, top_k=8, hidden_dtype="fp16",
            topk_logprobs="fp32",  # backends compared at 1e-4: keep q8's rounding out of it
            device="cpu", progress=False,
        )
        caches[backend] = open_cache(run(cfg))
    hf, vl = caches["transformers"], caches["vllm"]
    assert vl.manifest["teacher"]["backend"] == "vllm"
    assert hf.manifest["teacher"]["backend"] == "transformers"
    for c in (hf, vl):  # what ran, not "auto"
        assert c.manifest["teacher"]["dtype"] == "float32"
        assert c.manifest["teacher"]["compute"] == "cpu-float32"
    assert len(hf) == len(vl) == LIMIT
    # Same head bytes (vLLM's read from the checkpoint, HF's from the loaded model); only the
    # transformers backend can prove hidden @ head == its own logits.
    assert vl.manifest["head"][CHECKSUM] == hf.manifest["head"][CHECKSUM]
    assert vl.manifest["head"]["check_max_abs_err"] is None
    assert hf.manifest["head"]["check_max_abs_err"] is not None
    worst = {"hidden": 0.0, "lse": 0.0, "topk_logprobs": 0.0, "next_logprob": 0.0}
    ids_same = ids_total = 0
    for a, b in zip(hf, vl, strict=True):
        assert a.example_id == b.example_id
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        # fp16 storage: values of either side may round to neighbouring fp16 numbers
        np.testing.assert_allclose(b.hidden, a.hidden, rtol=2e-3, atol=2e-3)
        for f in ("lse", "topk_logprobs", "next_logprob", "tail_logprob"):
            np.testing.assert_allclose(getattr(b, f), getattr(a, f), atol=ATOL, rtol=0, err_msg=f)
        for f, w in worst.items():
            worst[f] = max(w, float(np.abs(getattr(b, f) - getattr(a, f)).max()))
        ids_same += int((a.topk_ids == b.topk_ids).sum())
        ids_total += a.topk_ids.size
    # ids may differ only where two logits tie to within fp32 rounding
    assert ids_same / ids_total > 0.995, (ids_same, ids_total)
    print("vLLM vs transformers cache, max abs diff:", {k: f"{v:.2g}" for k, v in worst.items()},
          f"top-k ids equal {ids_same}/{ids_total}")
