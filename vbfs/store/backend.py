"""Storage backends: get/put/list/delete of immutable, named objects.

A backend knows nothing of chunks or snapshots; it stores byte strings under names such as ``config``,
``chunks/ab/ab12...`` or ``snapshots/<id>``. ``put`` is atomic: an object is either absent or whole, never partial,
so a crash at any moment leaves only complete objects behind (and, on a local directory, temporary files that
every listing ignores). ``flush`` makes every object put so far durable; the repository calls it before it writes
a snapshot manifest, which is how "the manifest lands only after every chunk it names is durable" is kept.

``put_batched`` is for the many small immutable objects of a backup (chunks): the object is written to a temporary
file at once but lands under its name only at the next ``flush`` (or when a batch grows large), after one
``syncfs`` made the whole batch durable — one filesystem sync per batch instead of one ``fsync`` per object.
Until then it is visible to this process only. A crash loses at most the objects of the open batch; they are
temporary files that every listing ignores.

Temporary files are named ``.tmp-<pid>-<host id>-<random>-<name>``: the host id (a hash of the host name, the
boot and the pid namespace) says whether ``pid`` can be asked about here, so a temporary whose writer is gone is
told apart from one still being written (:meth:`LocalBackend.remove_dead_temporaries`). One that cannot be asked
about is dead once it is older than ``TEMPORARY_MAX_AGE``, which no live write keeps a temporary for.

Methods are blocking and may be called from several threads at once.
"""

from __future__ import annotations

import builtins
import contextlib
import ctypes
import ctypes.util
import errno
import functools
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol, cast

import blake3

from vbfs.errors import ObjectMissing, StorageFull, VbfsError
from vbfs.failpoints import failpoint

TMP_PREFIX = ".tmp-"
TEMPORARY_MAX_AGE = 24 * 3600.0
_TMP_RE = re.compile(r"\.tmp-(\d+)-([0-9a-f]{12})-[0-9a-f]{8}-")


@functools.cache
def host_id() -> str:
    """Names this host, boot and pid namespace: a process id means the same process wherever this matches."""
    parts = [socket.gethostname()]
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        pass
    return blake3.blake3("\0".join(parts).encode()).hexdigest()[:12]


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


class Backend(Protocol):
    """What the repository needs from a place that stores objects."""

    def get(self, name: str) -> bytes: ...

    def put(self, name: str, data: bytes) -> None: ...

    def put_batched(self, name: str, data: bytes) -> None: ...

    def discard_batch(self) -> None: ...

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
        self._flush_lock = threading.Lock()
        self._batch: dict[str, tuple[Path, int]] = {}  # name -> (temporary file, size): written, not landed
        self._batch_bytes = 0

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
        path = self._path(name)
        for _ in range(2):
            try:
                with open(path, "rb") as f:
                    return f.read()
            except FileNotFoundError:
                pass
            with self._lock:
                entry = self._batch.get(name)
            if entry is None:
                break
            tmp = entry[0]
            try:
                with open(tmp, "rb") as f:
                    return f.read()
            except FileNotFoundError:
                continue  # it landed in between: read it under its name
        raise ObjectMissing(f"object {name} is missing from the repository")

    def exists(self, name: str) -> bool:
        if self._path(name).exists():
            return True
        with self._lock:
            return name in self._batch

    def put(self, name: str, data: bytes) -> None:
        tmp, path = self._write_temporary(name, data, sync=True)
        try:
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise _storage_error(exc, name) from None
        with self._lock:
            self._dirty_dirs.add(path.parent)

    def put_batched(self, name: str, data: bytes) -> None:
        tmp, _ = self._write_temporary(name, data, sync=False)
        with self._lock:
            old = self._batch.get(name)
            self._batch[name] = (tmp, len(data))
            self._batch_bytes += len(data) - (old[1] if old else 0)
            full = self._batch_bytes >= BATCH_BYTES or len(self._batch) >= BATCH_OBJECTS
        if old is not None:  # the same object twice in one batch: the same bytes, keep one
            with contextlib.suppress(OSError):
                old[0].unlink()
        if full:
            self.flush()

    def _write_temporary(self, name: str, data: bytes, sync: bool) -> tuple[Path, Path]:
        path = self._path(name)
        tmp = path.parent / f"{TMP_PREFIX}{os.getpid()}-{host_id()}-{secrets.token_hex(4)}-{path.name}"
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
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise _storage_error(exc, name) from None
        return tmp, path

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
        """Land the open batch (sync its files, rename them into place) and make every landed object durable."""
        with self._flush_lock:
            with self._lock:
                batch = list(self._batch.items())
            if batch:
                self._sync([tmp for _, (tmp, _) in batch])
                for name, (tmp, size) in batch:
                    path = self._path(name)
                    try:
                        os.replace(tmp, path)
                    except OSError as exc:
                        raise _storage_error(exc, name) from None
                    with self._lock:
                        if self._batch.get(name, (None, 0))[0] == tmp:
                            del self._batch[name]
                            self._batch_bytes -= size
                        self._dirty_dirs.add(path.parent)
            with self._lock:
                dirs, self._dirty_dirs = self._dirty_dirs, set()
            if batch and _syncfs is not None:
                self._sync([])  # one filesystem sync makes the renames durable too
            else:
                for d in sorted(dirs):
                    self._fsync_dir(d)

    def discard_batch(self) -> None:
        """Forget the open batch and remove its temporary files (a backup that failed will not name them)."""
        with self._lock:
            batch, self._batch, self._batch_bytes = self._batch, {}, 0
        for tmp, _ in batch.values():
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _sync(self, files: builtins.list[Path]) -> None:
        """Make ``files`` durable: one syncfs of the repository's filesystem where Linux has it, else fsyncs."""
        if _syncfs is not None:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                if _syncfs(fd) != 0:
                    err = ctypes.get_errno()
                    raise _storage_error(OSError(err, os.strerror(err)), "a batch of chunks")
            finally:
                os.close(fd)
            return
        for tmp in files:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def leftover_temporaries(self) -> builtins.list[str]:
        """Temporary files left by a process that died in the middle of a put."""
        out: builtins.list[str] = []
        for dirpath, _dirnames, filenames in os.walk(self.root):
            rel = Path(dirpath).relative_to(self.root)
            out.extend(str(rel / fn) for fn in filenames if fn.startswith(TMP_PREFIX))
        return sorted(out)

    def remove_dead_temporaries(self) -> tuple[int, int]:
        """Remove the temporaries whose writer is provably gone; returns (files, bytes) removed.

        Gone means: written by a process of this host (same host id) that no longer runs, or, for one that cannot
        be asked about (another host, or a name without a writer), older than ``TEMPORARY_MAX_AGE``.
        """
        here = host_id()
        now = time.time()
        count = size = 0
        for name in self.leftover_temporaries():
            path = self.root / name
            m = _TMP_RE.match(path.name)
            try:
                st = path.lstat()
            except OSError:
                continue
            if m and m.group(2) == here:
                dead = int(m.group(1)) != os.getpid() and not process_alive(int(m.group(1)))
            else:
                dead = now - st.st_mtime > TEMPORARY_MAX_AGE
            if not dead:
                continue
            try:
                path.unlink()
            except OSError:
                continue
            count += 1
            size += st.st_size
        return count, size

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


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return cast(Callable[[int], int], fn)


_syncfs = _load_syncfs()
BATCH_BYTES = 256 * 1024 * 1024  # a batch lands when it holds this much, so a crash loses little work
BATCH_OBJECTS = 8192


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        n = os.write(fd, view)
        view = view[n:]
