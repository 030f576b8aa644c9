"""Write sessions and the chunk index: two writers in one process, a failure of one, dedup without a backend call
per chunk, and an index that is lost or damaged. Real repositories, the engine in this process or the real CLI."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MiB, Vbfs, copy_sparse, sha256
from vbfs.engine.backup import BackupRun
from vbfs.errors import SourceError
from vbfs.plugins import plugin_manager
from vbfs.sources import CRASH_CONSISTENT, DiskInfo, Extent, GuestInfo
from vbfs.store.backend import TMP_PREFIX
from vbfs.store.chunkindex import cache_path
from vbfs.store.codec import ID_SIZE
from vbfs.store.repository import ZERO_ID, Repository


class MemoryGuests:
    """Guests whose one disk is bytes in memory; ``on_read(guest, offset)`` runs before each read."""

    scheme = "memory"

    def __init__(self, disks: dict[str, bytes], on_read: Callable[[str, int], None] | None = None):
        self.disks = disks
        self.on_read = on_read or (lambda guest, offset: None)

    def guests(self) -> list[GuestInfo]:
        return [GuestInfo(g, "running", (DiskInfo("d", len(d)),)) for g, d in self.disks.items()]

    def default_guest(self) -> str:
        return next(iter(self.disks))

    def remove_leftovers(self, guest: str) -> list[str]:
        return []

    @contextmanager
    def snapshot(self, guest: str) -> Iterator[Any]:
        data, hv = self.disks[guest], self

        class Snap:
            consistency = CRASH_CONSISTENT

            def disks(self) -> list[DiskInfo]:
                return [DiskInfo("d", len(data))]

            def allocated_extents(self, disk: DiskInfo) -> list[Extent] | None:
                return None

            def changed_extents(self, disk: DiskInfo, since: str) -> list[Extent] | None:
                return None

            def read(self, disk: DiskInfo, offset: int, length: int) -> bytes:
                hv.on_read(guest, offset)
                return data[offset : offset + length]

            def change_token(self, disk: DiskInfo) -> str | None:
                return None

            def metadata(self) -> dict[str, Any]:
                return {}

            def config_files(self) -> dict[str, bytes]:
                return {}

        yield Snap()

    def close(self) -> None:
        pass


def _backup(repo: Repository, hv: MemoryGuests, guest: str) -> Any:
    return BackupRun(repo, plugin_manager(False), index_files=False).run(hv, guest, f"memory://{guest}")  # type: ignore[arg-type]


def _doc(manifest: Any) -> dict[str, Any]:
    """A manifest as its JSON document."""
    return manifest if isinstance(manifest, dict) else dict(manifest.to_json())


def _disk(repo: Repository, manifest: Any) -> bytes:
    d = _doc(manifest)["disks"][0]
    entries = repo.read_index(d["index"])
    out = bytearray()
    for i in range(0, len(entries), ID_SIZE):
        cid = entries[i : i + ID_SIZE]
        out += bytes(min(d["chunk_size"], d["size"] - len(out))) if cid == ZERO_ID else repo.get_chunk(cid)
    return bytes(out)


def _ids(data: bytes) -> set[bytes]:
    """The ids of a plaintext repository's 1 MiB chunks of ``data``."""
    import blake3

    return {blake3.blake3(data[i : i + MiB]).digest() for i in range(0, len(data), MiB)}


def _temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob(f"{TMP_PREFIX}*")]


def _check_ok(vbfs: Vbfs) -> dict[str, Any]:
    proc = vbfs("check", "--verify-data", "--json", check=False)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["ok"], report
    return dict(report)


def test_two_sessions_in_one_process_commit_two_snapshots(vbfs: Vbfs) -> None:
    """Two guests at once, sharing half their chunks: both snapshots land whole, each session its own index."""
    shared = os.urandom(6 * MiB)
    disks = {"g0": shared + os.urandom(6 * MiB), "g1": shared + os.urandom(6 * MiB)}
    repo = Repository.open(str(vbfs.repo), lambda confirm: "")
    start = threading.Barrier(2)
    hv = MemoryGuests(disks, on_read=lambda guest, offset: start.wait(10) if offset == 3 * MiB else None)
    results: dict[str, Any] = {}
    threads = [threading.Thread(target=lambda g=g: results.update({g: _backup(repo, hv, g)})) for g in disks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == ["g0", "g1"]
    for g, m in results.items():
        assert _disk(repo, m) == disks[g]
    listed = json.loads(vbfs("snapshots", "--json").stdout)
    assert sorted(s["guest"] for s in listed) == ["g0", "g1"]
    assert len(list(repo.backend.list("index/"))) == 2, "each session wrote its index object"
    assert not _temporaries(vbfs.repo)
    _check_ok(vbfs)


def test_a_failing_session_discards_only_its_own_objects(vbfs: Vbfs, tmp_path: Path) -> None:
    """One guest's source fails mid-way while the other's chunks sit in its open batch: the failure removes only
    the failed session's temporaries, the other snapshot commits, and its chunks are durable and whole."""
    disks = {"good": os.urandom(16 * MiB), "bad": os.urandom(16 * MiB)}
    good_ids = {repo_chunk.hex() for repo_chunk in _ids(disks["good"])}
    good_paused, bad_failed = threading.Event(), threading.Event()
    seen: dict[str, list[Path]] = {}

    def on_read(guest: str, offset: int) -> None:
        if guest == "good" and offset == 10 * MiB:
            good_paused.set()
            assert bad_failed.wait(30)
            seen["good temporaries after the failure"] = _temporaries(vbfs.repo)
        if guest == "bad" and offset == 10 * MiB:
            assert good_paused.wait(30)
            seen["before the failure"] = _temporaries(vbfs.repo)
            raise SourceError("the source went away")

    repo = Repository.open(str(vbfs.repo), lambda confirm: "")
    hv = MemoryGuests(disks, on_read=on_read)
    errors: list[BaseException] = []
    results: dict[str, Any] = {}

    def bad() -> None:
        try:
            _backup(repo, hv, "bad")
        except SourceError as exc:
            errors.append(exc)
        finally:
            bad_failed.set()

    threads = [
        threading.Thread(target=lambda: results.update(good=_backup(repo, hv, "good"))),
        threading.Thread(target=bad),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(errors) == 1 and "went away" in str(errors[0])
    before = seen["before the failure"]
    good_before = {p for p in before if p.name.rsplit("-", 1)[-1] in good_ids}
    assert len(good_before) >= 3 and len(before) - len(good_before) >= 3, "both sessions had chunks in open batches"
    after = set(seen["good temporaries after the failure"])
    assert good_before <= after, "the failure left the other session's temporaries alone"
    assert all(p.name.rsplit("-", 1)[-1] in good_ids for p in after), "and removed its own"
    assert _disk(repo, results["good"]) == disks["good"]
    assert not _temporaries(vbfs.repo), "the good session landed its batch at commit"
    listed = json.loads(vbfs("snapshots", "--json").stdout)
    assert [s["guest"] for s in listed] == ["good"]
    _check_ok(vbfs)
    # nothing of the failed guest's first half landed: its chunks were only in its discarded batch
    stored = {n.rsplit("/", 1)[-1] for n in repo.backend.list("chunks/")}
    assert not {c.hex() for c in _ids(disks["bad"][: 10 * MiB])} & stored


def test_a_second_backup_of_unchanged_data_makes_no_call_per_chunk(vbfs: Vbfs) -> None:
    """The dedup decisions come from the chunk index: a few listings and reads per backup, whatever the size."""
    repo = Repository.open(str(vbfs.repo), lambda confirm: "")
    calls = []
    for chunks in (8, 32):
        hv = MemoryGuests({f"g{chunks}": os.urandom(chunks * MiB)})
        _backup(repo, hv, f"g{chunks}")
        fresh = Repository.open(str(vbfs.repo), lambda confirm: "")  # a new process: the index from the cache
        before = fresh.backend.calls.snapshot()
        again = _backup(fresh, hv, f"g{chunks}")
        stats = _doc(again)["stats"]
        assert stats["dedup_chunks"] == chunks and stats["new_chunks"] == 0
        calls.append(fresh.backend.calls.since(before))
    for c in calls:
        assert c["exists"] == 0, c
        assert c["get"] <= 3 and c["list"] <= 5, c  # the new index object, the previous manifest; locks, index/
    assert calls[0]["get"] == calls[1]["get"] and calls[0]["list"] == calls[1]["list"], "independent of the size"


@pytest.mark.parametrize("loss", ["deleted", "damaged"])
def test_a_lost_or_damaged_index_is_rebuilt_and_backups_stay_correct(
    vbfs: Vbfs, template_image: Path, tmp_path: Path, loss: str
) -> None:
    image = copy_sparse(template_image, tmp_path / "web01.raw")
    vbfs("backup", f"image://{image}")
    repo = Repository.open(str(vbfs.repo), lambda confirm: "")
    (name,) = list(repo.backend.list("index/"))
    cache_path(repo).unlink(missing_ok=True)  # a new machine or a lost cache: only the index objects count
    if loss == "deleted":
        (vbfs.repo / name).unlink()
    else:
        blob = bytearray((vbfs.repo / name).read_bytes())
        blob[len(blob) // 2] ^= 0x40
        (vbfs.repo / name).write_bytes(bytes(blob))
    with open(image, "r+b") as f:  # some changed data too
        f.seek(5 * MiB)
        f.write(hashlib.sha256(b"x").digest() * 4096)
    out = vbfs("backup", f"image://{image}")
    notes = [line for line in out.stderr.splitlines() if "chunk index rebuilt" in line]
    assert len(notes) == 1, out.stderr
    assert "1 snapshot(s) were not in it" in notes[0]
    assert ("removed the damaged index/" in notes[0]) == (loss == "damaged"), notes[0]
    report = _check_ok(vbfs)  # a chunk deleted above was stored again by the backup: every snapshot is whole
    assert not any("chunk index" in e for e in report["errors"])
    third = vbfs("backup", f"image://{image}")
    assert "chunk index" not in third.stderr, "rebuilt once, then used"
    for snap in json.loads(vbfs("snapshots", "--json").stdout)[1:]:
        out_img = tmp_path / f"{snap['id']}.img"
        vbfs("restore", f"web01@{snap['id']}:/disks/web01.img", str(out_img))
        assert sha256(out_img) == sha256(image)


def test_check_reports_an_index_that_names_a_missing_chunk(vbfs: Vbfs, template_image: Path, tmp_path: Path) -> None:
    image = copy_sparse(template_image, tmp_path / "web01.raw")
    vbfs("backup", f"image://{image}")
    victim = sorted(p for p in (vbfs.repo / "chunks").rglob("*") if p.is_file() and p.stat().st_size > 4096)[0]
    victim.unlink()
    proc = vbfs("check", "--json", check=False)
    errors = json.loads(proc.stdout)["errors"]
    assert proc.returncode != 0
    assert any("the chunk index names 1 chunk(s) the repository does not hold" in e for e in errors), errors


def test_names_come_from_the_repository_and_a_damaged_header_cache_is_ignored(vbfs: Vbfs) -> None:
    from vbfs.store import snapshots

    repo = Repository.open(str(vbfs.repo), lambda confirm: "")
    hv = MemoryGuests({"g": bytes(2 * MiB), "h": bytes(MiB)})
    first = _backup(repo, hv, "g")
    _backup(repo, hv, "h")
    assert snapshots.cache_path(repo).exists(), "the decoded headers are kept beside the catalog"
    assert not repo.catalog_path().exists(), "the engine never opens the catalog"

    raw = bytearray(snapshots.cache_path(repo).read_bytes())
    raw[-5] ^= 0xFF
    snapshots.cache_path(repo).write_bytes(bytes(raw))
    snapshots._known.clear()
    snapshots._loaded.clear()
    second = _backup(repo, hv, "g")
    names = [h.name for h in snapshots.headers(repo, "g")]
    assert len(set(names)) == 2 and first.name in names and second.name in names, names
    latest = snapshots.latest_manifest(repo, "g")
    assert latest is not None and latest.id == second.id
    assert [h.guest for h in snapshots.headers(repo)].count("h") == 1
