"""The repository as a tree of plain objects: guests, snapshots, and what each snapshot holds.

This module defines what the repository looks like as a filesystem (DESIGN.md section 5) and nothing about how
that tree is served: the CLI (``ls``, ``restore``) and the FUSE adapter both walk it. Errors are domain errors
(:class:`PathNotFound`, :class:`IntegrityError`, :class:`GuestDataError`); the adapters map them to exit codes or
errnos. Every node has a ``key`` that names it stably (hard links of a guest share one), from which the FUSE
adapter makes inode numbers.

::

    <guest>/latest -> <snapshot>
    <guest>/<snapshot>/vm.json
                       config/<file>
                       disks/<disk>.img                 and <disk>-p<N>.img for partitions with no known filesystem
                       files/<disk>/<volume>/...        volume: p<N>, <vg>-<lv> or whole

Listing the root or a guest asks the catalog (one indexed query); a snapshot's manifest is read only when
something inside that snapshot is looked at, so a repository with ten thousand snapshots mounts at once.
Symlinks of the guest are shown as they are and are never followed by vbfs itself. How a guest folder is listed
(host names, loops left out, a folder met twice shown empty) is :mod:`vbfs.guestfs.walk`'s, which the guest-file
index of the write path follows too.
"""

from __future__ import annotations

import json
import logging
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any

from vbfs.errors import PathNotFound, VbfsError
from vbfs.guestfs.bounds import deadline_cap, parse_seconds
from vbfs.guestfs.filesystems import BUILTIN as BUILTIN_FILESYSTEMS
from vbfs.guestfs.model import GuestDataError, GuestEntry, GuestFS, VolumeBusy
from vbfs.guestfs.volumes import Volume
from vbfs.guestfs.walk import clamp_ns, disk_volumes, host_mode, list_folder, open_root, open_volume
from vbfs.store.cache import ChunkCache
from vbfs.store.manifest import Manifest, time_ns
from vbfs.store.objects import DiskImage, StreamFile
from vbfs.store.repository import ZERO_ID, Repository

log = logging.getLogger("vbfs.tree")


@dataclass(frozen=True)
class Attr:
    mode: int  # full st_mode, type bits included
    size: int
    mtime_ns: int
    uid: int = 0
    gid: int = 0
    nlink: int = 1
    atime_ns: int | None = None
    ctime_ns: int | None = None
    rdev: int = 0  # device number of a device node (os.makedev form)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


class Node:
    __slots__ = ()
    name: str
    attr: Attr
    key: Hashable
    immutable = True  # its attributes and contents never change (snapshots); False for guest lists, `latest`
    from_guest = False  # a file, folder or symlink of a guest filesystem (its mode and owner are the guest's)
    _where: str | None = None

    @property
    def where(self) -> str:
        """Where the node is, for messages: the snapshot and the path when known."""
        return self._where or self.name


class Dir(Node):
    __slots__ = ()

    def children(self) -> list[Node]:
        raise NotImplementedError

    def lookup(self, name: str) -> Node:
        for child in self.children():
            if child.name == name:
                return child
        raise PathNotFound(f"no {name!r} here")


class MappedDir(Dir):
    """A folder whose children come as a name → node mapping from ``_load`` (which may cache it)."""

    def _load(self) -> dict[str, Node]:
        raise NotImplementedError

    def children(self) -> list[Node]:
        return list(self._load().values())

    def lookup(self, name: str) -> Node:
        try:
            return self._load()[name]
        except KeyError:
            raise PathNotFound(f"no {name!r} here") from None


class File(Node):
    __slots__ = ()

    def read(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def data_extents(self) -> Iterator[tuple[int, int]] | None:
        """Ranges that may hold non-zero bytes, for sparse copies; ``None`` if unknown."""
        return None

    def read_if_cached(self, offset: int, length: int) -> bytes | None:
        """The bytes when they can be had from memory without blocking; ``None`` means: call ``read``."""
        return None


class Symlink(Node):
    target: str


def _dir_attr(mtime_ns: int) -> Attr:
    return Attr(stat.S_IFDIR | 0o555, 0, mtime_ns, nlink=2)


class StaticDir(MappedDir):
    def __init__(self, name: str, key: Hashable, mtime_ns: int, kids: list[Node]):
        self.name = name
        self.key = key
        self.attr = _dir_attr(mtime_ns)
        self._kids = {k.name: k for k in kids}

    def _load(self) -> dict[str, Node]:
        return self._kids


class BytesFile(File):
    def __init__(self, name: str, key: Hashable, data: bytes, mtime_ns: int):
        self.name = name
        self.key = key
        self.data = data
        self.attr = Attr(stat.S_IFREG | 0o444, len(data), mtime_ns)

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]


class DiskFile(File):
    def __init__(self, image: DiskImage, key: Hashable, mtime_ns: int):
        self.name = f"{image.name}.img"
        self.key = key
        self.image = image
        self.attr = Attr(stat.S_IFREG | 0o444, image.size, mtime_ns)
        self._where = f"disks/{self.name}"

    def read(self, offset: int, length: int) -> bytes:
        return self.image.read(offset, length)

    def read_if_cached(self, offset: int, length: int) -> bytes | None:
        return self.image.read_if_cached(offset, length)

    def data_extents(self) -> Iterator[tuple[int, int]]:
        for i, cid in self.image.entries():
            if cid != ZERO_ID:
                yield i * self.image.chunk_size, self.image.chunk_length(i)


class VolumeFile(File):
    """A partition shown as an image of its own (when its filesystem is not known)."""

    def __init__(self, name: str, key: Hashable, image: DiskImage, offset: int, size: int, mtime_ns: int):
        self.name = name
        self.key = key
        self.image = image
        self.offset = offset
        self.attr = Attr(stat.S_IFREG | 0o444, size, mtime_ns)

    def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.attr.size - offset))
        return self.image.read(self.offset + offset, length)


class StreamNode(File):
    def __init__(self, name: str, key: Hashable, stream: StreamFile, mtime_ns: int):
        self.name = name
        self.key = key
        self.stream = stream
        self.attr = Attr(stat.S_IFREG | 0o444, stream.size, mtime_ns)

    def read(self, offset: int, length: int) -> bytes:
        return self.stream.read(offset, length)


class LinkNode(Symlink):
    def __init__(self, name: str, key: Hashable, target: str, mtime_ns: int, immutable: bool = True):
        self.name = name
        self.key = key
        self.target = target
        self.immutable = immutable
        self.attr = Attr(stat.S_IFLNK | 0o777, len(target.encode()), mtime_ns)


# ---- guest files -------------------------------------------------------------------------------------------------


def _guest_attr(e: GuestEntry) -> Attr:
    """Attributes as the guest has them, each clamped to what a stat structure carries."""
    return Attr(
        host_mode(e),
        e.size,
        clamp_ns(e.mtime_ns),
        e.uid & 0xFFFFFFFF,
        e.gid & 0xFFFFFFFF,
        min(max(e.nlink, 0), 0xFFFFFFFF),
        clamp_ns(e.atime_ns),
        clamp_ns(e.ctime_ns),
        e.rdev,
    )


def _bounded(lock: threading.Lock, where: str) -> None:
    """Take a lock that guards one parse of guest data: its holder is bounded by a time budget, so is the wait."""
    if not lock.acquire(timeout=2 * parse_seconds() + 1):
        raise VolumeBusy(f"{where}: busy (another request has been reading it for too long)")


def guest_node(
    fs: GuestFS,
    entry: GuestEntry,
    base_key: tuple[Hashable, ...],
    parent_path: str = "",
    parent: GuestDirNode | None = None,
) -> Node:
    key = (*base_key, entry.ino)
    path = f"{parent_path}/{entry.name}"
    node: Node
    if entry.is_dir:
        node = GuestDirNode(fs, entry, base_key, path, parent)
    elif entry.is_symlink:
        node = GuestLinkNode(fs, entry, key)
    else:
        node = GuestFileNode(fs, entry, key)
    node._where = f"{fs.label}:{path}"
    return node


class GuestDirNode(MappedDir):
    """A guest's folder. Its key is its place in the tree (a folder has one place; a damaged filesystem may
    list one folder inode at several, and the kernel must never see one folder inode in two places); a folder
    whose inode is one of its own ancestors' is left out with a note (a loop)."""

    from_guest = True

    def __init__(
        self,
        fs: GuestFS,
        entry: GuestEntry,
        base_key: tuple[Hashable, ...],
        path: str = "",
        parent: GuestDirNode | None = None,
    ):
        self.fs = fs
        self.entry = entry
        self.name = entry.name
        self.path = path
        self.parent = parent
        self._where = f"{fs.label}:{path or '/'}"
        self.base_key = base_key
        self.key = (*base_key, "dir", path)
        self.attr = _guest_attr(entry)
        self._kids: dict[str, Node] | None = None
        self._error: GuestDataError | None = None  # a damaged folder stays damaged: it is parsed once
        self._lock = threading.Lock()

    def _is_ancestor(self, ino: int) -> bool:
        node: GuestDirNode | None = self
        while node is not None:
            if node.entry.ino == ino:
                return True
            node = node.parent
        return False

    def _load(self) -> dict[str, Node]:
        _bounded(self._lock, self.where)
        try:
            if self._error is not None:
                raise self._error
            if self._kids is None:
                try:
                    listed = list_folder(self.fs, self.entry, self.path, self._is_ancestor)
                except VolumeBusy:
                    raise
                except GuestDataError as exc:
                    self._error = exc
                    raise
                kids: dict[str, Node] = {}
                for item in listed:
                    e = item.entry
                    if item.alias_of is not None:
                        kids[e.name] = AliasDirNode(self.fs, e, self.base_key, item.place, self)
                    else:
                        kids[e.name] = guest_node(self.fs, e, self.base_key, self.path, self)
                self._kids = kids
            return self._kids
        finally:
            self._lock.release()


class AliasDirNode(GuestDirNode):
    """A second place of a folder inode that is shown whole elsewhere: an empty folder with the guest's attributes."""

    def _load(self) -> dict[str, Node]:
        return {}


class GuestLinkNode(Symlink):
    """A guest's symlink; one whose target could not be read safely is an error to read, not an empty link."""

    from_guest = True

    def __init__(self, fs: GuestFS, entry: GuestEntry, key: Hashable):
        self.fs = fs
        self.entry = entry
        self.name = entry.name
        self.key = key
        self.attr = _guest_attr(entry)

    @property
    def target(self) -> str:  # type: ignore[override]
        if self.entry.damage or self.entry.target is None:
            raise GuestDataError(f"{self.where}: damaged {self.fs.fstype} symlink ({self.entry.damage})")
        return self.entry.target


class GuestFileNode(File):
    """A guest's file. Small on purpose: a mount may hold one for every file of a large guest."""

    from_guest = True
    __slots__ = ("_where", "entry", "fs", "key", "name")
    PIECE = 4 * 1024 * 1024  # the largest range ``data_extents`` gives

    def __init__(self, fs: GuestFS, entry: GuestEntry, key: Hashable):
        self.fs = fs
        self.entry = entry
        self.name = entry.name
        self.key = key
        self._where: str | None = None

    @property
    def attr(self) -> Attr:  # type: ignore[override]
        return _guest_attr(self.entry)

    def read(self, offset: int, length: int) -> bytes:
        if offset >= self.entry.size and not self.entry.damage:
            return b""
        return self.fs.read(self.entry, offset, length)

    def data_extents(self) -> Iterator[tuple[int, int]] | None:
        """The ranges of the file that the guest stored (holes left out), in pieces of at most ``PIECE``."""
        if not self.entry.is_file:
            return None
        ranges = self.fs.data_extents(self.entry)
        if ranges is None:
            return None
        return (
            (pos, min(self.PIECE, end - pos))
            for off, n in ranges
            for end in (off + n,)
            for pos in range(off, end, self.PIECE)
        )


class VolumeRoot(GuestDirNode):
    """The root folder of one guest filesystem, named after its volume (p1, vg0-root, whole)."""

    def __init__(self, fs: GuestFS, volume: Volume, base_key: tuple[Hashable, ...]):
        super().__init__(fs, open_root(fs), base_key)
        self.name = volume.name


# ---- snapshots ---------------------------------------------------------------------------------------------------


FilesystemFactory = Callable[[str], Any]


class SnapshotTree:
    """What one snapshot holds; built lazily from its manifest. Thread-safe."""

    def __init__(
        self, repo: Repository, manifest: Manifest, cache: ChunkCache, filesystems: dict[str, Any] | None = None
    ):
        self.repo = repo
        self.manifest = manifest
        self.cache = cache
        self.filesystems = filesystems or BUILTIN_FILESYSTEMS
        self.id = manifest.id
        self.mtime_ns = time_ns(manifest.time)
        self.images = {d.name: DiskImage(repo, d, cache) for d in manifest.disks}
        self._volumes: dict[str, list[Volume]] = {}
        self._lock = threading.RLock()
        self._root: StaticDir | None = None

    def volumes(self, disk: str) -> list[Volume]:
        with self._lock:
            if disk not in self._volumes:
                image = self.images[disk]
                self._volumes[disk] = disk_volumes(image.read, image.size, self.label(disk))
            return self._volumes[disk]

    def label(self, *parts: str) -> str:
        return " ".join([f"{self.manifest.guest}@{self.manifest.name}", *parts])

    def open_fs(self, disk: str, vol: Volume) -> GuestFS:
        return open_volume(self.filesystems, vol, self.label(disk, vol.name))

    def _describe(self, disk: str, vol: Volume) -> dict[str, object]:
        """A volume in vm.json, with what its filesystem says of itself (Btrfs: its default subvolume)."""
        out = vol.describe()
        cls = self.filesystems.get(vol.fstype) if vol.fstype is not None else None
        notes_of = getattr(cls, "volume_notes", None)
        if notes_of is not None:
            try:
                extra = notes_of(vol.reader.sub(0, vol.size), self.label(disk, vol.name))
            except VbfsError as exc:
                extra = [str(exc)]
            out["note"] = "; ".join(n for n in (vol.note, *extra) if n)
        return out

    def vm_json(self) -> bytes:
        m = self.manifest
        volumes: dict[str, Any] = {}
        for d in m.disks:
            try:
                volumes[d.name] = [self._describe(d.name, v) for v in self.volumes(d.name)]
            except VbfsError as exc:
                volumes[d.name] = {"error": str(exc)}
        doc = {
            "guest": m.guest,
            "snapshot": {"id": m.id, "name": m.name, "time": m.time, "finished": m.finished},
            "source": m.source.to_json(),
            "consistency": m.consistency,
            "disks": [
                {"name": d.name, "size": d.size, "mode": d.mode, "details": dict(d.details), "volumes": volumes[d.name]}
                for d in m.disks
            ],
            "metadata": dict(m.metadata),
            "notes": list(m.notes),
        }
        return json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"

    def root(self, name: str) -> StaticDir:
        with self._lock:
            if self._root is None:
                self._root = self._build(name)
            return self._root

    def _build(self, name: str) -> StaticDir:
        m, sid, t = self.manifest, self.id, self.mtime_ns
        disk_nodes: list[Node] = []
        files: list[Node] = []
        for d in m.disks:
            image = self.images[d.name]
            disk_file = DiskFile(image, (sid, "disks", d.name), t)
            disk_file._where = self.label(f"disks/{disk_file.name}")
            disk_nodes.append(disk_file)
            files.append(DiskFilesDir(self, d.name, t))
        kids: list[Node] = [
            LazyBytesFile("vm.json", (sid, "vm.json"), self.vm_json, t),
            DisksDir(self, disk_nodes, t),
            StaticDir("files", (sid, "files"), t, files),
        ]
        if m.config:
            kids.append(
                StaticDir(
                    "config",
                    (sid, "config"),
                    t,
                    [
                        StreamNode(n, (sid, "config", n), StreamFile(self.repo, ref, self.cache), t)
                        for n, ref in sorted(m.config.items())
                    ],
                )
            )
        return StaticDir(name, ("snap", sid), t, kids)


class LazyBytesFile(File):
    """A small generated file whose contents are made on first use (its size needs them too)."""

    def __init__(self, name: str, key: Hashable, make: Callable[[], bytes], mtime_ns: int):
        self.name = name
        self.key = key
        self._make = make
        self._data: bytes | None = None
        self._mtime_ns = mtime_ns

    @property
    def data(self) -> bytes:
        if self._data is None:
            self._data = self._make()
        return self._data

    @property
    def attr(self) -> Attr:  # type: ignore[override]
        return Attr(stat.S_IFREG | 0o444, len(self.data), self._mtime_ns)

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]


class DisksDir(Dir):
    """``disks/``: every disk, and an image of each partition whose filesystem is unknown."""

    def __init__(self, snap: SnapshotTree, disk_nodes: list[Node], mtime_ns: int):
        self.snap = snap
        self.name = "disks"
        self.key = (snap.id, "disks")
        self.attr = _dir_attr(mtime_ns)
        self._disks = disk_nodes
        self._kids: dict[str, Node] | None = None

    def children(self) -> list[Node]:
        if self._kids is None:
            kids = list(self._disks)
            for d in self._disks:
                assert isinstance(d, DiskFile)
                try:
                    vols = self.snap.volumes(d.image.name)
                except VbfsError:
                    continue
                for v in vols:
                    if v.fstype is None and v.offset >= 0 and v.name != "whole" and not v.note.startswith("LVM2"):
                        name = f"{d.image.name}-{v.name}.img"
                        kids.append(
                            VolumeFile(
                                name, (self.snap.id, "disks", name), d.image, v.offset, v.size, self.attr.mtime_ns
                            )
                        )
            self._kids = {k.name: k for k in kids}
        return list(self._kids.values())

    def lookup(self, name: str) -> Node:
        for d in self._disks:
            if d.name == name:
                return d
        return super().lookup(name)


class DiskFilesDir(MappedDir):
    """``files/<disk>/``: one folder per volume with a known filesystem."""

    def __init__(self, snap: SnapshotTree, disk: str, mtime_ns: int):
        self.snap = snap
        self.disk = disk
        self.name = disk
        self.key = (snap.id, "files", disk)
        self.attr = _dir_attr(mtime_ns)
        self._kids: dict[str, Node] | None = None
        self._lock = threading.Lock()

    def _load(self) -> dict[str, Node]:
        with self._lock:
            if self._kids is None:
                kids: dict[str, Node] = {}
                for v in self.snap.volumes(self.disk):
                    if v.fstype is not None:
                        kids[v.name] = LazyVolumeRoot(self.snap, self.disk, v, self.attr.mtime_ns)
                self._kids = kids
            return self._kids


class LazyVolumeRoot(Dir):
    """A volume's folder; the filesystem is opened on first use, so a damaged one fails only what touches it."""

    def __init__(self, snap: SnapshotTree, disk: str, volume: Volume, mtime_ns: int):
        self.snap = snap
        self.disk = disk
        self.volume = volume
        self.name = volume.name
        self.key = (snap.id, "files", disk, volume.name)
        self._mtime_ns = mtime_ns
        self._root: VolumeRoot | None = None
        self._error: GuestDataError | None = None  # a volume that cannot be opened is tried once
        self._lock = threading.Lock()

    def real(self) -> VolumeRoot:
        _bounded(self._lock, self.snap.label(self.disk, self.volume.name))
        try:
            if self._error is not None:
                raise self._error
            if self._root is None:
                try:
                    fs = self.snap.open_fs(self.disk, self.volume)
                    root = VolumeRoot(fs, self.volume, (self.snap.id, self.disk, self.volume.name))
                except VolumeBusy:
                    raise
                except GuestDataError as exc:
                    self._error = exc
                    raise
                root.key = self.key
                self._root = root
            return self._root
        finally:
            self._lock.release()

    @property
    def attr(self) -> Attr:  # type: ignore[override]
        try:
            return self.real().attr
        except VbfsError:
            return _dir_attr(self._mtime_ns)

    def children(self) -> list[Node]:
        return self.real().children()

    def lookup(self, name: str) -> Node:
        return self.real().lookup(name)


# ---- the whole repository ----------------------------------------------------------------------------------------


class RepositoryTree:
    """The root of the tree: guests, their snapshots and ``latest``. Snapshot trees are kept in a small LRU."""

    KEEP_SNAPSHOTS = 32

    def __init__(
        self,
        repo: Repository,
        catalog: Callable[[], Any],
        cache: ChunkCache,
        filesystems: dict[str, Any] | None = None,
    ):
        self.repo = repo
        self.catalog = catalog  # gives this thread's Catalog
        self.cache = cache
        self.filesystems = filesystems
        self._snaps: OrderedDict[str, SnapshotTree] = OrderedDict()
        self._lock = threading.Lock()
        self.root = RootDir(self)

    def snapshot(self, snap_id: str) -> SnapshotTree:
        with self._lock:
            tree = self._snaps.get(snap_id)
            if tree is not None:
                self._snaps.move_to_end(snap_id)
                return tree
        manifest = self.repo.load_manifest(snap_id)
        log.info("opened snapshot %s@%s (%s)", manifest.guest, manifest.name, snap_id)
        tree = SnapshotTree(self.repo, manifest, self.cache, self.filesystems)
        with self._lock:
            tree = self._snaps.setdefault(snap_id, tree)
            while len(self._snaps) > self.KEEP_SNAPSHOTS:
                self._snaps.popitem(last=False)
        return tree


class RootDir(Dir):
    immutable = False

    def __init__(self, tree: RepositoryTree):
        self.tree = tree
        self.name = ""
        self.key = ("root",)
        self.attr = _dir_attr(0)

    def children(self) -> list[Node]:
        return [GuestHostDir(self.tree, g["name"], g["latest"]) for g in self.tree.catalog().guests()]

    def lookup(self, name: str) -> Node:
        for g in self.tree.catalog().guests():
            if g["name"] == name:
                return GuestHostDir(self.tree, name, g["latest"])
        raise PathNotFound(f"no guest {name!r}")


class GuestHostDir(Dir):
    """``<guest>/``: ``latest`` and one folder per snapshot."""

    immutable = False

    def __init__(self, tree: RepositoryTree, guest: str, latest_time: str):
        self.tree = tree
        self.name = guest
        self.key = ("guest", guest)
        self.attr = _dir_attr(time_ns(latest_time))

    def _latest(self) -> Node | None:
        latest = self.tree.catalog().latest(self.name)
        if latest is None:
            return None
        return LinkNode("latest", ("latest", self.name), latest["name"], time_ns(latest["time"]), immutable=False)

    def children(self) -> list[Node]:
        latest = self._latest()
        kids: list[Node] = [latest] if latest else []
        kids += [SnapshotDirNode(self.tree, s) for s in self.tree.catalog().snapshots(self.name)]
        return kids

    def lookup(self, name: str) -> Node:
        if name == "latest":
            latest = self._latest()
            if latest is not None:
                return latest
        summary = self.tree.catalog().by_name(self.name, name)
        if summary is None:
            raise PathNotFound(f"no snapshot {name!r} of {self.name}")
        return SnapshotDirNode(self.tree, summary)


class SnapshotDirNode(Dir):
    """A snapshot's folder: its attributes come from the catalog, its contents from the manifest on first use."""

    def __init__(self, tree: RepositoryTree, summary: dict[str, Any]):
        self.tree = tree
        self.summary = summary
        self.name = summary["name"]
        self.key = ("snap", summary["id"])
        self.attr = _dir_attr(time_ns(summary["time"]))

    def real(self) -> StaticDir:
        return self.tree.snapshot(self.summary["id"]).root(self.name)

    def children(self) -> list[Node]:
        return self.real().children()

    def lookup(self, name: str) -> Node:
        return self.real().lookup(name)


def walk_path(node: Node, path: str) -> Node:
    """Follow a slash-separated path from ``node`` without following symlinks; ``PathNotFound`` names the part."""
    done = ""
    for part in [p for p in path.split("/") if p and p != "."]:
        if not isinstance(node, Dir):
            kind = "a symlink (not followed)" if isinstance(node, Symlink) else "not a folder"
            raise PathNotFound(f"{done or '/'} is {kind}")
        try:
            node = node.lookup(part)
        except PathNotFound:
            raise PathNotFound(f"no such path in the snapshot: {done}/{part}") from None
        done += "/" + part
    return node


def iter_tree(
    node: Node,
    prefix: str = "",
    seconds: float | None = None,
    on_error: Callable[[str, VbfsError], None] | None = None,
) -> Iterator[tuple[str, Node]]:
    """Every node below ``node`` (depth first, parents before children), with its path relative to ``node``.

    With ``seconds``, the walk and every parser call in it end within that many seconds (a :class:`GuestDataError`
    then says where it stopped). With ``on_error``, a folder that cannot be listed is reported to it and the walk
    goes on with the rest. The walk keeps a stack, not a recursion: a deep tree cannot overflow it.
    """
    deadline = None if seconds is None else time.monotonic() + seconds
    stack: list[tuple[str, Node]] = [(prefix, node)]
    while stack:
        here, parent = stack.pop()
        if not isinstance(parent, Dir):
            continue
        try:
            if deadline is not None:
                if time.monotonic() > deadline:
                    raise GuestDataError(f"{parent.where}: walk stopped after {seconds:g} s")
                with deadline_cap(deadline):
                    kids = parent.children()
            else:
                kids = parent.children()
        except VbfsError as exc:
            if on_error is None or (deadline is not None and time.monotonic() > deadline):
                raise
            on_error(here or parent.name, exc)
            continue
        below = []
        for child in sorted(kids, key=lambda n: n.name):
            path = f"{here}/{child.name}" if here else child.name
            yield path, child
            if isinstance(child, Dir):
                below.append((path, child))
        stack.extend(reversed(below))
