"""The guest-file index of a snapshot: every file, folder and symlink of its guest filesystems, one JSON line each.

Built right after a backup from the stored chunks (so it sees exactly what was stored), kept in the repository as
a stream that the manifest names (encrypted like everything else), and imported into the catalog, where
``vbfs find`` and ``vbfs diff`` answer from it without opening any image. ``catalog rebuild`` reads it back.
"""

from __future__ import annotations

import json
import stat
from contextlib import suppress
from dataclasses import replace

from vbfs.errors import VbfsError
from vbfs.guestfs.bounds import index_seconds
from vbfs.store.manifest import StreamRecord
from vbfs.store.session import WriteSession
from vbfs.vfs import Dir, LazyVolumeRoot, Node, SnapshotTree, Symlink, iter_tree

Row = tuple[str, str, int, int, int]  # path below files/, type (f d l o), size, mtime_ns, mode


def _type(node: Node) -> str:
    if isinstance(node, Dir):
        return "d"
    if isinstance(node, Symlink):
        return "l"
    return "f" if stat.S_ISREG(node.attr.mode) else "o"


def walk_guest_files(tree: SnapshotTree) -> tuple[list[Row], list[str]]:
    """Rows for every guest file of the snapshot, and a warning for each volume that could not be read whole."""
    rows: list[Row] = []
    warnings: list[str] = []
    files = tree.root(tree.manifest.name).lookup("files")
    assert isinstance(files, Dir)

    def skipped(where: str, exc: VbfsError) -> None:
        warnings.append(f"{where}: not indexed ({exc})")
    for disk in files.children():
        assert isinstance(disk, Dir)
        try:
            volumes = disk.children()
        except VbfsError as exc:
            warnings.append(f"disk {disk.name}: not indexed ({exc})")
            continue
        for vol in volumes:
            prefix = f"{disk.name}/{vol.name}"
            try:
                for path, node in iter_tree(vol, prefix, seconds=index_seconds(), on_error=skipped):
                    a = node.attr
                    rows.append((path, _type(node), a.size, a.mtime_ns, a.mode))
            except VbfsError as exc:
                warnings.append(f"{prefix}: index incomplete ({exc})")
            if isinstance(vol, LazyVolumeRoot):
                with suppress(VbfsError):
                    warnings += [f"{prefix}: {n}" for n in vol.real().fs.notes]
    return rows, warnings


def encode_rows(rows: list[Row]) -> bytes:
    return b"".join(json.dumps(list(r), separators=(",", ":")).encode() + b"\n" for r in rows)


def index_snapshot(tree: SnapshotTree, session: WriteSession) -> tuple[StreamRecord, list[Row], list[str]]:
    """Walk, store (through ``session``) and describe the index of a snapshot whose chunks are all stored;
    (ref, rows, warnings)."""
    rows, warnings = walk_guest_files(tree)
    ref, _stored = session.put_bytes(encode_rows(rows))
    return replace(ref, entries=len(rows)), rows, warnings
