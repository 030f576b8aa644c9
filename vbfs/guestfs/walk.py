"""The walk rules of a guest filesystem, shared by the snapshot tree (:mod:`vbfs.vfs`) and the guest-file index.

What a disk holds is found once (:func:`disk_volumes`), a volume's filesystem is opened through the registered
readers (:func:`open_volume`), and a folder is listed through :func:`list_folder`, which applies the trust rules
every reader of a guest must see alike:

- every guest name becomes one safe host name (:func:`vbfs.names.host_names`), with a note for each change;
- a folder that is one of its own ancestors (a loop of a damaged filesystem) is left out, with a note;
- a folder inode met at a second place is listed there empty (an alias of the first place), with a note.

Notes go to the filesystem's ``notes`` (:meth:`GuestFS.note`); the places already shown whole are kept in its
``folder_places``. Nothing here knows about nodes, inodes of a mount or the repository.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from vbfs.errors import VbfsError
from vbfs.guestfs.model import GuestDataError, GuestEntry, GuestFS
from vbfs.guestfs.stream import RangeReader
from vbfs.guestfs.volumes import Volume, discover
from vbfs.names import host_names

_NS_MIN, _NS_MAX = -(1 << 63), (1 << 63) - 1


def clamp_ns(value: int) -> int:
    """A guest's time in nanoseconds, clamped to what a stat structure carries."""
    return min(max(value, _NS_MIN), _NS_MAX)


def host_mode(entry: GuestEntry) -> int:
    """A guest's st_mode, clamped to 32 bits."""
    return entry.mode & 0xFFFFFFFF


def disk_volumes(read: Callable[[int, int], bytes], size: int, label: str) -> list[Volume]:
    """The volumes of a disk image (partitions, logical volumes, or the whole disk); a table that cannot be
    parsed is a :class:`GuestDataError` that names ``label``."""
    try:
        return discover(RangeReader(read, size))
    except VbfsError:
        raise
    except Exception as exc:
        raise GuestDataError(f"{label}: cannot read the partition table ({exc})") from None


def open_volume(filesystems: dict[str, Any], vol: Volume, label: str) -> GuestFS:
    """The filesystem of a volume whose type is known, opened by the reader registered for that type."""
    assert vol.fstype is not None
    cls = filesystems.get(vol.fstype)
    if cls is None:
        raise GuestDataError(f"{label}: no reader for {vol.fstype}")
    return cast(GuestFS, cls(vol.reader.sub(0, vol.size), label))


def open_root(fs: GuestFS) -> GuestEntry:
    """The root folder of ``fs``; its place is the root of the volume."""
    root = fs.root()
    fs.folder_places.setdefault(root.ino, "")
    return root


@dataclass(frozen=True)
class Listed:
    """One entry of a listed folder, under its host name."""

    entry: GuestEntry  # with ``name`` the host name
    place: str  # its path below the volume, "/a/b"
    alias_of: str | None = None  # a folder shown whole at that place: this place shows it empty


def list_folder(fs: GuestFS, folder: GuestEntry, path: str, is_ancestor: Callable[[int], bool]) -> list[Listed]:
    """The entries of ``folder`` (at ``path``, "" for the root) with the trust rules applied; ``is_ancestor``
    tells whether a folder inode is ``folder`` itself or one of the folders above it."""
    entries = fs.listdir(folder)
    names, notes = host_names([e.name for e in entries])
    for note in notes:
        fs.note(f"{path or '/'}: {note}")
    listed: list[Listed] = []
    for e, name in zip(entries, names, strict=True):
        if e.is_dir and is_ancestor(e.ino):
            fs.note(f"{path}/{name}: left out: the folder is one of its own parent folders (a loop)")
            continue
        if name != e.name:
            e = dataclasses.replace(e, name=name)
        place = f"{path}/{name}"
        first = fs.folder_places.setdefault(e.ino, place) if e.is_dir else place
        if first != place:
            # One folder inode listed at several places (hard-linked folders of a damaged filesystem) would
            # multiply the tree at every level: it is shown whole once, empty here.
            fs.note(f"{place}: shown empty: it is the same folder as {first} (a hard-linked folder)")
            listed.append(Listed(e, place, first))
            continue
        listed.append(Listed(e, place))
    return listed
