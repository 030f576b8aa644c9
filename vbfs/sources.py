"""The plugin-facing protocols and data classes: what a hypervisor plugin gives the backup engine.

One model for every hypervisor: a guest is snapshotted; the snapshot has disks; each disk gives the extents that
changed since a change token (or "unknown"), the extents that are allocated at all (or "unknown"), bytes at an
offset, and the token to keep for next time. The engine commits that token together with the manifest, never
before, and falls back to reading everything (deduplicated by hash) whenever a token is missing or rejected.

Plugin calls are blocking; the engine runs them in worker threads. A plugin may be called from a thread other
than the one that created it, but never from two threads at once for the same snapshot.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol
from urllib.parse import unquote, urlsplit

from vbfs.errors import SourceError

ChangeToken = str
"""A hypervisor's opaque marker for "the disk as it was at this backup" (changeId, checkpoint, RCT id, ...)."""

CRASH_CONSISTENT = "crash-consistent"
FILESYSTEM_CONSISTENT = "filesystem-consistent"
APPLICATION_CONSISTENT = "application-consistent"


@dataclass(frozen=True, order=True)
class Extent:
    """A byte range of a virtual disk."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class DiskInfo:
    """One virtual disk of a guest. ``name`` becomes ``disks/<name>.img`` in the tree and must be stable."""

    name: str
    size: int
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GuestInfo:
    name: str
    state: str
    disks: tuple[DiskInfo, ...]
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SourceURL:
    """``scheme://[user@]host/path`` of a backup source, e.g. ``image:///var/lib/images/web01.qcow2``."""

    scheme: str
    user: str | None
    host: str | None
    port: int | None
    path: str
    raw: str

    @classmethod
    def parse(cls, text: str) -> SourceURL:
        if "://" not in text:
            raise SourceError(f"{text!r} is not a source URL (expected scheme://..., e.g. image:///path/disk.qcow2)")
        parts = urlsplit(text)
        try:
            port = parts.port
        except ValueError:
            raise SourceError(f"bad port in source URL {text!r}") from None
        return cls(
            parts.scheme.lower(),
            unquote(parts.username) if parts.username else None,
            parts.hostname,
            port,
            unquote(parts.path),
            text,
        )


def vbfs_process_alive(pid: int) -> bool:
    """Whether ``pid`` on this machine is a running vbfs process: plugins use it to tell a snapshot, job or folder
    that a live run is using from one that a killed run left behind."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"vbfs" in f.read()
    except OSError:
        return False


class GuestSnapshot(Protocol):
    """A point-in-time view of one guest's disks, valid inside :meth:`Hypervisor.snapshot`."""

    consistency: str

    def disks(self) -> list[DiskInfo]: ...

    def allocated_extents(self, disk: DiskInfo) -> list[Extent] | None:
        """Extents that may hold data (sorted, non-overlapping); ``None`` if the source cannot tell."""
        ...

    def changed_extents(self, disk: DiskInfo, since: ChangeToken) -> list[Extent] | None:
        """Extents changed since ``since``; ``None`` when unknown or the token was rejected (full read follows)."""
        ...

    def read(self, disk: DiskInfo, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes (fewer only at the end of the disk); raise :class:`SourceError` on failure."""
        ...

    def change_token(self, disk: DiskInfo) -> ChangeToken | None: ...

    # Optional: ``notes: list[str]``, read after the disks, are sentences for the user (quiescing failed, a token
    # was rejected, ...); they are printed after the backup and kept in the snapshot's manifest.
    #
    # Optional: ``read_ranges(disk, ranges: Iterable[tuple[int, int]]) -> Iterator[bytes]`` yields the bytes of each
    # (offset, length) in order, like ``read`` called once per range. The engine uses it when present; a source
    # with latency (a network) implements it to keep several reads in flight. Closing the iterator early must
    # stop and clean up whatever it started.

    def metadata(self) -> dict[str, Any]:
        """JSON-able facts about the guest shown as ``vm.json`` (config, tools state, ...)."""
        ...

    def config_files(self) -> dict[str, bytes]:
        """Original configuration files (.vmx, domain XML, ...) to keep under ``config/``."""
        ...


class Hypervisor(Protocol):
    """A connection to one hypervisor (or image store), made from a source URL."""

    scheme: ClassVar[str]

    def guests(self) -> list[GuestInfo]: ...

    def default_guest(self) -> str | None:
        """The guest that the URL itself names, if any (``.../vm/web01`` names web01)."""
        ...

    def remove_leftovers(self, guest: str) -> list[str]:
        """Clean up what an earlier vbfs run left behind (snapshots, jobs, freezes); return one sentence per thing."""
        ...

    def snapshot(
        self, guest: str, since: Mapping[str, ChangeToken] | None = None
    ) -> AbstractContextManager[GuestSnapshot]:
        """Take a snapshot; the context manager removes it on exit whatever happened inside.

        ``since`` maps disk names to the change tokens of the last committed backup, for sources that must know
        before the snapshot where an incremental starts (libvirt names the checkpoint in ``backupBegin``).
        """
        ...

    def close(self) -> None: ...


class HypervisorFactory(Protocol):
    scheme: ClassVar[str]

    def __call__(self, url: SourceURL, options: Mapping[str, Any]) -> Hypervisor: ...
