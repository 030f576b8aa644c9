"""Storage backends: get/put/list/delete of immutable, named objects.

A backend knows nothing of chunks or snapshots; it stores byte strings under names such as ``config``,
``chunks/ab/ab12...`` or ``snapshots/<id>``. ``put`` is atomic: an object is either absent or whole, never partial,
so a crash at any moment leaves only complete objects behind (and, on a local directory, temporary files that
every listing ignores). ``flush`` makes every object put so far durable; the repository calls it before it writes
a snapshot manifest, which is how "the manifest lands only after every chunk it names is durable" is kept.

Methods are blocking and may be called from several threads at once.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from vbfs.errors import ObjectMissing, StorageFull, VbfsError
from vbfs.failpoints import failpoint

TMP_PREFIX = ".tmp-"


class Backend(Protocol):
    """What the repository needs from a place that stores objects."""

    def get(self, name: str) -> bytes: ...

    def put(self, name: str, data: bytes) -> None: ...

    def exists(self, name: str) -> bool: ...

    def list(self, prefix: str) -> Iterator[str]: ...

    def delete(self, name: str) -> None: ...

    def flush(self) -> None: ...

    def describe(self) -> str: ...

    def writable(self) -> bool: ...


def _storage_error(exc: OSError, what: str) -> VbfsError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"no space left on the repository's storage while writing {what}")
    if exc.errno == errno.EROFS:
        return VbfsError(f"the repository's storage is read-only (writing {what})")
    if exc.errno == errno.EACCES:
        return VbfsError(f"permission denied writing {what}")
    return VbfsError(f"cannot write {what}: {exc.strerror or exc}")


class LocalBackend:
    """Objects as files below one directory; durability by fsync of files and of the directories they land in."""

    def __init__(self, root: Path):
        self.root = root
        self._dirty_dirs: set[Path] = set()
        self._lock = threading.Lock()

    def describe(self) -> str:
        return str(self.root)

    def writable(self) -> bool:
        """False on read-only storage (a read-only mount, a write-protected share, no write permission)."""
        try:
            if os.statvfs(self.root).f_flag & os.ST_RDONLY:
                return False
        except OSError:
            return False
        return os.access(self.root, os.W_OK)

    def _path(self, name: str) -> Path:
        if name.startswith("/") or ".." in name.split("/"):
            raise ValueError(f"bad object name {name!r}")
        return self.root / name

    def get(self, name: str) -> bytes:
        try:
            with open(self._path(name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise ObjectMissing(f"object {name} is missing from the repository") from None

    def exists(self, name: str) -> bool:
        return self._path(name).exists()

    def put(self, name: str, data: bytes) -> None:
        path = self._path(name)
        tmp = path.parent / f"{TMP_PREFIX}{path.name}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileNotFoundError:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._fsync_dir(path.parent.parent)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                half = len(data) // 2
                _write_all(fd, memoryview(data)[:half])
                failpoint(f"put-partial:{name.split('/')[0]}")
                _write_all(fd, memoryview(data)[half:])
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise _storage_error(exc, name) from None
        with self._lock:
            self._dirty_dirs.add(path.parent)

    def list(self, prefix: str) -> Iterator[str]:
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        if not base.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            rel = Path(dirpath).relative_to(self.root)
            for fn in sorted(filenames):
                if not fn.startswith(TMP_PREFIX):
                    yield str(rel / fn)

    def delete(self, name: str) -> None:
        path = self._path(name)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        with self._lock:
            self._dirty_dirs.add(path.parent)

    def flush(self) -> None:
        with self._lock:
            dirs, self._dirty_dirs = self._dirty_dirs, set()
        for d in sorted(dirs):
            self._fsync_dir(d)

    def leftover_temporaries(self) -> builtins.list[str]:
        """Temporary files left by a process that died in the middle of a put."""
        out: builtins.list[str] = []
        for dirpath, _dirnames, filenames in os.walk(self.root):
            rel = Path(dirpath).relative_to(self.root)
            out.extend(str(rel / fn) for fn in filenames if fn.startswith(TMP_PREFIX))
        return sorted(out)

    @staticmethod
    def _fsync_dir(d: Path) -> None:
        try:
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        n = os.write(fd, view)
        view = view[n:]
