"""Random access to stored disks and streams: the objects the tree, restore and check read from.

A :class:`DiskImage` maps ``offset // chunk_size`` straight to an entry of the disk's chunk list and loads list
pieces on demand, so reading one byte of a 1 TiB disk reads one list piece and one chunk. A :class:`StreamFile`
keeps cumulative chunk offsets and finds the chunks of a read by bisection (no rescans).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator

from vbfs.errors import IntegrityError
from vbfs.store.cache import ChunkCache
from vbfs.store.codec import ID_SIZE, ChunkId
from vbfs.store.manifest import DiskRecord, StreamRecord
from vbfs.store.repository import INDEX_PIECE_ENTRIES, STREAM_ENTRY, ZERO_ID, Repository

PREFETCH_CHUNKS = 3


class DiskImage:
    def __init__(self, repo: Repository, disk: DiskRecord, cache: ChunkCache):
        self.repo = repo
        self.name = disk.name
        self.size = disk.size
        self.chunk_size = disk.chunk_size
        self.pieces: list[str] = list(disk.index)
        self.count = -(-self.size // self.chunk_size)
        self.cache = cache
        self._loaded: dict[int, bytes] = {}
        self._lock = threading.Lock()
        self._next_sequential = -1  # where the last read ended: a read starting there is sequential
        self._prefetched_to = -1  # the last chunk index handed to prefetch
        if -(-self.count // INDEX_PIECE_ENTRIES) != len(self.pieces):
            raise IntegrityError(
                f"disk {self.name}: chunk list has {len(self.pieces)} pieces, expected "
                f"{-(-self.count // INDEX_PIECE_ENTRIES)}"
            )

    def _piece(self, p: int) -> bytes:
        with self._lock:
            raw = self._loaded.get(p)
        if raw is None:
            raw = self.repo.read_index_piece(self.pieces[p])
            want = min(INDEX_PIECE_ENTRIES, self.count - p * INDEX_PIECE_ENTRIES) * ID_SIZE
            if len(raw) != want:
                raise IntegrityError(f"disk {self.name}: chunk list piece {p} has the wrong length")
            with self._lock:
                self._loaded[p] = raw
        return raw

    def entry(self, i: int) -> ChunkId:
        p, k = divmod(i, INDEX_PIECE_ENTRIES)
        raw = self._piece(p)
        return raw[k * ID_SIZE : (k + 1) * ID_SIZE]

    def entries(self) -> Iterator[tuple[int, ChunkId]]:
        for p in range(len(self.pieces)):
            raw = self._piece(p)
            base = p * INDEX_PIECE_ENTRIES
            for k in range(len(raw) // ID_SIZE):
                yield base + k, raw[k * ID_SIZE : (k + 1) * ID_SIZE]

    def chunk_length(self, i: int) -> int:
        return min(self.chunk_size, self.size - i * self.chunk_size)

    def read_chunk(self, i: int) -> bytes:
        cid = self.entry(i)
        length = self.chunk_length(i)
        if cid == ZERO_ID:
            return bytes(length)
        data = self.cache.get(cid)
        if len(data) != length:
            raise IntegrityError(f"disk {self.name}: chunk {i} has {len(data)} bytes, expected {length}")
        return data

    def read(self, offset: int, length: int) -> bytes:
        data = self._read(offset, length, cached_only=False)
        assert data is not None
        return data

    def read_if_cached(self, offset: int, length: int) -> bytes | None:
        """The bytes if every chunk they need is cached (or all zeros); ``None`` instead of any I/O.

        The chunk list pieces must be loaded already too: this never reads from the repository.
        """
        return self._read(offset, length, cached_only=True)

    def _read(self, offset: int, length: int, cached_only: bool) -> bytes | None:
        end = min(self.size, offset + length)
        if offset >= end:
            return b""
        cs = self.chunk_size
        first, last = offset // cs, (end - 1) // cs
        if cached_only and not {first // INDEX_PIECE_ENTRIES, last // INDEX_PIECE_ENTRIES} <= self._loaded.keys():
            return None
        if offset == self._next_sequential and last >= self._prefetched_to:
            self._prefetch(last + 1, PREFETCH_CHUNKS)
            self._prefetched_to = last + PREFETCH_CHUNKS
        parts = []
        for i in range(first, last + 1):
            lo = max(offset - i * cs, 0)
            hi = min(end - i * cs, cs)
            cid = self.entry(i)
            if cid == ZERO_ID:
                parts.append(bytes(hi - lo))
                continue
            if cached_only:
                cached = self.cache.peek(cid)
                if cached is None or len(cached) != self.chunk_length(i):
                    return None  # not cached, or damaged: the blocking path fetches it or reports it
                data = cached
            else:
                data = self.read_chunk(i)
            parts.append(data[lo:hi] if (lo, hi) != (0, len(data)) else data)
        self._next_sequential = end
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _prefetch(self, start: int, count: int) -> None:
        cids = []
        for i in range(start, min(start + count, self.count)):
            if (i // INDEX_PIECE_ENTRIES) not in self._loaded:
                break
            cid = self.entry(i)
            if cid != ZERO_ID:
                cids.append(cid)
        if cids:
            self.cache.prefetch(cids)


class StreamFile:
    def __init__(self, repo: Repository, ref: StreamRecord, cache: ChunkCache):
        self.size = ref.size
        self.cache = cache
        self.ids: list[ChunkId] = []
        self.starts: list[int] = []
        pos = 0
        for piece in ref.index:
            raw = repo.read_index_piece(piece)
            if len(raw) % STREAM_ENTRY.size:
                raise IntegrityError("a stream's chunk list piece has the wrong length")
            for off in range(0, len(raw), STREAM_ENTRY.size):
                cid, length = STREAM_ENTRY.unpack_from(raw, off)
                self.ids.append(cid)
                self.starts.append(pos)
                pos += length
        if pos != self.size:
            raise IntegrityError("a stream's chunk list does not add up to its size")

    def read(self, offset: int, length: int) -> bytes:
        end = min(self.size, offset + length)
        parts = []
        pos = offset
        while pos < end:
            k = bisect.bisect_right(self.starts, pos) - 1
            data = self.cache.get(self.ids[k])
            lo = pos - self.starts[k]
            piece = data[lo : lo + (end - pos)]
            if not piece:
                raise IntegrityError("a stream chunk is shorter than its list says")
            parts.append(piece)
            pos += len(piece)
        return b"".join(parts)
