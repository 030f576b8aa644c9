"""Named crash points for crash-safety tests.

A test sets ``VBFS_FAILPOINT=<name>`` (or ``<name>:<n>``, a number, to fire on the n-th pass) and the process
kills itself with SIGKILL when it reaches that point, exactly as an administrator's ``kill -9`` would end it.
With the variable unset a failpoint costs one environment lookup.
"""

from __future__ import annotations

import os
import signal
import threading

_counts: dict[str, int] = {}
_lock = threading.Lock()


def failpoint(name: str) -> None:
    spec = os.environ.get("VBFS_FAILPOINT")
    if not spec:
        return
    want, _, nth = spec.rpartition(":")
    if not nth.isdigit():
        want, nth = spec, "1"
    if want != name:
        return
    with _lock:
        _counts[name] = _counts.get(name, 0) + 1
        hit = _counts[name]
    if hit >= int(nth):
        os.kill(os.getpid(), signal.SIGKILL)
