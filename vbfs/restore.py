"""Restore: copy a node of the snapshot tree (a disk image, a guest file or folder, ...) out to a local path, or a
disk image onto a block device.

An adapter of the tree of :mod:`vbfs.vfs`, like the FUSE adapter (:mod:`vbfs.fuse`): it reads the tree and
writes below a local folder.

Where things go (one rule, so that the same restore run twice gives the same tree):

- A folder restored to TARGET becomes TARGET: made when missing, merged into when it exists (as ``rsync -a src/
  dst/``, never ``TARGET/<name>``). A TARGET that restore made gets the snapshot folder's owner and mode; an
  existing one keeps its own (a folder made private to hold restores stays private). Both get its times.
- A file (or symlink) restored to an existing folder goes to ``TARGET/<name>``; to any other path it becomes that
  path.
- An entry that already exists is compared with the snapshot's: a symlink by its target, anything else by type,
  size and modification time in whole seconds (rsync's quick check; owner and mode are not compared). The same:
  left untouched and counted as ``unchanged``. Different: ``overwrite`` decides. ``never`` (the default) refuses:
  a check pass that writes nothing finds every such entry first, so a refused restore wrote nothing; an entry
  that appears or changes after that check stops the restore at it (a new entry is renamed into place with
  ``RENAME_NOREPLACE``, so one that appears at the last moment is not replaced either, where the filesystem
  can do that). ``if-changed`` replaces what differs, ``always`` replaces everything, the same or not. A
  replacement is a new file renamed over the old one, never a write into it.
- ``include`` / ``exclude`` choose entries of a restored folder: :class:`Selection`.

A restore is two walks over the tree: the check, which writes nothing (a ``dry_run`` is the check alone, and lists
what it would do), then the writes. Folder listings are cached by the tree, so the second walk lists nothing again.

A guest's files are attacker-controlled data and restore usually runs as root, so it writes only below the path
the user gave, and never through anything it did not make itself:

- The target the user typed is the only path resolved the ordinary way. Everything below it is made relative to
  a folder restore has open (``dir_fd=``) and opened with ``O_NOFOLLOW``: a symlink in the way of a folder is
  replaced by the folder, never followed (a file in the way is replaced too, unless ``overwrite`` is ``never``);
  a folder in the way of a file is refused.
- Files, symlinks and device nodes are made with ``O_EXCL`` under short random names (12 hex digits, whatever
  the length of the final name) in a private folder (``.vbfs-restore-XXXXXXXX``, mode 0700, made on first use
  in the folder restored to, or in the folder a file is restored into, so renames stay on one filesystem). They
  get their owner, mode and times there, through their descriptor, and are renamed into place only when every
  byte was read and verified: a damaged chunk never leaves a plausible-looking but wrong file behind. The
  private folder is removed on every way out (done, error, Ctrl-C).
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

A disk image restored onto a block device (:func:`restore_to_device`) is written whole: its allocated chunks, and
zeros (discarded, then zeroed out by the kernel) everywhere else. The device is opened with ``O_EXCL``, which the
kernel refuses for a mounted device or one another program holds; it must be at least as large as the disk.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import re
import secrets
import stat
import struct
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from vbfs.engine.progress import NoProgress, Progress
from vbfs.errors import IntegrityError, VbfsError
from vbfs.globs import path_regex
from vbfs.guestfs.model import GuestDataError, GuestFS
from vbfs.names import is_safe
from vbfs.vfs import Dir, DiskFile, File, GuestDirNode, LazyVolumeRoot, Node, Symlink, VolumeFile

WINDOW = 8
PIECE = 4 * 1024 * 1024
SPARSE_BLOCK = 64 * 1024
BIG_FILE = 32 * 1024 * 1024  # from this size on: parallel reads, a progress bar, an fsync of its own
MAX_DEPTH = 256  # folder levels below what is restored; more is a damaged or hostile filesystem
PRIVATE_PREFIX = ".vbfs-restore-"
OVERWRITE = ("never", "if-changed", "always")
_SECOND = 1_000_000_000

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_SETID = stat.S_ISUID | stat.S_ISGID
_SPECIAL = {stat.S_IFIFO: "fifo", stat.S_IFCHR: "device node", stat.S_IFBLK: "device node", stat.S_IFSOCK: "socket"}
_HINT = "--overwrite if-changed replaces what differs, --dry-run lists it"

# Block device ioctls (linux/fs.h)
BLKSSZGET = 0x1268
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F
BLKGETSIZE64 = 0x80081272

# What a dry run lists for each entry
NEW, REPLACE, SAME, REFUSED = "+", "M", "=", "!"


class RestoreConflict(VbfsError):
    """An existing entry differs from the snapshot's and the restore may not overwrite it."""


@dataclass
class RestoreStats:
    files: int = 0  # files, symlinks and nodes written, new or replacing one (a dry run: that it would write)
    bytes: int = 0  # bytes read from the snapshot and written (a dry run: the size of what it would write)
    unchanged: int = 0  # entries that were already as in the snapshot: left untouched
    overwritten: int = 0  # existing entries replaced (counted in files too)
    not_made: list[str] = field(default_factory=list)  # device nodes, fifos and sockets of the guest, not made
    # Guest files and folders that could not be read (damaged data): not restored, the rest of the folder was.
    failed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was restored differently from the snapshot, and why
    warnings: list[str] = field(default_factory=list)  # --include patterns that matched nothing
    # What exists, differs, and overwrite "never" refuses: every one in a dry run, else the first (a check of a
    # huge tree keeps no list of it); conflicted counts them all.
    conflicts: list[str] = field(default_factory=list)
    conflicted: int = 0
    planned: list[tuple[str, str]] = field(default_factory=list)  # a dry run: (NEW/REPLACE/SAME/REFUSED, path)
    seconds: float = 0.0
    dry_run: bool = False
    device: str = ""  # onto a block device: the device (files is 1, bytes the data written)
    zeroed: int = 0  # onto a block device: the bytes of it made zeros (the disk's unallocated parts)


def conflict_message(stats: RestoreStats) -> str:
    more = f" (and {stats.conflicted - 1} more)" if stats.conflicted > 1 else ""
    return f"{stats.conflicts[0]}{more} exists and differs from the snapshot: nothing was restored ({_HINT})"


# ---- include and exclude -------------------------------------------------------------------------------------


class Selection:
    """Which entries of a restored folder are restored: ``--include`` and ``--exclude`` patterns.

    A pattern is matched against an entry's path below the restored folder (``etc/nginx/nginx.conf``). ``*``,
    ``?`` and ``[...]`` match within one name, never across a ``/`` (not even a range that holds it, ``[.-0]``);
    ``**`` matches any number of folders; a pattern that is not a glob (``[z-a]``) is a :class:`VbfsError`. A
    pattern without a ``/`` matches a name at any depth (``*.log``); one with a ``/`` is matched from the restored
    folder (``etc/nginx``, ``/etc/*.conf``, ``var/**/*.log``); a trailing ``/`` is ignored. A folder that matches
    brings everything below it. An excluded entry is left out with everything below it; with includes, only what
    matches one of them is restored, with the folders on the way to it. An exclude wins over an include.
    """

    def __init__(self, include: Iterable[str] = (), exclude: Iterable[str] = ()):
        self.include = [(p, path_regex(p)) for p in include]
        self.exclude = [path_regex(p) for p in exclude]
        self.hits = [0] * len(self.include)

    @property
    def active(self) -> bool:
        return bool(self.include or self.exclude)

    def excluded(self, path: str) -> bool:
        return any(r.fullmatch(path) for r in self.exclude)

    def included(self, path: str, count: bool) -> bool:
        found = False
        for i, (_, r) in enumerate(self.include):
            if r.fullmatch(path):
                found = True
                if not count:
                    break
                self.hits[i] += 1
        return found

    def unmatched(self) -> list[str]:
        return [p for (p, _), n in zip(self.include, self.hits, strict=True) if not n]


# ---- copying -------------------------------------------------------------------------------------------------


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
    node: File,
    extents: list[tuple[int, int]],
    fd: int,
    stats: RestoreStats,
    progress: Progress,
    write: Callable[[int, bytes, int], None] | None = None,
) -> None:
    """Large files: up to ``WINDOW`` pieces read (fetched, verified, decompressed) at once, written in order
    (sparse, unless ``write`` says otherwise)."""
    write = write or _write_sparse
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
                write(fd, data, off)
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


def _load_renameat2() -> Callable[..., int] | None:
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return cast(Callable[..., int], fn)


_renameat2 = _load_renameat2()
_RENAME_NOREPLACE = 1


def _rename_noreplace(src_dir: int, src: str, dst_dir: int, dst: str) -> bool:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (FileExistsError), in one step; ``False`` (nothing done)
    where the C library or the filesystem cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(src_dir, os.fsencode(src), dst_dir, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err))


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


@dataclass(frozen=True)
class _Options:
    keep_setuid: bool
    devices: bool
    overwrite: str
    selection: Selection


class _Restore:
    """One walk of a restore over the tree: the check (``write`` false: looks, counts, writes nothing) or the
    writes. It holds the base folder it writes into (open), its private folder, what it has placed so far."""

    def __init__(
        self,
        base_fd: int,
        base: Path,
        progress: Progress,
        stats: RestoreStats,
        opts: _Options,
        *,
        write: bool,
        marks: dict[int, tuple[GuestFS, int]],
        wanted: set[tuple[str, ...]] | None = None,
        entries: int = 0,
        plan: bool = False,
    ):
        self.base_fd = base_fd  # -1 in a check: the folder restored to does not exist yet
        self.base = base
        self.progress = progress
        self.stats = stats
        self.keep_setuid = opts.keep_setuid
        self.devices = opts.devices
        self.overwrite = opts.overwrite
        self.selection = opts.selection
        self.write = write
        self.plan = plan
        self.as_root = os.geteuid() == 0
        self.umask = current_umask()
        self.private_fd = -1
        self.private_name = ""
        self.links: dict[Hashable, _Placed] = {}  # hard-link key → the first restored copy
        self.folders: dict[Hashable, tuple[str, ...]] = {}  # folder key → where it was restored
        self.ancestors: set[Hashable] = set()  # keys of the folders on the current path
        self.marks = marks  # guest filesystem → how many notes it had before (shared by the check and the writes)
        # With --include: the folders that hold something chosen (the check finds them, the writes make only them).
        self.wanted: set[tuple[str, ...]] = wanted if wanted is not None else set()
        self.entries = entries  # how many entries the writes go through (from the check), for the progress bar
        self.counted = 0
        self.counting = False
        self.depth = 0  # levels above the entries' paths ``rel`` (1: the base folder is the folder restored)

    def show(self, rel: tuple[str, ...]) -> str:
        return str(self.base.joinpath(*rel))

    def note(self, text: str) -> None:
        self.stats.notes.append(text)

    # ---- the private folder ----------------------------------------------------------------------------------

    def open_private(self) -> None:
        try:
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
        except OSError as exc:
            raise VbfsError(f"cannot restore into {self.base}: {exc.strerror or exc}") from None
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
        """A fresh short random name in the private folder, made by ``make(name)`` (which must use O_EXCL).

        The name never depends on the final one, so a name of 255 bytes restores like any other."""
        if self.private_fd < 0:
            self.open_private()
        for _ in range(100):
            name = secrets.token_hex(6)
            try:
                make(name)
                return name
            except FileExistsError:
                continue
        raise VbfsError(f"cannot make a temporary file in {self.base}")

    def place(self, tmp: str, dir_fd: int, rel: tuple[str, ...], action: str) -> None:
        """Rename ``tmp`` from the private folder to ``rel[-1]`` in ``dir_fd``, replacing a file or symlink there
        when ``action`` is REPLACE; one that appeared since it was looked at is not replaced with "never"."""
        try:
            if action == NEW and self.overwrite == "never":
                if _rename_noreplace(self.private_fd, tmp, dir_fd, rel[-1]):
                    self._placed(action)
                    return
                if self.existing(dir_fd, rel[-1]) is not None:  # a filesystem without RENAME_NOREPLACE
                    raise self.changed(rel)
            os.replace(tmp, rel[-1], src_dir_fd=self.private_fd, dst_dir_fd=dir_fd)
        except FileExistsError:
            if action == NEW and self.overwrite == "never":
                raise self.changed(rel) from None
            raise VbfsError(f"cannot restore {self.show(rel)}: a folder is in the way") from None
        except OSError as exc:
            if exc.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                raise VbfsError(f"cannot restore {self.show(rel)}: a folder is in the way") from None
            if exc.errno == errno.EXDEV:
                raise VbfsError(
                    f"cannot restore {self.show(rel)}: it is on another filesystem than {self.base} "
                    "(restore into a folder without mount points below it)"
                ) from None
            raise
        self._placed(action)

    def _placed(self, action: str) -> None:
        self.stats.files += 1
        if action == REPLACE:
            self.stats.overwritten += 1
        self.tick()

    # ---- what is there already -------------------------------------------------------------------------------

    def existing(self, dir_fd: int, name: str) -> os.stat_result | None:
        if dir_fd < 0:
            return None
        try:
            return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def same(self, dir_fd: int, name: str, node: Node, st: os.stat_result) -> bool:
        """Whether the entry ``st`` (named ``name`` in ``dir_fd``: a file restored to a new name is not named
        ``node.name``) is already what the snapshot has."""
        if isinstance(node, Symlink):
            return stat.S_ISLNK(st.st_mode) and os.readlink(name, dir_fd=dir_fd) == node.target
        kind = stat.S_IFMT(node.attr.mode) if node.from_guest else stat.S_IFREG
        if stat.S_IFMT(st.st_mode) != kind:
            return False
        if kind in (stat.S_IFCHR, stat.S_IFBLK):
            return st.st_rdev == node.attr.rdev
        if kind != stat.S_IFREG:
            return True
        return st.st_size == node.attr.size and st.st_mtime_ns // _SECOND == node.attr.mtime_ns // _SECOND

    def decide(self, dir_fd: int, node: Node, rel: tuple[str, ...]) -> tuple[str, os.stat_result | None]:
        """NEW, SAME, REPLACE or (a check with "never") REFUSED for the entry at ``rel``, and what is there."""
        st = self.existing(dir_fd, rel[-1])
        if st is None:
            return NEW, None
        if stat.S_ISDIR(st.st_mode):
            raise VbfsError(f"cannot restore {self.show(rel)}: a folder is in the way")
        if self.overwrite != "always" and self.same(dir_fd, rel[-1], node, st):
            return SAME, st
        if self.overwrite == "never":
            if self.write:
                raise self.changed(rel)
            self.conflict(rel)
            return REFUSED, st
        return REPLACE, st

    def conflict(self, rel: tuple[str, ...]) -> None:
        self.stats.conflicted += 1
        if self.plan or not self.stats.conflicts:
            self.stats.conflicts.append(self.show(rel))

    def changed(self, rel: tuple[str, ...]) -> RestoreConflict:
        return RestoreConflict(
            f"{self.show(rel)} appeared or changed during the restore and differs from the snapshot: "
            f"the restore stopped there ({_HINT})"
        )

    def planned(self, action: str, rel: tuple[str, ...], size: int = 0, folder: bool = False) -> None:
        """A check: count what the writes would do, and list it for a dry run."""
        if not folder:
            if action in (NEW, REPLACE):
                self.stats.files += 1
                self.stats.bytes += size
                self.stats.overwritten += action == REPLACE
            elif action == SAME:
                self.stats.unchanged += 1
        if self.plan:
            self.stats.planned.append((action, self.show(rel) + ("/" if folder else "")))

    def unchanged(self) -> None:
        self.stats.unchanged += 1
        self.tick()

    def tick(self) -> None:
        if self.counting:
            self.counted += 1
            self.progress.advance(1)

    def want(self, rel: tuple[str, ...]) -> None:
        """A check: the folder ``rel`` holds something chosen, so it and the folders on the way are made."""
        if not self.selection.include:
            return  # every folder is chosen: no set of them all
        while rel not in self.wanted:
            self.wanted.add(rel)
            if not rel:
                return
            rel = rel[:-1]

    # ---- the walk --------------------------------------------------------------------------------------------

    def run(self, node: Node, name: str | None) -> None:
        """Restore ``node``: a folder to the base folder itself (``name`` None), anything else to ``name`` in it."""
        if name is not None:
            self.node(self.base_fd, node, (name,))
            return
        assert isinstance(node, Dir)
        self.depth = 1  # the folder restored counts as a level, as when it is restored below a folder
        self.folders[node.key] = ()
        self._mark_notes(node)
        kids = node.children()
        self.want(())
        if self.write and self.entries:
            self.progress.begin("restore", self.entries, unit="files")
            self.counting = True
        try:
            self.ancestors.add(node.key)
            self.fill(self.base_fd, kids, (), not self.selection.include)
        finally:
            self.ancestors.discard(node.key)
            if self.counting:
                self.counting = False
                self.progress.end()

    def finish_base(self, node: Node, made: bool) -> None:
        """The folder restored to gets its attributes last, when the private folder in it is gone."""
        fd = self.base_fd
        if node.from_guest:
            if made:
                if self.as_root:
                    os.fchown(fd, node.attr.uid, node.attr.gid)
                os.fchmod(fd, node.attr.mode & 0o7777)
            os.utime(fd, ns=_times(node))
        elif made:
            os.fchmod(fd, 0o777 & ~self.umask)

    def fill(self, fd: int, kids: list[Node], rel: tuple[str, ...], included: bool) -> None:
        for child in kids:
            if not is_safe(child.name):  # the tree gives safe names; this is the last line of defence
                self.note(f"{self.show(rel)}: not restored: an entry named {child.name!r}")
                continue
            crel = (*rel, child.name)
            chosen = included
            if self.selection.active:
                path = "/".join(crel)
                if self.selection.excluded(path):
                    continue
                if not chosen:
                    chosen = self.selection.included(path, count=not self.write)
                if not chosen and not isinstance(child, Dir):
                    continue
            try:
                if isinstance(child, Dir):
                    self.folder(fd, child, crel, chosen)
                else:
                    self.node(fd, child, crel)
            except OSError as exc:
                raise VbfsError(f"cannot restore {self.show(crel)}: {exc.strerror or exc}") from None
            except (GuestDataError, IntegrityError) as exc:
                if not child.from_guest:
                    raise
                # One damaged guest file or folder is not restored; the rest of the folder is.
                self.stats.failed.append(f"{self.show(crel)}: {exc}")

    def node(self, dir_fd: int, node: Node, rel: tuple[str, ...]) -> None:
        """Restore an entry that is not a folder."""
        try:
            if isinstance(node, Symlink):
                self.symlink(dir_fd, node, rel)
            elif isinstance(node, File) and node.from_guest and not stat.S_ISREG(node.attr.mode):
                self.special(dir_fd, node, rel)
            elif isinstance(node, File):
                self.file_or_link(dir_fd, node, rel)
            else:
                raise VbfsError(f"cannot restore {node.name}: not a file, folder or symlink")
            if not self.write:
                self.want(rel[:-1])
        except OSError as exc:
            raise VbfsError(f"cannot restore {self.show(rel)}: {exc.strerror or exc}") from None

    def _mark_notes(self, node: Dir) -> None:
        fs = node.real().fs if isinstance(node, LazyVolumeRoot) else node.fs if isinstance(node, GuestDirNode) else None
        if fs is not None and id(fs) not in self.marks:
            self.marks[id(fs)] = (fs, len(fs.notes))

    def tree_notes(self) -> list[str]:
        """The notes the tree made while restore listed its folders (names escaped, entries left out)."""
        return [f"{fs.label}: {n}" for fs, start in self.marks.values() for n in fs.notes[start:]]

    def folder(self, dir_fd: int, node: Dir, rel: tuple[str, ...], chosen: bool) -> None:
        key = node.key
        if self.write and not chosen and rel not in self.wanted:
            return  # with --include: nothing below it was chosen
        if key in self.ancestors:
            self.note(f"{self.show(rel)}: not restored: the folder is its own ancestor (a damaged filesystem)")
            return
        first = self.folders.get(key)
        if first is not None:
            self.note(f"{self.show(rel)}: not restored: it is the same folder as {self.show(first)} (hard-linked)")
            return
        if len(rel) + self.depth > MAX_DEPTH:
            # A damaged or hostile filesystem: this folder is left out, the rest of the restore goes on.
            shown = "/".join((*rel[:3], "...", *rel[-2:]))
            self.stats.failed.append(f"{self.base}/{shown}: not restored: folders nested more than {MAX_DEPTH} deep")
            return
        self.folders[key] = rel
        self._mark_notes(node)
        kids = node.children()
        self.ancestors.add(key)  # one frame per folder level: the walk recurses folder → fill → folder
        try:
            st = None
            if self.write:
                fd, made = self.make_folder(dir_fd, rel)
            else:  # a check: what is in the folder's place now; below one still to be made, all is new
                st, made, at = self.existing(dir_fd, rel[-1]), False, len(self.stats.planned)
                fd = os.open(rel[-1], _DIR, dir_fd=dir_fd) if st is not None and stat.S_ISDIR(st.st_mode) else -1
            try:
                self.fill(fd, kids, rel, chosen)
                if self.write and node.from_guest:
                    if self.as_root:
                        os.fchown(fd, node.attr.uid, node.attr.gid)
                    os.fchmod(fd, node.attr.mode & 0o7777)  # a folder's setgid bit only passes on its group: kept
                    os.utime(fd, ns=_times(node))
                elif made:  # only a write makes folders
                    os.fchmod(fd, 0o777 & ~self.umask)
            finally:
                if fd >= 0:
                    os.close(fd)
            if not self.write:
                self.checked(st, rel, chosen, at)
        finally:
            self.ancestors.discard(key)

    def checked(self, st: os.stat_result | None, rel: tuple[str, ...], chosen: bool, at: int) -> None:
        """A check of a folder, after its entries: what would happen to what is in its place (``st``)."""
        if not (chosen or rel in self.wanted):
            return  # with --include: nothing below it was chosen, it is not made
        self.want(rel)
        if st is None:
            action = NEW
        elif stat.S_ISDIR(st.st_mode):
            return
        elif stat.S_ISLNK(st.st_mode):
            action = REPLACE
            self.note(f"{self.show(rel)}: the symlink that is in the way would be replaced by the snapshot's folder")
        elif self.overwrite == "never":
            action = REFUSED
            self.conflict(rel)
        else:
            action = REPLACE
            self.stats.overwritten += 1
        if self.plan:
            self.stats.planned.insert(at, (action, self.show(rel) + "/"))

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
        link = stat.S_ISLNK(st.st_mode)
        if not link and self.overwrite == "never":
            raise self.changed(rel)
        os.unlink(name, dir_fd=dir_fd)
        os.mkdir(name, 0o700, dir_fd=dir_fd)
        what = "symlink" if link else "file"
        self.note(f"{self.show(rel)}: replaced the {what} that was in the way by the snapshot's folder")
        self.stats.overwritten += not link
        return os.open(name, _DIR, dir_fd=dir_fd), True

    def to_write(self, dir_fd: int, node: Node, rel: tuple[str, ...]) -> str | None:
        """What to do with a symlink or special file at ``rel``; ``None`` when nothing is to be written there (a
        dry run lists it; an unchanged entry is counted)."""
        action, _ = self.decide(dir_fd, node, rel)
        if not self.write:
            self.planned(action, rel)
            return None
        if action == SAME:
            self.unchanged()
            return None
        return action

    def symlink(self, dir_fd: int, node: Symlink, rel: tuple[str, ...]) -> None:
        action = self.to_write(dir_fd, node, rel)
        if action is None:
            return
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
        self.place(tmp, dir_fd, rel, action)

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
            self.stats.not_made.append(self.show(rel))
            return
        if device and (not self.as_root or not rdev):
            why = "only root can make device nodes" if not self.as_root else "its device number is not known"
            self.note(f"{self.show(rel)}: device node not restored: {why}")
            self.stats.not_made.append(self.show(rel))
            return
        action = self.to_write(dir_fd, node, rel)
        if action is None:
            return
        tmp = self._new(lambda n: os.mknod(n, kind | 0o600, rdev if device else 0, dir_fd=self.private_fd))
        if self.as_root:
            os.chown(tmp, node.attr.uid, node.attr.gid, dir_fd=self.private_fd, follow_symlinks=False)
        # chmod follows a symlink, but this name is restore's own, in a folder only restore can write to
        os.chmod(tmp, self.mode_of(node, rel), dir_fd=self.private_fd)
        os.utime(tmp, ns=_times(node), dir_fd=self.private_fd, follow_symlinks=False)
        self.place(tmp, dir_fd, rel, action)

    def file_or_link(self, dir_fd: int, node: File, rel: tuple[str, ...]) -> None:
        linked = node.from_guest and node.attr.nlink > 1
        if not self.write:
            action, _ = self.decide(dir_fd, node, rel)
            again = linked and node.key in self.links  # a second name of a file: a link, nothing to read
            self.planned(action, rel, 0 if again else node.attr.size)
            if linked:
                self.links.setdefault(node.key, _Placed(rel, 0, 0))
            return
        if linked:
            placed = self.links.get(node.key)
            if placed is not None:
                st = self.existing(dir_fd, rel[-1])
                if st is not None and (st.st_dev, st.st_ino) == (placed.dev, placed.ino):
                    self.unchanged()  # already a link of the first copy
                    return
                action, _ = self.decide(dir_fd, node, rel)
                if action == SAME:
                    self.unchanged()
                    return
                if self.link(dir_fd, placed, rel, action):
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

    def link(self, dir_fd: int, first: _Placed, rel: tuple[str, ...], action: str) -> bool:
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
        self.place(tmp, dir_fd, rel, action)
        return True

    def file(self, dir_fd: int, node: File, rel: tuple[str, ...]) -> os.stat_result:
        action, there = self.decide(dir_fd, node, rel)
        if action == SAME:
            assert there is not None
            self.unchanged()
            return there
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
                    if self.counting:  # back to the count of files of the folder restored
                        self.progress.begin("restore", self.entries, unit="files")
                        self.progress.advance(self.counted)
            if self.as_root and node.from_guest:
                os.fchown(fd, node.attr.uid, node.attr.gid)  # before the mode: a chown clears setuid bits
            os.fchmod(fd, self.mode_of(node, rel))
            os.utime(fd, ns=_times(node))
            st = os.fstat(fd)
        finally:
            os.close(fd)
        self.place(tmp, dir_fd, rel, action)
        return st


def _make_target(target: Path) -> tuple[int, bool]:
    """Make the folder a folder is restored to (and the folders above it, the ordinary way); open it."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        parent = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise VbfsError(f"cannot restore to {target}: cannot make {target.parent}: {exc.strerror}") from None
    try:
        made = False
        try:
            os.mkdir(target.name, 0o700, dir_fd=parent)
            made = True
        except FileExistsError:
            pass
        try:
            return os.open(target.name, _DIR, dir_fd=parent), made
        except OSError as exc:
            raise VbfsError(f"cannot restore to {target}: {exc.strerror}") from None
    finally:
        os.close(parent)


def _finish(stats: RestoreStats, tree_notes: list[str], devices: bool, started: float) -> RestoreStats:
    stats.notes[:0] = tree_notes
    if stats.not_made:
        hint = "" if devices else " (--devices restores device nodes and fifos)"
        stats.notes.append(
            f"skipped {len(stats.not_made)} device node(s), fifo(s) or socket(s) of the guest, "
            f"e.g. {stats.not_made[0]}{hint}"
        )
    stats.seconds = time.monotonic() - started
    return stats


def restore(
    node: Node,
    target: Path,
    progress: Progress | None = None,
    *,
    keep_setuid: bool = False,
    devices: bool = False,
    overwrite: str = "never",
    dry_run: bool = False,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
) -> RestoreStats:
    """Restore ``node`` to ``target`` as the module says: a folder becomes ``target``, a file goes into an existing
    folder ``target`` or becomes ``target``. A dry run writes nothing and lists what a restore would do."""
    started = time.monotonic()
    if overwrite not in OVERWRITE:
        raise VbfsError(f"--overwrite is one of {', '.join(OVERWRITE)}, not {overwrite!r}")
    progress = progress or NoProgress()
    selection = Selection(include, exclude)
    folder = isinstance(node, Dir)
    if selection.active and not folder:
        raise VbfsError(f"--include and --exclude choose entries of a folder, and {node.name} is not a folder")
    if is_block_device(target):
        raise VbfsError(f"{target} is a block device: only a disk image (/disks/<disk>.img) restores onto one")
    name: str | None
    if folder:
        base, name = target, None
        if os.path.lexists(target) and not target.is_dir():
            raise VbfsError(f"{target} exists and is not a folder; restore a folder to a folder or a new name")
    elif target.is_dir():
        base, name = target, node.name
    else:
        base, name = target.parent, target.name
        if os.path.lexists(target) and not (target.is_symlink() or target.is_file()):
            raise VbfsError(f"{target} exists and is not a regular file; restore to a file or a folder")
    if name is not None and not is_safe(name):
        raise VbfsError(f"cannot restore to {base / name}: {name!r} is not a name to restore to")
    base_fd = -1
    if not folder or target.is_dir():
        try:
            base_fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            why = "it is not a folder" if exc.errno in (errno.ENOENT, errno.ENOTDIR) else exc.strerror
            raise VbfsError(f"cannot restore to {target}: {base}: {why}") from None
    marks: dict[int, tuple[GuestFS, int]] = {}
    opts = _Options(keep_setuid, devices, overwrite, selection)
    try:
        seen = RestoreStats(dry_run=dry_run)
        check = _Restore(base_fd, base, NoProgress(), seen, opts, write=False, marks=marks, plan=dry_run)
        check.run(node, name)
        unmatched = selection.unmatched()
        if selection.include and len(unmatched) == len(selection.include):
            shown = " ".join(repr(p) for p, _ in selection.include)
            raise VbfsError(f"--include {shown} matched nothing in the folder: nothing was restored")
        warnings = [f"--include {p!r} matched nothing in the folder" for p in unmatched]
        if dry_run:
            seen.warnings = warnings
            return _finish(seen, check.tree_notes(), devices, started)
        if seen.conflicted:
            raise RestoreConflict(conflict_message(seen))
        made = False
        if base_fd < 0:
            base_fd, made = _make_target(target)
        stats = RestoreStats(warnings=warnings)
        entries = seen.files + seen.unchanged
        run = _Restore(
            base_fd, base, progress, stats, opts, write=True, marks=marks, wanted=check.wanted, entries=entries
        )
        done = False
        try:
            run.run(node, name)
            done = True
            # what the check could not read, and the writes did not go to again (with --include: folders that
            # held nothing chosen, as far as could be seen)
            again = set(stats.failed)
            stats.failed += [f for f in seen.failed if f not in again]
        finally:
            try:
                run.close_private()
            except OSError as exc:
                if done:
                    raise VbfsError(f"cannot remove {base / run.private_name}: {exc.strerror}") from None
        if folder:
            try:
                run.finish_base(node, made)
            except OSError as exc:
                raise VbfsError(f"cannot restore {target}: {exc.strerror or exc}") from None
    finally:
        if base_fd >= 0:
            os.close(base_fd)
    os.sync()  # everything restored is on disk when the command returns
    return _finish(stats, run.tree_notes(), devices, started)


# ---- onto a block device -------------------------------------------------------------------------------------


def is_block_device(path: Path) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n = n / 1024  # type: ignore[assignment]
    return f"{n:.1f} TiB"


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def device_users(rdev: int) -> list[str]:
    """What uses the block device ``rdev`` or a partition of it: mount points and holders (device mapper, md)."""
    base = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"
    devs, places = {rdev}, [base]
    try:
        for entry in os.listdir(base):
            part = os.path.join(base, entry)
            if os.path.exists(os.path.join(part, "partition")):
                with open(os.path.join(part, "dev")) as f:
                    major, minor = f.read().split(":")
                devs.add(os.makedev(int(major), int(minor)))
                places.append(part)
    except (OSError, ValueError):
        pass
    users: list[str] = []
    for place in places:
        with contextlib.suppress(OSError):
            users += [f"held by {h}" for h in sorted(os.listdir(os.path.join(place, "holders")))]
    try:
        with open("/proc/self/mounts") as f:
            mounts = [line.split() for line in f]
    except OSError:
        mounts = []
    for fields in mounts:
        if len(fields) < 2 or not fields[0].startswith("/"):
            continue
        try:
            st = os.stat(_unescape(fields[0]))
        except OSError:
            continue
        if stat.S_ISBLK(st.st_mode) and st.st_rdev in devs:
            users.append(f"mounted on {_unescape(fields[1])}")
    return users


def _device_size(fd: int) -> int:
    try:
        return int(struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, bytes(8)))[0])
    except OSError:
        return os.lseek(fd, 0, os.SEEK_END)


def _sector_size(fd: int) -> int:
    try:
        return int(struct.unpack("i", fcntl.ioctl(fd, BLKSSZGET, bytes(4)))[0]) or 512
    except OSError:
        return 512


def _holes(extents: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """The ranges of ``[0, size)`` that no extent covers."""
    holes, pos = [], 0
    for off, n in sorted(extents):
        if off > pos:
            holes.append((pos, off - pos))
        pos = max(pos, off + n)
    if pos < size:
        holes.append((pos, size - pos))
    return holes


def _write_zeros(fd: int, off: int, n: int) -> None:
    zero = bytes(min(n, PIECE))
    end = off + n
    while off < end:
        _pwrite_all(fd, zero[: min(len(zero), end - off)], off)
        off += min(len(zero), end - off)


def _zero(fd: int, off: int, n: int, sector: int) -> None:
    """Make ``[off, off+n)`` of a device read as zeros: discarded (where it can be) and zeroed out by the kernel,
    or zeros written where the device takes neither; the parts of a sector at either end are written."""
    start, end = -(-off // sector) * sector, (off + n) // sector * sector
    if end <= start:
        _write_zeros(fd, off, n)
        return
    _write_zeros(fd, off, start - off)
    span = struct.pack("QQ", start, end - start)
    with contextlib.suppress(OSError):  # frees the space on thin and flash storage; need not read as zeros
        fcntl.ioctl(fd, BLKDISCARD, span)
    try:
        fcntl.ioctl(fd, BLKZEROOUT, span)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
            raise
        _write_zeros(fd, start, end - start)
    _write_zeros(fd, end, off + n - end)


def restore_to_device(
    node: Node,
    device: Path,
    progress: Progress | None = None,
    *,
    dry_run: bool = False,
    confirm: Callable[[int], None] | None = None,
) -> RestoreStats:
    """Write the disk image ``node`` onto the block device ``device``: its allocated chunks, and zeros everywhere
    else up to the disk's size. ``confirm(device_size)`` runs when every check passed, before the first write,
    with the device held open exclusively (it raises to stop). A dry run checks and says what it would write."""
    started = time.monotonic()
    progress = progress or NoProgress()
    if not isinstance(node, (DiskFile, VolumeFile)):
        raise VbfsError(f"{device} is a block device: only a disk image (/disks/<disk>.img) restores onto one")
    try:
        users = device_users(os.stat(device).st_rdev)  # what uses it, named (an open below would say only EBUSY)
        if users:
            raise VbfsError(f"{device} is in use ({', '.join(users)}): nothing was written")
        fd = os.open(device, (os.O_RDONLY if dry_run else os.O_WRONLY) | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise VbfsError(f"{device} is in use (mounted, or held by another program): nothing was written") from None
        raise VbfsError(f"cannot open {device}: {exc.strerror}") from None
    stats = RestoreStats(dry_run=dry_run, device=str(device))
    started_writing = False
    try:
        st = os.fstat(fd)  # what was opened, not what the path names now
        if not stat.S_ISBLK(st.st_mode):
            raise VbfsError(f"{device} is not a block device anymore: nothing was written")
        users = device_users(st.st_rdev)  # again: held exclusively from here on, nothing can mount it now
        if users:
            raise VbfsError(f"{device} is in use ({', '.join(users)}): nothing was written")
        size, disk = _device_size(fd), node.attr.size
        if size < disk:
            raise VbfsError(f"{device} holds {_size(size)}, less than the disk's {_size(disk)}: nothing was written")
        extents = _extents(node)
        holes = _holes(extents, disk)
        data = sum(n for _, n in extents)
        stats.files, stats.overwritten, stats.zeroed = 1, 1, disk - data
        if size > disk:
            stats.notes.append(f"{device}: its last {_size(size - disk)}, after the disk's end, are left as they are")
        if dry_run:
            stats.bytes = data
            stats.seconds = time.monotonic() - started
            return stats
        if confirm is not None:
            confirm(size)
        sector = _sector_size(fd)
        started_writing = True
        for off, n in holes:
            _zero(fd, off, n, sector)
        progress.begin(node.name, data)
        try:
            _copy_parallel(node, extents, fd, stats, progress, write=_pwrite_all)
        finally:
            progress.end()
        os.fsync(fd)
    except OSError as exc:
        partly = f": it was written in part, {node.name} is not usable on it" if started_writing else ""
        raise VbfsError(f"cannot write {device}: {exc.strerror or exc}{partly}") from None
    except VbfsError as exc:
        if not started_writing:
            raise
        # a chunk missing or damaged: each chunk is verified before it is written, but what came before it was
        kind = IntegrityError if isinstance(exc, IntegrityError) else VbfsError
        raise kind(f"{exc}: {device} was written in part and holds no usable copy of {node.name}") from None
    finally:
        os.close(fd)
    stats.seconds = time.monotonic() - started
    return stats
