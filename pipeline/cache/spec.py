"""The cache format in one place: version, file names, fields and their dtypes.

Everything a reader needs to know without reading the writer. docs/cache-format.md is the prose
version of this file; keep the two in step.

Layout of a cache directory::

    manifest.json            format version, fingerprints, committed shards (the index)
    head.safetensors         LM head (+ bias), input embeddings: hidden → logits
    tokenizer/               the teacher's tokenizer files (pipeline/cache/tokenizer.py)
    commits/shard-00000.json one record per committed shard (the manifest's journal)
    shards/shard-00000/      one shard = a Zarr v3 group (per-token arrays) + examples.arrow
    locks/                   writer locks (flock), config.yaml (the stage's resolved config)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

FORMAT_NAME = "dskd-teacher-cache"
# 2: compact top-k (uint16 ids, q8/fp16 log-probs) and sampled targets; version-1 caches (int32
# ids, float32 log-probs) are still read: their layout simply lacks the version-2 keys.
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)

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


# How top-k log-probs are stored: q8 = one byte per log-prob (sqrt-of-gap code, see topk.py),
# fp16, or fp32 (version 1).
TOPK_LOGPROB_DTYPES: tuple[str, ...] = ("q8", "fp16", "fp32")
Q8_PAD = 255  # q8 code of a -inf log-prob (padding); finite log-probs use codes 0..254


@dataclass(frozen=True)
class TopkStorage:
    """How a cache stores its top-k: ``id_bits`` 32 = int32 ids (version 1); 16 = uint16 ids;
    > 16 = uint16 low bits plus the high ``id_bits - 16`` bits of every id bit-packed per row in
    ``topk_ids_hi`` (as Megatron's 17-bit ids, but byte-aligned per row so decoding is two numpy
    ops). ``logprobs``: one of TOPK_LOGPROB_DTYPES."""

    id_bits: int = 32
    logprobs: str = "fp32"

    @classmethod
    def for_vocab(cls, vocab_size: int, logprobs: str = "q8") -> TopkStorage:
        """The narrowest ids the vocabulary allows (uint16 up to 65,536 ids)."""
        if logprobs not in TOPK_LOGPROB_DTYPES:
            raise ValueError(f"unknown top-k log-prob dtype {logprobs!r}; choose one of "
                             f"{TOPK_LOGPROB_DTYPES}")
        return cls(max(16, int(vocab_size - 1).bit_length()), logprobs)

    @classmethod
    def from_layout(cls, layout: dict) -> TopkStorage:
        """A manifest's layout; caches without the keys (version 1) are int32 + float32."""
        return cls(int(layout.get("topk_id_bits", 32)), layout.get("topk_logprob_dtype", "fp32"))

    def layout_keys(self) -> dict:
        return {"topk_id_bits": self.id_bits, "topk_logprob_dtype": self.logprobs}

    @property
    def hi_bits(self) -> int:
        return 0 if self.id_bits in (16, 32) else self.id_bits - 16

    def hi_bytes(self, top_k: int) -> int:
        """Bytes per row of ``topk_ids_hi``."""
        return -(-top_k * self.hi_bits // 8)


V1_TOPK = TopkStorage()  # int32 ids, float32 log-probs: also the form the writer is handed


@dataclass(frozen=True)
class TokenField:
    """One per-token Zarr array: rows are model-input positions (row k predicts s[k+1])."""

    name: str
    dtype: np.dtype
    per_k: bool = False  # second axis of length top_k
    per_d: bool = False  # second axis of length D_t (hidden size)
    doc: str = ""
    width: int = 0  # a fixed second axis of this length (when not per_k / per_d)
    ragged: bool = False  # one entry per sampled id, not per token row (see sampled_n)

    def shape(self, n_rows: int, hidden_size: int, top_k: int) -> tuple[int, ...]:
        """Array shape for a shard of ``n_rows`` token rows (ragged fields: n_rows = entries)."""
        return (n_rows,) + ((hidden_size,) if self.per_d else (top_k,) if self.per_k
                            else (self.width,) if self.width else ())


def layout_fields(layout: dict) -> list[TokenField]:
    """The stored per-token arrays of a cache, from its manifest's layout (any version)."""
    return token_fields(layout["hidden_dtype"], layout["top_k"], TopkStorage.from_layout(layout),
                        int(layout.get("sampled_targets", 0)), int(layout["vocab_size"]))


def sampled_dtypes(n_samples: int, vocab_size: int) -> tuple[np.dtype, np.dtype]:
    """(id dtype, count dtype) of sampled targets: uint16 ids up to 65,536 ids, else int32 (few
    unique ids per row, so packing their high bits would save little); uint8 counts up to 255
    samples, else uint16."""
    return (np.dtype("<u2" if vocab_size <= 1 << 16 else "<i4"),
            np.dtype("u1" if n_samples <= 255 else "<u2"))


def input_fields(hidden_dtype: str, top_k: int, sampled: int = 0) -> list[TokenField]:
    """What a shard writer is handed per example: the version-1 top-k (int32 ids, float32
    log-probs) and sampled targets as (n - 1, N) int32 ids and counts, zero counts padding."""
    fields = token_fields(hidden_dtype, top_k)
    if sampled:
        fields += [TokenField("sampled_ids", np.dtype("<i4"), width=sampled),
                   TokenField("sampled_counts", np.dtype("<i4"), width=sampled)]
    return fields


def token_fields(hidden_dtype: str, top_k: int, topk: TopkStorage = V1_TOPK, sampled: int = 0,
                 vocab_size: int = 0) -> list[TokenField]:
    """The stored per-token arrays of a shard, for this hidden dtype, k, top-k storage and
    number of sampled draws per row (0 drops the top-k / sampled arrays)."""
    fields = [TokenField("hidden", HIDDEN_STORAGE[hidden_dtype], per_d=True,
                         doc="last-layer hidden state = input of the LM head (post final norm)")]
    if hidden_dtype == "fp8":
        fields.append(TokenField("hidden_scale", np.dtype("<f4"),
                                 doc="per-token scale: hidden = fp8(bits) * scale"))
    if top_k > 0:
        fields.append(TokenField("topk_ids", np.dtype("<i4" if topk.id_bits == 32 else "<u2"),
                                 per_k=True, doc="top-k token ids, by logit desc (low 16 bits "
                                 "when topk_ids_hi exists)"))
        if topk.hi_bits:
            fields.append(TokenField("topk_ids_hi", np.dtype("u1"), width=topk.hi_bytes(top_k),
                                     doc="high id bits, bit-packed per row (big-endian bits)"))
        lp = {"fp32": "<f4", "fp16": "<f2", "q8": "u1"}[topk.logprobs]
        fields.append(TokenField("topk_logprobs", np.dtype(lp), per_k=True,
                                 doc="log p of topk_ids (T=1), stored per topk_logprob_dtype"))
        if topk.logprobs == "q8":
            fields.append(TokenField("topk_logprob_bounds", np.dtype("<f2"), width=2,
                                     doc="q8: (first, last finite) log-prob of the row"))
    if sampled > 0:
        id_dt, count_dt = sampled_dtypes(sampled, vocab_size)
        fields += [
            TokenField("sampled_n", count_dt, doc="number of distinct sampled ids of the row"),
            TokenField("sampled_ids", id_dt, ragged=True,
                       doc="distinct ids drawn, rows after rows, ascending within a row"),
            TokenField("sampled_counts", count_dt, ragged=True,
                       doc="times each id was drawn (a row's counts sum to sampled_targets)"),
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
