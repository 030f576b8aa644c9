"""Storage backends: get/put/list/delete of immutable, named objects.

A backend knows nothing of chunks or snapshots; it stores byte strings under names such as ``config``,
``chunks/ab/ab12...`` or ``snapshots/<id>``. ``put`` is atomic: an object is either absent or whole, never partial,
so a crash at any moment leaves only complete objects behind (and, on a local directory, temporary files that
every listing ignores). ``flush`` makes every object put so far durable; the repository calls it before it writes
a snapshot manifest, which is how "the manifest lands only after every chunk it names is durable" is kept.

``put_batched`` is for the many small immutable objects of a backup (chunks): the object is written to a temporary
file at once but lands under its name only when its :class:`Batch` is flushed (or grows large), after one
``syncfs`` made the whole batch durable — one filesystem sync per batch instead of one ``fsync`` per object.
Until then it is visible to this process only. Each writer (a write session) has a batch of its own, so two
writers in one process never land or discard each other's objects. A crash loses at most the objects of the
open batches; they are temporary files that every listing ignores.

Every backend counts its calls by kind (``get``, ``put``, ``exists``, ``list``, ``delete``) in ``calls``: what a
backup costs on storage where each call is a request.

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
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol, cast

import blake3

from vbfs.errors import ObjectMissing, StorageFull, VbfsError
from vbfs.failpoints import failpoint

TMP_PREFIX = ".tmp-"
TEMPORARY_MAX_AGE = 24 * 3600.0
TEMPORARY_REUSED_PID_AGE = 7 * 24 * 3600.0
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


class CallCounter:
    """Backend calls by kind (get, put, exists, list, delete); thread-safe."""

    KINDS = ("get", "put", "exists", "list", "delete")

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, kind: str) -> None:
        with self._lock:
            self._counts[kind] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {k: self._counts[k] for k in self.KINDS}

    def since(self, before: dict[str, int]) -> dict[str, int]:
        """The calls made since ``before`` (an earlier :meth:`snapshot`)."""
        now = self.snapshot()
        return {k: now[k] - before.get(k, 0) for k in self.KINDS}


class Batch:
    """One writer's objects that are written but not landed yet: name -> (temporary file, size)."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[Path, int]] = {}
        self.bytes = 0
        self.lock = threading.Lock()
        self.flush_lock = threading.Lock()  # one flush of a batch at a time: each object lands once

    def __len__(self) -> int:
        with self.lock:
            return len(self.entries)


class Backend(Protocol):
    """What the repository needs from a place that stores objects."""

    calls: CallCounter

    def get(self, name: str) -> bytes: ...

    def put(self, name: str, data: bytes) -> None: ...

    def open_batch(self) -> Batch: ...

    def put_batched(self, name: str, data: bytes, batch: Batch) -> None: ...

    def discard_batch(self, batch: Batch) -> None: ...

    def exists(self, name: str) -> bool: ...

    def list(self, prefix: str) -> Iterator[str]: ...

    def list_sizes(self, prefix: str) -> Iterator[tuple[str, int]]:
        """Like :meth:`list`, with each object's stored size (what deleting it frees)."""
        ...

    def delete(self, name: str) -> None: ...

    def flush(self, batch: Batch | None = None) -> None: ...

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
        self._open_batches: list[Batch] = []  # read through by get(), so a writer reads what it wrote
        self.calls = CallCounter()

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

    def _pending(self, name: str) -> tuple[Path, int] | None:
        with self._lock:
            batches = list(self._open_batches)
        for batch in batches:
            with batch.lock:
                entry = batch.entries.get(name)
            if entry is not None:
                return entry
        return None

    def get(self, name: str) -> bytes:
        self.calls.add("get")
        path = self._path(name)
        for _ in range(2):
            try:
                with open(path, "rb") as f:
                    return f.read()
            except FileNotFoundError:
                pass
            entry = self._pending(name)
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
        self.calls.add("exists")
        if self._path(name).exists():
            return True
        return self._pending(name) is not None

    def put(self, name: str, data: bytes) -> None:
        self.calls.add("put")
        tmp, path = self._write_temporary(name, data, sync=True)
        try:
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise _storage_error(exc, name) from None
        with self._lock:
            self._dirty_dirs.add(path.parent)

    def open_batch(self) -> Batch:
        """A new batch of one writer; it ends with :meth:`discard_batch` (which also removes what did not land)."""
        batch = Batch()
        with self._lock:
            self._open_batches.append(batch)
        return batch

    def put_batched(self, name: str, data: bytes, batch: Batch) -> None:
        self.calls.add("put")
        tmp, _ = self._write_temporary(name, data, sync=False)
        with batch.lock:
            old = batch.entries.get(name)
            batch.entries[name] = (tmp, len(data))
            batch.bytes += len(data) - (old[1] if old else 0)
            full = batch.bytes >= BATCH_BYTES or len(batch.entries) >= BATCH_OBJECTS
        if old is not None:  # the same object twice in one batch: the same bytes, keep one
            with contextlib.suppress(OSError):
                old[0].unlink()
        if full:
            self.flush(batch)

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
        self.calls.add("list")
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        if not base.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            rel = Path(dirpath).relative_to(self.root)
            for fn in sorted(filenames):
                if not fn.startswith(TMP_PREFIX):
                    yield str(rel / fn)

    def list_sizes(self, prefix: str) -> Iterator[tuple[str, int]]:
        self.calls.add("list")
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        if not base.is_dir():
            return
        for dirpath, dirnames, _filenames in os.walk(base):
            dirnames.sort()
            rel = Path(dirpath).relative_to(self.root)
            with os.scandir(dirpath) as it:
                entries = sorted((e.name, e) for e in it if not e.name.startswith(TMP_PREFIX))
            for name, entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False):
                        yield str(rel / name), entry.stat(follow_symlinks=False).st_blocks * 512
                except FileNotFoundError:
                    continue

    def delete(self, name: str) -> None:
        self.calls.add("delete")
        path = self._path(name)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        with self._lock:
            self._dirty_dirs.add(path.parent)

    def flush(self, batch: Batch | None = None) -> None:
        """Land ``batch`` (sync its files, rename them into place) and make every landed object durable.

        Only that batch lands: another writer's open batch stays as it is.
        """
        with batch.flush_lock if batch is not None else contextlib.nullcontext():
            self._land(batch)

    def _land(self, batch: Batch | None) -> None:
        pending: builtins.list[tuple[str, tuple[Path, int]]] = []
        if batch is not None:
            with batch.lock:
                pending = list(batch.entries.items())
        if pending:
            self._sync([tmp for _, (tmp, _) in pending])
            for name, (tmp, size) in pending:
                path = self._path(name)
                try:
                    os.replace(tmp, path)
                except OSError as exc:
                    raise _storage_error(exc, name) from None
                assert batch is not None
                with batch.lock:
                    if batch.entries.get(name, (None, 0))[0] == tmp:
                        del batch.entries[name]
                        batch.bytes -= size
                with self._lock:
                    self._dirty_dirs.add(path.parent)
        with self._lock:
            dirs, self._dirty_dirs = self._dirty_dirs, set()
        if pending and _syncfs is not None:
            self._sync([])  # one filesystem sync makes the renames durable too
        else:
            for d in sorted(dirs):
                self._fsync_dir(d)

    def discard_batch(self, batch: Batch) -> None:
        """End ``batch``: remove the temporary files of its objects that did not land (nothing will name them)."""
        with self._lock, contextlib.suppress(ValueError):
            self._open_batches.remove(batch)
        with batch.lock:
            entries, batch.entries, batch.bytes = batch.entries, {}, 0
        for tmp, _ in entries.values():
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

        Gone means: written by a process of this host (same host id) that no longer runs (or whose pid has been
        running for more than ``TEMPORARY_REUSED_PID_AGE`` since the write: a reused pid), or, for one that cannot
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
                # A live pid may be another process that took a dead writer's pid: after a week it is dead too
                # (no backup writes one temporary that long).
                dead = int(m.group(1)) != os.getpid() and (
                    not process_alive(int(m.group(1))) or now - st.st_mtime > TEMPORARY_REUSED_PID_AGE
                )
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
