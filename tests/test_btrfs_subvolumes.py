"""Btrfs subvolumes and read-only snapshots through a real mount: each is a folder at its place in the tree, with
its own inode space, and vm.json names the default subvolume.

The image is made by the kernel's Btrfs and btrfs-progs (a loop mount), put in a GPT disk, backed up and read back
through ``vbfs mount``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import MiB, Mount, Vbfs, random_bytes
from tests.guest_images import run, umount_quietly
from vbfs.testing.images import LoopDevice, blank, have, partition_table, place

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="loop mounts need root")

BEFORE = b"notes written before the snapshot\n" * 100
AFTER = b"notes rewritten after the snapshot\n" * 90


@pytest.fixture(scope="module")
def subvolume_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, bytes]]]:
    """A GPT disk whose p1 is Btrfs with subvolumes ``@`` (the default), ``@home`` holding a nested subvolume
    ``@home/projects`` and ``@home/cache``, and a read-only snapshot ``@home-snap`` of ``@home``; then
    ``@home/user/notes.txt`` is rewritten and ``@home/cache`` deleted. Returns the disk and what each path of the
    top level holds."""
    if not have("mkfs.btrfs", "btrfs", "losetup", "sfdisk"):
        pytest.skip("needs btrfs-progs, losetup and sfdisk")
    work = tmp_path_factory.mktemp("btrfs-subvol")
    part = blank(work / "p1.img", 128 * MiB)
    run("mkfs.btrfs", "-q", "-f", "-L", "vbfs-subvol", str(part))
    mnt = work / "mnt"
    mnt.mkdir()
    blob = random_bytes(300_000, 7)
    files = {
        "@/etc/hostname": b"subvol-vm\n",
        "@home/user/notes.txt": BEFORE,
        "@home/user/blob.bin": blob,
        "@home/projects/readme.md": b"# a nested subvolume\n",
        "@home/projects/src/main.c": b"int main(void) { return 0; }\n",
        "top.txt": b"at the top level\n",
    }
    with LoopDevice(part) as dev:
        run("mount", "-t", "btrfs", dev, str(mnt))
        try:
            run("btrfs", "subvolume", "create", str(mnt / "@"))
            run("btrfs", "subvolume", "create", str(mnt / "@home"))
            run("btrfs", "subvolume", "create", str(mnt / "@home/projects"))
            run("btrfs", "subvolume", "create", str(mnt / "@home/cache"))
            (mnt / "@home/cache/thumb.png").write_bytes(b"deleted later")
            for rel, content in files.items():
                (mnt / rel).parent.mkdir(parents=True, exist_ok=True)
                (mnt / rel).write_bytes(content)
            run("btrfs", "subvolume", "snapshot", "-r", str(mnt / "@home"), str(mnt / "@home-snap"))
            (mnt / "@home/user/notes.txt").write_bytes(AFTER)
            run("btrfs", "subvolume", "delete", "-c", str(mnt / "@home/cache"))
            run("btrfs", "subvolume", "sync", str(mnt))
            run("btrfs", "subvolume", "set-default", str(mnt / "@"))
            run("sync", "-f", str(mnt))
        finally:
            umount_quietly(mnt)
    expected = dict(files)
    expected["@home/user/notes.txt"] = AFTER
    expected["@home-snap/user/notes.txt"] = BEFORE
    expected["@home-snap/user/blob.bin"] = blob
    disk = partition_table(work / "subvolvm.raw", 160 * MiB, "gpt", [(1, 128, "L")])
    place(part, disk, MiB)
    yield disk, expected


def test_btrfs_subvolumes_and_snapshots_are_folders_of_their_own(
    vbfs: Vbfs, subvolume_disk: tuple[Path, dict[str, bytes]], mounted: Callable[[Vbfs], Mount]
) -> None:
    disk, expected = subvolume_disk
    vbfs("backup", f"image://{disk}")
    m = mounted(vbfs)
    root = m.path / "subvolvm/latest/files/subvolvm/p1"
    assert sorted(os.listdir(root)) == ["@", "@home", "@home-snap", "top.txt"]
    for rel, content in expected.items():
        assert (root / rel).read_bytes() == content, rel
    # the snapshot keeps the file as it was; the subvolume has it as it is now
    assert (root / "@home-snap/user/notes.txt").read_bytes() != (root / "@home/user/notes.txt").read_bytes()
    # a snapshot does not hold a nested subvolume's files, even of one deleted since: the kernel shows an empty
    # folder there
    for gone in ("projects", "cache"):
        assert (root / "@home-snap" / gone).is_dir()
        assert os.listdir(root / "@home-snap" / gone) == []
    assert not (root / "@home/cache").exists()

    # the whole volume walks without a loop, and every file is one of the guest's
    errors: list[OSError] = []
    seen: set[str] = set()
    for dirpath, _, names in os.walk(root, onerror=errors.append):
        for n in names:
            seen.add(os.path.relpath(os.path.join(dirpath, n), root))
    assert errors == []
    assert seen == set(expected)

    # a file and its snapshot copy are two files: the same guest inode number in two inode spaces
    for rel in ("user/notes.txt", "user/blob.bin"):
        a, b = os.stat(root / "@home" / rel), os.stat(root / "@home-snap" / rel)
        assert (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino), rel
    # and folders of two subvolumes are two folders (every subvolume's root is inode 256 in the guest)
    tops = [os.stat(root / p) for p in ("@", "@home", "@home-snap", "@home/projects")]
    assert len({(s.st_dev, s.st_ino) for s in tops}) == 4

    doc = json.loads((m.path / "subvolvm/latest/vm.json").read_text())
    (p1,) = [v for v in doc["disks"][0]["volumes"] if v["name"] == "p1"]
    assert p1["filesystem"] == "btrfs"
    assert "default subvolume: @ " in p1["note"]
    assert "@home-snap (read-only)" in p1["note"]
    assert "damaged" not in m.log()
