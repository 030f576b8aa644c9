"""Repository locks, stored as objects under ``locks/`` so that they work on any backend.

Backups and mounts take a *shared* lock; prune and garbage collection take the *exclusive* one. Taking a lock
writes our lock object first and then lists the others: a shared lock gives way to an exclusive one and an
exclusive lock gives way to anything, so two processes racing never both go ahead (at worst both back off and
retry). A lock whose process is gone (same host, no such pid) or that was not refreshed for ``STALE_AFTER``
seconds is stale and is removed by whoever finds it; a ``kill -9`` therefore never blocks the repository for long.

A lock object that is not a lock record (not JSON, not an object, fields of the wrong type) is no one's lock: it is
removed and reported in one line, never a reason to fail. A process that fails while taking a lock removes its own
lock object before the error leaves.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

from vbfs.errors import LockError, ObjectMissing, VbfsError
from vbfs.store.backend import Backend, host_id, process_alive

STALE_AFTER = 1800.0
REFRESH_EVERY = 300.0
SHARED = "shared"
EXCLUSIVE = "exclusive"


def parse_lock(raw: bytes) -> dict[str, Any] | None:
    """A lock record, or None when ``raw`` is not one (then it is no one's lock)."""
    try:
        info = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(info, dict) or info.get("kind") not in (SHARED, EXCLUSIVE):
        return None
    pid, when, host = info.get("pid"), info.get("time"), info.get("host")
    if type(pid) is not int or not 0 < pid < 2**31 or not isinstance(host, str) or len(host) > 255:
        return None
    if not isinstance(when, int | float) or isinstance(when, bool) or not 0 <= when < 2**40:
        return None
    if not isinstance(info.get("hostid", ""), str):
        return None
    return info


class RepositoryLock:
    def __init__(self, backend: Backend, kind: str, warn: Callable[[str], None] | None = None):
        assert kind in (SHARED, EXCLUSIVE)
        self.backend = backend
        self.kind = kind
        self.name = f"locks/{kind}-{secrets.token_hex(8)}"
        self.warn = warn or (lambda message: None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps(
            {
                "kind": self.kind,
                "host": socket.gethostname(),
                "hostid": host_id(),
                "pid": os.getpid(),
                "time": time.time(),
            }
        ).encode()

    def _others(self) -> list[tuple[str, dict[str, Any]]]:
        out = []
        dead = 0
        for name in self.backend.list("locks/"):
            if name == self.name:
                continue
            try:
                raw = self.backend.get(name)
            except ObjectMissing:
                continue
            info = parse_lock(raw)
            if info is None:
                self.backend.delete(name)
                self.warn(f"removed {name}: it is not a lock record (damaged)")
                continue
            if self._stale(info):
                self.backend.delete(name)
                dead += 1
                continue
            out.append((name, info))
        if dead:
            self.warn(f"removed {dead} lock(s) of processes that are gone")
        return out

    @staticmethod
    def _stale(info: dict[str, Any]) -> bool:
        same_host = info["hostid"] == host_id() if info.get("hostid") else info["host"] == socket.gethostname()
        if same_host and not process_alive(info["pid"]):
            return True
        return time.time() - float(info["time"]) > STALE_AFTER

    def acquire(self, timeout: float = 0.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.backend.put(self.name, self._record())
                conflicts = [
                    info for _n, info in self._others() if self.kind == EXCLUSIVE or info["kind"] == EXCLUSIVE
                ]
            except BaseException:
                with suppress(Exception):
                    self.backend.delete(self.name)
                raise
            if not conflicts:
                break
            self.backend.delete(self.name)
            if time.monotonic() >= deadline:
                who = conflicts[0]
                raise LockError(
                    f"the repository is locked ({who['kind']} lock held by pid {who['pid']} on "
                    f"{who['host'][:64]}); try again when that operation has finished"
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
def locked(
    backend: Backend, kind: str, timeout: float = 0.0, warn: Callable[[str], None] | None = None
) -> Iterator[RepositoryLock]:
    lock = RepositoryLock(backend, kind, warn)
    lock.acquire(timeout)
    try:
        yield lock
    finally:
        lock.release()
