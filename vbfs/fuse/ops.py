"""pyfuse3 operations over the vfs tree: a protocol adapter only.

What the repository looks like as a filesystem is decided in :mod:`vbfs.vfs`; this module turns FUSE requests into
calls on that tree and its answers into ``EntryAttributes``. It runs on the trio thread and never blocks it:
every call into the tree (which may read and decrypt chunks, parse a guest filesystem or query the catalog) goes
through ``trio.to_thread.run_sync``. Three ``CapacityLimiter``s keep the kinds of work from waiting behind each
other: the repository's root and guest folders (catalog queries only), guest filesystems (parsers, each call
bounded by a time budget, see :mod:`vbfs.guestfs.bounds`), and the rest of a snapshot (manifests, disk images).
Listing the mount's root therefore never waits for a guest parser. A guest volume's parser serves one request at a
time: requests for one volume queue in trio (holding no thread) for at most one time budget, then get EIO, so a
volume that keeps its parser busy costs one worker thread and never the other volumes. Errors are mapped here and
only here; only ``FUSEError`` leaves a handler.

Inode numbers are made from the nodes' stable keys: the same node (and every hard link of one guest file) always
gets the same number during a mount. Lookup counts are kept and released in ``forget``.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import pyfuse3
import trio

from vbfs.errors import IntegrityError, PathNotFound, VbfsError
from vbfs.guestfs.bounds import parse_seconds
from vbfs.guestfs.model import GuestDataError, VolumeBusy
from vbfs.vfs import (
    Dir,
    DiskFilesDir,
    File,
    GuestHostDir,
    LazyVolumeRoot,
    Node,
    RootDir,
    Symlink,
)

log = logging.getLogger("vbfs.mount")
T = TypeVar("T")

IMMUTABLE_TIMEOUT = 3600.0  # snapshots never change: let the kernel cache them
MUTABLE_TIMEOUT = 1.0  # guest lists and `latest` change when a backup lands
SIZE_MAX = (1 << 63) - 1  # st_size is a signed 64-bit number


class VbfsOperations(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, root: Node, threads: int = 4):
        super().__init__()
        self._limiter = trio.CapacityLimiter(threads)  # snapshots: manifests, disk images, generated files
        self._catalog_limiter = trio.CapacityLimiter(2)  # the root and the guests' folders
        self._guest_limiter = trio.CapacityLimiter(threads)  # guest filesystems
        self._lanes: dict[str, trio.CapacityLimiter] = {}  # one per guest volume: its parser serves one at a time
        self._nodes: dict[int, Node] = {pyfuse3.ROOT_INODE: root}
        self._inodes: dict[Any, int] = {root.key: pyfuse3.ROOT_INODE}
        self._next_ino = pyfuse3.ROOT_INODE + 1
        self._lookups: dict[int, int] = {}
        self._open: dict[int, Any] = {}
        self._next_fh = 1
        self._logged: set[str] = set()

    # ---- helpers --------------------------------------------------------------------------------------------------

    def _ino(self, node: Node) -> int:
        ino = self._inodes.get(node.key)
        if ino is None:
            ino = self._next_ino
            self._next_ino += 1
            self._inodes[node.key] = ino
        self._nodes[ino] = node
        return ino

    def _node(self, ino: int) -> Node:
        try:
            return self._nodes[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _fail(self, exc: BaseException, what: str) -> pyfuse3.FUSEError:
        if isinstance(exc, PathNotFound):
            return pyfuse3.FUSEError(errno.ENOENT)
        if isinstance(exc, GuestDataError | IntegrityError | VbfsError):
            message = f"{what}: {exc}"
            if message not in self._logged:
                self._logged.add(message)
                log.error("%s", message)
            return pyfuse3.FUSEError(errno.EIO)
        log.exception("internal error in %s", what)
        return pyfuse3.FUSEError(errno.EIO)

    def _limiter_for(self, node: Node) -> trio.CapacityLimiter:
        if isinstance(node, RootDir | GuestHostDir):
            return self._catalog_limiter
        if node.from_guest or isinstance(node, LazyVolumeRoot | DiskFilesDir):
            return self._guest_limiter
        return self._limiter

    def _lane(self, node: Node) -> trio.CapacityLimiter | None:
        if isinstance(node, LazyVolumeRoot):
            label = node.snap.label(node.disk, node.volume.name)
        elif node.from_guest and hasattr(node, "fs"):
            label = node.fs.label
        else:
            return None
        lane = self._lanes.get(label)
        if lane is None:
            lane = self._lanes[label] = trio.CapacityLimiter(1)
        return lane

    async def _call(self, what: str, fn: Callable[..., T], *args: Any, node: Node | None = None) -> T:
        limiter = self._limiter if node is None else self._limiter_for(node)
        lane = None if node is None else self._lane(node)
        try:
            if lane is None:
                return await trio.to_thread.run_sync(fn, *args, limiter=limiter)
            seconds = parse_seconds()
            acquired = False
            with trio.move_on_after(seconds):
                await lane.acquire()
                acquired = True
            if not acquired:
                raise VolumeBusy(f"the volume is busy (another request has parsed it for more than {seconds:g} s)")
            try:
                return await trio.to_thread.run_sync(fn, *args, limiter=limiter)
            finally:
                lane.release()
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            raise self._fail(exc, what) from None

    @staticmethod
    def _attrs(ino: int, node: Node) -> pyfuse3.EntryAttributes:
        a = node.attr
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.generation = 0
        e.st_mode = a.mode
        e.st_nlink = a.nlink
        e.st_uid = a.uid
        e.st_gid = a.gid
        size = min(max(a.size, 0), SIZE_MAX)
        e.st_size = size
        e.st_blksize = 128 * 1024
        e.st_blocks = (size + 511) // 512
        e.st_mtime_ns = a.mtime_ns
        e.st_atime_ns = a.atime_ns if a.atime_ns is not None else a.mtime_ns
        e.st_ctime_ns = a.ctime_ns if a.ctime_ns is not None else a.mtime_ns
        timeout = IMMUTABLE_TIMEOUT if node.immutable else MUTABLE_TIMEOUT
        e.entry_timeout = timeout
        e.attr_timeout = timeout
        return e

    # ---- the operations -------------------------------------------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        if not isinstance(parent, Dir):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        text = os.fsdecode(name)

        def find() -> tuple[Node, int, pyfuse3.EntryAttributes]:
            child = parent.lookup(text)
            return child, 0, self._attrs(0, child)

        child, _, attrs = await self._call(f"lookup {text} in {parent.where}", find, node=parent)
        ino = self._ino(child)
        attrs.st_ino = ino
        self._lookups[ino] = self._lookups.get(ino, 0) + 1
        return attrs

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if node.from_guest:  # a guest entry's attributes are in memory: answered here, never behind its parser
            try:
                return self._attrs(inode, node)
            except Exception as exc:
                raise self._fail(exc, f"getattr {node.where}") from None
        return await self._call(f"getattr {node.where}", self._attrs, inode, node, node=node)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        if not isinstance(node, Symlink):
            raise pyfuse3.FUSEError(errno.EINVAL)
        try:
            return os.fsencode(node.target)  # in memory (a damaged guest symlink raises instead)
        except Exception as exc:
            raise self._fail(exc, f"readlink {node.where}") from None

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._node(inode)
        if not isinstance(node, Dir):
            raise pyfuse3.FUSEError(errno.ENOTDIR)

        def listing() -> list[tuple[Node, pyfuse3.EntryAttributes]]:
            return [(c, self._attrs(0, c)) for c in sorted(node.children(), key=lambda n: n.name)]

        entries = await self._call(f"listing {node.where}", listing, node=node)
        fh = self._next_fh
        self._next_fh += 1
        self._open[fh] = entries
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._open.get(fh, [])
        for i in range(start_id, len(entries)):
            child, attrs = entries[i]
            ino = self._ino(child)
            attrs.st_ino = ino
            if not pyfuse3.readdir_reply(token, os.fsencode(child.name), attrs, i + 1):
                break
            self._lookups[ino] = self._lookups.get(ino, 0) + 1

    async def releasedir(self, fh: int) -> None:
        self._open.pop(fh, None)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        node = self._node(inode)
        if not isinstance(node, File):
            raise pyfuse3.FUSEError(errno.EISDIR if isinstance(node, Dir) else errno.EINVAL)
        fh = self._next_fh
        self._next_fh += 1
        self._open[fh] = node
        return pyfuse3.FileInfo(fh=fh, keep_cache=node.immutable)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        node = self._open.get(fh)
        if not isinstance(node, File):
            raise pyfuse3.FUSEError(errno.EBADF)
        try:  # served from memory on this thread when no I/O is needed (most reads of a sequential copy)
            data = node.read_if_cached(off, size)
        except Exception as exc:
            raise self._fail(exc, f"read {node.where}") from None
        if data is not None:
            return data
        return await self._call(f"read {node.where}", node.read, off, size, node=node)

    async def release(self, fh: int) -> None:
        self._open.pop(fh, None)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            left = self._lookups.get(ino, 0) - n
            if left > 0:
                self._lookups[ino] = left
                continue
            self._lookups.pop(ino, None)
            if ino != pyfuse3.ROOT_INODE:
                self._nodes.pop(ino, None)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = s.f_bfree = s.f_bavail = 0
        s.f_files = len(self._nodes)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return not mode & os.W_OK

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return []

    # Writes never reach a read-only mount (the kernel answers EROFS), but answer them the same way if they do.
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def mknod(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def mkdir(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def create(self, *args: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def unlink(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def rmdir(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def rename(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def symlink(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def link(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def write(self, *args: Any) -> int:
        raise pyfuse3.FUSEError(errno.EROFS)
