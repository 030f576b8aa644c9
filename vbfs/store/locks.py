"""Repository locks, stored as objects under ``locks/`` so that they work on any backend.

Backups, mounts and restores take a *shared* lock. Forgetting snapshots and marking what they reference takes
the *gc* lock, which shares the repository with shared locks but not with another gc or an exclusive lock;
deleting chunks takes the *exclusive* one, which shares it with nothing. Taking a lock writes our lock object
first and then lists the others: a lock gives way to any lock it conflicts with (:func:`conflicts`), so two
processes racing never both go ahead (at worst both back off and retry). A lock whose process is gone (same host,
no such pid) or that was not refreshed for ``STALE_AFTER`` seconds is stale and is removed by whoever finds it; a
``kill -9`` therefore never blocks the repository for long.

A holder whose lock is lost (its refresh found the lock object removed because another process judged it stale,
or it went unrefreshed for ``STALE_AFTER - REFRESH_EVERY`` seconds: a stopped process, unreachable storage) is
told by :meth:`RepositoryLock.check`, which raises :class:`LockLost`. A write session checks before each batch
lands and before its manifest, so a backup that was stopped long enough for a garbage collection to go ahead
stops instead of committing a snapshot that may name deleted chunks.

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
GC = "gc"
EXCLUSIVE = "exclusive"
KINDS = (SHARED, GC, EXCLUSIVE)


def conflicts(a: str, b: str) -> bool:
    """Whether locks of kinds ``a`` and ``b`` cannot be held at once."""
    return EXCLUSIVE in (a, b) or a == b == GC


class LockLost(LockError):
    """This process's lock was removed or could not be kept: it must stop writing."""


def parse_lock(raw: bytes) -> dict[str, Any] | None:
    """A lock record, or None when ``raw`` is not one (then it is no one's lock)."""
    try:
        info = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(info, dict) or info.get("kind") not in KINDS:
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
    def __init__(
        self,
        backend: Backend,
        kind: str,
        warn: Callable[[str], None] | None = None,
        mine: frozenset[str] = frozenset(),
    ):
        assert kind in KINDS
        self.backend = backend
        self.kind = kind
        self.name = f"locks/{kind}-{secrets.token_hex(8)}"
        self.warn = warn or (lambda message: None)
        self.mine = mine
        """Names of this process's other locks, which this one does not give way to (gc taking exclusive)."""
        self.lost: str | None = None
        """Why this lock is lost, once it is."""
        self._refreshed = time.monotonic()
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
            if name == self.name or name in self.mine:
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
                found = [info for _n, info in self._others() if conflicts(self.kind, info["kind"])]
            except BaseException:
                with suppress(Exception):
                    self.backend.delete(self.name)
                raise
            if not found:
                break
            self.backend.delete(self.name)
            if time.monotonic() >= deadline:
                who = found[0]
                raise LockError(
                    f"the repository is locked ({who['kind']} lock held by pid {who['pid']} on "
                    f"{who['host'][:64]}); try again when that operation has finished (--lock-wait SECONDS waits; "
                    "vbfs break-lock removes a lock whose process is gone on another machine)"
                )
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
        self._refreshed = time.monotonic()
        self._thread = threading.Thread(target=self._refresh, name="vbfs-lock-refresh", daemon=True)
        self._thread.start()

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_EVERY):
            self.refresh()

    def refresh(self) -> None:
        """Write the lock record again, unless it was removed meanwhile (then the lock is lost)."""
        if self.lost:
            return
        try:
            if not self.backend.exists(self.name):
                self.lost = f"its lock {self.name} was removed by another process (judged stale)"
                return
            self.backend.put(self.name, self._record())
            self._refreshed = time.monotonic()
        except VbfsError as exc:
            if time.monotonic() - self._refreshed > STALE_AFTER - REFRESH_EVERY:
                self.lost = f"its lock could not be refreshed for {STALE_AFTER - REFRESH_EVERY:.0f} s ({exc})"

    def check(self, ask: bool = False) -> None:
        """Raise :class:`LockLost` when this lock is lost; with ``ask``, look at the lock object first."""
        if ask and not self.lost:
            try:
                if not self.backend.exists(self.name):
                    self.lost = f"its lock {self.name} was removed by another process (judged stale)"
            except VbfsError:
                pass
        if not self.lost and time.monotonic() - self._refreshed > STALE_AFTER - REFRESH_EVERY:
            self.lost = f"its lock was not refreshed for {STALE_AFTER - REFRESH_EVERY:.0f} s"
        if self.lost:
            raise LockLost(
                f"stopped: {self.lost}; another process may have deleted chunks meanwhile, so nothing more is "
                "written (run the operation again)"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.backend.delete(self.name)


@contextmanager
def locked(
    backend: Backend,
    kind: str,
    timeout: float = 0.0,
    warn: Callable[[str], None] | None = None,
    mine: frozenset[str] = frozenset(),
) -> Iterator[RepositoryLock]:
    lock = RepositoryLock(backend, kind, warn, mine)
    lock.acquire(timeout)
    try:
        yield lock
    finally:
        lock.release()


def describe_locks(backend: Backend) -> list[dict[str, Any]]:
    """Every lock object: its name, kind, host, pid, age in seconds and ``state``: ``running`` (a live process on
    this host), ``gone`` (no such process on this host), ``stale`` (not refreshed for ``STALE_AFTER``),
    ``elsewhere`` (another host's, refreshed lately: this host cannot tell whether it still runs) or ``damaged``."""
    out: list[dict[str, Any]] = []
    for name in backend.list("locks/"):
        try:
            raw = backend.get(name)
        except ObjectMissing:
            continue
        info = parse_lock(raw)
        if info is None:
            out.append({"name": name, "state": "damaged"})
            continue
        same_host = info["hostid"] == host_id() if info.get("hostid") else info["host"] == socket.gethostname()
        age = max(0.0, time.time() - float(info["time"]))
        if same_host:
            state = "running" if process_alive(info["pid"]) else "gone"
        else:
            state = "stale" if age > STALE_AFTER else "elsewhere"
        out.append(
            {"name": name, "kind": info["kind"], "host": info["host"], "pid": info["pid"], "age": age, "state": state}
        )
    return out


def break_locks(backend: Backend, include_running: bool = False) -> list[dict[str, Any]]:
    """Remove the lock objects of other processes (those of live processes on this host only with
    ``include_running``); the locks removed, as :func:`describe_locks` gives them. A holder whose lock is removed
    stops at its next check (:class:`LockLost`)."""
    removed = []
    for lock in describe_locks(backend):
        if lock["state"] == "running" and (not include_running or lock["pid"] == os.getpid()):
            continue
        with suppress(ObjectMissing):
            backend.delete(lock["name"])
        removed.append(lock)
    if removed:
        backend.flush()
    return removed
