"""build_toy_world: deterministic, idempotent, atomic, and describes what it built."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dskd.pipeline.toyworld import PRESETS, ToyWorld, build_toy_world
from dskd.pipeline.toyworld import build as build_mod


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".building-" in p.name or ".old-" in p.name]


def test_world_has_every_piece(toy_world):
    w = toy_world
    assert (w.seed, w.preset) == (0, "tiny")
    for split, n in PRESETS["tiny"].sizes.items():
        assert getattr(w, split) == w.root / "data" / f"{split}.jsonl"
        assert len(_rows(getattr(w, split))) == n
    assert set(w.tokenizers) == {"bpe", "spbpe", "unigram"}
    assert w.teacher_train == w.train  # tiny has no teacher-only split
    models = [w.teacher, w.student, w.student_gpt2, w.student_xvocab, w.student_unigram]
    for path in [*w.tokenizers.values(), *models]:
        assert (path / "tokenizer.json").is_file()
    assert ToyWorld.load(w.root) == w


def test_manifest_describes_the_world(toy_world):
    info = json.loads((toy_world.root / "toyworld.json").read_text())
    assert (info["seed"], info["preset"]) == (0, "tiny")
    rows = {k: v["rows"] for k, v in info["splits"].items()}
    assert rows == {**PRESETS["tiny"].sizes, "teacher_train": PRESETS["tiny"].sizes["train"]}
    assert info["models"]["teacher"]["params"] > info["models"]["student"]["params"] > 0
    assert info["models"]["student_xvocab"]["tokenizer"] == "spbpe"
    # one student architecture for both vocabularies
    xv, sv = info["models"]["student_xvocab"], info["models"]["student"]
    assert {k: xv[k] for k in ("arch", "hidden", "layers", "intermediate")} == {
        k: sv[k] for k in ("arch", "hidden", "layers", "intermediate")}
    assert info["models"]["student_unigram"]["tokenizer"] == "unigram"
    for fam, t in info["tokenizers"].items():
        assert 10 <= t["train_tokens"]["mean"] <= 60, (
            fam
        )  # short texts: the tiny preset trains in seconds
        assert t["train_tokens"]["max"] <= 80, fam


def test_split_files_have_disjoint_prompts(toy_world):
    prompts = {
        s: {(r["instruction"], r["context"]) for r in _rows(getattr(toy_world, s))}
        for s in ("train", "valid", "test")
    }
    assert not prompts["train"] & (prompts["valid"] | prompts["test"])
    assert not prompts["valid"] & prompts["test"]


def test_same_seed_gives_byte_identical_files(toy_world, tmp_path):
    again = build_toy_world(tmp_path / "again", seed=0, preset="tiny")
    ours, theirs = _tree_hashes(toy_world.root), _tree_hashes(again.root)
    assert ours == theirs
    assert any(name.endswith("model.safetensors") for name in ours)


def test_same_seed_in_another_process_gives_byte_identical_files(toy_world, tmp_path):
    """Another process has other Python string hashes and Rust hash-map keys; nothing may leak."""
    root = tmp_path / "subprocess"
    code = f"from dskd.pipeline.toyworld import build_toy_world; build_toy_world({str(root)!r})"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    # a guard against a hung build, not a speed check: a loaded 2-core machine takes minutes
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=900)
    assert _tree_hashes(root) == _tree_hashes(toy_world.root)


def test_other_seed_gives_other_data_and_weights(toy_world, tmp_path):
    other = build_toy_world(tmp_path / "seed1", seed=1, preset="tiny")
    for rel in ("data/train.jsonl", "data/test.jsonl", "models/teacher/model.safetensors"):
        assert (other.root / rel).read_bytes() != (toy_world.root / rel).read_bytes(), rel


def test_rebuild_with_same_seed_reuses_the_world(toy_world):
    manifest = toy_world.root / "toyworld.json"
    before = manifest.stat().st_mtime_ns
    assert build_toy_world(toy_world.root, seed=0, preset="tiny") == toy_world
    assert manifest.stat().st_mtime_ns == before


def test_other_seed_or_preset_replaces_an_existing_toy_world(tmp_path):
    root = tmp_path / "world"
    build_toy_world(root, seed=1, preset="tiny")
    w = build_toy_world(root, seed=2, preset="small")
    info = json.loads((root / "toyworld.json").read_text())
    assert (info["seed"], info["preset"], w.seed) == (2, "small", 2)
    sizes = PRESETS["small"].sizes
    assert len(_rows(w.train)) == sizes["train"]
    # the paper's regime: the teacher sees its own rows, then the students' train rows
    teacher_rows = _rows(w.teacher_train)
    assert len(teacher_rows) == sizes["pretrain"] + sizes["train"]
    assert teacher_rows[sizes["pretrain"]:] == _rows(w.train)
    seen = {(r["instruction"], r["context"]) for r in teacher_rows}
    assert not seen & {(r["instruction"], r["context"]) for r in _rows(w.test)}
    assert info["models"]["teacher"]["params"] > info["models"]["student"]["params"]
    assert _leftovers(tmp_path) == []


def test_refuses_a_non_empty_directory_that_is_not_a_toy_world(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        build_toy_world(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_failed_build_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(build_mod, "build_model", boom)
    with pytest.raises(RuntimeError, match="killed mid-build"):
        build_toy_world(tmp_path / "world")
    assert not (tmp_path / "world").exists()
    assert _leftovers(tmp_path) == []


def test_unknown_preset_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="tiny"):
        build_toy_world(tmp_path, preset="huge")
