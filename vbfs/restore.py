"""Restore: copy a node of the snapshot tree (a disk image, a guest file or folder, ...) out to a local path.

An adapter of the tree of :mod:`vbfs.vfs`, like the FUSE adapter (:mod:`vbfs.fuse`): it reads the tree and
writes below a local folder.

A guest's files are attacker-controlled data and restore usually runs as root, so it writes only below the path
the user gave, and never through anything it did not make itself:

- The target the user typed is the only path resolved the ordinary way. Everything below it is made relative to
  a folder restore has open (``dir_fd=``) and opened with ``O_NOFOLLOW``: a symlink or a file in the way of a
  folder is replaced by the folder, never followed; a folder in the way of a file is refused.
- Files, symlinks and device nodes are made with ``O_EXCL`` under short random names in a private folder
  (``.vbfs-restore-XXXXXXXX``, mode 0700, in the folder the target is restored into, so renames stay on one
  filesystem). They get their owner, mode and times there, through their descriptor, and are renamed into place
  only when every byte was read and verified: a damaged chunk never leaves a plausible-looking but wrong file
  behind. The private folder is removed on every way out (done, error, Ctrl-C).
- Names come from the tree, where :mod:`vbfs.names` made every guest name one safe path component; the notes it
  made about the folders restored are passed on.
- setuid and setgid bits of files are restored only when asked (``keep_setuid``); device nodes and fifos are made
  only when asked (``devices``). Otherwise the bits are cleared or the node is skipped, with a note.
- A folder hard-linked into itself (a damaged filesystem) is restored once, with a note; nesting is capped.
- A guest file or folder that cannot be read (damaged data) is left out and listed in ``failed``; the rest of
  the folder is restored. The caller reports the failures and exits non-zero.

Disk images and guest files are written sparse (zero blocks stay holes). Guest files get back their mode, times
and (as root) owner; symlinks are recreated as symlinks and hard links as hard links. Files that are not a
guest's (disk images, ``vm.json``) get mode 0666 less the umask.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from vbfs.engine.progress import NoProgress, Progress
from vbfs.errors import IntegrityError, VbfsError
from vbfs.guestfs.model import GuestDataError, GuestFS
from vbfs.names import is_safe
from vbfs.vfs import Dir, File, GuestDirNode, LazyVolumeRoot, Node, Symlink

WINDOW = 8
PIECE = 4 * 1024 * 1024
SPARSE_BLOCK = 64 * 1024
BIG_FILE = 32 * 1024 * 1024  # from this size on: parallel reads, a progress bar, an fsync of its own
MAX_DEPTH = 256  # folder levels below what is restored; more is a damaged or hostile filesystem
PRIVATE_PREFIX = ".vbfs-restore-"

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_SETID = stat.S_ISUID | stat.S_ISGID
_SPECIAL = {stat.S_IFIFO: "fifo", stat.S_IFCHR: "device node", stat.S_IFBLK: "device node", stat.S_IFSOCK: "socket"}


@dataclass
class RestoreStats:
    files: int = 0
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)  # device nodes, fifos and sockets of the guest, not made
    # Guest files and folders that could not be read (damaged data): not restored, the rest of the folder was.
    failed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was restored differently from the snapshot, and why


@dataclass(frozen=True)
class _Placed:
    """Where the first copy of a hard-linked file went (its path below the base folder) and its inode."""

    rel: tuple[str, ...]
    dev: int
    ino: int


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

        try:
            fill()
            while window:
                off, fut = window.popleft()
                data = fut.result()
                _write_sparse(fd, data, off)
                stats.bytes += len(data)
                progress.advance(len(data))
                fill()
        except BaseException:
            for _, pending in window:  # an error or Ctrl-C: do not wait for reads nobody will write
                pending.cancel()
            raise


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


def current_umask() -> int:
    """The process umask, read without changing it (``/proc``), or by setting it back at once."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _times(node: Node) -> tuple[int, int]:
    return node.attr.atime_ns or node.attr.mtime_ns, node.attr.mtime_ns


class _Restore:
    """One restore run: the base folder it writes into (open), its private folder, what it has placed so far."""

    def __init__(
        self, base_fd: int, base: Path, progress: Progress, stats: RestoreStats, keep_setuid: bool, devices: bool
    ):
        self.base_fd = base_fd
        self.base = base
        self.progress = progress
        self.stats = stats
        self.keep_setuid = keep_setuid
        self.devices = devices
        self.as_root = os.geteuid() == 0
        self.umask = current_umask()
        self.private_fd = -1
        self.private_name = ""
        self.links: dict[Hashable, _Placed] = {}  # hard-link key → the first restored copy
        self.folders: dict[Hashable, tuple[str, ...]] = {}  # folder key → where it was restored
        self.ancestors: set[Hashable] = set()  # keys of the folders on the current path
        self.marks: dict[int, tuple[GuestFS, int]] = {}  # guest filesystem → how many notes it had before

    def show(self, rel: tuple[str, ...]) -> str:
        return str(self.base.joinpath(*rel))

    def note(self, text: str) -> None:
        self.stats.notes.append(text)

    # ---- the private folder ----------------------------------------------------------------------------------

    def open_private(self) -> None:
        for _ in range(100):
            name = PRIVATE_PREFIX + secrets.token_hex(4)
            try:
                os.mkdir(name, 0o700, dir_fd=self.base_fd)
                self.private_name = name  # from here on close_private removes it, whatever happens next
                break
            except FileExistsError:
                continue
        else:
            raise VbfsError(f"cannot make a temporary folder in {self.base}")
        fd = os.open(name, _DIR, dir_fd=self.base_fd)
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            os.close(fd)
            raise VbfsError(f"cannot restore into {self.base}: its temporary folder {name} was replaced")
        os.fchmod(fd, 0o700)
        self.private_fd = fd

    def close_private(self) -> None:
        """Remove the private folder and whatever is still in it (only entries restore made, never folders)."""
        if not self.private_name:
            return
        fd, self.private_fd = self.private_fd, -1
        try:
            if fd >= 0:
                for name in os.listdir(fd):
                    os.unlink(name, dir_fd=fd)
        finally:
            if fd >= 0:
                os.close(fd)
        os.rmdir(self.private_name, dir_fd=self.base_fd)
        self.private_name = ""

    def _new(self, make: Callable[[str], object]) -> str:
        """A fresh short random name in the private folder, made by ``make(name)`` (which must use O_EXCL)."""
        for _ in range(100):
            name = secrets.token_hex(6)
            try:
                make(name)
                return name
            except FileExistsError:
                continue
        raise VbfsError(f"cannot make a temporary file in {self.base}")

    def place(self, tmp: str, dir_fd: int, rel: tuple[str, ...]) -> None:
        """Rename ``tmp`` from the private folder to ``rel[-1]`` in ``dir_fd``, replacing a file or symlink there."""
        try:
            os.replace(tmp, rel[-1], src_dir_fd=self.private_fd, dst_dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                raise VbfsError(f"cannot restore {self.show(rel)}: a folder is in the way") from None
            if exc.errno == errno.EXDEV:
                raise VbfsError(
                    f"cannot restore {self.show(rel)}: it is on another filesystem than {self.base} "
                    "(restore into a folder without mount points below it)"
                ) from None
            raise

    # ---- nodes -----------------------------------------------------------------------------------------------

    def node(self, dir_fd: int, node: Node, rel: tuple[str, ...]) -> None:
        try:
            if isinstance(node, Dir):
                self.folder(dir_fd, node, rel)
            elif isinstance(node, Symlink):
                self.symlink(dir_fd, node, rel)
            elif isinstance(node, File) and node.from_guest and not stat.S_ISREG(node.attr.mode):
                self.special(dir_fd, node, rel)
            elif isinstance(node, File):
                self.file_or_link(dir_fd, node, rel)
            else:
                raise VbfsError(f"cannot restore {node.name}: not a file, folder or symlink")
        except OSError as exc:
            raise VbfsError(f"cannot restore {self.show(rel)}: {exc.strerror or exc}") from None

    def _mark_notes(self, node: Dir) -> None:
        fs = node.real().fs if isinstance(node, LazyVolumeRoot) else node.fs if isinstance(node, GuestDirNode) else None
        if fs is not None and id(fs) not in self.marks:
            self.marks[id(fs)] = (fs, len(fs.notes))

    def tree_notes(self) -> list[str]:
        """The notes the tree made while restore listed its folders (names escaped, entries left out)."""
        return [f"{fs.label}: {n}" for fs, start in self.marks.values() for n in fs.notes[start:]]

    def folder(self, dir_fd: int, node: Dir, rel: tuple[str, ...]) -> None:
        key = node.key
        if key in self.ancestors:
            self.note(f"{self.show(rel)}: not restored: the folder is its own ancestor (a damaged filesystem)")
            return
        first = self.folders.get(key)
        if first is not None:
            self.note(f"{self.show(rel)}: not restored: it is the same folder as {self.show(first)} (hard-linked)")
            return
        if len(rel) > MAX_DEPTH:
            # A damaged or hostile filesystem: this folder is left out, the rest of the restore goes on.
            shown = "/".join((*rel[:3], "...", *rel[-2:]))
            self.stats.failed.append(f"{self.base}/{shown}: not restored: folders nested more than {MAX_DEPTH} deep")
            return
        self.folders[key] = rel
        self._mark_notes(node)
        kids = node.children()
        fd, made = self.make_folder(dir_fd, rel)
        try:
            self.ancestors.add(key)
            try:
                for child in kids:
                    if not is_safe(child.name):  # the tree gives safe names; this is the last line of defence
                        self.note(f"{self.show(rel)}: not restored: an entry named {child.name!r}")
                        continue
                    try:
                        self.node(fd, child, (*rel, child.name))
                    except (GuestDataError, IntegrityError) as exc:
                        if not child.from_guest:
                            raise
                        # One damaged guest file or folder is not restored; the rest of the folder is.
                        self.stats.failed.append(f"{self.show((*rel, child.name))}: {exc}")
            finally:
                self.ancestors.discard(key)
            if node.from_guest:
                if self.as_root:
                    os.fchown(fd, node.attr.uid, node.attr.gid)
                os.fchmod(fd, node.attr.mode & 0o7777)  # a folder's setgid bit only passes on its group: kept
                os.utime(fd, ns=_times(node))
            elif made:
                os.fchmod(fd, 0o777 & ~self.umask)
        finally:
            os.close(fd)

    def make_folder(self, dir_fd: int, rel: tuple[str, ...]) -> tuple[int, bool]:
        """Open folder ``rel[-1]`` of ``dir_fd`` (never through a symlink), made when missing; and whether it was."""
        name = rel[-1]
        made = False
        try:
            os.mkdir(name, 0o700, dir_fd=dir_fd)
            made = True
        except FileExistsError:
            pass
        try:
            return os.open(name, _DIR, dir_fd=dir_fd), made
        except OSError as exc:
            if made or exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        what = "symlink" if stat.S_ISLNK(st.st_mode) else "file"
        os.unlink(name, dir_fd=dir_fd)
        os.mkdir(name, 0o700, dir_fd=dir_fd)
        self.note(f"{self.show(rel)}: replaced the {what} that was in the way by the snapshot's folder")
        return os.open(name, _DIR, dir_fd=dir_fd), True

    def symlink(self, dir_fd: int, node: Symlink, rel: tuple[str, ...]) -> None:
        try:
            tmp = self._new(lambda n: os.symlink(node.target, n, dir_fd=self.private_fd))
        except ValueError:  # a NUL byte in the target
            self.note(f"{self.show(rel)}: symlink not restored: its target holds a NUL byte")
            return
        except OSError as exc:
            if exc.errno != errno.ENAMETOOLONG:
                raise
            self.note(f"{self.show(rel)}: symlink not restored: its target is too long for this host")
            return
        if self.as_root and node.from_guest:
            os.chown(tmp, node.attr.uid, node.attr.gid, dir_fd=self.private_fd, follow_symlinks=False)
        os.utime(tmp, ns=_times(node), dir_fd=self.private_fd, follow_symlinks=False)
        self.place(tmp, dir_fd, rel)

    def mode_of(self, node: Node, rel: tuple[str, ...]) -> int:
        if not node.from_guest:
            return 0o666 & ~self.umask  # the user's copy of a disk image or vm.json, as any file they make
        mode = node.attr.mode & 0o7777
        if mode & _SETID and not self.keep_setuid:
            mode &= ~_SETID
            self.note(f"{self.show(rel)}: restored without its setuid/setgid bits (--keep-setuid keeps them)")
        return mode

    def special(self, dir_fd: int, node: File, rel: tuple[str, ...]) -> None:
        kind = stat.S_IFMT(node.attr.mode)
        rdev = node.attr.rdev
        device = kind in (stat.S_IFCHR, stat.S_IFBLK)
        if not self.devices or kind not in _SPECIAL or kind == stat.S_IFSOCK:
            self.stats.skipped.append(self.show(rel))
            return
        if device and (not self.as_root or not rdev):
            why = "only root can make device nodes" if not self.as_root else "its device number is not known"
            self.note(f"{self.show(rel)}: device node not restored: {why}")
            self.stats.skipped.append(self.show(rel))
            return
        tmp = self._new(lambda n: os.mknod(n, kind | 0o600, rdev if device else 0, dir_fd=self.private_fd))
        if self.as_root:
            os.chown(tmp, node.attr.uid, node.attr.gid, dir_fd=self.private_fd, follow_symlinks=False)
        # chmod follows a symlink, but this name is restore's own, in a folder only restore can write to
        os.chmod(tmp, self.mode_of(node, rel), dir_fd=self.private_fd)
        os.utime(tmp, ns=_times(node), dir_fd=self.private_fd, follow_symlinks=False)
        self.place(tmp, dir_fd, rel)
        self.stats.files += 1

    def file_or_link(self, dir_fd: int, node: File, rel: tuple[str, ...]) -> None:
        linked = node.from_guest and node.attr.nlink > 1
        if linked:
            placed = self.links.get(node.key)
            if placed is not None and self.link(dir_fd, placed, rel):
                return
        st = self.file(dir_fd, node, rel)
        if linked and node.key not in self.links:
            self.links[node.key] = _Placed(rel, st.st_dev, st.st_ino)

    def open_below(self, rel: tuple[str, ...]) -> int:
        """Open the folder ``rel`` below the base folder, one component at a time, never through a symlink."""
        fd = os.dup(self.base_fd)
        for part in rel:
            try:
                nxt = os.open(part, _DIR, dir_fd=fd)
            finally:
                os.close(fd)
            fd = nxt
        return fd

    def link(self, dir_fd: int, first: _Placed, rel: tuple[str, ...]) -> bool:
        """Make ``rel`` a hard link of the first copy; ``False`` (and a note) when that copy is not there anymore."""
        try:
            src = self.open_below(first.rel[:-1])
            try:
                tmp = self._new(
                    lambda n: os.link(
                        first.rel[-1], n, src_dir_fd=src, dst_dir_fd=self.private_fd, follow_symlinks=False
                    )
                )
            finally:
                os.close(src)
            st = os.stat(tmp, dir_fd=self.private_fd, follow_symlinks=False)
        except OSError as exc:
            self.note(f"{self.show(rel)}: restored as a copy, not a link of {self.show(first.rel)}: {exc.strerror}")
            return False
        if (st.st_dev, st.st_ino) != (first.dev, first.ino):
            os.unlink(tmp, dir_fd=self.private_fd)
            self.note(f"{self.show(rel)}: restored as a copy: {self.show(first.rel)} was replaced meanwhile")
            return False
        self.place(tmp, dir_fd, rel)
        return True

    def file(self, dir_fd: int, node: File, rel: tuple[str, ...]) -> os.stat_result:
        extents = _extents(node)
        big = node.attr.size >= BIG_FILE
        fds: list[int] = []
        tmp = self._new(lambda n: fds.append(os.open(n, _NEW_FILE, 0o600, dir_fd=self.private_fd)))
        fd = fds[0]
        try:
            if big:
                self.progress.begin(node.name, sum(n for _, n in extents))
            try:
                if big:
                    _copy_parallel(node, extents, fd, self.stats, self.progress)
                else:
                    _copy_sequential(node, extents, fd, self.stats)
                os.ftruncate(fd, node.attr.size)
                if big:
                    os.fsync(fd)  # small files are synced together at the end of the restore
            finally:
                if big:
                    self.progress.end()
            if self.as_root and node.from_guest:
                os.fchown(fd, node.attr.uid, node.attr.gid)  # before the mode: a chown clears setuid bits
            os.fchmod(fd, self.mode_of(node, rel))
            os.utime(fd, ns=_times(node))
            st = os.fstat(fd)
        finally:
            os.close(fd)
        self.place(tmp, dir_fd, rel)
        self.stats.files += 1
        return st


def restore(
    node: Node,
    target: Path,
    progress: Progress | None = None,
    *,
    keep_setuid: bool = False,
    devices: bool = False,
) -> RestoreStats:
    """Restore ``node`` to ``target``; into ``target/<name>`` when ``target`` is an existing folder."""
    progress = progress or NoProgress()
    stats = RestoreStats()
    if target.is_dir():
        base, name = target, node.name
    else:
        base, name = target.parent, target.name
        if os.path.lexists(target):
            if isinstance(node, Dir):
                raise VbfsError(f"{target} exists and is not a folder; restore a folder to a folder or a new name")
            if not (target.is_symlink() or target.is_file()):
                raise VbfsError(f"{target} exists and is not a regular file; restore to a file or a folder")
    if not is_safe(name):
        raise VbfsError(f"cannot restore to {base / name}: {name!r} is not a name to restore to")
    if isinstance(node, Dir) and not base.is_dir():
        try:
            base.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise VbfsError(f"cannot restore to {target}: cannot make {base}: {exc.strerror}") from None
    try:
        base_fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        why = "it is not a folder" if exc.errno in (errno.ENOENT, errno.ENOTDIR) else exc.strerror
        raise VbfsError(f"cannot restore to {target}: {base}: {why}") from None
    run = _Restore(base_fd, base, progress, stats, keep_setuid, devices)
    try:
        done = False
        try:
            try:
                run.open_private()
            except OSError as exc:
                raise VbfsError(f"cannot restore to {target}: {base}: {exc.strerror}") from None
            run.node(base_fd, node, (name,))
            done = True
        finally:
            try:
                run.close_private()
            except OSError as exc:
                if done:
                    raise VbfsError(f"cannot remove {base / run.private_name}: {exc.strerror}") from None
    finally:
        os.close(base_fd)
    stats.notes[:0] = run.tree_notes()
    if stats.skipped:
        hint = "" if devices else " (--devices restores device nodes and fifos)"
        stats.notes.append(
            f"skipped {len(stats.skipped)} device node(s), fifo(s) or socket(s) of the guest, "
            f"e.g. {stats.skipped[0]}{hint}"
        )
    os.sync()  # everything restored is on disk when the command returns
    return stats
