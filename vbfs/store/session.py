"""A write session: everything one writer (one guest's backup) stores, from its first chunk to its manifest.

A session owns its open batch (:class:`vbfs.store.backend.Batch`), the chunk index it deduplicates against
(:mod:`vbfs.store.chunkindex`, loaded when it starts) and the ids it stored itself. It decides alone whether a
chunk is new: an id in the index or already stored by this session is not stored again, and no backend call is
made for that decision. ``commit(manifest)`` lands the batch, writes the session's index object, then the
manifest. A session that ends without committing (an exception, or no commit) removes the temporaries of its
open batch and nothing else; a session whose repository lock is lost (store/locks.py) stops with
:class:`vbfs.store.locks.LockLost` before anything more lands. Two sessions of one process (two guests backed
up at once) never land or discard each other's objects. Objects of batches that landed earlier stay, unnamed,
for a later garbage collection.

Thread-safe: a backup's worker threads store chunks through one session at once.
"""

from __future__ import annotations

import io
import secrets
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO

from pyfastcdc.cy import FastCDC

from vbfs.errors import VbfsError
from vbfs.failpoints import failpoint
from vbfs.store.chunkindex import INDEX_PREFIX, ChunkIndex, index_object
from vbfs.store.codec import ChunkId
from vbfs.store.manifest import INDEX_PIECE_ENTRIES, Manifest
from vbfs.store.patch import PatchRecord
from vbfs.store.repository import (
    CDC_AVG,
    CDC_MAX,
    CDC_MIN,
    STREAM_ENTRY,
    ZERO_ID,
    StreamRef,
    chunk_object_name,
    patch_object_name,
)

if TYPE_CHECKING:
    from vbfs.store.repository import Repository


@dataclass(frozen=True)
class Stored:
    """What storing a chunk came to: its id, ``outcome`` ("zero", "dedup" or "new"), the bytes written to the
    backend and the plaintext bytes it stands for (a patch record's pieces, a whole chunk's length)."""

    id: ChunkId
    outcome: str
    written: int
    plain: int


class WriteSession:
    def __init__(self, repo: Repository, index: ChunkIndex):
        self.repo = repo
        self.id = secrets.token_hex(16)
        self.index = index
        self.notes: list[str] = list(index.notes)
        """One line each for what the user should know (the chunk index was rebuilt)."""
        self._codec = repo.codec
        self._backend = repo.backend
        self._batch = repo.backend.open_batch()
        self._lock = threading.Lock()
        self._chunks: set[ChunkId] = set()  # stored by this session (in its batch or landed)
        self._patches: set[ChunkId] = set()
        self._zero = bytes(repo.chunk_size)
        self._done = False

    @property
    def chunk_size(self) -> int:
        return self.repo.chunk_size

    def __enter__(self) -> WriteSession:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """End the session; what it did not commit is removed (only this session's open batch)."""
        self._done = True
        self._backend.discard_batch(self._batch)

    # ---- chunks ---------------------------------------------------------------------------------------------

    def _claim(self, cid: ChunkId, patch: bool) -> bool:
        """True when ``cid`` is new to the repository and this session now stores it."""
        if cid in (self.index.patches if patch else self.index.chunks):
            return False
        mine = self._patches if patch else self._chunks
        with self._lock:
            if cid in mine:
                return False
            mine.add(cid)
        return True

    def _unclaim(self, cid: ChunkId, patch: bool) -> None:
        with self._lock:
            (self._patches if patch else self._chunks).discard(cid)

    def _put(self, name: str, data: bytes | memoryview, patch: bool = False) -> int:
        if self._done:
            raise VbfsError("this write session has ended")
        self.repo.check_locks()  # a lost lock stops the session before more lands
        blob = self._codec.encode(data, name, patch=patch)
        self._backend.put_batched(name, blob, self._batch)
        failpoint("chunk-written")
        return len(blob)

    def store_chunk(self, data: bytes) -> Stored:
        """Store a disk chunk's bytes: a chunk of zeros is not stored, a known one is deduplicated."""
        if data == self._zero[: len(data)]:
            return Stored(ZERO_ID, "zero", 0, 0)
        return self._store(data)

    def _store(self, data: bytes | memoryview) -> Stored:
        cid = self._codec.chunk_id(data)
        if not self._claim(cid, patch=False):
            return Stored(cid, "dedup", 0, len(data))
        try:
            return Stored(cid, "new", self._put(chunk_object_name(cid), data), len(data))
        except BaseException:
            self._unclaim(cid, patch=False)
            raise

    def store_blob(self, data: bytes) -> tuple[ChunkId, int]:
        """Store ``data`` as a chunk (zeros too) unless it is known; its id and the bytes newly written."""
        s = self._store(data)
        return s.id, s.written

    def put_chunk(self, cid: ChunkId, data: bytes | memoryview) -> int:
        """Store a chunk under an id the caller computed; the bytes written."""
        with self._lock:
            self._chunks.add(cid)
        return self._put(chunk_object_name(cid), data)

    def get_chunk(self, cid: ChunkId) -> bytes:
        return self.repo.get_chunk(cid)

    def chunk_patch(self, cid: ChunkId) -> PatchRecord | None:
        """The patch record ``cid`` is stored as, or None for a full chunk; the index says which (no stat)."""
        with self._lock:
            mine_patch, mine_chunk = cid in self._patches, cid in self._chunks
        if mine_patch or cid in self.index.patches:
            record = self.repo._load(cid)
            return record if isinstance(record, PatchRecord) else None
        if mine_chunk or cid in self.index.chunks:
            return None
        return self.repo.chunk_patch(cid)  # not in the index (a snapshot newer than it): ask the backend

    def put_patch(self, record: PatchRecord) -> Stored:
        """Store a patch record unless it is known."""
        raw = record.to_bytes()
        cid = self._codec.patch_id(raw)
        if not self._claim(cid, patch=True):
            return Stored(cid, "dedup", 0, record.piece_bytes)
        try:
            return Stored(cid, "new", self._put(patch_object_name(cid), raw, patch=True), record.piece_bytes)
        except BaseException:
            self._unclaim(cid, patch=True)
            raise

    # ---- chunk lists and streams ----------------------------------------------------------------------------

    def write_index(self, entries: bytes, entry_size: int) -> list[str]:
        """Store a chunk list in pieces; the pieces' ids."""
        piece = INDEX_PIECE_ENTRIES * entry_size
        ids = []
        for off in range(0, len(entries), piece):
            cid, _ = self.store_blob(entries[off : off + piece])
            ids.append(cid.hex())
        return ids

    def put_stream(self, fh: BinaryIO) -> tuple[StreamRef, int, int]:
        """Store a byte stream with content-defined chunks; (ref, bytes read, bytes newly written)."""
        cdc = FastCDC(avg_size=CDC_AVG, min_size=CDC_MIN, max_size=CDC_MAX)
        entries = bytearray()
        size = stored = 0
        for chunk in cdc.cut_stream(fh):
            data = bytes(chunk.data)
            cid, new = self.store_blob(data)
            stored += new
            size += len(data)
            entries += STREAM_ENTRY.pack(cid, len(data))
        return StreamRef(size, self.write_index(bytes(entries), STREAM_ENTRY.size)), size, stored

    def put_bytes(self, data: bytes) -> tuple[StreamRef, int]:
        ref, _size, stored = self.put_stream(io.BytesIO(data))
        return ref, stored

    # ---- landing --------------------------------------------------------------------------------------------

    def flush(self) -> None:
        """Land this session's open batch and make it durable."""
        self.repo.check_locks()
        self._backend.flush(self._batch)

    def commit(self, manifest: Manifest) -> None:
        """Land the batch, write this session's index object, then the manifest; the session then ends."""
        if self._done:
            raise VbfsError("this write session has ended")
        snap_id = manifest.id
        self.flush()
        name = f"{INDEX_PREFIX}{self.id}"
        with self._lock:
            raw = index_object(str(snap_id), self._chunks, self._patches)
        # The lock object itself, before anything names this session's chunks: a gc that judged the lock stale
        # may have deleted some of them. A lost lock found after the index object landed takes it back.
        self.repo.check_locks(ask=True)
        self._backend.put(name, self._codec.encode(raw, name))
        failpoint("index-written")
        try:
            self.repo.check_locks(ask=True)
        except VbfsError:
            self._backend.delete(name)
            self._backend.flush()
            raise
        self.repo.commit_manifest(manifest)
        self.close()
