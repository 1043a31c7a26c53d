"""The teacher's tokenizer, kept in the cache: a cache copied to another machine stands on its own.

MinED (and anything else that must decode teacher token ids) needs the teacher's tokenizer, not
its weights. `cache-teacher` copies the tokenizer files (a few MB at most) into ``CACHE/tokenizer/``
before the manifest exists, and records them in the manifest's ``tokenizer`` entry. Caches
written before that fall back to the teacher directory the manifest names, if it is still there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from .fingerprint import TOKENIZER_FILES, tokenizer_fingerprint
from .manifest import hash_file
from .spec import CHECKSUM, TMP_DIR, CacheError

TOKENIZER_DIR = "tokenizer"
# config.json too: AutoTokenizer reads the model type there when tokenizer_config.json names no
# tokenizer class, and dskd's tokenizer loader wants a model-dir-shaped directory.
_EXTRA_FILES = ("config.json",)


def write_tokenizer(cache_dir: str | Path, tokenizer_dir: str | Path,
                    teacher_dir: str | Path) -> dict[str, Any]:
    """Copy the tokenizer files of ``tokenizer_dir`` (config.json from it, else from the teacher)
    into CACHE/tokenizer/, whole or not at all (temp dir, then rename); return the manifest entry."""
    cache_dir, src = Path(cache_dir), Path(tokenizer_dir)
    files = {n: src / n for n in TOKENIZER_FILES if (src / n).is_file()}
    for n in _EXTRA_FILES:
        for d in (src, Path(teacher_dir)):
            if (d / n).is_file():
                files[n] = d / n
                break
    tmp = cache_dir / TMP_DIR / f"{TOKENIZER_DIR}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, f in files.items():
        shutil.copyfile(f, tmp / name)
    dest = cache_dir / TOKENIZER_DIR
    shutil.rmtree(dest, ignore_errors=True)  # a start that died before its manifest left it
    os.replace(tmp, dest)
    return {"dir": TOKENIZER_DIR,
            "files": {n: {"bytes": (dest / n).stat().st_size, CHECKSUM: hash_file(dest / n)}
                      for n in sorted(files)}}


def check_tokenizer_files(cache_dir: str | Path, manifest: dict[str, Any],
                          checksums: bool = True) -> list[str]:
    """Problems with the stored tokenizer files (none for a cache written without them)."""
    rec = manifest.get("tokenizer")
    if not rec:
        return []
    d = Path(cache_dir) / rec["dir"]
    problems = []
    for name, info in rec["files"].items():
        f = d / name
        if not f.is_file():
            problems.append(f"{name}: missing")
        elif f.stat().st_size != info["bytes"]:
            problems.append(f"{name}: size {f.stat().st_size}, manifest says {info['bytes']}")
        elif checksums and hash_file(f) != info[CHECKSUM]:
            problems.append(f"{name}: {CHECKSUM} mismatch (file corrupted or replaced)")
    return problems


def teacher_tokenizer_dir(cache_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """The directory to load the cache's teacher tokenizer from: the cache's own copy, or, for a
    cache written without one, the teacher directory it names. Either must hold the tokenizer
    the cache was made with (its fingerprint), or CacheError says what to do."""
    from .remote import open_cache_location

    cache_dir = open_cache_location(cache_dir)  # a store URL: its view (tokenizer included)
    want = manifest["fingerprints"].get("tokenizer")
    if manifest.get("tokenizer"):
        bad = check_tokenizer_files(cache_dir, manifest)
        if bad:
            raise CacheError(f"{cache_dir}: the teacher tokenizer stored in the cache is damaged "
                             f"({TOKENIZER_DIR}/: {'; '.join(bad)}); rebuild the cache with "
                             "`dskd cache-teacher ... --overwrite`")
        return cache_dir / manifest["tokenizer"]["dir"]
    path = manifest.get("teacher", {}).get("path")
    if not path or not Path(path).is_dir():
        raise CacheError(
            f"{cache_dir} holds no copy of the teacher's tokenizer (it was written by an older "
            f"dskd), and the teacher directory it names, {path!r}, is not on this machine. Put "
            "the teacher directory (its tokenizer files are enough) at that path, or rebuild the "
            "cache with this dskd, which stores the tokenizer in the cache")
    try:
        got = tokenizer_fingerprint(path)
    except FileNotFoundError as e:
        raise CacheError(f"{cache_dir}: the teacher directory it names has no tokenizer ({e})") from None
    if want is not None and got != want:
        raise CacheError(
            f"{cache_dir}: the tokenizer in the teacher directory {path} (fingerprint {got}) is not "
            f"the one the cache was made with ({want}; was --tokenizer given to cache-teacher?). "
            "Rebuild the cache with this dskd, which stores the tokenizer in the cache")
    return Path(path)
