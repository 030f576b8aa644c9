"""Backups of one guest at once, and what killed backups leave behind.

Every manifest is listed under a name of its own and reads back by that name; two manifests that gave themselves
the same name are shown the same way whatever order the catalog learns them in. Temporaries and locks of killed
processes are removed by the next backup or check, which say how much they removed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import MiB, Vbfs, random_bytes, sha256
from vbfs.catalog import Catalog
from vbfs.store.backend import host_id
from vbfs.store.repository import Repository

ROUNDS = 4
AT_ONCE = 3


def _small_image(path: Path, seed: int) -> Path:
    with open(path, "wb") as f:
        f.write(random_bytes(2 * MiB, seed))
        f.truncate(4 * MiB)
    return path


def _start(v: Vbfs, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "vbfs.cli", *args], env=v.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(procs: list[subprocess.Popen[str]]) -> list[str]:
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert "internal error" not in err, err
        outs.append(out)
    return outs


@pytest.mark.slow
def test_backups_of_one_guest_at_once_are_all_listed(vbfs: Vbfs, tmp_path: Path) -> None:
    image = _small_image(tmp_path / "g.raw", 5)
    ids = []
    deadline = time.monotonic() + 90
    for _ in range(ROUNDS):
        outs = _finish([_start(vbfs, "backup", f"image://{image}", "--json") for _ in range(AT_ONCE)])
        ids += [json.loads(o)["id"] for o in outs]
        assert time.monotonic() < deadline
    listed = json.loads(vbfs("snapshots", "--json").stdout)
    assert sorted(s["id"] for s in listed) == sorted(ids), "every manifest is listed"
    names = [s["name"] for s in listed]
    assert len(set(names)) == len(names), names
    # each name reads back, and reads back its own snapshot
    procs = []
    for s in listed:
        procs.append(_start(vbfs, "ls", f"g@{s['name']}:/", "--json"))
        procs.append(_start(vbfs, "restore", f"g@{s['name']}:/disks/g.img", str(tmp_path / f"{s['id']}.img")))
    _finish(procs)
    for s in listed:
        assert sha256(tmp_path / f"{s['id']}.img") == sha256(image)
    again = json.loads(vbfs("snapshots", "--json").stdout)
    assert again == listed, "the listing is the same from one command to the next"


def test_two_manifests_with_one_name_are_both_shown_in_any_order(vbfs: Vbfs, tmp_path: Path) -> None:
    image = _small_image(tmp_path / "g.raw", 6)
    first = json.loads(vbfs("backup", f"image://{image}", "--json").stdout)
    repo = Repository.open(str(vbfs.repo), lambda confirm: "")
    twins = []
    for _ in range(2):  # what two backups that finished in the same second would have written
        m = dataclasses.replace(repo.load_manifest(first["id"]), id=secrets.token_hex(16))
        repo.commit_manifest(m)
        twins.append(m)
    listed = json.loads(vbfs("snapshots", "--json").stdout)
    assert len(listed) == 3
    by_id = {s["id"]: s["name"] for s in listed}
    ordered = sorted(by_id)
    assert by_id[ordered[0]] == first["name"]
    assert {by_id[i] for i in ordered[1:]} == {f"{first['name']}-{i[:8]}" for i in ordered[1:]}
    # a catalog that learns them in another order shows the same names
    manifests = [repo.load_manifest(i) for i in ordered]
    for order in (manifests, manifests[::-1], [manifests[1], manifests[0], manifests[2]]):
        cat = Catalog(tmp_path / f"c-{secrets.token_hex(4)}.sqlite")
        for m in order:
            cat.add(m)
        assert {s["id"]: s["name"] for s in cat.snapshots()} == by_id
        cat.close()
    for name in by_id.values():
        vbfs("ls", f"g@{name}:/disks")
    # the same manifest added twice (a backup and a sync racing) stays one row
    cat = Catalog(repo.catalog_path())
    assert cat.add(manifests[0]) == [] and len(cat.snapshots()) == 3
    cat.close()


def _temporaries(repo: Path) -> list[Path]:
    return [p for p in repo.rglob(".tmp-*")]


def test_leftovers_of_killed_backups_are_removed(vbfs: Vbfs, tmp_path: Path) -> None:
    image = _small_image(tmp_path / "g.raw", 7)
    for n in range(2):
        killed = vbfs("backup", f"image://{image}", check=False, extra_env={"VBFS_FAILPOINT": "chunk-written:2"})
        assert killed.returncode == -signal.SIGKILL
        # the second one found the first one's lock and removed it
        assert ("removed 1 lock(s) of processes that are gone" in killed.stderr) == (n == 1), killed.stderr
    left = _temporaries(vbfs.repo)
    size = sum(p.stat().st_size for p in left)
    assert left and size > MiB, "the killed backups left temporaries"
    assert len(list((vbfs.repo / "locks").iterdir())) == 1, "and its lock"
    # a temporary of a live writer on this host, and one of another host that is recent, are kept;
    # one of another host (or of an older vbfs) that is a day old is removed
    live = vbfs.repo / "chunks" / f".tmp-{os.getpid()}-{host_id()}-00000000-live"
    recent = vbfs.repo / "chunks" / ".tmp-1-0123456789ab-00000000-elsewhere"
    ancient = vbfs.repo / "chunks" / ".tmp-oldname-123-abcd"
    for p in (live, recent, ancient):
        p.write_bytes(b"x" * 1000)
    os.utime(ancient, (time.time() - 2 * 86400,) * 2)

    proc = vbfs("check", "--json")
    assert "removed 1 lock(s) of processes that are gone" in proc.stderr, proc.stderr
    notes = json.loads(proc.stdout)["notes"]
    assert notes == [
        f"removed {len(left) + 1} temporary file(s) ({(size + 1000) / MiB:.1f} MiB) left by interrupted writes"
    ]
    assert sorted(_temporaries(vbfs.repo)) == sorted([live, recent])
    assert list((vbfs.repo / "locks").iterdir()) == []

    # the next backup cleans up too, and says so
    killed = vbfs("backup", f"image://{image}", check=False, extra_env={"VBFS_FAILPOINT": "chunk-written:2"})
    assert killed.returncode == -signal.SIGKILL
    done = vbfs("backup", f"image://{image}")
    assert "vbfs: note: cleanup: removed" in done.stderr and "temporary file(s)" in done.stderr, done.stderr
    assert sorted(_temporaries(vbfs.repo)) == sorted([live, recent])
    assert json.loads(vbfs("check", "--verify-data", "--json").stdout)["ok"]
