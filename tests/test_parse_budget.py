"""The time budget of parser calls on its own: the watchdog under many threads, and a parser that never returns.

A budget that is over must stop the block it guards and nothing else: the exception never lands in the code
after the block, never while the thread reads from the store, never after the block has ended, and no thread
stays armed nor the watchdog's lock taken once the blocks are over.
"""

from __future__ import annotations

import gc
import random
import stat
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable

import pytest

from vbfs.guestfs import bounds
from vbfs.guestfs.bounds import ParseTimeout, budget, io_section
from vbfs.guestfs.model import GuestDataError, GuestEntry, GuestFS

THREADS = 8
BLOCKS = 1000  # per thread


def _spin(n: int) -> int:
    """Pure-Python work: about ``n`` loop iterations, each a few bytecodes."""
    x = 0
    for i in range(n):
        x += i
    return x


def _work(rng: random.Random) -> int:
    """A parser step of random length: mostly short, sometimes long enough to run past a budget."""
    return _spin(rng.randrange(20_000) if rng.random() < 0.2 else rng.randrange(2000))


def _worker(seed: int, tally: Counter[str], failures: list[str], lock: threading.Lock) -> None:
    rng = random.Random(seed)
    tid = threading.get_ident()
    seen: Counter[str] = Counter()

    def fail(what: str) -> None:
        with lock:
            failures.append(f"thread {seed}: {what}")

    for _ in range(BLOCKS):
        where = "before"
        try:
            with budget(rng.uniform(0.001, 0.02)):
                where = "block"
                _work(rng)
                if rng.random() < 0.3:
                    with budget(rng.uniform(0.001, 0.02)):
                        where = "nested"
                        _work(rng)
                    where = "block"
                if rng.random() < 0.3:
                    with io_section():
                        where = "io"
                        _spin(rng.randrange(1000))
                        where = "io done"
                    where = "block"
                _spin(rng.randrange(500))
                where = "end"
        except ParseTimeout:
            # "before"/"end": the budget ran out as the block began or ended; the ``with`` itself says so
            seen["timeout in " + where] += 1
            if where == "io":
                fail("ParseTimeout delivered while the thread read from the store (io_section)")
            continue
        # The block ended normally: nothing may be raised from here on.
        try:
            seen["completed"] += 1
            if tid in bounds._armed:
                fail("still armed after its block ended normally")
            _spin(3000)  # a few thousand bytecodes, time for a late exception to land
            _spin(rng.randrange(300))
        except ParseTimeout:
            fail("ParseTimeout after the block had ended normally")
    with lock:
        tally.update(seen)


def test_watchdog_stops_blocks_and_only_blocks_under_many_threads() -> None:
    tally: Counter[str] = Counter()
    failures: list[str] = []
    lock = threading.Lock()
    seed = random.randrange(1 << 30)
    threads = [
        threading.Thread(target=_worker, args=(seed + i, tally, failures, lock), daemon=True) for i in range(THREADS)
    ]
    switch = sys.getswitchinterval()
    sys.setswitchinterval(0.0002)  # threads change hands often, so timeouts land at every kind of point
    try:
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=max(0.1, 30 - (time.monotonic() - started)))
    finally:
        sys.setswitchinterval(switch)
    hung = [t.name for t in threads if t.is_alive()]
    gc.collect()
    lock_free = bounds._lock.acquire(timeout=1)
    if lock_free:
        bounds._lock.release()
    assert not hung, f"seed {seed}: threads never finished (watchdog lock held: {not lock_free}): {hung}"
    assert lock_free, f"seed {seed}: the watchdog's lock is still held"
    assert not failures, f"seed {seed}: {failures[:10]} ({len(failures)} in all); tally {dict(tally)}"
    assert not bounds._armed, f"seed {seed}: threads left armed: {list(bounds._armed)}"
    total = sum(tally.values())
    assert total == THREADS * BLOCKS
    # The mix is what the test is about: both outcomes happen, and often.
    timeouts = total - tally["completed"]
    assert tally["completed"] > total // 10, dict(tally)
    assert timeouts > total // 100, dict(tally)


class _Spinning(GuestFS):
    """A guest filesystem whose folder listing never ends (a loop in damaged metadata)."""

    fstype = "spinfs"

    def _root(self) -> GuestEntry:
        return GuestEntry("", 2, stat.S_IFDIR | 0o755, 0)

    def _listdir(self, entry: GuestEntry) -> Iterable[GuestEntry]:
        n = 0
        while True:
            n += 1


def test_a_parser_call_that_never_returns_gives_up_and_frees_the_volume(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VBFS_PARSE_SECONDS", "0.2")
    fs = _Spinning(object(), "web01 sda p1")
    root = fs.root()
    started = time.monotonic()
    with pytest.raises(GuestDataError, match=r"web01 sda p1: folder /: gave up after 0\.2 s"):
        fs.listdir(root)
    took = time.monotonic() - started
    assert 0.15 < took < 2.0, f"the call took {took:.2f} s"

    taken: list[bool] = []

    def take() -> None:
        got = fs.lock.acquire(timeout=0.5)
        taken.append(got)
        if got:
            fs.lock.release()

    other = threading.Thread(target=take)
    other.start()
    other.join(timeout=5)
    assert taken == [True], "the volume's lock was not free after the call gave up"
    assert threading.get_ident() not in bounds._armed
    _spin(100_000)  # and no late exception for the thread that made the call
