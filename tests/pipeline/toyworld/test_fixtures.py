"""The shared fixtures in tests/conftest.py that every test file may rely on."""

from __future__ import annotations

import os

import torch


def test_shared_dir_holds_the_shared_material(shared_dir):
    assert (shared_dir / "tokenizers" / "gpt2").is_dir()
    assert (shared_dir / "golden").is_dir()


def test_session_runs_offline_on_few_threads():
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    assert torch.get_num_threads() <= 2


def test_toy_world_fixture_is_the_tiny_seed0_world(toy_world):
    assert (toy_world.seed, toy_world.preset) == (0, "tiny")
    assert (toy_world.root / "toyworld.json").is_file()
