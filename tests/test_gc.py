"""Garbage collection and prune as a user meets them: ``kill -9`` at every stage leaves a repository that checks,
restores and is cleaned up by the next ``gc``; patch records keep their bases; a running reader holds deletion
back; a damaged manifest stops it; a write session whose lock was taken away commits nothing."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MiB, Vbfs, copy_sparse, sha256

GUEST = "web01"


@dataclass
class Prepared:
    """A repository with three snapshots of one guest, oldest first, and the image each was taken of."""

    root: Path
    snaps: list[str]
    images: list[Path]


def _vbfs_at(root: Path) -> Vbfs:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VBFS_")}
    env.update(VBFS_REPO=str(root / "repo"), VBFS_PASSPHRASE="correct horse", XDG_CACHE_HOME=str(root / "cache"))
    return Vbfs(root / "repo", env)


def _change(image: Path, seed: int) -> None:
    """Overwrite the same three 1 MiB chunks past the filesystem's data with new bytes: each version has chunks
    of its own, which no other version holds."""
    rng = random.Random(seed)
    with open(image, "r+b") as f:
        for n in range(3):
            f.seek((20 + 8 * n) * MiB)
            f.write(rng.randbytes(MiB))


@pytest.fixture(scope="module")
def prepared(template_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    root = tmp_path_factory.mktemp("gc-prepared")
    v = _vbfs_at(root)
    v.init()
    work = copy_sparse(template_image, root / f"{GUEST}.raw")
    snaps, images = [], []
    for i in range(3):
        _change(work, i)
        snaps.append(json.loads(v("backup", f"image://{work}", "--no-index", "--json").stdout)["id"])
        (root / f"v{i}").mkdir()
        images.append(copy_sparse(work, root / f"v{i}" / f"{GUEST}.raw"))  # the disk keeps its name
    work.unlink()
    return Prepared(root, snaps, images)


@pytest.fixture
def repo_copy(prepared: Prepared, tmp_path: Path) -> Vbfs:
    """A private copy of the prepared repository (and of its user cache)."""
    dst = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(prepared.root), str(dst)], check=True)
    return _vbfs_at(dst)


def _check_ok(v: Vbfs, *extra: str) -> dict[str, Any]:
    proc = v("check", "--json", *extra, check=False)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["ok"], (proc.stderr, report)
    return dict(report)


def _snapshot_ids(v: Vbfs) -> set[str]:
    proc = v("snapshots", "--json")
    assert "vanish" not in proc.stderr.lower() and "disappeared" not in proc.stderr.lower(), proc.stderr
    return {row["id"] for row in json.loads(proc.stdout)}


def _chunk_files(v: Vbfs) -> set[str]:
    return {str(p.relative_to(v.repo)) for p in (v.repo / "chunks").rglob("*") if p.is_file()}


def _restores_as(v: Vbfs, snap: str, image: Path, tmp_path: Path, guest: str = GUEST) -> None:
    out = tmp_path / f"restored-{snap[:8]}.img"
    v("restore", f"{guest}@{snap}:/disks/{guest}.img", str(out))
    assert sha256(out) == sha256(image), f"snapshot {snap} does not restore what was backed up"
    out.unlink()


def _gc(v: Vbfs, *extra: str) -> dict[str, Any]:
    return dict(json.loads(v("gc", "--json", *extra).stdout))


def _fully_collected(v: Vbfs) -> None:
    """What a fresh full gc leaves: a further gc finds nothing to remove and every object listed is referenced."""
    again = _gc(v)
    assert again["objects_removed"] == 0 and again["held_back_objects"] == 0, again
    assert again["objects"] == again["referenced"], again


# (command, failpoint, index in the prepared snapshots of those a finished run forgets)
# ``prune --keep-last 1`` forgets the two older snapshots, newest first: the second (index 1), then the first.
CRASHES = [
    ("prune", "forget-recorded", {1}),  # the record of the first forget landed, its manifest is still there
    ("prune", "forget-done", {1}),  # the first manifest is gone, the prune had not gone on
    ("prune", "prune-forgot:1", {1}),  # between the two forgets
    ("prune", "prune-forgot:2", {0, 1}),  # both forgotten, no collection yet
    ("prune", "gc-deleting:2", {0, 1}),  # the collection that follows a prune, in the middle of deleting
    ("gc", "gc-marked", {0, 1}),
    ("gc", "gc-index-written", {0, 1}),
    ("gc", "gc-index-replaced", {0, 1}),
    ("gc", "gc-deleting:1", {0, 1}),
    ("gc", "gc-deleting:4", {0, 1}),
]


@pytest.mark.parametrize(("command", "failpoint", "forgets"), CRASHES, ids=[f"{c}-{f}" for c, f, _ in CRASHES])
def test_kill_during_prune_or_gc_leaves_a_repository_the_next_gc_finishes(
    prepared: Prepared, repo_copy: Vbfs, tmp_path: Path, command: str, failpoint: str, forgets: set[int]
) -> None:
    v = repo_copy
    kill = {"VBFS_FAILPOINT": failpoint}
    if command == "prune":
        killed = v("prune", "--keep-last", "1", check=False, extra_env=kill)
    else:
        v("forget", *(f"{GUEST}@{prepared.snaps[i]}" for i in sorted(forgets)))
        killed = v("gc", check=False, extra_env=kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    _check_ok(v)
    kept = [i for i in range(3) if i not in forgets]
    for i in kept:
        _restores_as(v, prepared.snaps[i], prepared.images[i], tmp_path)

    done = _gc(v)
    assert done["held_back_objects"] == 0, done
    assert _snapshot_ids(v) == {prepared.snaps[i] for i in kept}
    if failpoint == "forget-recorded":
        assert done["forgets_finished"] == [prepared.snaps[1]], done
    _fully_collected(v)
    _check_ok(v, "--verify-data")
    for i in kept:
        _restores_as(v, prepared.snaps[i], prepared.images[i], tmp_path)

    # The next backup deduplicates against what stayed and stores again what was collected.
    newest = json.loads(v("backup", f"image://{prepared.images[2]}", "--guest", GUEST, "--no-index", "--json").stdout)
    assert newest["stats"]["new_bytes"] == 0, newest["stats"]
    gone = max(forgets)
    oldest = json.loads(
        v("backup", f"image://{prepared.images[gone]}", "--guest", GUEST, "--no-index", "--json").stdout
    )
    assert oldest["stats"]["new_bytes"] >= 3 * MiB, "a forgotten version's own chunks are stored again"
    _check_ok(v, "--verify-data")
    _restores_as(v, newest["id"], prepared.images[2], tmp_path)
    _restores_as(v, oldest["id"], prepared.images[gone], tmp_path)


# ---- patch records ----------------------------------------------------------------------------------------------


def test_a_patch_records_base_survives_gc_while_referenced_and_goes_with_it(vbfs: Vbfs) -> None:
    from tests.test_patches import TrackedDisk, _disk_bytes
    from vbfs.engine.backup import BackupRun
    from vbfs.plugins import plugin_manager
    from vbfs.store.codec import ID_SIZE
    from vbfs.store.repository import Repository, chunk_object_name

    repo = Repository.open(str(vbfs.repo), lambda confirm: "")
    hv = TrackedDisk()

    def backup() -> Any:
        return BackupRun(repo, plugin_manager(False), index_files=False).run(hv, "g", "tracked://g")  # type: ignore[arg-type]

    def patch_files() -> list[Path]:
        return [p for p in (vbfs.repo / "chunks").rglob("*.patch")]

    full = backup()
    base_id = repo.read_index(full.disks[0].index)[1 * ID_SIZE : 2 * ID_SIZE]
    hv.write(1 * MiB + 100, b"A" * 4096)
    patched = backup()
    patched_data = bytes(hv.data)
    slot = repo.read_index(patched.disks[0].index)[1 * ID_SIZE : 2 * ID_SIZE]
    assert slot != base_id and repo.chunk_patch(slot) is not None, "chunk 1 is stored as a patch record"
    assert repo.chunk_patch(slot).base == base_id  # type: ignore[union-attr]
    assert len(patch_files()) == 1
    base_file = vbfs.repo / chunk_object_name(base_id)

    vbfs("forget", f"g@{full.id}")
    first = _gc(vbfs)
    assert first["objects_removed"] > 0, first  # the forgotten snapshot's chunk-list piece at least
    assert base_file.exists(), "the base of a referenced patch record was collected"
    assert len(patch_files()) == 1
    assert _disk_bytes(Repository.open(str(vbfs.repo), lambda confirm: ""), patched) == patched_data
    _check_ok(vbfs, "--verify-data")
    _fully_collected(vbfs)

    vbfs("forget", f"g@{patched.id}")
    _gc(vbfs)
    assert not patch_files(), "the patch record of a forgotten snapshot stayed"
    assert not base_file.exists(), "the base of a collected patch record stayed"
    _check_ok(vbfs)


# ---- held back --------------------------------------------------------------------------------------------------

HOLDER = """
import sys
from vbfs.store.repository import Repository
repo = Repository.open(sys.argv[1], lambda confirm: "")
with repo.lock_shared():
    print("locked", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def holder(repo_copy: Vbfs) -> Iterator[subprocess.Popen[str]]:
    """Another process holding a shared lock until its stdin is closed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(repo_copy.repo)],
        env=repo_copy.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        if proc.poll() is None:
            proc.communicate(timeout=30)


def test_gc_holds_back_while_another_process_holds_a_lock(
    prepared: Prepared, repo_copy: Vbfs, holder: subprocess.Popen[str], tmp_path: Path
) -> None:
    v = repo_copy
    v("forget", f"{GUEST}@{prepared.snaps[0]}", f"{GUEST}@{prepared.snaps[1]}")
    before = _chunk_files(v)

    dry = _gc(v, "--dry-run")
    assert _chunk_files(v) == before, "a dry run deleted objects"
    assert dry["objects_removed"] == 0 and dry["held_back_objects"] > 0, dry

    held = _gc(v)
    assert _chunk_files(v) == before, "gc deleted objects while a shared lock was held"
    assert held["objects_removed"] == 0, held
    assert held["held_back_objects"] == dry["held_back_objects"], (held, dry)
    assert f"pid {holder.pid}" in held["held_back_by"] and "shared" in held["held_back_by"], held
    text = v("gc")
    assert "held back" in text.stdout, text.stdout

    holder.communicate(timeout=30)
    assert holder.returncode == 0
    freed = _gc(v)
    assert freed["objects_removed"] == dry["held_back_objects"], (freed, dry)
    assert len(_chunk_files(v)) == len(before) - freed["objects_removed"]
    _fully_collected(v)
    _restores_as(v, prepared.snaps[2], prepared.images[2], tmp_path)


# ---- a damaged manifest -------------------------------------------------------------------------------------------


def test_a_damaged_manifest_makes_gc_refuse_and_delete_nothing(prepared: Prepared, repo_copy: Vbfs) -> None:
    v = repo_copy
    v("forget", f"{GUEST}@{prepared.snaps[0]}")
    [manifest] = [p for p in (v.repo / "snapshots").rglob("*") if p.is_file() and prepared.snaps[2] in p.name]
    raw = bytearray(manifest.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    manifest.write_bytes(bytes(raw))
    before = _chunk_files(v)

    proc = v("gc", check=False)
    assert proc.returncode == 3, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and prepared.snaps[2] in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert _chunk_files(v) == before, "gc deleted objects although a manifest could not be read"


# ---- a lost lock ------------------------------------------------------------------------------------------------


def test_a_write_session_whose_lock_was_removed_commits_nothing(vbfs: Vbfs) -> None:
    from vbfs.store.locks import LockLost
    from vbfs.store.manifest import DiskRecord, Manifest, Source, format_time, snapshot_name
    from vbfs.store.repository import Repository

    repo = Repository.open(str(vbfs.repo), lambda confirm: "")
    now = datetime.now(UTC)
    with repo.lock_shared(timeout=0):
        [lock_file] = list((vbfs.repo / "locks").iterdir())
        session = repo.write_session()
        stored = session.store_chunk(os.urandom(MiB))
        index = session.write_index(stored.id, 32)
        manifest = Manifest(
            id=os.urandom(16).hex(),
            guest="g",
            name=snapshot_name(now),
            time=format_time(now),
            source=Source("image", "image:///g.raw"),
            disks=[DiskRecord("d", MiB, MiB, index)],
        )
        lock_file.unlink()  # another process judged the lock stale and removed it
        with pytest.raises(LockLost), session:
            session.commit(manifest)
    assert not list(repo.backend.list("snapshots/")), "a snapshot was committed without its lock"
    assert repo.snapshot_ids() == []
