"""Checkpoints a run can continue from: atomic, keep-last-K plus the best, newest-complete lookup.

Layout of one checkpoint (``RUN_DIR/checkpoints/step-000120/``)::

    student/                 HF save_pretrained (safetensors) + tokenizer; LoRA: the adapter
    projectors.safetensors   the loss module's parameters (projectors), maybe empty
    optimizer.pt             full (un-sharded) optimizer state, keyed by parameter name
    trainer.json             step, data position, schedule, best metric, config, per-rank positions
    rng.pt                   RNG states of every rank (python, numpy, torch, cuda) as tensors

A checkpoint is written under ``.tmp-step-…`` and renamed into place as a whole, so a directory
named ``step-N`` is always complete; a crash mid-save leaves only a temp dir, removed next time.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pickle
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..failpoints import failpoint

CKPT_SUBDIR = "checkpoints"
_PREFIX = "step-"
_TMP = ".tmp-"
TRAINER_FILE = "trainer.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used to resume; the message names it."""


class RunLockedError(RuntimeError):
    """Another live process is training into this run dir."""


def lock_run_dir(run_dir: str | os.PathLike, orphan_wait_s: float = 60.0) -> int:
    """Hold an exclusive flock on RUN_DIR/.lock for this process's life (the kernel drops it when
    the process dies, SIGKILL included, so a crash never leaves a stale lock). Returns the fd.

    DataLoader workers forked by a killed run share its lock until they notice their parent is
    gone (a few seconds); when the pid in the lock file is dead we wait for them, not refuse.
    """
    path = Path(run_dir) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + orphan_wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if _holder_alive(path) or time.monotonic() > deadline:
                os.close(fd)
                raise RunLockedError(f"--out {run_dir} is locked by another running `dskd distill` "
                                     f"({path}); wait for it, or give another --out") from None
            time.sleep(0.5)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _holder_alive(lock_file: Path) -> bool:
    try:
        pid = int(lock_file.read_text().strip() or 0)
        os.kill(pid, 0)
        return pid > 0
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # alive, owned by someone else
        return True


def checkpoint_name(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temp dirs of interrupted saves are ignored)."""
    root = Path(run_dir) / CKPT_SUBDIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith(_PREFIX) and (p / TRAINER_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def new_temp_dir(parent: Path, name: str) -> Path:
    """An empty temp dir beside the final one (same filesystem, so the rename is atomic)."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f"{_TMP}{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def publish_dir(tmp: Path, final: Path) -> Path:
    """Rename a finished temp dir to its final name, replacing an older one of that name."""
    old = None
    if final.exists():
        old = final.with_name(f"{_TMP}old-{final.name}-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale_temps(parent: Path) -> None:
    """Temp dirs left by a save that crashed (any pid) are garbage."""
    if parent.is_dir():
        for p in parent.iterdir():
            if p.name.startswith(_TMP):
                shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain numbers only, so a checkpoint loads with
    torch.load(weights_only=True): no pickled Python objects (numpy's state is an ndarray)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- save / load


def write_checkpoint(
    ckpt_dir: Path,
    *,
    save_student: Any,
    projectors: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    trainer: dict[str, Any],
    rng: list[dict[str, Any]],
) -> None:
    """Fill an (empty, temp) checkpoint dir. `save_student(dir)` writes the HF student there."""
    save_student(ckpt_dir / "student")
    failpoint("checkpoint.mid_write")  # student written, optimizer and trainer state not yet
    # safetensors refuses shared storage; projectors never share, but clone keeps that true.
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in projectors.items()},
              str(ckpt_dir / "projectors.safetensors"))
    torch.save(optimizer, ckpt_dir / "optimizer.pt")
    torch.save(rng, ckpt_dir / "rng.pt")
    # Every file's size and CRC-32C, so a resume never starts from a changed or truncated byte.
    trainer = {**trainer, "files": _file_sums(ckpt_dir)}
    # trainer.json last: list_checkpoints() also requires it (belt and braces over the rename).
    (ckpt_dir / TRAINER_FILE).write_text(json.dumps(trainer, indent=2, default=str) + "\n")


def _sum(p: Path) -> dict[str, Any]:
    from ..cache.manifest import hash_file

    return {"bytes": p.stat().st_size, "crc32c": hash_file(p)}


def _file_sums(ckpt_dir: Path) -> dict[str, dict[str, Any]]:
    return {p.relative_to(ckpt_dir).as_posix(): _sum(p)
            for p in sorted(ckpt_dir.rglob("*")) if p.is_file() and p.name != TRAINER_FILE}


def verify_checkpoint(ckpt_dir: Path, files: dict[str, dict[str, Any]]) -> None:
    """Raise CheckpointError naming the first file whose size or checksum changed."""
    for rel, want in files.items():
        now = ckpt_dir / rel
        if not now.is_file() or _sum(now) != want:
            raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: {rel} is "
                                  f"{'missing' if not now.is_file() else 'changed or truncated'}; "
                                  "delete this checkpoint to resume from the one before")


def save_checkpoint(run_dir: str | os.PathLike, step: int, **parts: Any) -> Path:
    """Write checkpoint `step` atomically (temp dir + rename); see write_checkpoint for parts."""
    root = Path(run_dir) / CKPT_SUBDIR
    remove_stale_temps(root)
    tmp = new_temp_dir(root, checkpoint_name(step))
    try:
        write_checkpoint(tmp, **parts)
    except BaseException as e:
        # torch.save reports a full disk as a RuntimeError ("unexpected pos"): name it for what it is
        full = not isinstance(e, OSError) and shutil.disk_usage(root).free < (1 << 20)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise OSError(errno.ENOSPC, f"No space left on device ({type(e).__name__}: {e})",
                          str(tmp)) from e
        raise
    return publish_dir(tmp, root / checkpoint_name(step))


def load_checkpoint(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """trainer state, projector tensors, optimizer state and per-rank RNG of one checkpoint."""
    d = Path(ckpt_dir)
    try:
        trainer = json.loads((d / TRAINER_FILE).read_text())
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {d} is unreadable ({TRAINER_FILE}: {type(e).__name__}: "
                              f"{e}); delete it to resume from the one before") from None
    verify_checkpoint(d, trainer.get("files", {}))
    try:
        projectors = load_file(str(d / "projectors.safetensors"))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types
        raise CheckpointError(f"checkpoint {d} is unreadable (projectors.safetensors: "
                              f"{type(e).__name__}: {e}); delete it to resume from the one before") from None
    return {"trainer": trainer, "projectors": projectors,
            "optimizer": _load_tensors(d / "optimizer.pt"), "rng": _load_tensors(d / "rng.pt"),
            "student_dir": d / "student"}


def _load_tensors(path: Path) -> Any:
    """torch.load with weights_only=True: tensors and plain data only. A file holding any other
    pickled object (which could run code while loading) is refused, not executed."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {path.parent}: {path.name} holds pickled Python objects, not only tensors "
            f"and plain data ({first}). dskd never unpickles them on resume, since loading such a "
            "file can run arbitrary code; a checkpoint written by dskd holds none. Delete this "
            "checkpoint (or the run) unless you know where it came from") from None
    except Exception as e:  # noqa: BLE001 - truncated zip, bad magic, ...
        raise CheckpointError(f"checkpoint {path.parent} is unreadable ({path.name}: "
                              f"{type(e).__name__}: {e}); delete it to resume from the one before") from None


# --------------------------------------------------------------------------- retention


def best_info(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    p = Path(run_dir) / CKPT_SUBDIR / "best.json"
    return json.loads(p.read_text()) if p.is_file() else None


def mark_best(run_dir: str | os.PathLike, step: int, metric: str, value: float) -> None:
    root = Path(run_dir) / CKPT_SUBDIR
    info = {"step": step, "checkpoint": checkpoint_name(step), "metric": metric, "value": value}
    tmp = root / f"{_TMP}best.json"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, root / "best.json")


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints, never the best one; returns deleted."""
    if keep_last <= 0:
        return []
    found = list_checkpoints(run_dir)
    best = best_info(run_dir)
    keep = {p.name for p in found[-keep_last:]} | ({best["checkpoint"]} if best else set())
    deleted = []
    for p in found:
        if p.name not in keep:
            # Rename first so a crash mid-delete never leaves a half checkpoint with a real name.
            doomed = p.with_name(f"{_TMP}del-{p.name}")
            os.replace(p, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            deleted.append(p)
    return deleted
