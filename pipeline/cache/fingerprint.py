"""Fingerprints: short hashes that say whether a cache was made from these inputs.

They decide whether a rerun may resume a cache (same fingerprints) or must be refused (any field
differs). Computed from files and texts only, so this module knows nothing of models.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt",
                    "tokenizer.model", "chat_template.jinja", "chat_template.json")
_SAMPLES = 64
_SAMPLE_BYTES = 64 << 10


def _h(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def config_fingerprint(model_dir: str | Path) -> str:
    """The model's config.json, canonicalized (key order and tool-version fields ignored)."""
    p = Path(model_dir) / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: teacher has no config.json; pass a HF model directory")
    cfg = {k: v for k, v in json.loads(p.read_text()).items() if k not in _VOLATILE_CONFIG_KEYS}
    return _h(json.dumps(cfg, sort_keys=True).encode())


def weights_fingerprint(model_dir: str | Path) -> str:
    """Names, sizes and sampled content of every weight file.

    Sampled, not a full hash: hashing a 140 GB checkpoint would cost minutes on every run. Each
    file contributes its first and last 64 KiB, 64 evenly spaced 64 KiB blocks and its size;
    safetensors headers (tensor names, shapes, offsets) sit in the first block. Any fine-tune
    rewrites nearly every byte, so it changes the samples."""
    files = sorted(p for p in Path(model_dir).iterdir()
                   if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no weight files (*.safetensors, *.bin) found")
    h = hashlib.sha256()
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.name}\0{size}\0".encode())
        with open(p, "rb") as f:
            offsets = {0, max(0, size - _SAMPLE_BYTES)}
            offsets |= {i * max(0, size - _SAMPLE_BYTES) // _SAMPLES for i in range(_SAMPLES)}
            for off in sorted(offsets):
                h.update(os.pread(f.fileno(), _SAMPLE_BYTES, off))
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer_dir: str | Path) -> str:
    """Every tokenizer file present (vocab, merges, special tokens, chat template)."""
    d = Path(tokenizer_dir)
    found = [d / n for n in TOKENIZER_FILES if (d / n).is_file()]
    if not found:
        raise FileNotFoundError(f"{d}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
    h = hashlib.sha256()
    for p in found:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def dataset_fingerprint(examples: Iterable[tuple[str, str, str]]) -> str:
    """(id, prompt, response) of every example, in order: the exact texts the cache will hold."""
    h = hashlib.sha256()
    for eid, prompt, response in examples:
        for s in (eid, prompt, response):
            b = s.encode("utf-8")
            h.update(len(b).to_bytes(8, "little") + b)  # length-prefixed: no ambiguity
    return h.hexdigest()[:16]


def vocab_fingerprint(tokenizer: object) -> str:
    """What turns text into ids, from a loaded fast tokenizer: model (vocabulary, merges),
    normalizer, pre-tokenizer, added tokens, EOS id. Equal fingerprints tokenize any text to the
    same ids, even when the files differ in bytes (a re-saved tokenizer_config.json, a student
    of the teacher's family)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())  # type: ignore[attr-defined]
    keep = {k: spec.get(k) for k in ("model", "normalizer", "pre_tokenizer")}
    keep["added_tokens"] = sorted((t["id"], t["content"]) for t in spec.get("added_tokens") or [])
    keep["eos"] = getattr(tokenizer, "eos_token_id", None)
    return _h(json.dumps(keep, sort_keys=True).encode())
