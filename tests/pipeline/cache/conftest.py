"""A synthetic cache (random rows, no model) for the format tests: fast and fully known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dskd.pipeline.cache import spec
from dskd.pipeline.cache.manifest import finalize
from dskd.pipeline.cache.quant import codes_to_numpy, encode_hidden
from dskd.pipeline.cache.store import start_cache, write_head
from dskd.pipeline.cache.writer import ExampleRows, ShardLayout, ShardWriter


def synthetic_rows(n_examples: int, D: int, V: int, hidden_dtype: str, top_k: int,
                   seed: int = 0, head: np.ndarray | None = None
                   ) -> tuple[list[ExampleRows], list[np.ndarray]]:
    """Examples with random ids/texts and per-token fields shaped like a real teacher's: the
    log-probs are those of ``hidden @ head.T`` and the tail is the mass outside the top-k, as
    `cache verify` checks. Without a head: random float32 logits and a tail of -0.5, bit for bit
    what the stored version-1 fixture (data/v1-cache) was written from.
    Returns the rows and each example's float32 hidden states (before encoding)."""
    rng = np.random.default_rng(seed)
    rows, hiddens = [], []
    for i in range(n_examples):
        n = int(rng.integers(2, 40))
        prompt_len = int(rng.integers(1, n))
        ids = rng.integers(0, V, n).astype(np.int32)
        h = rng.standard_normal((n - 1, D)).astype(np.float32) * 3
        codes, scale = encode_hidden(torch.from_numpy(h), hidden_dtype)
        if head is None:
            logits = rng.standard_normal((n - 1, V)).astype(np.float32)
        else:
            logits = (h @ head.T).astype(np.float64)
        lse = np.log(np.exp(logits).sum(-1))
        order = np.argsort(-logits, axis=1, kind="stable")[:, :top_k]
        if head is None:
            tail = np.full(n - 1, -0.5, np.float32)
        else:  # the mass outside the top-k, summed directly
            rest = logits.copy()
            np.put_along_axis(rest, order, -np.inf, 1)
            tail = np.log(np.exp(rest - lse[:, None]).sum(-1))
        tok = {
            "hidden": codes_to_numpy(codes, hidden_dtype),
            "lse": lse.astype(np.float32),
            "tail_logprob": tail.astype(np.float32),
            "next_logprob": (logits[np.arange(n - 1), ids[1:]] - lse).astype(np.float32),
        }
        if scale is not None:
            tok["hidden_scale"] = scale.numpy()
        if top_k:
            tok["topk_ids"] = order.astype(np.int32)
            tok["topk_logprobs"] = (np.take_along_axis(logits, order, 1) - lse[:, None]).astype(np.float32)
        text_p, text_r = f"prompt {i} ✓", f"response {i}"
        offsets = [(min(k, len(text_p + text_r)), min(k + 1, len(text_p + text_r))) for k in range(n)]
        rows.append(ExampleRows(f"ex{i:04d}", i, text_p, text_r, ids.tolist(), prompt_len, offsets, tok))
        hiddens.append(h)
    return rows, hiddens


def build_synthetic_cache(out: Path, n_examples: int = 23, shard_size: int = 5, D: int = 16,
                          V: int = 50, hidden_dtype: str = "fp16", top_k: int = 4,
                          commit: list[int] | None = None, seed: int = 0,
                          topk_logprobs: str | None = None):
    """Start a cache, commit shards (all, or only ``commit``), finalize when all are there.
    ``topk_logprobs``: None keeps the version-1 top-k storage (int32 ids, float32 log-probs);
    q8/fp16/fp32 uses the narrowest ids for V, as cache-teacher does."""
    topk = spec.V1_TOPK if topk_logprobs is None else spec.TopkStorage.for_vocab(V, topk_logprobs)
    g = torch.Generator().manual_seed(seed)
    # scaled so that logits = hidden @ head.T have std ~1, like a real teacher's log-probs
    head = {spec.HEAD_WEIGHT: torch.randn(V, D, generator=g) / (3 * D ** 0.5)}
    rows, hiddens = synthetic_rows(n_examples, D, V, hidden_dtype, top_k, seed,
                                   head[spec.HEAD_WEIGHT].numpy())
    head_info = write_head(out, head, {"logit_scale": 1.0, "tied_embeddings": True})
    ranges = spec.shard_ranges(n_examples, shard_size)
    layout = {"n_examples": n_examples, "shard_size": shard_size, "n_shards": len(ranges),
              "hidden_dtype": hidden_dtype, "hidden_storage": str(spec.HIDDEN_STORAGE[hidden_dtype]),
              "top_k": top_k, "hidden_size": D, "vocab_size": V,
              **(topk.layout_keys() if topk_logprobs else {}),
              "token_fields": [f.name for f in spec.token_fields(hidden_dtype, top_k, topk)],
              "checksum": spec.CHECKSUM}
    fps = {"format_version": spec.FORMAT_VERSION, "dataset": f"synthetic-{seed}", "top_k": top_k}
    m = start_cache(out, fps, {"name": "synthetic"}, layout, head_info)
    lay = ShardLayout.from_manifest(m)
    for si in (range(len(ranges)) if commit is None else commit):
        a, b = ranges[si]
        w = ShardWriter(out, si, (a, b), lay, fsync=False)
        for r in reversed(rows[a:b]):  # any order is fine; the writer sorts by index
            w.add(r)
        w.commit()
    finalize(out)
    return rows, hiddens


@pytest.fixture
def synthetic_cache(tmp_path):
    """(cache dir, rows, float32 hidden states) of a complete 23-example, 5-shard cache."""
    out = tmp_path / "cache"
    rows, hiddens = build_synthetic_cache(out)
    return out, rows, hiddens


@pytest.fixture
def make_cache(tmp_path):
    """build_synthetic_cache(tmp_path / name, **kwargs) -> (dir, rows, hiddens)."""
    def make(name: str = "cache", **kwargs):
        out = tmp_path / name
        rows, hiddens = build_synthetic_cache(out, **kwargs)
        return out, rows, hiddens

    return make


@pytest.fixture
def rows_of():
    """synthetic_rows itself, for tests that rebuild the rows a cache was written from."""
    return synthetic_rows
