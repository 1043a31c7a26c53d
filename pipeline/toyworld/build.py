"""Write a whole toy world (data, two tokenizer families, tiny models) to one directory.

Layout under `root`::

    toyworld.json                 what was built (written last; its presence = complete world)
    data/{train,valid,test}.jsonl Dolly schema + `references` (see tasks.py)
    tokenizers/{bpe,unigram}/     HF fast tokenizers (see vocab.py)
    models/teacher/               Llama, bpe vocab           (the teacher)
    models/student/               Llama, bpe vocab           (same-vocab student)
    models/student_gpt2/          GPT-2, bpe vocab           (same-vocab student, other arch)
    models/student_xvocab/        GPT-2, unigram vocab       (cross-vocab student)

Presets (params for seed 0, whose vocabularies are bpe 1872 / unigram 1024; bpe is ~1.9k for
other seeds, and unigram can land below 1024 where the trainer's pruning overshoots):

    preset  train/valid/test  teacher (Llama, bpe)            students (D=128, tied embeddings)
    tiny     600/100/100      D=256 L=2 ff=512  4 heads 2.27M  L=2 ff=256 2 heads 0.46–0.57M
    small   3000/300/300      D=256 L=4 ff=768  4 heads 4.37M  L=3 ff=384 2 heads 0.69–0.88M

Texts are ~17 bpe / ~28 unigram tokens on average (instruction + context + response, max ~56).
A build takes about a second on 2 CPU cores (plus ~2 s to import transformers).

Tokenizers are trained on a preset-independent sample of 2000 generated examples, so `tiny`
and `small` worlds of one seed share vocabularies. The models are random-init: a quickstart
fine-tunes the teacher on `train` before caching it. Same seed → byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dskd.pipeline.data import DSKD_TEMPLATE, DSKD_TEMPLATE_WITH_INPUT
from dskd.pipeline.toyworld.models import ModelSpec, build_model
from dskd.pipeline.toyworld.tasks import make_splits, toy_examples
from dskd.pipeline.toyworld.vocab import train_tokenizer
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

FORMAT = "dskd-toyworld"
VERSION = 2  # bump when generated content changes, so old worlds get rebuilt
MANIFEST = "toyworld.json"
TOKENIZER_CORPUS_EXAMPLES = 2000
TEMPLATE_TEXTS = [DSKD_TEMPLATE.format(instruction=""),
                  DSKD_TEMPLATE_WITH_INPUT.format(instruction="", input="")]
TEMPLATE_REPEATS = 300
MAX_POSITIONS = 512


@dataclass(frozen=True)
class Preset:
    sizes: dict[str, int]  # split name -> rows
    vocab: dict[str, int]  # tokenizer family -> target vocab size
    models: dict[str, tuple[ModelSpec, str]]  # model name -> (spec, tokenizer family)


def _students(layers: int, ff: int) -> dict[str, tuple[ModelSpec, str]]:
    return {
        "student": (ModelSpec("llama", 128, layers, ff, tie_embeddings=True), "bpe"),
        "student_gpt2": (ModelSpec("gpt2", 128, layers, ff, tie_embeddings=True), "bpe"),
        "student_xvocab": (ModelSpec("gpt2", 128, layers, ff, tie_embeddings=True), "unigram"),
    }


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        sizes={"train": 600, "valid": 100, "test": 100},
        vocab={"bpe": 2048, "unigram": 1024},
        models={"teacher": (ModelSpec("llama", 256, 2, 512), "bpe"), **_students(2, 256)},
    ),
    "small": Preset(
        sizes={"train": 3000, "valid": 300, "test": 300},
        vocab={"bpe": 2048, "unigram": 1024},
        models={"teacher": (ModelSpec("llama", 256, 4, 768), "bpe"), **_students(3, 384)},
    ),
}


@dataclass(frozen=True)
class ToyWorld:
    """Absolute paths of a built toy world."""

    root: Path
    seed: int
    preset: str
    train: Path
    valid: Path
    test: Path
    tokenizers: dict[str, Path]  # "bpe", "unigram"
    teacher: Path  # Llama, bpe
    student: Path  # Llama, bpe (same vocab as teacher)
    student_gpt2: Path  # GPT-2, bpe
    student_xvocab: Path  # GPT-2, unigram (cross-vocab)

    @classmethod
    def load(cls, root: Path) -> ToyWorld:
        """Read `root/toyworld.json` of a complete world."""
        root = Path(root).resolve()
        info = _read_manifest(root)
        if info is None:
            raise FileNotFoundError(
                f"{root / MANIFEST}: no complete toy world here; build it with build_toy_world"
            )
        models = {name: root / m["path"] for name, m in info["models"].items()}
        return cls(
            root=root,
            seed=info["seed"],
            preset=info["preset"],
            **{name: root / s["path"] for name, s in info["splits"].items()},
            tokenizers={fam: root / t["path"] for fam, t in info["tokenizers"].items()},
            **models,
        )


def _read_manifest(root: Path) -> dict | None:
    try:
        info = json.loads((root / MANIFEST).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    return info if isinstance(info, dict) and info.get("format") == FORMAT else None


def _is_built(root: Path, seed: int, preset: str) -> bool:
    info = _read_manifest(root)
    return info is not None and (info.get("version"), info.get("seed"), info.get("preset")) == (
        VERSION,
        seed,
        preset,
    )


def _model_seed(seed: int, name: str) -> int:
    """A distinct, stable torch seed per model, so the students don't share init streams."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:6], "big")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _corpus_text(row: dict) -> str:
    return "\n".join([str(row["instruction"]), str(row["context"]), *row["references"]])


@contextmanager
def _quiet_hf():
    """Hide transformers' per-save progress bars; a build is a few saves of tiny files."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _token_stats(tokenizer_dir: Path, rows: list[dict]) -> dict[str, float]:
    """Tokens per example (instruction + context + response), to size max lengths downstream."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = [f"{r['instruction']}\n{r['context']}\n{r['response']}" for r in rows]
    lens = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    return {"mean": round(sum(lens) / len(lens), 2), "max": max(lens)}


def _build_into(tmp: Path, seed: int, preset_name: str) -> None:
    preset = PRESETS[preset_name]
    info: dict = {"format": FORMAT, "version": VERSION, "seed": seed, "preset": preset_name}

    splits = make_splits(preset.sizes, seed)
    info["splits"] = {}
    for name, rows in splits.items():
        _write_jsonl(tmp / "data" / f"{name}.jsonl", rows)
        info["splits"][name] = {"path": f"data/{name}.jsonl", "rows": len(rows)}

    corpus = [_corpus_text(r) for r in toy_examples(TOKENIZER_CORPUS_EXAMPLES, seed)]
    # Real tokenizers know the words of the prompt template; without this the toy ones split the
    # DSKD template into ~90 pieces, 5x the example itself, and training time goes to boilerplate.
    corpus += TEMPLATE_TEXTS * TEMPLATE_REPEATS
    info["tokenizers"] = {}
    for family, vocab_size in preset.vocab.items():
        out = tmp / "tokenizers" / family
        tok = train_tokenizer(family, corpus, vocab_size, out, MAX_POSITIONS)
        info["tokenizers"][family] = {
            "path": f"tokenizers/{family}",
            "vocab_size": len(tok),
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
            "train_tokens": _token_stats(out, splits["train"]),
        }

    info["models"] = {}
    for name, (spec, family) in preset.models.items():
        out = tmp / "models" / name
        params = build_model(spec, tmp / "tokenizers" / family, out, _model_seed(seed, name))
        info["models"][name] = {
            "path": f"models/{name}",
            "arch": spec.arch,
            "tokenizer": family,
            "hidden": spec.hidden,
            "layers": spec.layers,
            "heads": spec.heads,
            "intermediate": spec.intermediate,
            "tie_embeddings": spec.tie_embeddings,
            "params": params,
        }
    # Last write: a world without this file is incomplete by definition.
    (tmp / MANIFEST).write_text(json.dumps(info, indent=2) + "\n")


def build_toy_world(out_dir: Path, seed: int = 0, preset: str = "tiny") -> ToyWorld:
    """Build (or reuse) the toy world for (seed, preset) at `out_dir`; takes a few seconds.

    Reuses an existing world with the same seed, preset and version. Replaces an older or
    different toy world (everything in it is regenerable), but refuses a non-empty directory
    that is not a toy world. Builds in a sibling temp dir and renames it into place, so a killed
    build never leaves a world that looks complete.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown toy-world preset {preset!r}; choose one of {sorted(PRESETS)}")
    root = Path(out_dir).resolve()
    if _is_built(root, seed, preset):
        return ToyWorld.load(root)
    if root.is_dir() and any(root.iterdir()) and _read_manifest(root) is None:
        raise FileExistsError(
            f"{root} is not empty and holds no {MANIFEST}; refusing to overwrite it. "
            "Pass an empty or new directory for the toy world."
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
    try:
        with _quiet_hf():
            _build_into(tmp, seed, preset)
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        _move_into_place(tmp, root, seed, preset)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless something failed
    return ToyWorld.load(root)


def _move_into_place(tmp: Path, root: Path, seed: int, preset: str) -> None:
    try:
        os.replace(tmp, root)  # succeeds when root is missing or an empty dir
        return
    except OSError:
        if _is_built(root, seed, preset):
            return  # a concurrent build of the same world won the race
    # root holds another toy world: move it aside, swap ours in, then delete the old one.
    old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
    os.replace(root, old / "world")
    os.replace(tmp, root)
    shutil.rmtree(old, ignore_errors=True)
