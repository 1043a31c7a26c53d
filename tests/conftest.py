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


@pytest.fixture
def torchrun_two_nodes():
    """Run `torchrun ... ARGS` as two nodes on this machine: two agents (each `--nnodes 2
    --nproc-per-node N`) meeting through a c10d rendezvous on 127.0.0.1, as on a cluster.
    Returns a function (args, env, nproc=1) that waits for both and fails with their stderr."""
    import socket
    import subprocess
    import sys
    import uuid

    def launch(args: list[str], env: dict[str, str], nproc: int = 1, timeout: int = 900) -> None:
        with socket.socket() as s:  # a free port for the rendezvous store
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", uuid.uuid4().hex[:8],
               *args]
        nodes = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
        try:
            outs = [p.communicate(timeout=timeout) for p in nodes]
        finally:
            for p in nodes:
                if p.poll() is None:
                    p.kill()
        for p, (_, err) in zip(nodes, outs):
            assert p.returncode == 0, err[-3000:]

    return launch


# --------------------------------------------------------------------------- object storage

S3_SECRET = "dskd-test-secret-0123456789abcdef"  # fake; tests grep outputs for it


@pytest.fixture(scope="session")
def moto_endpoint():
    """A real S3-compatible server (moto's server mode) on 127.0.0.1, on a free port."""
    import logging
    import socket

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(moto_endpoint, monkeypatch, tmp_path):
    """A fresh bucket on the local S3 server, reached the way users reach S3: credentials and
    endpoint in the standard AWS variables (fake ones), nothing passed in code. Gives
    (bucket URL, an s3fs filesystem); store views go to tmp_path. Closes every s3fs session
    after the test."""
    import uuid

    import s3fs

    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "dskd-test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)
    monkeypatch.setenv("DSKD_STORE_CACHE", str(tmp_path / "store-views"))
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    bucket = f"dskd-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    yield f"s3://{bucket}", fs
    _close_s3fs(fs)


def _close_s3fs(*extra) -> None:
    """Close the client sessions of the test's s3fs filesystems (its own and the cached ones the
    code under test made), then forget them. Left to garbage collection, s3fs closes a session
    with a 0.1 s timeout that a busy machine misses, and aiohttp logs "Unclosed client session"."""
    import s3fs
    from fsspec.asyn import sync

    for fs in {id(f): f for f in (*extra, *s3fs.S3FileSystem._cache.values())}.values():
        client = getattr(fs, "_s3", None)
        if client is not None:
            fs._s3 = None
            sync(fs.loop, client.__aexit__, None, None, None)
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def gcs_endpoint(tmp_path_factory):
    """A GCS emulator (gcp-storage-emulator, pure Python, in memory) on 127.0.0.1, reached the
    way users reach an emulator: STORAGE_EMULATOR_HOST. Skips when it or gcsfs is not installed.
    gcsfs's bucket-type probe (a gRPC control-plane call the emulator does not serve, retried for
    a minute) is turned off with GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false, read when gcsfs is
    first imported, so it is set before."""
    import socket

    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    server_mod = pytest.importorskip("gcp_storage_emulator.server")
    pytest.importorskip("gcsfs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    read_data = server_mod._read_data

    def read_data_exactly(handler, query):  # see _multipart_related
        ctype = handler.headers.get("Content-Type") or ""
        if not ctype.startswith("multipart/related"):
            return read_data(handler, query)
        raw = server_mod._decode_raw_data(server_mod._read_raw_data(handler), handler)
        return _multipart_related(raw, ctype)

    server_mod._read_data = read_data_exactly
    server = server_mod.create_server("127.0.0.1", port, in_memory=True)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()
    server_mod._read_data = read_data


def _multipart_related(raw: bytes, ctype: str) -> dict:
    """A GCS multipart upload (JSON metadata, then the object) split exactly at its boundaries.
    The emulator parses it with the email package, which takes a CR before the closing
    delimiter for part of the line break, so an object whose last byte is 0x0D loses it (gcsfs
    separates parts with bare LF); real GCS keeps every byte."""
    import json

    boundary = b"--" + ctype.split("boundary=", 1)[1].strip('"').encode()
    parts = raw.split(boundary)[1:-1]
    eol = b"\r\n" if parts[0].startswith(b"\r\n") else b"\n"
    out = []
    for part in parts:
        head, _, body = part[len(eol):].partition(eol + eol)
        out.append((head.decode(), body[:-len(eol)]))
    part_type = next((h.split(":", 1)[1].strip() for h in out[1][0].split(eol.decode())
                      if h.lower().startswith("content-type:")), "application/octet-stream")
    return {"meta": json.loads(out[0][1]), "content": out[1][1], "content-type": part_type}


@pytest.fixture
def gcs(gcs_endpoint, monkeypatch, tmp_path):
    """A fresh bucket on the GCS emulator; returns (bucket URL, a gcsfs filesystem). Anonymous
    access (FSSPEC_GS_TOKEN=anon, as a user of an emulator would set it); store views go to
    tmp_path."""
    import uuid

    import fsspec.config
    import gcsfs

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_endpoint)
    monkeypatch.setenv("FSSPEC_GS_TOKEN", "anon")  # for subprocesses
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    monkeypatch.setitem(fsspec.config.conf, "gs", {"token": "anon"})  # read at fsspec's import
    monkeypatch.setenv("DSKD_STORE_CACHE", str(tmp_path / "store-views"))
    gcsfs.GCSFileSystem.clear_instance_cache()
    fs = gcsfs.GCSFileSystem(token="anon")
    bucket = f"dskd-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    return f"gs://{bucket}", fs
