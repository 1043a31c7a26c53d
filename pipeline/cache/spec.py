"""The cache format in one place: version, file names, fields and their dtypes.

Everything a reader needs to know without reading the writer. docs/cache-format.md is the prose
version of this file; keep the two in step.

Layout of a cache directory::

    manifest.json            format version, fingerprints, committed shards (the index)
    head.safetensors         LM head (+ bias), input embeddings: hidden → logits
    commits/shard-00000.json one record per committed shard (the manifest's journal)
    shards/shard-00000/      one shard = a Zarr v3 group (per-token arrays) + examples.arrow
    locks/                   writer locks (flock), config.yaml (the stage's resolved config)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

FORMAT_NAME = "dskd-teacher-cache"
FORMAT_VERSION = 1

MANIFEST = "manifest.json"
HEAD_FILE = "head.safetensors"
SHARDS_DIR = "shards"
COMMITS_DIR = "commits"
LOCKS_DIR = "locks"
TMP_DIR = "tmp"
EXAMPLES_FILE = "examples.arrow"

# Per-file checksum: CRC-32C (Castagnoli), hardware-accelerated and the one Zarr's shard index
# uses; it detects corruption and truncation (not tampering). Recorded as 8 lowercase hex digits.
CHECKSUM = "crc32c"


class CacheError(ValueError):
    """A cache that cannot be used as asked; the message names the dir, shard or field and the fix."""

HiddenDtype = Literal["fp16", "bf16", "fp8"]
HIDDEN_DTYPES: tuple[str, ...] = ("fp16", "bf16", "fp8")
# How each hidden dtype is stored in Zarr (which has neither bf16 nor fp8):
#   fp16: float16 values; bf16: the raw bf16 bits as uint16; fp8: e4m3fn bits as uint8, times a
#   per-token float32 scale in `hidden_scale`.
HIDDEN_STORAGE = {"fp16": np.dtype("<f2"), "bf16": np.dtype("<u2"), "fp8": np.dtype("u1")}
FP8_MAX = 448.0  # largest finite float8_e4m3fn

# Head tensor names in head.safetensors.
HEAD_WEIGHT = "lm_head.weight"  # (V, D_t)
HEAD_BIAS = "lm_head.bias"  # (V,), only when the model has one
EMBED_WEIGHT = "embed_tokens.weight"  # (V_in, D_t), input embeddings (cross-model attention)


@dataclass(frozen=True)
class TokenField:
    """One per-token Zarr array: rows are model-input positions (row k predicts s[k+1])."""

    name: str
    dtype: np.dtype
    per_k: bool = False  # second axis of length top_k
    per_d: bool = False  # second axis of length D_t (hidden size)
    doc: str = ""


def token_fields(hidden_dtype: str, top_k: int) -> list[TokenField]:
    """The per-token arrays of a shard, for this hidden dtype and k (k = 0 drops the top-k pair)."""
    fields = [TokenField("hidden", HIDDEN_STORAGE[hidden_dtype], per_d=True,
                         doc="last-layer hidden state = input of the LM head (post final norm)")]
    if hidden_dtype == "fp8":
        fields.append(TokenField("hidden_scale", np.dtype("<f4"),
                                 doc="per-token scale: hidden = fp8(bits) * scale"))
    if top_k > 0:
        fields += [
            TokenField("topk_ids", np.dtype("<i4"), per_k=True, doc="top-k token ids, by logit desc"),
            TokenField("topk_logprobs", np.dtype("<f4"), per_k=True, doc="log p of topk_ids (T=1)"),
        ]
    fields += [
        TokenField("lse", np.dtype("<f4"), doc="log-sum-exp of the logits (T=1)"),
        TokenField("tail_logprob", np.dtype("<f4"),
                   doc="log of the probability mass outside the top-k (-inf when none)"),
        TokenField("next_logprob", np.dtype("<f4"), doc="log p of the observed next token s[k+1]"),
    ]
    return fields


# CSR offsets per example: rows of example j are token_offsets[j]:token_offsets[j+1].
TOKEN_OFFSETS = "token_offsets"
TOKEN_OFFSETS_DTYPE = np.dtype("<i8")

# Columns of examples.arrow, one row per example, in dataset order.
EXAMPLE_COLUMNS = (
    "example_id",  # string: pipeline.data Example.id
    "index",  # int64: position of the example in the (limited) dataset
    "prompt",  # string: rendered prompt text
    "response",  # string: response text
    "input_ids",  # list<int32>: s = prompt_ids + response_ids + [eos] (n tokens)
    "prompt_len",  # int32
    "response_mask",  # list<bool>: token k of s is a response token (k >= prompt_len)
    "offsets",  # list<int32>: 2n ints, (start, end) char span of each token in prompt+response
    "n_tokens",  # int32: n
)

# Target bytes of one Zarr inner chunk: big enough for fast whole-shard writes, small enough that
# random access to one example reads little more than that example.
CHUNK_BYTES = 4 << 20


def chunk_rows(row_bytes: int, n_rows: int | None = None) -> int:
    """Rows per inner chunk for an array of ``n_rows`` rows of ``row_bytes`` each: at most
    CHUNK_BYTES, and split evenly so the last (zero-padded) chunk wastes fewer than one row per
    chunk."""
    most = max(1, CHUNK_BYTES // max(1, row_bytes))
    if n_rows is None:
        return most
    n_chunks = max(1, -(-n_rows // most))
    return max(1, -(-n_rows // n_chunks))


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def shard_ranges(n_examples: int, shard_size: int) -> list[tuple[int, int]]:
    """Example ranges [start, end) of each shard. Fixed by example index, never by timing, so
    any number of ranks or workers (and any resume) produces the same shards."""
    return [(s, min(s + shard_size, n_examples)) for s in range(0, n_examples, shard_size)]


def shards_for_worker(n_shards: int, worker: int, num_workers: int) -> list[int]:
    """Round-robin: worker w writes shards w, w + W, w + 2W, ..."""
    return list(range(worker, n_shards, num_workers))
