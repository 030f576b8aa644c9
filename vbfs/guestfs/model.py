"""The guest filesystem model shared by every filesystem adapter: entries and the GuestFS interface."""

from __future__ import annotations

import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO, cast

from vbfs.errors import IntegrityError, VbfsError


class GuestDataError(VbfsError):
    """The guest's own data cannot be parsed (a damaged or unsupported filesystem)."""

    exit_code = 3


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
    # The parser's own object, for filesystems without stable inode numbers (FAT). Others find the object again
    # from ``ino`` when it is needed, so that a listing of 100,000 entries does not keep 100,000 parser objects.
    handle: Any = field(default=None, repr=False, compare=False)

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
    """A mounted-in-user-space guest filesystem. Subclasses implement the ``_`` methods; callers use the rest."""

    fstype = "?"
    OPEN_STREAMS = 16

    def __init__(self, fh: Any, label: str):
        self.fh = fh
        self.label = label  # e.g. "web01 sda p1", for messages
        self.lock = threading.RLock()
        self._streams: OrderedDict[int, BinaryIO] = OrderedDict()

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        with self.lock:
            try:
                yield
            except (VbfsError, MemoryError):
                raise
            except IntegrityError:
                raise
            except Exception as exc:
                why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise GuestDataError(f"{self.label}: {what}: damaged {self.fstype} data ({why})") from None

    def root(self) -> GuestEntry:
        with self._guard("root folder"):
            return self._root()

    def listdir(self, entry: GuestEntry) -> list[GuestEntry]:
        with self._guard(f"folder {entry.name}"):
            return [e for e in self._listdir(entry) if e.name not in (".", "..", "")]

    def read(self, entry: GuestEntry, offset: int, length: int) -> bytes:
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

    def _root(self) -> GuestEntry:
        raise NotImplementedError

    def _listdir(self, entry: GuestEntry) -> list[GuestEntry]:
        raise NotImplementedError

    def _resolve(self, entry: GuestEntry) -> Any:
        """The parser's object for an entry."""
        return entry.handle

    def _open(self, entry: GuestEntry) -> BinaryIO:
        """A file-like object of a regular file's contents (dissect's nodes all have ``open()``)."""
        return cast(BinaryIO, self._resolve(entry).open())


FilesystemOpener = Callable[[BinaryIO, str], GuestFS]
