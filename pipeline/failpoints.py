"""Named failpoints for fault-injection tests: SIGKILL this process at an exact place.

Storage systems test crash safety by dying at chosen points (FoundationDB's and TiKV's
failpoints); timing-based kills cannot hit "between the shard rename and its commit record" on
purpose. ``DSKD_FAILPOINTS="shard.renamed:2,checkpoint.mid_write:1"`` kills the process the 2nd
time ``shard.renamed`` is reached, and so on; ``shard.renamed:1:sleep=5`` pauses there for 5 s
instead; ``shard.renamed:1:wait=PATH`` creates ``PATH.reached`` there and pauses until PATH exists
(to hold a lock while a concurrency test runs a second process: no timing involved, the test
releases it). Unset (always, outside tests), a failpoint is a dict lookup.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

ENV = "DSKD_FAILPOINTS"
WAIT_LIMIT_S = 600.0  # a wait= failpoint whose test died does not hang the process forever
_hits: dict[str, int] = {}


def _armed() -> dict[str, tuple[int, str | None]]:
    spec = os.environ.get(ENV, "")
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, nth, *action = part.split(":", 2)
        out[name] = (int(nth or 1), action[0] if action else None)
    return out


def _pause_until(release: Path) -> None:
    Path(f"{release}.reached").touch()
    deadline = time.monotonic() + WAIT_LIMIT_S
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def failpoint(name: str) -> None:
    """Die with SIGKILL (no cleanup, no atexit, like the OOM killer) when armed for this hit."""
    if ENV not in os.environ:
        return
    armed = _armed().get(name)
    if armed is None:
        return
    nth, action = armed
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == nth:
        if action is None:
            os.kill(os.getpid(), signal.SIGKILL)
        elif action.startswith("wait="):
            _pause_until(Path(action.removeprefix("wait=")))
        else:
            time.sleep(float(action.removeprefix("sleep=")))
