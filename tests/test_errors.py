"""Bad input: one clear line on stderr, a non-zero exit, no traceback, and a repository that stays valid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import MiB, Vbfs, copy_sparse, random_bytes
from vbfs.engine.retention import Policy
from vbfs.job import Job
from vbfs.testing.images import convert


def one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode not in (0, 1), (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vbfs: error: "), proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_missing_repository(make_vbfs: Callable[..., Vbfs], tmp_path: Path) -> None:
    v = make_vbfs(tmp_path / "nowhere")
    one_line_error(v("snapshots", check=False), "no repository at", "does not exist")
    (tmp_path / "empty").mkdir()
    one_line_error(make_vbfs(tmp_path / "empty")("snapshots", check=False), "no config file")
    env = dict(v.env)
    del env["VBFS_REPO"]
    proc = subprocess.run([sys.executable, "-m", "vbfs.cli", "snapshots"], env=env, capture_output=True, text=True)
    one_line_error(proc, "-r PATH", "VBFS_REPO")


@pytest.mark.parametrize("address", ["ssh://backup@host/srv/repo", "s3://bucket/repo", "sftp://host/x"])
def test_a_repository_address_with_a_scheme_is_refused(
    make_vbfs: Callable[..., Vbfs], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, address: str
) -> None:
    monkeypatch.chdir(tmp_path)
    v = make_vbfs()
    for args in (["init", "-e", "none", address], ["-r", address, "snapshots"]):
        proc = subprocess.run(
            [sys.executable, "-m", "vbfs.cli", *args], env=v.env, capture_output=True, text=True, cwd=tmp_path
        )
        one_line_error(proc, "are not supported", address.split(":")[0] + "://")
    assert not list(tmp_path.glob("*:")), "no local folder named after the scheme"


def test_init_refuses_a_used_directory(vbfs: Vbfs) -> None:
    one_line_error(vbfs("init", "-e", "none", check=False), "exists and is not an empty directory")


@pytest.mark.parametrize("kind", ["directory", "odd-size file", "missing file", "bad qcow2 header"])
def test_not_a_disk_image(vbfs: Vbfs, tmp_path: Path, kind: str) -> None:
    path = tmp_path / "thing"
    if kind == "directory":
        path.mkdir()
        want = "not a disk image"
    elif kind == "odd-size file":
        path.write_text("hello, I am a text file\n")
        want = "not a disk image"
    elif kind == "missing file":
        want = "no such file"
    else:
        path.write_bytes(b"QFI\xfb" + bytes(100))
        want = "damaged or unsupported qcow2 image"
    one_line_error(vbfs("backup", f"image://{path}", check=False), want)
    assert json.loads(vbfs("snapshots", "--json").stdout) == []


def test_truncated_qcow2(vbfs: Vbfs, template_image: Path, tmp_path: Path) -> None:
    image = convert(template_image, "qcow2", tmp_path / "web01.qcow2")
    with open(image, "r+b") as f:
        f.truncate(image.stat().st_size // 2)
    one_line_error(vbfs("backup", f"image://{image}", check=False), "web01.qcow2", "truncated or damaged")
    assert json.loads(vbfs("snapshots", "--json").stdout) == []
    assert json.loads(vbfs("check", "--json").stdout)["ok"]


def test_unknown_scheme_and_bad_urls(vbfs: Vbfs) -> None:
    one_line_error(vbfs("backup", "ftp://host/vm", check=False), "unknown source scheme 'ftp'", "image")
    one_line_error(vbfs("backup", "just-a-word", check=False), "not a source URL")


def test_unknown_guest_snapshot_and_path(vbfs: Vbfs, template_image: Path, tmp_path: Path) -> None:
    image = copy_sparse(template_image, tmp_path / "web01.raw")
    vbfs("backup", f"image://{image}")
    one_line_error(vbfs("restore", "nope@latest:/disks/x.img", str(tmp_path / "o"), check=False), "no snapshots")
    one_line_error(vbfs("restore", "web01@ffffffff:/disks/web01.img", str(tmp_path / "o"), check=False), "no snapshot")
    one_line_error(
        vbfs("restore", "web01@latest:/disks/nope.img", str(tmp_path / "o"), check=False),
        "no such path",
        "/disks/nope.img",
    )
    one_line_error(vbfs("restore", "web01@latest", str(tmp_path / "o"), check=False), "needs a path")


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 24 MiB tmpfs, to fill up."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_full_disk_while_writing(make_vbfs: Callable[..., Vbfs], small_fs: Path, tmp_path: Path) -> None:
    v = make_vbfs(small_fs / "repo")
    v.init("none")
    image = tmp_path / "big.raw"
    image.write_bytes(random_bytes(48 * MiB, 3))  # incompressible: needs ~48 MiB of repository
    one_line_error(v("backup", f"image://{image}", check=False), "no space left")
    assert json.loads(v("snapshots", "--json").stdout) == []
    report = json.loads(v("check", "--json").stdout)
    assert report["ok"], report
    assert not list((small_fs / "repo").rglob(".tmp-*")), "temporary files are removed on ENOSPC"
    # after making room, the next backup of something that fits succeeds
    small = tmp_path / "small.raw"
    small.write_bytes(random_bytes(4 * MiB, 4))
    for p in (small_fs / "repo" / "chunks").glob("*/*"):
        p.unlink()
    v("backup", f"image://{small}")
    assert len(json.loads(v("snapshots", "--json").stdout)) == 1


def test_a_job_files_bad_retention_setting_is_one_line(vbfs: Vbfs, tmp_path: Path) -> None:
    job = tmp_path / "nightly.toml"
    job.write_text('source = "image:///nowhere.qcow2"\n\n[retention]\nkeep-daily = 7\nkeep-dayly = 3\n')
    one_line_error(vbfs("backup", "--job", str(job), check=False), "nightly.toml [retention]", "'keep-dayly'")
    job.write_text('source = "image:///nowhere.qcow2"\nretention = 7\n')
    one_line_error(vbfs("backup", "--job", str(job), check=False), "'retention' must be a table")
    assert json.loads(vbfs("snapshots", "--json").stdout) == []
    job.write_text('source = "image:///nowhere.qcow2"\n\n[retention]\nkeep-daily = 7\nkeep-within = "2d"\n')
    assert Job.load(job).retention == Policy(daily=7, within=2 * 86400), "a good table is the job's policy"
