"""Limits on parsing guest data: sane maxima for sizes, and a time budget for every call into a parser.

A guest's filesystem is attacker-controlled. Sizes, counts and chains from it are checked against what contains
them (the constants below); what no check foresees is caught by time. Every call into a parser runs under a
:func:`budget`: when it is over, a watchdog thread raises :class:`ParseTimeout` in the thread that runs the
parser (``PyThreadState_SetAsyncExc``; the parsers are pure Python, so the exception arrives within a few
bytecodes), and :class:`~vbfs.guestfs.model.GuestFS` turns it into a :class:`GuestDataError` for that one request.

The exception is only ever raised inside the parser's own code: while the thread reads bytes from the store
(:func:`io_section`, used by the range readers) the watchdog leaves it alone and the reader checks the deadline
itself when the read returns, so chunk caches and locks of the store are never left half-updated. Arming and
disarming happen under one lock, and disarming clears an exception that was raised but not yet delivered.

The budget of one call is ``VBFS_PARSE_SECONDS`` (default 10 s); the walk that indexes a volume after a backup
has ``VBFS_INDEX_SECONDS`` (default 600 s) for the whole volume.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

LINK_MAX = 4096  # bytes of a symlink target (PATH_MAX of Linux; no filesystem here stores longer ones)
FOLDER_MAX_BYTES = 1 << 30  # the largest folder that is read (ext4 and XFS folders are files of entries)
FOLDER_MAX_ENTRIES = 1 << 20  # entries of one folder
FILE_SIZE_MAX = (1 << 63) - 1  # what st_size (a signed 64-bit off_t) can carry


def _seconds(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, ""))
    except ValueError:
        return default
    return value if value > 0 else default


def parse_seconds() -> float:
    """The time budget of one parser call (``VBFS_PARSE_SECONDS``)."""
    return _seconds("VBFS_PARSE_SECONDS", 10.0)


def index_seconds() -> float:
    """The time budget of indexing one volume (``VBFS_INDEX_SECONDS``)."""
    return _seconds("VBFS_INDEX_SECONDS", 600.0)


class ParseTimeout(BaseException):
    """A parser call ran past its budget (raised in the parser's thread by the watchdog, or by a range reader).

    Not an ``Exception``: a parser's own ``except Exception`` must not swallow it."""


class _Arm:
    __slots__ = ("deadline", "done", "fired", "io", "tid")

    def __init__(self, tid: int, deadline: float):
        self.tid = tid
        self.deadline = deadline
        self.io = 0  # > 0 while the thread reads from the store: no asynchronous exception then
        self.fired = False  # the watchdog raised (at most once per arming)
        self.done = False


# A plain lock for ``with``: a ``Condition`` takes it in a Python frame, where a timeout raised in the thread at
# that moment would leave it held for good (every parser call and the watchdog would then hang).
_lock = threading.Lock()
_wake = threading.Condition(_lock)  # the watchdog sleeps on it; arming wakes it
_armed: dict[int, _Arm] = {}
_local = threading.local()
_watchdog: threading.Thread | None = None


def _raise_in(tid: int, exc: type[BaseException] | None) -> None:
    """Raise ``exc`` in thread ``tid`` at its next bytecode, or clear a pending one (``None``)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), ctypes.py_object(exc) if exc else None)


def _watch() -> None:
    with _lock:
        while True:
            now = time.monotonic()
            wait = 1.0
            for arm in _armed.values():
                if arm.fired:
                    continue
                if arm.deadline <= now:
                    if arm.io == 0:
                        arm.fired = True
                        _raise_in(arm.tid, ParseTimeout)
                    else:
                        wait = min(wait, 0.05)  # it checks the deadline itself when its read returns
                else:
                    wait = min(wait, arm.deadline - now)
            _wake.wait(max(wait, 0.01))


def _start_watchdog() -> None:
    global _watchdog
    if _watchdog is None or not _watchdog.is_alive():
        _watchdog = threading.Thread(target=_watch, name="vbfs-parse-watchdog", daemon=True)
        _watchdog.start()


@contextmanager
def deadline_cap(deadline: float) -> Iterator[None]:
    """Calls into parsers made inside this block end by ``deadline`` at the latest (a walk's overall budget)."""
    outer = getattr(_local, "cap", None)
    _local.cap = deadline if outer is None else min(outer, deadline)
    try:
        yield
    finally:
        _local.cap = outer


def remaining() -> float | None:
    """Seconds left of this thread's overall cap, if one is set."""
    cap = getattr(_local, "cap", None)
    return None if cap is None else cap - time.monotonic()


def _disarm(arm: _Arm) -> None:
    with _lock:
        if arm.done:
            return
        _armed.pop(arm.tid, None)
        _local.arm = None
        if arm.fired:
            _raise_in(arm.tid, None)  # raised but perhaps not delivered yet: clear it
        arm.done = True


@contextmanager
def budget(seconds: float | None = None) -> Iterator[None]:
    """Run the block under a time budget; :class:`ParseTimeout` leaves it when the budget is over.

    A budget inside another one only brings the deadline forward. The block must be parser code only (see the
    module docstring).
    """
    tid = threading.get_ident()
    deadline = time.monotonic() + (parse_seconds() if seconds is None else seconds)
    cap = getattr(_local, "cap", None)
    if cap is not None:
        deadline = min(deadline, cap)
    with _lock:
        outer = _armed.get(tid)
        if outer is not None:
            outer.deadline = min(outer.deadline, deadline)
    if outer is not None:
        yield
        return
    arm = _Arm(tid, deadline)
    late = False
    try:
        # Armed inside the ``try``: a timeout that lands the moment the lock is let go is still disarmed below
        # (an arm left behind would make every later budget of this thread look nested, and expired).
        with _lock:
            _armed[tid] = arm
            _local.arm = arm
            _start_watchdog()
            _wake.notify()
        yield
    except ParseTimeout:
        late = True
    finally:
        # The watchdog raises at most once per arming; if that one exception arrives while disarming, disarm again.
        while not arm.done:
            try:
                _disarm(arm)
            except ParseTimeout:
                late = True
    if late:
        raise ParseTimeout()


def check_deadline() -> None:
    """Raise :class:`ParseTimeout` if this thread's budget is over (a safe point: called between reads)."""
    arm = getattr(_local, "arm", None)
    if arm is not None and time.monotonic() > arm.deadline:
        with _lock:
            if arm.fired:
                _raise_in(arm.tid, None)  # this one is raised here instead
            arm.fired = True
        raise ParseTimeout()


@contextmanager
def io_section() -> Iterator[None]:
    """Reading bytes from the store: the watchdog waits; the deadline is checked before and after."""
    arm = getattr(_local, "arm", None)
    if arm is None:
        yield
        return
    with _lock:
        if arm.fired:
            _raise_in(arm.tid, None)
            pending = True
        else:
            arm.io += 1
            pending = False
    if pending:
        raise ParseTimeout()
    try:
        yield
    finally:
        with _lock:
            arm.io -= 1
    check_deadline()
