"""Repositories written by vbfs 0.1.0 (before retention, protection and forget records) open, check, restore,
mount, take new backups and are pruned by this version, in place and without an upgrade step.

The repositories are stored in tests/data (see its README): they are what users already have on disk.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Mount, Vbfs, sha256
from vbfs.testing.images import gpt_ext4, write_tree

DATA = Path(__file__).parent / "data" / "repos-0.1.0.tar.xz"
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("compat")
    subprocess.run(["tar", "-xJf", str(DATA), "-C", str(d)], check=True)
    return d


@pytest.mark.parametrize("kind", ["none", "repokey"])
def test_a_repository_of_0_1_0_is_read_written_and_pruned(
    unpacked: Path,
    kind: str,
    make_vbfs: Callable[..., Vbfs],
    mounted: Callable[[Vbfs], Mount],
    tmp_path: Path,
) -> None:
    expected = json.loads((unpacked / "expected.json").read_text())
    repo = tmp_path / f"repo-{kind}"
    shutil.copytree(unpacked / f"repo-{kind}", repo, symlinks=True)
    v = make_vbfs(repo, passphrase=expected["passphrase"])

    rows = json.loads(v("snapshots", "--json").stdout)
    assert [r["guest"] for r in rows] == ["old01", "old01"]
    v("check", "--verify-data")
    disk = tmp_path / "old01.img"
    v("restore", "old01@latest:/disks/old01.img", str(disk))
    assert sha256(disk) == expected["disk_sha256_latest"]
    v("restore", "old01@latest:/files/old01/p1/etc/hostname", str(tmp_path))
    assert (tmp_path / "hostname").read_text() == expected["files"]["etc/hostname"]
    m = mounted(v)
    motd = m.path / "old01" / rows[0]["name"] / "files" / "old01" / "p1" / "etc" / "motd"
    assert hashlib.sha256(motd.read_bytes()).hexdigest() == expected["files"]["etc/motd_sha256"]
    v("umount", str(m.path))

    # This version writes into it: a new backup, protection, a prune and a garbage collection.
    tree = write_tree(tmp_path / "tree", {"etc/hostname": "old01\n", "srv/new.txt": "written by the new version\n"})
    image = gpt_ext4(tmp_path / "old01.raw", 16 * MiB, tree)
    v("backup", f"image://{image}", "--guest", "old01")
    oldest = rows[0]["id"]
    v("protect", f"old01@{oldest}")
    out = json.loads(v("prune", "--keep-last", "1", "--json").stdout)
    assert [r["id"] for r in out["removed"]] == [rows[1]["id"]]
    assert out["gc"]["objects_removed"] > 0
    after = json.loads(v("snapshots", "--json").stdout)
    assert len(after) == 2 and oldest in {r["id"] for r in after}
    assert "disappeared" not in v("snapshots").stderr
    v("check", "--verify-data")
    new = tmp_path / "new.img"
    v("restore", "old01@latest:/disks/old01.img", str(new))
    assert sha256(new) == sha256(image)
