"""Write a whole toy world (data, three tokenizer families, tiny models) to one directory.

Layout under `root`::

    toyworld.json                 what was built (written last; its presence = complete world)
    data/{train,valid,test}.jsonl Dolly schema + `references` + true `probs` (see tasks.py)
    data/teacher_train.jsonl      teacher-only pretraining rows + train (presets with `pretrain`)
    tokenizers/{bpe,spbpe,unigram}/  HF fast tokenizers (see vocab.py)
    models/teacher/               Llama, bpe vocab           (the teacher)
    models/student/               Llama, bpe vocab           (same-vocab student)
    models/student_gpt2/          GPT-2, bpe vocab           (same-vocab student, other arch)
    models/student_xvocab/        Llama, spbpe vocab         (cross-vocab student, same arch)
    models/student_unigram/       GPT-2, unigram vocab       (cross-vocab stress variant)

Presets (train/valid/test rows; `pretrain` rows only the teacher sees):

    preset    pretrain  train/valid/test  teacher (Llama, bpe)     students (L=2 ff=256, tied)
    tiny             0     600/100/100    D=256 L=2 ff=512 2.27M   D=128 (2 heads) 0.43–0.57M
    small         5000     300/200/200    D=128 L=2 ff=512 1.0M    D=64 (1 head)  0.19–0.25M
    evidence     20000     300/300/300    D=128 L=2 ff=512 1.0M    D=64 (1 head)  0.19–0.25M

The teacher's edge in small/evidence is what it has seen (~70x the students' rows) and 4x the
parameters; both are sized so the whole evidence run fits 2 CPU cores.

`small` and `evidence` mimic the paper's regime: a teacher that knows much more than the small
distillation split it shares with the students. Their valid/test prompts are a tenth of the
prompt space each (split by prompt, not row), so test prompts are unseen and varied.

Every build checks the realistic cross-vocab pair against the teacher's tokenizer on the train
responses (label tokens incl. eos: `spbpe`/`bpe` ratio in [1.05, 1.3]; boundary agreement, the
Jaccard index of token end offsets, ≥ 0.7) and records both numbers for every family.

Tokenizers are trained on a preset-independent sample of 2000 generated examples, so worlds of
one seed share vocabularies. The models are random-init: a quickstart fine-tunes the teacher on
`teacher_train` before caching it. Same seed → byte-identical files.
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

from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from dskd.pipeline.data import DSKD_TEMPLATE, DSKD_TEMPLATE_WITH_INPUT
from dskd.pipeline.toyworld.models import ModelSpec, build_model
from dskd.pipeline.toyworld.tasks import make_splits, toy_examples
from dskd.pipeline.toyworld.vocab import train_tokenizer

FORMAT = "dskd-toyworld"
VERSION = 3  # bump when generated content changes, so old worlds get rebuilt
MANIFEST = "toyworld.json"
TOKENIZER_CORPUS_EXAMPLES = 2000
TEMPLATE_TEXTS = [DSKD_TEMPLATE.format(instruction=""),
                  DSKD_TEMPLATE_WITH_INPUT.format(instruction="", input="")]
TEMPLATE_REPEATS = 300
MAX_POSITIONS = 512


TEACHER_FAMILY = "bpe"
REALISTIC_PAIR = "spbpe"  # checked at build time against TEACHER_FAMILY
LABEL_TOKEN_RATIO = (1.05, 1.3)
MIN_BOUNDARY_AGREEMENT = 0.7
VOCAB = {"bpe": 2048, "spbpe": 1152, "unigram": 1024}


@dataclass(frozen=True)
class Preset:
    sizes: dict[str, int]  # split name -> rows; "pretrain" = teacher-only rows
    models: dict[str, tuple[ModelSpec, str]]  # model name -> (spec, tokenizer family)
    prompt_shares: dict[str, float] | None = None  # split -> share of prompts (default: sizes)


def _students(hidden: int, layers: int, ff: int) -> dict[str, tuple[ModelSpec, str]]:
    return {
        "student": (ModelSpec("llama", hidden, layers, ff, tie_embeddings=True), "bpe"),
        "student_gpt2": (ModelSpec("gpt2", hidden, layers, ff, tie_embeddings=True), "bpe"),
        "student_xvocab": (ModelSpec("llama", hidden, layers, ff, tie_embeddings=True), "spbpe"),
        "student_unigram": (ModelSpec("gpt2", hidden, layers, ff, tie_embeddings=True), "unigram"),
    }


_PAPER_SHARES = {"pretrain": 0.6, "train": 0.2, "valid": 0.1, "test": 0.1}
PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        sizes={"train": 600, "valid": 100, "test": 100},
        models={"teacher": (ModelSpec("llama", 256, 2, 512), "bpe"), **_students(128, 2, 256)},
    ),
    "small": Preset(
        sizes={"pretrain": 5000, "train": 300, "valid": 200, "test": 200},
        models={"teacher": (ModelSpec("llama", 128, 2, 512), "bpe"), **_students(64, 2, 256)},
        prompt_shares=_PAPER_SHARES,
    ),
    "evidence": Preset(
        sizes={"pretrain": 20000, "train": 300, "valid": 300, "test": 300},
        models={"teacher": (ModelSpec("llama", 128, 2, 512), "bpe"), **_students(64, 2, 256)},
        prompt_shares=_PAPER_SHARES,
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
    teacher_train: Path  # teacher-only pretraining rows + train (= train without a pretrain split)
    tokenizers: dict[str, Path]  # "bpe", "spbpe", "unigram"
    teacher: Path  # Llama, bpe
    student: Path  # Llama, bpe (same vocab as teacher)
    student_gpt2: Path  # GPT-2, bpe
    student_xvocab: Path  # Llama, spbpe (cross-vocab, realistic granularity)
    student_unigram: Path  # GPT-2, unigram (cross-vocab stress variant)

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


def fresh_student(world: ToyWorld, name: str, seed: int, out_dir: Path) -> Path:
    """A new random init of the world's model `name` under `seed` (paired-seed experiments:
    each seed's students start from their own init). Reused when already written."""
    spec, family = PRESETS[world.preset].models[name]
    out_dir = Path(out_dir)
    if not (out_dir / "model.safetensors").is_file():
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        with _quiet_hf():
            build_model(spec, world.tokenizers[family], tmp, _model_seed(seed, f"{name}:init"))
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    return out_dir


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


def _ends(tok, texts: list[str]) -> list[list[int]]:
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return [[e for _, e in offs] for offs in enc]


def pair_granularity(teacher_dir: Path, other_dir: Path, responses: list[str]) -> dict[str, float]:
    """How `other` segments responses against the teacher's tokenizer.

    label_token_ratio: label tokens (response + eos) of `other` / of the teacher;
    boundary_agreement: Jaccard index of the two sets of token end offsets, pooled.
    Real pairs on these responses: GPT-2/Qwen2 1.12 and 0.82, GPT-2/Mistral 1.24 and 0.77.
    """
    t_tok, o_tok = AutoTokenizer.from_pretrained(teacher_dir), AutoTokenizer.from_pretrained(other_dir)
    t_ends, o_ends = _ends(t_tok, responses), _ends(o_tok, responses)
    both = union = 0
    for a, b in zip(t_ends, o_ends):
        both += len(set(a) & set(b))
        union += len(set(a) | set(b))
    n = len(responses)  # + eos per response
    ratio = (sum(map(len, o_ends)) + n) / (sum(map(len, t_ends)) + n)
    return {"label_token_ratio": round(ratio, 4), "boundary_agreement": round(both / union, 4)}


def _check_realistic_pair(stats: dict[str, float], family: str) -> None:
    lo, hi = LABEL_TOKEN_RATIO
    ratio, agree = stats["label_token_ratio"], stats["boundary_agreement"]
    if not (lo <= ratio <= hi and agree >= MIN_BOUNDARY_AGREEMENT):
        raise RuntimeError(
            f"toy world: tokenizer {family!r} vs the teacher's has label-token ratio {ratio} "
            f"(needs [{lo}, {hi}]) and boundary agreement {agree} (needs ≥ "
            f"{MIN_BOUNDARY_AGREEMENT}); change VOCAB[{family!r}] in toyworld/build.py"
        )


def _build_into(tmp: Path, seed: int, preset_name: str) -> None:
    preset = PRESETS[preset_name]
    info: dict = {"format": FORMAT, "version": VERSION, "seed": seed, "preset": preset_name}

    splits = make_splits(preset.sizes, seed, preset.prompt_shares)
    pretrain = splits.pop("pretrain", [])
    info["splits"] = {}
    for name, rows in splits.items():
        _write_jsonl(tmp / "data" / f"{name}.jsonl", rows)
        info["splits"][name] = {"path": f"data/{name}.jsonl", "rows": len(rows)}
    if pretrain:  # the teacher trains on its own rows and on the students' distillation rows
        _write_jsonl(tmp / "data" / "teacher_train.jsonl", pretrain + splits["train"])
        info["splits"]["teacher_train"] = {"path": "data/teacher_train.jsonl",
                                           "rows": len(pretrain) + len(splits["train"]),
                                           "teacher_only_rows": len(pretrain)}
    else:
        info["splits"]["teacher_train"] = dict(info["splits"]["train"])

    corpus = [_corpus_text(r) for r in toy_examples(TOKENIZER_CORPUS_EXAMPLES, seed)]
    # Real tokenizers know the words of the prompt template; without this the toy ones split the
    # DSKD template into ~90 pieces, 5x the example itself, and training time goes to boilerplate.
    corpus += TEMPLATE_TEXTS * TEMPLATE_REPEATS
    info["tokenizers"] = {}
    for family, vocab_size in VOCAB.items():
        out = tmp / "tokenizers" / family
        tok = train_tokenizer(family, corpus, vocab_size, out, MAX_POSITIONS)
        info["tokenizers"][family] = {
            "path": f"tokenizers/{family}",
            "vocab_size": len(tok),
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
            "train_tokens": _token_stats(out, splits["train"]),
        }
    responses = [r["response"] for r in splits["train"]]
    for family in VOCAB:
        if family != TEACHER_FAMILY:
            stats = pair_granularity(tmp / "tokenizers" / TEACHER_FAMILY,
                                     tmp / "tokenizers" / family, responses)
            info["tokenizers"][family]["vs_teacher"] = stats
    _check_realistic_pair(info["tokenizers"][REALISTIC_PAIR]["vs_teacher"], REALISTIC_PAIR)

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
