"""The guest-file index of a snapshot: every file, folder and symlink of its guest filesystems, one JSON line each.

Built right after a backup from the stored chunks (so it sees exactly what was stored), kept in the repository as
a stream that the manifest names (encrypted like everything else), and imported into the catalog, where
``vbfs find`` and ``vbfs diff`` answer from it without opening any image. ``catalog rebuild`` reads it back.

A stage of the write path over the guest filesystem layer alone: the disks are read through
:class:`vbfs.store.objects.DiskImage`, the volumes and folders through :mod:`vbfs.guestfs.walk`, whose rules (host
names, loops left out, a folder met twice listed empty) are the ones the snapshot tree shows. The walk and every
parser call in it end within ``VBFS_INDEX_SECONDS`` (:func:`vbfs.guestfs.bounds.index_seconds`).
"""

from __future__ import annotations

import json
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from vbfs.engine.progress import NoProgress, Progress
from vbfs.errors import VbfsError
from vbfs.guestfs.bounds import deadline_cap, index_seconds
from vbfs.guestfs.filesystems import BUILTIN as BUILTIN_FILESYSTEMS
from vbfs.guestfs.model import GuestDataError, GuestEntry, GuestFS
from vbfs.guestfs.volumes import Volume
from vbfs.guestfs.walk import clamp_ns, disk_volumes, host_mode, list_folder, open_root, open_volume
from vbfs.store.cache import ChunkCache
from vbfs.store.manifest import Manifest, StreamRecord
from vbfs.store.objects import DiskImage
from vbfs.store.repository import Repository
from vbfs.store.session import WriteSession

Row = tuple[str, str, int, int, int]  # path below files/, type (f d l o), size, mtime_ns, mode


def _row(path: str, e: GuestEntry) -> Row:
    mode = host_mode(e)
    kind = "d" if e.is_dir else "l" if e.is_symlink else "f" if stat.S_ISREG(mode) else "o"
    return path, kind, e.size, clamp_ns(e.mtime_ns), mode


class _Folder:
    """A folder still to list: its entry, its place below the volume and its ancestors (for loops)."""

    __slots__ = ("alias", "entry", "parent", "path", "place")

    def __init__(self, path: str, entry: GuestEntry, place: str, parent: _Folder | None, alias: bool = False):
        self.path = path  # below files/, for rows and messages
        self.entry = entry
        self.place = place  # below the volume, "" for its root
        self.parent = parent
        self.alias = alias  # a second place of a folder shown whole elsewhere: nothing to list

    def is_ancestor(self, ino: int) -> bool:
        f: _Folder | None = self
        while f is not None:
            if f.entry.ino == ino:
                return True
            f = f.parent
        return False


def _walk_volume(
    open_fs: Callable[[], GuestFS],
    name: str,
    prefix: str,
    deadline: float,
    seconds: float,
    on_error: Callable[[str, VbfsError], None],
) -> Iterator[Row]:
    """Rows of one volume, depth first, parents before children, names in order; a folder that cannot be listed
    is reported to ``on_error`` and left out; past the deadline a :class:`GuestDataError` ends the walk."""
    fs: GuestFS | None = None
    stack: list[_Folder | None] = [None]  # None: the volume itself, opened on the first listing
    while stack:
        folder = stack.pop()
        here = prefix if folder is None else folder.path
        try:
            if time.monotonic() > deadline:
                where = name if fs is None or folder is None else f"{fs.label}:{folder.place or '/'}"
                raise GuestDataError(f"{where}: walk stopped after {seconds:g} s")
            if folder is not None and folder.alias:
                continue
            with deadline_cap(deadline):
                if folder is None:
                    fs = open_fs()
                    folder = _Folder(prefix, open_root(fs), "", None)
                assert fs is not None
                listed = list_folder(fs, folder.entry, folder.place, folder.is_ancestor)
        except VbfsError as exc:
            if time.monotonic() > deadline:
                raise
            on_error(here, exc)
            continue
        below: list[_Folder] = []
        for item in sorted(listed, key=lambda i: i.entry.name):
            e = item.entry
            path = f"{folder.path}/{e.name}"
            yield _row(path, e)
            if e.is_dir:
                below.append(_Folder(path, e, item.place, folder, alias=item.alias_of is not None))
        stack.extend(reversed(below))


def walk_guest_files(
    repo: Repository,
    manifest: Manifest,
    cache: ChunkCache,
    filesystems: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> tuple[list[Row], list[str]]:
    """Rows for every guest file of the snapshot, and a warning for each volume that could not be read whole;
    ``progress`` counts the files as they are found."""
    progress = progress or NoProgress()
    readers = filesystems or BUILTIN_FILESYSTEMS
    rows: list[Row] = []
    warnings: list[str] = []

    def label(*parts: str) -> str:
        return " ".join([f"{manifest.guest}@{manifest.name}", *parts])

    def skipped(where: str, exc: VbfsError) -> None:
        warnings.append(f"{where}: not indexed ({exc})")

    for disk in manifest.disks:
        image = DiskImage(repo, disk, cache)
        try:
            found = disk_volumes(image.read, image.size, label(disk.name))
        except VbfsError as exc:
            warnings.append(f"disk {disk.name}: not indexed ({exc})")
            continue
        volumes: dict[str, Volume] = {v.name: v for v in found if v.fstype is not None}
        for vol in volumes.values():
            prefix = f"{disk.name}/{vol.name}"
            opened: list[GuestFS] = []

            def open_fs(vol: Volume = vol, disk_name: str = disk.name, opened: list[GuestFS] = opened) -> GuestFS:
                fs = open_volume(readers, vol, label(disk_name, vol.name))
                opened.append(fs)
                return fs

            seconds = index_seconds()
            deadline = time.monotonic() + seconds
            try:
                for row in _walk_volume(open_fs, vol.name, prefix, deadline, seconds, skipped):
                    rows.append(row)
                    if not len(rows) % 256:
                        progress.advance(256)
            except VbfsError as exc:
                warnings.append(f"{prefix}: index incomplete ({exc})")
            for fs in opened:
                warnings += [f"{prefix}: {n}" for n in fs.notes]
    return rows, warnings


def encode_rows(rows: list[Row]) -> bytes:
    return b"".join(json.dumps(list(r), separators=(",", ":")).encode() + b"\n" for r in rows)


def index_snapshot(
    repo: Repository,
    manifest: Manifest,
    session: WriteSession,
    filesystems: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> tuple[StreamRecord, list[Row], list[str]]:
    """Walk, store (through ``session``) and describe the index of a snapshot whose chunks are all stored;
    (ref, rows, warnings)."""
    cache = ChunkCache(repo.get_chunk, 32 * 1024 * 1024)
    progress = progress or NoProgress()
    progress.begin(f"{manifest.guest}: indexing guest files", 0, "files")
    try:
        rows, warnings = walk_guest_files(repo, manifest, cache, filesystems, progress)
    finally:
        progress.end()
    ref, _stored = session.put_bytes(encode_rows(rows))
    return replace(ref, entries=len(rows)), rows, warnings
