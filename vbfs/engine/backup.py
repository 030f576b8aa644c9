"""A backup run: snapshot a guest, read its disks, store chunks, land the manifest.

The data flows one way: the source's bytes are read in the calling thread (one sequential reader) and handed to
a pool of worker threads that test for zeros, hash, compress, encrypt and store (BLAKE3, zstd, AES and file
writes release the GIL, so both cores stay busy). At most ``MAX_IN_FLIGHT`` chunks are in memory at once.

Only what the source says may hold data (allocated extents for a full backup, changed extents for an incremental)
is read. A chunk read in part is stored as a patch record on its previous version (or on zeros) while the parts
stay small, so the work of an incremental follows the change, not the chunk size (:mod:`vbfs.store.patch`).
Chunks are stored through the run's write session (:mod:`vbfs.store.session`), which decides what is new from the
repository's chunk index; the engine never touches the codec or the backend. A failed run removes the chunks of
its session's open batch; earlier batches stay (unnamed until a later run stores them again or GC removes them).

The write path stands on the sources and the store alone: the previous snapshot of a guest (for incrementals and
change tokens) and the names already taken come from the repository (:mod:`vbfs.store.snapshots`), and the guest
files are indexed over the guest filesystem layer (:mod:`vbfs.engine.fileindex`). The catalog is a cache that the
command brings up to date after the run.

Consistency rules kept here:
- ``vbfs_freeze`` is always followed by ``vbfs_thaw``, whatever fails in between.
- The hypervisor snapshot is a context manager and is removed on every path out.
- The change token of each disk is written in the manifest, which lands last; an incremental starts only from a
  token that landed, and a token the source rejects gives a full read deduplicated by hash.
"""

from __future__ import annotations

import inspect
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import pluggy

from vbfs import __version__
from vbfs.engine.fileindex import index_snapshot
from vbfs.engine.progress import NoProgress, Progress
from vbfs.errors import SourceError, VbfsError
from vbfs.failpoints import failpoint
from vbfs.names import is_plain_name
from vbfs.names import repository_name as repository_name
from vbfs.sources import DiskInfo, Extent, GuestSnapshot, Hypervisor
from vbfs.store.codec import ID_SIZE, ChunkId
from vbfs.store.manifest import (
    DiskRecord,
    Manifest,
    Source,
    StreamRecord,
    check_note,
    check_tags,
    format_time,
    snapshot_name,
)
from vbfs.store.patch import PatchRecord
from vbfs.store.repository import ZERO_ID, Repository
from vbfs.store.session import Stored, WriteSession
from vbfs.store.snapshots import latest_manifest, names_of

MAX_IN_FLIGHT = 8
MAX_READ_PARTS = 8  # a chunk with more parts to read is read whole
MAX_PATCH_PIECES = 256  # a patch record with more pieces is stored as a full chunk again


@dataclass
class BackupStats:
    read_bytes: int = 0  # bytes read from the source
    new_bytes: int = 0  # plaintext bytes new to the repository (whole chunks, or the pieces of patch records)
    dedup_bytes: int = 0  # plaintext bytes the repository already had (whole chunks, or patch record pieces)
    zero_bytes: int = 0  # bytes of the disks never stored: unallocated, unchanged or all zeros
    stored_bytes: int = 0  # bytes written to the repository (compressed, encrypted)
    new_chunks: int = 0
    dedup_chunks: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def add(self, other: BackupStats) -> None:
        for k in (
            "read_bytes",
            "new_bytes",
            "dedup_bytes",
            "zero_bytes",
            "stored_bytes",
            "new_chunks",
            "dedup_chunks",
        ):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.notes += other.notes


def check_name(kind: str, name: str) -> str:
    """``name`` if the repository keeps it as it is (what a plugin's own names should be; see the conformance
    suite); a backup maps any other name with :func:`vbfs.names.repository_name` instead of refusing it."""
    if not is_plain_name(name):
        raise VbfsError(f"{kind} name {name!r} is not usable as a folder name (letters, digits, . _ + - @ space)")
    return name


def _kept_as(kind: str, name: str, notes: list[str]) -> str:
    """The repository name of a guest, disk or config file of the source, with a note when it had to change."""
    kept = repository_name(name)
    if kept != name:
        notes.append(
            f"{kind} {name!r} is kept as {kept!r} (only letters, digits, . _ + - @ and spaces, at most 201 "
            f"characters, are kept as they are)"
        )
    return kept


def chunk_indices(extents: list[Extent], size: int, chunk_size: int) -> Iterator[int]:
    """Indices of the chunks that the (sorted) extents touch, each once, in order."""
    for index, _ in chunk_jobs(extents, size, chunk_size, partial=False):
        yield index


ChunkJob = tuple[int, tuple[Extent, ...] | None]
"""A chunk to store: its index, and the parts of it to read (``None``: all of it)."""


def chunk_jobs(extents: list[Extent], size: int, chunk_size: int, partial: bool) -> Iterator[ChunkJob]:
    """The chunks that the extents touch, in order, each once; streamed, so a 2 TB disk costs no memory.

    With ``partial``, a chunk that the extents cover only in part comes with those parts (clipped to the chunk,
    merged), so an incremental reads only the changed bytes and patches them into the previous chunk; a chunk
    covered for three quarters or more, or in more than ``MAX_READ_PARTS`` parts, is read whole.
    """
    cur = -1
    parts: list[Extent] = []

    def finish() -> ChunkJob:
        whole = min(chunk_size, size - cur * chunk_size)
        covered = sum(e.length for e in parts)
        # Many small parts, or most of the chunk: one read of the whole chunk costs less than many small ones.
        if not partial or covered * 4 >= whole * 3 or len(parts) > MAX_READ_PARTS:
            return cur, None
        return cur, tuple(parts)

    for e in _merged(extents, size):
        pos = e.offset
        while pos < e.end:
            i = pos // chunk_size
            hi = min(e.end, (i + 1) * chunk_size)
            if i != cur:
                if cur >= 0:
                    yield finish()
                cur, parts = i, []
            parts.append(Extent(pos, hi - pos))
            pos = hi
    if cur >= 0:
        yield finish()


def _merged(extents: list[Extent], size: int) -> Iterator[Extent]:
    """The extents clipped to the disk, sorted, with overlapping and touching ones joined."""
    run: Extent | None = None
    for e in sorted(extents):
        start, end = max(0, e.offset), min(e.end, size)
        if end <= start:
            continue
        if run is not None and start <= run.end:
            run = Extent(run.offset, max(run.end, end) - run.offset)
            continue
        if run is not None:
            yield run
        run = Extent(start, end - start)
    if run is not None:
        yield run


class DiskWriter:
    """Stores the chunks of one disk through the worker pool and builds its chunk list.

    Bytes come from the snapshot in the calling thread, in disk order: through ``read_ranges`` when the plugin
    offers it (a network source keeps several ranges in flight there), else one ``read`` per range. A chunk read
    in part is completed in a worker from the previous backup's chunk, so unchanged bytes are never read again.
    """

    def __init__(self, session: WriteSession, pool: ThreadPoolExecutor):
        self.session = session
        self.pool = pool

    def _patch_and_store(self, base_id: ChunkId, start: int, length: int, pieces: list[tuple[int, bytes]]) -> Stored:
        """The previous chunk with the changed pieces over it: as a patch record while the pieces stay small, so
        the work follows the change and not the chunk size; as a full chunk again once they pass half of it."""
        rel = [(offset - start, data) for offset, data in pieces]
        previous = None if base_id == ZERO_ID else self.session.chunk_patch(base_id)
        record = (previous or PatchRecord(base_id, length, ())).overlay(rel)
        if record.length != length:
            raise VbfsError(f"the previous backup's chunk at offset {start} has {record.length} bytes, not {length}")
        if record.piece_bytes * 2 > length or len(record.pieces) > MAX_PATCH_PIECES:
            base = bytes(length) if record.base == ZERO_ID else self.session.get_chunk(record.base)
            return self.session.store_chunk(record.apply(base))
        return self.session.put_patch(record)

    @staticmethod
    def _read_all(snap: GuestSnapshot, disk: DiskInfo, ranges: Iterator[tuple[int, int]]) -> Iterator[bytes]:
        read_ranges = getattr(snap, "read_ranges", None)
        if read_ranges is not None:
            yield from read_ranges(disk, ranges)
        else:
            for offset, length in ranges:
                yield snap.read(disk, offset, length)

    def run(
        self,
        snap: GuestSnapshot,
        disk: DiskInfo,
        jobs: Callable[[], Iterator[ChunkJob]],
        entries: bytearray,
        stats: BackupStats,
        progress: Progress,
    ) -> None:
        cs = self.session.chunk_size
        pending: dict[Future[Stored], tuple[int, int]] = {}

        def ranges() -> Iterator[tuple[int, int]]:
            for i, parts in jobs():
                if parts is None:
                    yield i * cs, min(cs, disk.size - i * cs)
                else:
                    yield from ((e.offset, e.length) for e in parts)

        def settle(done: set[Future[Stored]]) -> None:
            for fut in done:
                i, n = pending.pop(fut)
                got = fut.result()
                entries[i * ID_SIZE : (i + 1) * ID_SIZE] = got.id
                if got.outcome == "zero":
                    stats.zero_bytes += n
                elif got.outcome == "dedup":
                    stats.dedup_bytes += got.plain
                    stats.dedup_chunks += 1
                else:
                    stats.new_bytes += got.plain
                    stats.new_chunks += 1
                    stats.stored_bytes += got.written
                progress.advance(n)

        data_in = self._read_all(snap, disk, ranges())
        try:
            for i, parts in jobs():
                start = i * cs
                length = min(cs, disk.size - start)
                wanted = [(start, length)] if parts is None else [(e.offset, e.length) for e in parts]
                pieces = []
                for offset, n in wanted:
                    data = next(data_in, None)
                    if data is None or len(data) != n:
                        got = "no" if data is None else len(data)
                        raise SourceError(
                            f"disk {disk.name}: the source gave {got} bytes at offset {offset}, expected {n}"
                        )
                    stats.read_bytes += n
                    pieces.append((offset, data))
                failpoint("chunk-read")
                if parts is None:
                    fut = self.pool.submit(self.session.store_chunk, pieces[0][1])
                else:
                    base = bytes(entries[i * ID_SIZE : (i + 1) * ID_SIZE])
                    fut = self.pool.submit(self._patch_and_store, base, start, length, pieces)
                pending[fut] = (i, length)
                if len(pending) >= MAX_IN_FLIGHT:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    settle(done)
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                settle(done)
        finally:
            close = getattr(data_in, "close", None)
            if close is not None:
                close()
            for fut in pending:
                fut.cancel()
            if pending:
                wait(pending)


class BackupRun:
    def __init__(
        self,
        repo: Repository,
        pm: pluggy.PluginManager,
        progress: Progress | None = None,
        index_files: bool = True,
        filesystems: dict[str, Any] | None = None,
        tags: Sequence[str] = (),
        note: str | None = None,
    ):
        self.repo = repo
        self.pm = pm
        self.progress = progress or NoProgress()
        self.index_files = index_files
        self.tags = check_tags(list(tags))  # the user's labels of the snapshot, checked before any work
        self.note = None if note is None else check_note(note)
        self.phases: dict[str, float] = {}
        """Seconds of each phase of the last run: ``read`` (snapshot and disks), ``index``, ``commit``."""
        self.filesystems = filesystems

    def _fresh_name(self, guest: str, when: datetime) -> str:
        """The snapshot's name: its time, with -2, -3, ... when the guest has that name in the repository already
        (the snapshots that landed since this run began included). Another backup may still pick the same name at
        the same moment; the catalog then shows both (see vbfs.catalog)."""
        taken = names_of(self.repo, guest)
        name = snapshot_name(when)
        n = 1
        while name in taken:
            n += 1
            name = f"{snapshot_name(when)}-{n}"
        return name

    def _previous_disks(self, guest: str) -> dict[str, DiskRecord]:
        manifest = latest_manifest(self.repo, repository_name(guest))
        if manifest is None:
            return {}
        return {d.name: d for d in manifest.disks}

    def _backup_disk(
        self, snap: GuestSnapshot, disk: DiskInfo, prev: DiskRecord | None, writer: DiskWriter, kept_as: str
    ) -> tuple[DiskRecord, BackupStats]:
        cs = self.repo.chunk_size
        count = -(-disk.size // cs)
        stats = BackupStats()
        mode = "full"
        extents: list[Extent] | None = None
        entries: bytearray | None = None
        token = prev.token if prev else None
        if prev and token and prev.size == disk.size and prev.chunk_size == cs:
            changed = snap.changed_extents(disk, token)
            if changed is not None:
                try:
                    entries = bytearray(self.repo.read_index(prev.index))
                except VbfsError as exc:
                    stats.notes.append(f"disk {disk.name}: previous chunk list unreadable ({exc}); full read")
                else:
                    if len(entries) == count * ID_SIZE:
                        mode, extents = "incremental", changed
                    else:
                        entries = None
            else:
                stats.notes.append(f"disk {disk.name}: change token rejected by the source; full read, deduplicated")
        elif prev and token:
            stats.notes.append(f"disk {disk.name}: size or chunk size changed; full read, deduplicated")
        if mode == "full":
            entries = bytearray(count * ID_SIZE)
            extents = snap.allocated_extents(disk)
            if extents is None:
                extents = [Extent(0, disk.size)]
        assert entries is not None and extents is not None

        def jobs() -> Iterator[ChunkJob]:
            assert extents is not None
            return chunk_jobs(extents, disk.size, cs, partial=True)

        touched = sum(min(cs, disk.size - i * cs) for i, _ in jobs())
        stats.zero_bytes += disk.size - touched
        self.progress.begin(f"{disk.name}", touched)
        try:
            writer.run(snap, disk, jobs, entries, stats, self.progress)
        finally:
            self.progress.end()
        record = DiskRecord(
            name=kept_as,
            size=disk.size,
            chunk_size=cs,
            index=writer.session.write_index(bytes(entries), ID_SIZE),
            token=snap.change_token(disk),
            mode=mode,
            read_bytes=stats.read_bytes,
            details=dict(disk.details),
            source_name=disk.name if kept_as != disk.name else None,
        )
        return record, stats

    def run(self, hv: Hypervisor, guest: str, source_url: str) -> Manifest:
        # A run that fails removes its session's open batch: chunks no manifest will name.
        with self.repo.write_session() as session:
            return self._run(session, hv, guest, source_url)

    def _run(self, session: WriteSession, hv: Hypervisor, guest: str, source_url: str) -> Manifest:
        started = time.monotonic()
        stats = BackupStats()
        stats.notes += session.notes
        stored_as = _kept_as("guest", guest, stats.notes)
        removed = hv.remove_leftovers(guest)
        stats.notes += [f"cleanup: {r}" for r in removed]
        stats.notes += [f"cleanup: {r}" for r in self.repo.remove_leftovers()]
        prev_disks = self._previous_disks(guest)
        with ExitStack() as stack:
            ctx: dict[str, Any] = {}
            try:
                self.pm.hook.vbfs_freeze(guest=guest, ctx=ctx)
                since = {name: d.token for name, d in prev_disks.items() if d.token}
                if "since" in inspect.signature(hv.snapshot).parameters:
                    snap = stack.enter_context(hv.snapshot(guest, since=since))
                else:  # a plugin written before ``since`` existed
                    snap = stack.enter_context(hv.snapshot(guest))
            finally:
                self.pm.hook.vbfs_thaw(guest=guest, ctx=ctx)
            when = datetime.now(UTC)
            failpoint("before-chunks")
            pool = stack.enter_context(
                ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="vbfs-store")
            )
            writer = DiskWriter(session, pool)
            disks = snap.disks()
            names = [_kept_as("disk", d.name, stats.notes) for d in disks]
            if len(set(names)) != len(names):
                raise SourceError(f"guest {guest} has two disks with the same name: {[d.name for d in disks]}")
            disk_records = []
            for disk, kept_as in zip(disks, names, strict=True):
                record, dstats = self._backup_disk(snap, disk, prev_disks.get(kept_as), writer, kept_as)
                disk_records.append(record)
                stats.add(dstats)
            failpoint("after-chunks")
            config: dict[str, StreamRecord] = {}
            for fname, content in sorted(snap.config_files().items()):
                ref, stored = session.put_bytes(content)
                config[_kept_as("config file", fname, stats.notes)] = ref
                stats.stored_bytes += stored
            metadata = snap.metadata()
            consistency = snap.consistency
            stats.notes += list(getattr(snap, "notes", []))
        stats.seconds = round(time.monotonic() - started, 3)
        manifest = Manifest(
            id=secrets.token_hex(16),
            guest=stored_as,
            name=snapshot_name(when),  # chosen for good just before the commit, below
            time=format_time(when),
            finished=format_time(datetime.now(UTC)),
            source=Source(hv.scheme, _redact(source_url), guest),
            consistency=consistency,
            metadata=metadata,
            disks=disk_records,
            config=config,
            stats={k: v for k, v in asdict(stats).items() if k != "notes"},
            notes=stats.notes,
            vbfs_version=__version__,
            tags=self.tags,
            note=self.note,
        )
        if self.index_files:
            t0 = time.monotonic()
            index_ref, _rows, warnings = index_snapshot(self.repo, manifest, session, self.filesystems, self.progress)
            manifest = replace(
                manifest,
                files_index=index_ref,
                notes=[*manifest.notes, *warnings],
                stats={**manifest.stats, "index_seconds": round(time.monotonic() - t0, 3)},
            )
        # the name again: another backup may have landed meanwhile
        manifest = replace(manifest, name=self._fresh_name(stored_as, when))
        t0 = time.monotonic()
        session.commit(manifest)
        self.phases = {
            "read": float(manifest.stats["seconds"]),
            "index": float(manifest.stats.get("index_seconds", 0.0)),
            "commit": round(time.monotonic() - t0, 3),
        }
        self.pm.hook.vbfs_snapshot_committed(snapshot=manifest.summary())
        return manifest


def _redact(url: str) -> str:
    """Source URLs never carry passwords into the repository."""
    return re.sub(r"(://[^/@:]+):[^/@]*@", r"\1@", url)
