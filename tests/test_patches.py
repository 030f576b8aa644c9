"""Incremental backups that know which bytes changed: chunks stored as patch records, read back exactly, turned
back into full chunks when the changes grow, and checked. The source is an in-memory disk with change tracking."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tests.conftest import MiB, Vbfs
from vbfs.engine.backup import BackupRun
from vbfs.engine.check import check
from vbfs.plugins import plugin_manager
from vbfs.sources import CRASH_CONSISTENT, DiskInfo, Extent, GuestInfo
from vbfs.store.codec import ID_SIZE
from vbfs.store.manifest import Manifest
from vbfs.store.repository import ZERO_ID, Repository, chunk_object_name


class TrackedDisk:
    """A guest with one 8 MiB disk whose writes are tracked like CBT: token n = after the n-th backup."""

    scheme = "tracked"

    def __init__(self) -> None:
        self.data = bytearray(8 * MiB)
        self.data[: 4 * MiB] = os.urandom(4 * MiB)
        self.writes: list[tuple[int, Extent]] = []  # (backup count when written, extent)
        self.backups = 0

    def write(self, offset: int, data: bytes) -> None:
        self.data[offset : offset + len(data)] = data
        self.writes.append((self.backups, Extent(offset, len(data))))

    def guests(self) -> list[GuestInfo]:
        return [GuestInfo("g", "running", (DiskInfo("d", len(self.data)),))]

    def default_guest(self) -> str:
        return "g"

    def remove_leftovers(self, guest: str) -> list[str]:
        return []

    @contextmanager
    def snapshot(self, guest: str) -> Iterator[Any]:
        frozen = bytes(self.data)
        hv = self
        hv.backups += 1
        n = hv.backups

        class Snap:
            consistency = CRASH_CONSISTENT

            def disks(self) -> list[DiskInfo]:
                return [DiskInfo("d", len(frozen))]

            def allocated_extents(self, disk: DiskInfo) -> list[Extent] | None:
                return None

            def changed_extents(self, disk: DiskInfo, since: str) -> list[Extent] | None:
                return sorted(e for when, e in hv.writes if when >= int(since))

            def read(self, disk: DiskInfo, offset: int, length: int) -> bytes:
                return frozen[offset : offset + length]

            def change_token(self, disk: DiskInfo) -> str:
                return str(n)

            def metadata(self) -> dict[str, Any]:
                return {}

            def config_files(self) -> dict[str, bytes]:
                return {}

        yield Snap()

    def close(self) -> None:
        pass


def _disk_bytes(repo: Repository, manifest: Manifest) -> bytes:
    d = manifest.disks[0]
    entries = repo.read_index(d.index)
    out = bytearray()
    for i in range(0, len(entries), ID_SIZE):
        cid = entries[i : i + ID_SIZE]
        out += bytes(min(d.chunk_size, d.size - len(out))) if cid == ZERO_ID else repo.get_chunk(cid)
    return bytes(out)


def _patches(repo: Repository) -> list[str]:
    return [n for n in repo.backend.list("chunks/") if n.endswith(".patch")]


def test_changed_bytes_become_patch_records_and_read_back_exactly(vbfs: Vbfs) -> None:
    repo = Repository.open(str(vbfs.repo), lambda confirm: "")
    hv = TrackedDisk()

    def backup() -> Manifest:
        return BackupRun(repo, plugin_manager(False), index_files=False).run(hv, "g", "tracked://g")  # type: ignore[arg-type]

    full = backup()
    assert _disk_bytes(repo, full) == bytes(hv.data) and not _patches(repo)

    hv.write(1 * MiB + 100, b"A" * 4096)  # inside a full chunk
    hv.write(6 * MiB, b"B" * 8192)  # inside a chunk of zeros
    inc = backup()
    assert inc.stats["read_bytes"] == 4096 + 8192, "only the changed bytes are read"
    assert inc.stats["new_bytes"] == 4096 + 8192, "and only they are stored"
    assert len(_patches(repo)) == 2
    assert _disk_bytes(repo, inc) == bytes(hv.data)
    assert _disk_bytes(repo, full)[1 * MiB + 100 : 1 * MiB + 104] != b"AAAA", "the older snapshot is unchanged"

    hv.write(1 * MiB + 50, b"C" * 100)  # overlaps the first change: merged into one record on the same base
    third = backup()
    assert _disk_bytes(repo, third) == bytes(hv.data)
    assert third.stats["new_bytes"] == 4096 + 50, "the merged record holds the pieces of both changes"

    hv.write(1 * MiB, os.urandom(600 * 1024))  # past half the chunk: stored whole again
    fourth = backup()
    assert fourth.stats["new_bytes"] == MiB
    assert _disk_bytes(repo, fourth) == bytes(hv.data)
    assert check(repo, verify_data=True).ok

    # a patch record whose base is lost: the plain check finds it
    base = full.disks[0].index
    entries = repo.read_index(base)
    base_id = entries[1 * ID_SIZE : 2 * ID_SIZE]
    (vbfs.repo / chunk_object_name(base_id)).unlink()
    report = check(repo)
    assert any("which is missing" in e for e in report.errors), report.errors
