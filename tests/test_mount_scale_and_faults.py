"""A mount with many snapshots, find and diff across snapshots, and damaged guest data that must not take a mount
down."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import MiB, Mount, Vbfs
from vbfs.catalog import Catalog
from vbfs.engine.backup import BackupRun
from vbfs.plugins import plugin_manager, registry
from vbfs.sources import SourceURL
from vbfs.store.repository import Repository
from vbfs.testing.images import ext4_file, gpt_ext4, partition_table, place, write_tree

pytestmark = pytest.mark.slow


def _backups_in_process(v: Vbfs, image: Path, count: int) -> None:
    """Many snapshots quickly: the engine in this process, the same code the CLI runs, and the catalog brought up
    to date after them, as the command does."""
    repo = Repository.open(str(v.repo), lambda confirm: "")
    hv = registry().hypervisor("image")(SourceURL.parse(f"image://{image}"), {})
    for _ in range(count):
        BackupRun(repo, plugin_manager(load_entry_points=False)).run(hv, "web01", f"image://{image}")
    cat = Catalog(repo.catalog_path())
    try:
        cat.sync(repo)
    finally:
        cat.close()


def test_two_hundred_snapshots_mount_without_reading_every_manifest(
    vbfs: Vbfs, tmp_path: Path, mounted: Callable[[Vbfs], Mount]
) -> None:
    tree = write_tree(tmp_path / "tree", {"etc/hostname": "web01\n", "srv/app.cfg": "x = 1\n" * 1000})
    image = gpt_ext4(tmp_path / "web01.raw", 16 * MiB, tree)
    _backups_in_process(vbfs, image, 200)
    assert len(json.loads(vbfs("snapshots", "--json").stdout)) == 200
    m = mounted(vbfs)
    snaps = os.listdir(m.path / "web01")
    assert len(snaps) == 201 and "latest" in snaps
    middle = sorted(s for s in snaps if s != "latest")[100]
    assert (m.path / "web01" / middle / "files/web01/p1/etc/hostname").read_text() == "web01\n"
    assert (m.path / "web01/latest/files/web01/p1/srv/app.cfg").stat().st_size == 6000
    opened = [line for line in m.log().splitlines() if "opened snapshot" in line]
    assert 1 <= len(opened) <= 2, opened


def test_find_and_diff_across_three_snapshots(vbfs: Vbfs, tmp_path: Path) -> None:
    image = tmp_path / "web01.raw"
    versions = [
        {"etc/app.conf": "v1\n", "etc/old.conf": "old\n", "srv/data.txt": "same\n"},
        {"etc/app.conf": "version two\n", "etc/old.conf": "old\n", "srv/data.txt": "same\n", "srv/new.txt": "n\n"},
        {"etc/app.conf": "version two\n", "srv/data.txt": "same\n", "srv/new.txt": "n\n"},
    ]
    names = []
    for i, files in enumerate(versions):
        tree = write_tree(tmp_path / f"tree{i}", files)
        for p in [*tree.rglob("*"), tree]:
            os.utime(p, (1_700_000_000 + (100 if i and "app" in p.name else 0),) * 2)
        gpt_ext4(image, 16 * MiB, tree)
        names.append(json.loads(vbfs("backup", f"image://{image}", "--json").stdout)["name"])

    found = json.loads(vbfs("find", "app.conf", "--json").stdout)
    assert [[s["name"] for s in f["snapshots"]] for f in found] == [[names[0]], names[1:]]
    assert {f["path"] for f in found} == {"/files/web01/p1/etc/app.conf"}
    assert json.loads(vbfs("find", "*.txt", "--guest", "web01", "--json").stdout)[0]["path"].endswith(".txt")
    missing = vbfs("find", "nothing-like-this", check=False)
    assert missing.returncode == 1

    d1 = json.loads(vbfs("diff", f"web01@{names[0]}", f"web01@{names[1]}", "--json").stdout)["changes"]
    assert {(c["change"], c["path"].split("/p1/")[1]) for c in d1 if "lost+found" not in c["path"]} >= {
        ("changed", "etc/app.conf"),
        ("added", "srv/new.txt"),
    }
    assert not any(c["path"].endswith("data.txt") for c in d1)
    d2 = json.loads(vbfs("diff", f"web01@{names[1]}", "web01@latest", "--json").stdout)["changes"]
    assert ("removed", "/files/web01/p1/etc/old.conf") in {(c["change"], c["path"]) for c in d2}
    assert not any(c["path"].endswith(("app.conf", "new.txt")) for c in d2)
    plain = vbfs("diff", f"web01@{names[1]}", "web01@latest").stdout
    assert "- /files/web01/p1/etc/old.conf" in plain.splitlines()

    # the index survives the loss of the catalog
    (vbfs.repo / "catalog.sqlite").unlink()
    vbfs("catalog", "rebuild")
    assert json.loads(vbfs("find", "app.conf", "--json").stdout) == found


def _debugfs_block(part: Path, path: str) -> int:
    out = subprocess.run(["debugfs", "-R", f"blocks {path}", str(part)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def test_damaged_guest_data_gives_eio_and_the_rest_keeps_working(
    vbfs: Vbfs, tmp_path: Path, mounted: Callable[[Vbfs], Mount]
) -> None:
    good = write_tree(tmp_path / "good", {"etc/hostname": "ok\n", "srv/readme": "fine\n"})
    disk = partition_table(tmp_path / "broken.raw", 64 * MiB, "gpt", [(1, 16, "L"), (17, 16, "L"), (33, 16, "L")])
    parts = [ext4_file(tmp_path / f"part{i}.img", 16 * MiB, good) for i in range(3)]
    # p1: a superblock with a valid magic but impossible geometry
    with open(parts[0], "r+b") as f:
        f.seek(1024 + 40)  # s_inodes_per_group
        f.write(b"\0\0\0\0")
    # p2: the block of /etc overwritten with garbage; / and /srv stay readable
    block = _debugfs_block(parts[1], "/etc")
    with open(parts[1], "r+b") as f:
        f.seek(block * 1024)
        f.write(os.urandom(1024))
    for i, p in enumerate(parts):
        place(p, disk, (1 + 16 * i) * MiB)
    vbfs("backup", f"image://{disk}")
    m = mounted(vbfs)
    files = m.path / "broken/latest/files/broken"
    with pytest.raises(OSError) as err:
        os.listdir(files / "p1")
    assert err.value.errno == errno.EIO
    with pytest.raises(OSError) as err:
        os.listdir(files / "p2" / "etc")
    assert err.value.errno == errno.EIO
    assert (files / "p2/srv/readme").read_text() == "fine\n"
    assert (files / "p3/etc/hostname").read_text() == "ok\n"
    assert (m.path / "broken/latest/vm.json").stat().st_size > 0
    errors = [line for line in m.log().splitlines() if "ERROR" in line]
    assert errors and all("broken@" in line for line in errors), errors


def test_missing_chunk_is_eio_for_what_uses_it(vbfs: Vbfs, tmp_path: Path, mounted: Callable[[Vbfs], Mount]) -> None:
    big = os.urandom(8 * MiB)
    tree = write_tree(tmp_path / "tree", {"srv/big.bin": big, "etc/hostname": "ok\n"})
    image = gpt_ext4(tmp_path / "web01.raw", 32 * MiB, tree)
    vbfs("backup", f"image://{image}", "--no-index")
    with open(image, "rb") as f:
        data = f.read()
    offset = data.index(big[:4096])
    from vbfs.store.codec import Codec

    chunk = data[(offset // MiB + 1) * MiB : (offset // MiB + 2) * MiB]  # a chunk wholly inside big.bin
    cid = Codec(id_key=None, enc_key=None).chunk_id(chunk).hex()
    (vbfs.repo / "chunks" / cid[:2] / cid).unlink()
    m = mounted(vbfs)
    p1 = m.path / "web01/latest/files/web01/p1"
    with pytest.raises(OSError) as err:
        (p1 / "srv/big.bin").read_bytes()
    assert err.value.errno == errno.EIO
    assert (p1 / "etc/hostname").read_text() == "ok\n"
    with pytest.raises(OSError):
        (p1 / "srv/big.bin").read_bytes()
    missing = [line for line in m.log().splitlines() if "ERROR" in line]
    assert len(missing) == 1, m.log()
    assert "web01@" in missing[0] and "p1:/srv/big.bin" in missing[0] and "is missing" in missing[0]


def test_filesystem_without_partition_table_and_new_snapshots_appear(
    vbfs: Vbfs, tmp_path: Path, mounted: Callable[[Vbfs], Mount]
) -> None:
    tree = write_tree(tmp_path / "tree", {"data/readme.txt": "no partition table here\n"})
    image = ext4_file(tmp_path / "bare.raw", 16 * MiB, tree)
    vbfs("backup", f"image://{image}")
    m = mounted(vbfs)
    assert os.listdir(m.path / "bare/latest/files/bare") == ["whole"]
    assert (m.path / "bare/latest/files/bare/whole/data/readme.txt").read_text() == "no partition table here\n"
    # a backup that lands while the tree is mounted shows up without remounting
    other = ext4_file(tmp_path / "second.raw", 16 * MiB, tree)
    vbfs("backup", f"image://{other}")
    deadline = time.monotonic() + 5
    while "second" not in os.listdir(m.path) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "second" in os.listdir(m.path)
    assert (m.path / "second/latest/files/second/whole/data/readme.txt").exists()


def test_guest_special_files_are_names_not_host_devices(
    vbfs: Vbfs, tmp_path: Path, mounted: Callable[[Vbfs], Mount]
) -> None:
    tree = write_tree(tmp_path / "tree", {"usr/bin/su": b"#!/bin/sh\n", "etc/hostname": "x\n"})
    os.chmod(tree / "usr/bin/su", 0o4755)
    os.mkfifo(tree / "run-fifo")
    image = gpt_ext4(tmp_path / "dev.raw", 16 * MiB, tree)
    vbfs("backup", f"image://{image}")
    m = mounted(vbfs)
    mounts = Path("/proc/mounts").read_text().splitlines()
    options = next(line.split()[3] for line in mounts if line.split()[1] == str(m.path))
    assert {"ro", "nodev", "nosuid"} <= set(options.split(","))
    p1 = m.path / "dev/latest/files/dev/p1"
    assert stat.S_ISFIFO(os.lstat(p1 / "run-fifo").st_mode)
    assert os.stat(p1 / "usr/bin/su").st_mode & 0o4000
    out = tmp_path / "restored"
    done = vbfs("restore", "dev@latest:/files/dev/p1", str(out))
    assert "skipped 1 device node(s), fifo(s) or socket(s)" in done.stderr
    assert not (out / "run-fifo").exists() and (out / "etc/hostname").read_text() == "x\n"
    assert os.stat(out / "usr/bin/su").st_mode & 0o7777 == 0o755  # setuid only with --keep-setuid
    # the mount holds a shared lock for as long as it runs
    assert any(p.name.startswith("shared-") for p in (vbfs.repo / "locks").iterdir())


def test_a_repository_on_read_only_storage_can_be_restored_from_and_mounted(
    vbfs: Vbfs, tmp_path: Path, mounted: Callable[[Vbfs], Mount]
) -> None:
    """The backup disk mounted read-only at 3 a.m.: everything that reads works, backing up says why it cannot."""
    tree = write_tree(tmp_path / "tree", {"etc/hostname": "ro\n"})
    image = gpt_ext4(tmp_path / "web01.raw", 16 * MiB, tree)
    vbfs("backup", f"image://{image}")
    ro = tmp_path / "ro-repo"
    ro.mkdir()
    subprocess.run(["mount", "--bind", str(vbfs.repo), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        reader = Vbfs(ro, dict(vbfs.env, VBFS_REPO=str(ro)))
        listed = reader("snapshots", "--json")
        assert "read-only storage" in listed.stderr and len(json.loads(listed.stdout)) == 1
        reader("restore", "web01@latest:/files/web01/p1/etc/hostname", str(tmp_path))
        assert (tmp_path / "hostname").read_text() == "ro\n"
        assert json.loads(reader("check", "--verify-data", "--json").stdout)["ok"]
        m = mounted(reader)
        assert (m.path / "web01/latest/files/web01/p1/etc/hostname").read_text() == "ro\n"
        refused = reader("backup", f"image://{image}", check=False)
        assert refused.returncode == 2 and "read-only storage" in refused.stderr.splitlines()[-1]
        reader("umount", str(m.path))
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)
