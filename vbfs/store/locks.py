"""Repository locks, stored as objects under ``locks/`` so that they work on any backend.

Backups and mounts take a *shared* lock; prune and garbage collection take the *exclusive* one. Taking a lock
writes our lock object first and then lists the others: a shared lock gives way to an exclusive one and an
exclusive lock gives way to anything, so two processes racing never both go ahead (at worst both back off and
retry). A lock whose process is gone (same host, no such pid) or that was not refreshed for ``STALE_AFTER``
seconds is stale and is removed by whoever finds it; a ``kill -9`` therefore never blocks the repository for long.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from vbfs.errors import LockError, ObjectMissing, VbfsError
from vbfs.store.backend import Backend

STALE_AFTER = 1800.0
REFRESH_EVERY = 300.0
SHARED = "shared"
EXCLUSIVE = "exclusive"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RepositoryLock:
    def __init__(self, backend: Backend, kind: str):
        assert kind in (SHARED, EXCLUSIVE)
        self.backend = backend
        self.kind = kind
        self.name = f"locks/{kind}-{secrets.token_hex(8)}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps(
            {"kind": self.kind, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        ).encode()

    def _others(self) -> list[tuple[str, dict]]:
        out = []
        for name in self.backend.list("locks/"):
            if name == self.name:
                continue
            try:
                info = json.loads(self.backend.get(name))
            except (ObjectMissing, ValueError):
                continue
            if self._stale(info):
                self.backend.delete(name)
                continue
            out.append((name, info))
        return out

    @staticmethod
    def _stale(info: dict) -> bool:
        if info.get("host") == socket.gethostname() and not _alive(int(info.get("pid", 0))):
            return True
        return time.time() - float(info.get("time", 0)) > STALE_AFTER

    def acquire(self, timeout: float = 0.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.backend.put(self.name, self._record())
            conflicts = [info for _n, info in self._others() if self.kind == EXCLUSIVE or info.get("kind") == EXCLUSIVE]
            if not conflicts:
                break
            self.backend.delete(self.name)
            if time.monotonic() >= deadline:
                who = conflicts[0]
                raise LockError(
                    f"the repository is locked ({who.get('kind')} lock held by pid {who.get('pid')} on "
                    f"{who.get('host')}); try again when that operation has finished"
                )
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
        self._thread = threading.Thread(target=self._refresh, name="vbfs-lock-refresh", daemon=True)
        self._thread.start()

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_EVERY):
            with suppress(VbfsError):
                self.backend.put(self.name, self._record())

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.backend.delete(self.name)


@contextmanager
def locked(backend: Backend, kind: str, timeout: float = 0.0) -> Iterator[RepositoryLock]:
    lock = RepositoryLock(backend, kind)
    lock.acquire(timeout)
    try:
        yield lock
    finally:
        lock.release()
