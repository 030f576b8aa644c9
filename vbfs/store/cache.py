"""A byte-bounded cache of decompressed, verified chunks that fetches each chunk once.

Several readers asking for the same chunk at the same time share one fetch (single flight); the cache holds at
most ``max_bytes`` of chunk data and forgets the least recently used first. ``prefetch`` fetches chunks that a
sequential reader will want next on a small pool of background threads, so that reading, decrypting and
decompressing the next chunks overlaps with serving this one. Thread-safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from vbfs.store.codec import ChunkId


class _Flight:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None


class ChunkCache:
    def __init__(self, fetch: Callable[[ChunkId], bytes], max_bytes: int = 64 * 1024 * 1024):
        self._fetch = fetch
        self.max_bytes = max_bytes
        self._data: OrderedDict[ChunkId, bytes] = OrderedDict()
        self._bytes = 0
        self._flights: dict[ChunkId, _Flight] = {}
        self._lock = threading.Lock()
        self.fetches = 0
        self.fetched_bytes = 0
        self._pool: ThreadPoolExecutor | None = None
        self._prefetching: set[ChunkId] = set()

    def prefetch(self, cids: list[ChunkId]) -> None:
        """Start fetching ``cids`` in the background unless they are cached or on their way; errors are dropped
        here (the reader that needs the chunk gets them)."""
        with self._lock:
            todo = [c for c in cids if c not in self._data and c not in self._flights and c not in self._prefetching]
            if not todo:
                return
            self._prefetching.update(todo)
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="vbfs-prefetch")
        for cid in todo:
            self._pool.submit(self._prefetch_one, cid)

    def _prefetch_one(self, cid: ChunkId) -> None:
        try:
            self.get(cid)
        except Exception:
            pass
        finally:
            with self._lock:
                self._prefetching.discard(cid)

    def peek(self, cid: ChunkId) -> bytes | None:
        """The chunk if it is cached, without fetching it (never blocks on I/O)."""
        with self._lock:
            data = self._data.get(cid)
            if data is not None:
                self._data.move_to_end(cid)
            return data

    def get(self, cid: ChunkId) -> bytes:
        with self._lock:
            data = self._data.get(cid)
            if data is not None:
                self._data.move_to_end(cid)
                return data
            flight = self._flights.get(cid)
            leader = flight is None
            if flight is None:
                flight = self._flights[cid] = _Flight()
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            assert flight.data is not None
            return flight.data
        try:
            data = self._fetch(cid)
        except BaseException as exc:
            flight.error = exc
            with self._lock:
                del self._flights[cid]
            flight.done.set()
            raise
        flight.data = data
        with self._lock:
            del self._flights[cid]
            self.fetches += 1
            self.fetched_bytes += len(data)
            if len(data) <= self.max_bytes:
                self._data[cid] = data
                self._bytes += len(data)
                while self._bytes > self.max_bytes:
                    _, old = self._data.popitem(last=False)
                    self._bytes -= len(old)
        flight.done.set()
        return data
