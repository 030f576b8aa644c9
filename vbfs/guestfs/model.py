"""The guest filesystem model shared by every filesystem adapter: entries and the GuestFS interface."""

from __future__ import annotations

import logging
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO, cast

from vbfs.errors import VbfsError
from vbfs.guestfs.bounds import (
    FILE_SIZE_MAX,
    FOLDER_MAX_BYTES,
    FOLDER_MAX_ENTRIES,
    LINK_MAX,
    ParseTimeout,
    budget,
    parse_seconds,
    remaining,
)

log = logging.getLogger("vbfs.guestfs")


class GuestDataError(VbfsError):
    """The guest's own data cannot be parsed (a damaged or unsupported filesystem)."""

    exit_code = 3


class VolumeBusy(GuestDataError):
    """Another request has held the volume's parser for longer than a time budget: try again later."""


@dataclass(slots=True)
class GuestEntry:
    """One file, folder or symlink of a guest filesystem, as the guest has it."""

    name: str  # decoded with surrogateescape: os.fsencode(name) gives the guest's bytes back
    ino: int  # the guest's inode number (or a stable stand-in): hard links share it
    mode: int  # full st_mode
    size: int
    uid: int = 0
    gid: int = 0
    nlink: int = 1
    mtime_ns: int = 0
    atime_ns: int = 0
    ctime_ns: int = 0
    target: str | None = None  # symlink target
    rdev: int = 0  # device number of a device node (os.makedev form); 0 when unknown
    # The parser's own object, for filesystems without stable inode numbers (FAT). Others find the object again
    # from ``ino`` when it is needed, so that a listing of 100,000 entries does not keep 100,000 parser objects.
    handle: Any = field(default=None, repr=False, compare=False)
    # Why the entry's contents (a file's bytes, a folder's entries, a link's target) cannot be trusted; reading
    # them is then an error. The entry itself is still listed, with a size a caller can carry.
    damage: str = ""

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)


class GuestFS:
    """A mounted-in-user-space guest filesystem. Subclasses implement the ``_`` methods; callers use the rest.

    Every call into the parser holds the filesystem's lock (waited for at most one time budget) and runs under a
    time budget (:mod:`vbfs.guestfs.bounds`); sizes are checked against the volume before anything is read.
    """

    fstype = "?"
    OPEN_STREAMS = 16
    max_file_size = FILE_SIZE_MAX  # the largest file this filesystem can hold (subclasses know better)
    folder_sizes = False  # whether a folder's size is the length of its entries on disk (ext, XFS)

    def __init__(self, fh: Any, label: str):
        self.fh = fh
        self.label = label  # e.g. "web01 sda p1", for messages
        self.lock = threading.RLock()
        self.volume_size = int(getattr(fh, "size", 0) or 0)
        self._streams: OrderedDict[int, BinaryIO] = OrderedDict()
        self.notes: list[str] = []  # what the tree changed or left out of this filesystem, and why
        self.folder_places: dict[int, str] = {}  # folder inode → the one place in the tree that shows it whole
        self._noted: set[str] = set()
        self._notes_lock = threading.Lock()

    @classmethod
    def volume_notes(cls, fh: Any, label: str) -> list[str]:
        """What vm.json says of a volume of this filesystem beyond its type, read from ``fh``; nothing by default
        (a filesystem that says something opens the volume for it)."""
        return []

    def note(self, text: str) -> None:
        """Record (once) and log something the tree shows differently from the guest or leaves out."""
        with self._notes_lock:
            if text in self._noted:
                return
            self._noted.add(text)
            self.notes.append(text)
        log.warning("%s: %s", self.label, text)

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        seconds = parse_seconds()
        left = remaining()
        wait = seconds if left is None else max(0.0, min(seconds, left))
        if not self.lock.acquire(timeout=wait):
            raise VolumeBusy(
                f"{self.label}: {what}: the volume is busy (another request has parsed it for more than {wait:g} s)"
            )
        try:
            with budget(seconds):
                yield
        except ParseTimeout:
            raise GuestDataError(
                f"{self.label}: {what}: gave up after {seconds:g} s (damaged {self.fstype} data?)"
            ) from None
        except VbfsError:
            raise
        except MemoryError:  # (the sizes are checked first; this is what no check foresaw)
            raise GuestDataError(f"{self.label}: {what}: damaged {self.fstype} data (needs too much memory)") from None
        except Exception as exc:
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise GuestDataError(f"{self.label}: {what}: damaged {self.fstype} data ({why})") from None
        finally:
            self.lock.release()

    # ---- bounds ---------------------------------------------------------------------------------------------------

    def _bound(self, entry: GuestEntry) -> GuestEntry:
        """Check an entry's size against what holds it; mark what cannot be true as damaged (and carryable)."""
        if entry.is_file and entry.size > self.max_file_size:
            entry.damage = entry.damage or f"size {entry.size} is more than {self.fstype} can hold in one file"
        elif entry.is_dir and self.folder_sizes and entry.size > self.folder_limit:
            entry.damage = entry.damage or f"folder size {entry.size} is more than the volume can hold"
        elif entry.is_symlink and entry.target is None and not entry.damage:
            entry.damage = "symlink target not read"
        entry.size = min(max(entry.size, 0), FILE_SIZE_MAX)
        return entry

    @property
    def folder_limit(self) -> int:
        return min(self.volume_size or FOLDER_MAX_BYTES, FOLDER_MAX_BYTES)

    def _link_target(self, size: int, read: Callable[[], str]) -> tuple[str | None, str]:
        """A symlink's target read by ``read`` once its claimed ``size`` is known to be sane; (target, damage)."""
        if size > LINK_MAX or (self.volume_size and size > self.volume_size):
            return None, f"symlink target of {size} bytes is longer than {LINK_MAX}"
        target = read()
        if len(target.encode(errors="surrogateescape")) > LINK_MAX:
            return None, f"symlink target is longer than {LINK_MAX} bytes"
        return target, ""

    def _damaged(self, entry: GuestEntry, what: str) -> GuestDataError:
        return GuestDataError(f"{self.label}: {what} {entry.name or '/'}: damaged {self.fstype} data ({entry.damage})")

    # ---- what callers use -----------------------------------------------------------------------------------------

    def root(self) -> GuestEntry:
        with self._guard("root folder"):
            return self._bound(self._root())

    def listdir(self, entry: GuestEntry) -> list[GuestEntry]:
        if entry.damage:
            raise self._damaged(entry, "folder")
        with self._guard(f"folder {entry.name or '/'}"):
            out = []
            for e in self._listdir(entry):
                if e.name in (".", "..", ""):
                    continue
                out.append(self._bound(e))
                if len(out) > FOLDER_MAX_ENTRIES:
                    raise ValueError(f"more than {FOLDER_MAX_ENTRIES} entries")
            return out

    def read(self, entry: GuestEntry, offset: int, length: int) -> bytes:
        if entry.damage:
            raise self._damaged(entry, "file")
        with self._guard(f"file {entry.name}"):
            stream = self._streams.get(entry.ino)
            if stream is None:
                stream = self._open(entry)
                self._streams[entry.ino] = stream
                if len(self._streams) > self.OPEN_STREAMS:
                    self._streams.popitem(last=False)
            else:
                self._streams.move_to_end(entry.ino)
            stream.seek(offset)
            data = stream.read(min(length, max(0, entry.size - offset)))
            return bytes(data)

    def data_extents(self, entry: GuestEntry) -> list[tuple[int, int]] | None:
        """Byte ranges of a file that may hold data (the rest are holes); ``None`` when the parser cannot tell."""
        if entry.damage:
            raise self._damaged(entry, "file")
        with self._guard(f"file {entry.name}"):
            return self._data_extents(entry)

    # ---- what subclasses implement --------------------------------------------------------------------------------

    def _root(self) -> GuestEntry:
        raise NotImplementedError

    def _listdir(self, entry: GuestEntry) -> Iterable[GuestEntry]:
        raise NotImplementedError

    def _resolve(self, entry: GuestEntry) -> Any:
        """The parser's object for an entry."""
        return entry.handle

    def _open(self, entry: GuestEntry) -> BinaryIO:
        """A file-like object of a regular file's contents (dissect's nodes all have ``open()``)."""
        return cast(BinaryIO, self._resolve(entry).open())

    def _data_extents(self, entry: GuestEntry) -> list[tuple[int, int]] | None:
        return None


def runs_to_extents(runs: Iterable[tuple[int | None, int]], unit: int, size: int) -> list[tuple[int, int]] | None:
    """Byte ranges with data from a parser's runlist of (start block or ``None`` for a hole, block count)."""
    out: list[tuple[int, int]] = []
    pos = 0
    for start, count in runs:
        length = count * unit
        if start is not None and pos < size:
            end = min(size, pos + length)
            if out and out[-1][0] + out[-1][1] == pos:
                out[-1] = (out[-1][0], end - out[-1][0])
            else:
                out.append((pos, end - pos))
        pos += length
        if len(out) > FOLDER_MAX_ENTRIES:
            return None
    return out


FilesystemOpener = Callable[[BinaryIO, str], GuestFS]
