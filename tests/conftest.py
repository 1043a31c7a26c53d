"""Shared pytest fixtures: the tiny toy world (built once per session) and the shared/ folder."""

from __future__ import annotations

import os
from pathlib import Path

# Before anything imports transformers/tokenizers: never reach for the Hub, and keep the
# tokenizers' rayon pool off (it warns and can deadlock after fork in DataLoader workers).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest
import torch

torch.set_num_threads(2)  # the CI machine has 2 cores, shared by the whole suite

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory: pytest.TempPathFactory):
    """The `tiny` toy world for seed 0 (data, bpe/unigram tokenizers, teacher and students).

    Built once per session (~1 s); treat it as read-only, copy anything you need to modify.
    """
    from dskd.pipeline.toyworld import build_toy_world  # lazy: most tests never need transformers

    return build_toy_world(tmp_path_factory.mktemp("toyworld"), seed=0, preset="tiny")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared material (real tokenizers, golden vectors, data): $DSKD_SHARED_DIR or ../shared."""
    env = os.environ.get("DSKD_SHARED_DIR")
    path = Path(env) if env else REPO_ROOT.parent / "shared"
    if not path.is_dir():
        pytest.fail(
            f"shared material not found at {path}: set DSKD_SHARED_DIR or place shared/ beside the repo"
        )
    return path
