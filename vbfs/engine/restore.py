"""Restore: copy a node of the snapshot tree (a disk image, a guest file or folder, ...) out to a local path.

Files are written to a temporary name beside the target and renamed into place only when every byte was read
and verified, so a damaged chunk never leaves a plausible-looking but wrong file behind. Disk images and guest
files are written sparse (zero blocks stay holes). Guest files get back their mode, times and — when running as
root — owner; symlinks are recreated as symlinks (never followed) and hard links as hard links.
"""

from __future__ import annotations

import os
import stat
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from vbfs.engine.progress import NoProgress, Progress
from vbfs.errors import VbfsError
from vbfs.vfs import Dir, File, Node, Symlink

WINDOW = 8
PIECE = 4 * 1024 * 1024
SPARSE_BLOCK = 64 * 1024
BIG_FILE = 32 * 1024 * 1024  # from this size on: parallel reads, a progress bar, an fsync of its own


@dataclass
class RestoreStats:
    files: int = 0
    bytes: int = 0
    links: dict[object, Path] = field(default_factory=dict)  # hard-link key → first restored path
    skipped: list[str] = field(default_factory=list)  # device nodes, fifos and sockets of the guest


def _extents(node: File) -> list[tuple[int, int]]:
    ext = node.data_extents()
    if ext is not None:
        return list(ext)
    return [(off, min(PIECE, node.attr.size - off)) for off in range(0, node.attr.size, PIECE)]


def _copy_sequential(node: File, extents: list[tuple[int, int]], fd: int, stats: RestoreStats) -> None:
    for off, n in extents:
        data = node.read(off, n)
        _write_sparse(fd, data, off)
        stats.bytes += len(data)


def _copy_parallel(
    node: File, extents: list[tuple[int, int]], fd: int, stats: RestoreStats, progress: Progress
) -> None:
    """Large files: up to ``WINDOW`` pieces read (fetched, verified, decompressed) at once, written in order."""
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="vbfs-restore") as pool:
        window: deque[tuple[int, Future[bytes]]] = deque()
        it = iter(extents)

        def fill() -> None:
            while len(window) < WINDOW:
                nxt = next(it, None)
                if nxt is None:
                    return
                window.append((nxt[0], pool.submit(node.read, nxt[0], nxt[1])))

        fill()
        while window:
            off, fut = window.popleft()
            data = fut.result()
            _write_sparse(fd, data, off)
            stats.bytes += len(data)
            progress.advance(len(data))
            fill()


def restore_file(node: File, target: Path, progress: Progress, stats: RestoreStats) -> None:
    tmp = target.with_name(f".{target.name}.vbfs-partial")
    extents = _extents(node)
    big = node.attr.size >= BIG_FILE
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as exc:
        raise VbfsError(f"cannot write {target}: {exc.strerror}") from None
    ok = False
    try:
        if big:
            progress.begin(node.name, sum(n for _, n in extents))
            _copy_parallel(node, extents, fd, stats, progress)
        else:
            _copy_sequential(node, extents, fd, stats)
        os.ftruncate(fd, node.attr.size)
        if big:
            os.fsync(fd)  # small files are synced together at the end of the restore
        ok = True
    except OSError as exc:
        raise VbfsError(f"cannot write {target}: {exc.strerror}") from None
    finally:
        os.close(fd)
        if big:
            progress.end()
        if not ok:
            tmp.unlink(missing_ok=True)
    mode = node.attr.mode & 0o7777
    # Synthetic files of the tree (disks, vm.json) are read-only in the mount; a restored copy is the user's.
    _set_owner(tmp, node)
    os.chmod(tmp, mode if _is_guest(node) else 0o644)
    os.utime(tmp, ns=(node.attr.atime_ns or node.attr.mtime_ns, node.attr.mtime_ns))
    os.replace(tmp, target)
    stats.files += 1


def _write_sparse(fd: int, data: bytes, off: int) -> None:
    """Write the non-zero 64 KiB blocks of ``data``; zero blocks stay holes."""
    zero = bytes(SPARSE_BLOCK)
    start = None
    for pos in range(0, len(data), SPARSE_BLOCK):
        block = data[pos : pos + SPARSE_BLOCK]
        if block == zero[: len(block)]:
            if start is not None:
                _pwrite_all(fd, data[start:pos], off + start)
                start = None
        elif start is None:
            start = pos
    if start is not None:
        _pwrite_all(fd, data[start:], off + start)


def _pwrite_all(fd: int, data: bytes, off: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, off)
        view = view[n:]
        off += n


def restore(node: Node, target: Path, progress: Progress | None = None) -> RestoreStats:
    """Restore ``node`` to ``target``; into ``target/<name>`` when ``target`` is an existing folder."""
    progress = progress or NoProgress()
    stats = RestoreStats()
    if target.is_dir():
        target = target / node.name
    if target.exists() and not target.is_dir() and not target.is_file():
        raise VbfsError(f"{target} exists and is not a regular file; restore to a file or a folder")
    _restore(node, target, progress, stats)
    os.sync()  # everything restored is on disk when the command returns
    return stats


def _is_guest(node: Node) -> bool:
    return node.from_guest


def _set_owner(path: Path, node: Node) -> None:
    if os.geteuid() == 0 and _is_guest(node):
        os.lchown(path, node.attr.uid, node.attr.gid)


def _restore(node: Node, target: Path, progress: Progress, stats: RestoreStats) -> None:
    if isinstance(node, Dir):
        target.mkdir(parents=True, exist_ok=True)
        for child in node.children():
            _restore(child, target / child.name, progress, stats)
        if _is_guest(node):
            _set_owner(target, node)
            os.chmod(target, node.attr.mode & 0o7777)
            os.utime(target, ns=(node.attr.atime_ns or node.attr.mtime_ns, node.attr.mtime_ns))
    elif isinstance(node, Symlink):
        if target.is_symlink() or target.exists():
            target.unlink()
        os.symlink(node.target, target)
        _set_owner(target, node)
        os.utime(target, ns=(node.attr.mtime_ns, node.attr.mtime_ns), follow_symlinks=False)
    elif isinstance(node, File) and not stat.S_ISREG(node.attr.mode):
        stats.skipped.append(str(target))  # a guest's device node or fifo is no file to restore on this host
    elif isinstance(node, File):
        if not target.parent.is_dir():
            raise VbfsError(f"cannot restore to {target}: {target.parent} is not a folder")
        if node.attr.nlink > 1 and _is_guest(node):
            first = stats.links.get(node.key)
            if first is not None:
                if target.exists():
                    target.unlink()
                os.link(first, target)
                return
            stats.links[node.key] = target
        restore_file(node, target, progress, stats)
    else:
        raise VbfsError(f"cannot restore {node.name}: not a file, folder or symlink")
