"""Garbage collection while backups run into the same repository: both succeed, and no chunk a backup reuses is lost.

Each round makes garbage that the next backup deduplicates against (a snapshot of exactly the content about to be
backed up again is forgotten), then starts that backup and a ``gc`` (or a ``prune``) at random moments of each
other. Whatever the interleaving, both must exit 0, and at the end ``check --verify-data`` passes and every
snapshot restores byte-identically.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import MiB, Vbfs, copy_sparse, sha256

pytestmark = pytest.mark.slow


def _start(vbfs: Vbfs, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "vbfs.cli", *args],
        env=vbfs.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str], what: str) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{what} exited {proc.returncode}:\n{err}"
    return out


def _change(image: Path, rng: random.Random) -> None:
    """Overwrite a few 64 KiB blocks past the filesystem (the guest's files stay as they are)."""
    with open(image, "r+b") as f:
        for _ in range(4):
            f.seek(rng.randrange(10 * MiB, 58 * MiB) // 65536 * 65536)
            f.write(rng.randbytes(65536))


def test_backups_and_gc_at_random_moments_lose_nothing(vbfs: Vbfs, template_image: Path, tmp_path: Path) -> None:
    rounds = int(os.environ.get("GC_ROUNDS", "12"))
    rng = random.Random(int(os.environ.get("GC_SEED", "20261202")))
    image = copy_sparse(template_image, tmp_path / "g1.raw")
    with open(image, "r+b") as f:  # 48 MiB of data to read: a backup runs long enough for gc to meet it
        f.seek(10 * MiB)
        f.write(rng.randbytes(48 * MiB))
    url = f"image://{image}"
    versions: dict[str, str] = {}  # snapshot id -> sha256 of the disk it was taken of
    held_back = removed = 0
    for r in range(rounds):
        _change(image, rng)
        digest = sha256(image)
        # Garbage that the next backup deduplicates against: a snapshot of exactly this content, forgotten.
        doomed = json.loads(vbfs("backup", url, "--guest", "g1", "--no-index", "--json").stdout)["id"]
        vbfs("forget", f"g1@{doomed}")
        backup = _start(vbfs, "backup", url, "--guest", "g1", "--no-index", "--json")
        time.sleep(rng.uniform(0.0, 0.6))
        collector = _start(vbfs, *(["gc", "--json"] if r % 3 else ["prune", "--keep-last", "4", "--json"]))
        snap = json.loads(_finish(backup, f"round {r}: backup"))
        doc = json.loads(_finish(collector, f"round {r}: gc"))
        gc = doc if "objects_removed" in doc else doc["gc"]
        held_back += gc["held_back_objects"] > 0
        removed += gc["objects_removed"] > 0
        versions[snap["id"]] = digest
    # Sweeps went ahead in some rounds (and were held back for a running backup in others, as timing falls).
    assert removed, "no round deleted anything"
    listed = json.loads(vbfs("snapshots", "--json").stdout)
    assert listed, "prune keeps the newest snapshots"
    for row in listed:
        assert row["id"] in versions
    vbfs("check", "--verify-data")
    for row in listed:
        target = tmp_path / f"restored-{row['id'][:8]}.img"
        vbfs("restore", f"g1@{row['id']}:/disks/g1.img", str(target))
        assert sha256(target) == versions[row["id"]], f"snapshot {row['id']} does not restore what was backed up"
        target.unlink()
    # With no backup running, gc reclaims everything unreferenced before it exits.
    final = json.loads(vbfs("gc", "--json").stdout)
    assert final["held_back_objects"] == 0
    again = json.loads(vbfs("gc", "--json").stdout)
    assert again["objects_removed"] == 0 and again["objects"] == again["referenced"]
    print(f"{rounds} rounds: {held_back} held back, {removed} with deletions")


def test_lock_kinds_share_the_repository_as_documented(vbfs: Vbfs) -> None:
    """Backups (shared) go on beside a gc; two gcs never run at once; the sweep's exclusive lock waits for both."""
    from vbfs.errors import LockError
    from vbfs.store.repository import Repository

    repo = Repository.open(str(vbfs.repo), lambda confirm: "")
    other = Repository.open(str(vbfs.repo), lambda confirm: "")  # another process, as far as locks go
    with repo.lock_gc():
        with other.lock_shared(timeout=0):
            pass
        with pytest.raises(LockError, match="gc lock held"):
            other.lock_gc().__enter__()
        # This process's own gc lock does not stand in the way of its exclusive one.
        with repo.lock_exclusive(), pytest.raises(LockError, match="exclusive lock held"):
            other.lock_shared(timeout=0).__enter__()
        with other.lock_shared(timeout=0), pytest.raises(LockError, match="shared lock held"):
            repo.lock_exclusive().__enter__()
    assert not list((vbfs.repo / "locks").iterdir()), "every lock is removed when its holder is done"
