"""kill -9 of a backup at every stage leaves a valid repository, no partial snapshot, and a working next backup."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tests.conftest import Vbfs, copy_sparse, sha256

# (failpoint, does the killed run's snapshot exist afterwards?)
STAGES = [
    ("before-chunks", False),  # snapshot taken, nothing written yet
    ("put-partial:chunks", False),  # in the middle of writing the first chunk file
    ("chunk-written:3", False),  # during chunk writes: three chunks landed
    ("after-chunks", False),  # every chunk written, no manifest yet
    ("index-written", False),  # the session's chunk index object landed, its manifest not yet
    ("put-partial:snapshots", False),  # in the middle of writing the manifest
    ("after-manifest", True),  # manifest landed, catalog not yet updated
]


@pytest.mark.parametrize(("failpoint", "survives"), STAGES, ids=[s[0] for s in STAGES])
def test_kill_during_backup(vbfs: Vbfs, template_image: Path, tmp_path: Path, failpoint: str, survives: bool) -> None:
    image = copy_sparse(template_image, tmp_path / "web01.raw")
    killed = vbfs("backup", f"image://{image}", check=False, extra_env={"VBFS_FAILPOINT": failpoint})
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    checked = vbfs("check", "--verify-data", "--json", check=False)
    report = json.loads(checked.stdout)
    assert checked.returncode == 0 and report["ok"], report
    listed = json.loads(vbfs("snapshots", "--json").stdout)
    assert len(listed) == (1 if survives else 0)

    vbfs("backup", f"image://{image}")
    listed = json.loads(vbfs("snapshots", "--json").stdout)
    assert len(listed) == (2 if survives else 1)
    for snap in listed:
        out = tmp_path / f"{snap['id']}.img"
        vbfs("restore", f"web01@{snap['id']}:/disks/web01.img", str(out))
        assert sha256(out) == sha256(image)
    # the dead process's lock is stale and does not block an exclusive user
    assert not any(p.name.startswith("exclusive") for p in (vbfs.repo / "locks").iterdir())


def test_two_backups_at_once_both_succeed(vbfs: Vbfs, template_image: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    imgs = [copy_sparse(template_image, tmp_path / f"g{i}.raw") for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "vbfs.cli", "backup", f"image://{img}"],
            env=vbfs.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for img in imgs
    ]
    for p in procs:
        _out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    listed = json.loads(vbfs("snapshots", "--json").stdout)
    assert sorted(s["guest"] for s in listed) == ["g0", "g1"]
    assert json.loads(vbfs("check", "--verify-data", "--json").stdout)["ok"]
