"""Named failpoints for fault-injection tests: SIGKILL this process at an exact place.

Storage systems test crash safety by dying at chosen points (FoundationDB's and TiKV's
failpoints); timing-based kills cannot hit "between the shard rename and its commit record" on
purpose. ``DSKD_FAILPOINTS="shard.renamed:2,checkpoint.mid_write:1"`` kills the process the 2nd
time ``shard.renamed`` is reached, and so on; ``shard.renamed:1:sleep=5`` pauses there for 5 s
instead (to hold a lock while a concurrency test starts a second process). Unset (always, outside tests), a failpoint is a dict
lookup.
"""

from __future__ import annotations

import os
import signal
import time

ENV = "DSKD_FAILPOINTS"
_hits: dict[str, int] = {}


def _armed() -> dict[str, tuple[int, float | None]]:
    spec = os.environ.get(ENV, "")
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, nth, *action = part.split(":")
        sleep = float(action[0].removeprefix("sleep=")) if action else None
        out[name] = (int(nth or 1), sleep)
    return out


def failpoint(name: str) -> None:
    """Die with SIGKILL (no cleanup, no atexit, like the OOM killer) when armed for this hit."""
    if ENV not in os.environ:
        return
    armed = _armed().get(name)
    if armed is None:
        return
    nth, sleep = armed
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == nth:
        if sleep is not None:
            time.sleep(sleep)
        else:
            os.kill(os.getpid(), signal.SIGKILL)
