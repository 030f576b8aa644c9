"""Guest disks with every supported filesystem, built without a running guest (session fixtures), and the steps
the tests share to write filesystems through the host's own drivers (a loop mount, ntfs-3g)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import MiB, random_bytes
from vbfs.testing.images import (
    ext4_file,
    fat32_file,
    lvm_ext4_file,
    ntfs_file,
    partition_table,
    place,
    write_tree,
    xfs_file,
)

MTIME = 1_700_000_000  # 2023-11-14, a whole second: every filesystem can store it


def run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def umount_quietly(mnt: Path) -> None:
    """Unmount a host mount of a test image, lazily if it is still busy."""
    if os.path.ismount(mnt):
        subprocess.run(["umount", str(mnt)], check=False, capture_output=True)
    if os.path.ismount(mnt):
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)


def wait_for(cond: Callable[[], bool], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


@contextmanager
def ntfs3g_mounted(part: Path, mnt: Path) -> Iterator[Path]:
    """``part`` (an NTFS image) mounted at ``mnt`` by ntfs-3g in the foreground, so that its end, with every record
    written, is waited for by its own PID when the block ends."""
    log = mnt.parent / f"{mnt.name}-ntfs-3g.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["ntfs-3g", "-o", "no_detach", str(part), str(mnt)], stdout=out, stderr=out)
    try:
        wait_for(lambda: os.path.ismount(mnt) or proc.poll() is not None)
        assert proc.poll() is None, log.read_text()
        yield mnt
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False, capture_output=True)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(timeout=10)


def linux_tree(root: Path, many: int = 0) -> Path:
    """Files with the things a Linux guest has: owners, modes, symlinks, hard links, a sparse file."""
    write_tree(
        root,
        {
            "etc/hostname": "web01\n",
            "etc/nginx/nginx.conf": "worker_processes auto;\n" * 40,
            "etc/shadow": "root:*:19000:0:99999:7:::\n",
            "home/alice/notes.txt": "alice's notes\n" * 100,
            "usr/bin/tool": b"\x7fELF" + random_bytes(300_000, 5),
            "srv/big.bin": random_bytes(3 * MiB + 12345, 6),
        },
    )
    os.chmod(root / "etc/shadow", 0o640)
    os.chown(root / "etc/shadow", 0, 42)
    os.chmod(root / "home/alice", 0o700)
    os.chmod(root / "home/alice/notes.txt", 0o600)
    os.chown(root / "home/alice", 1000, 1000)
    os.chown(root / "home/alice/notes.txt", 1000, 1000)
    os.chmod(root / "usr/bin/tool", 0o755)
    os.symlink("/usr/share/zoneinfo/UTC", root / "etc/localtime")  # absolute, dangling on the host
    os.symlink("tool", root / "usr/bin/tool-link")
    os.link(root / "usr/bin/tool", root / "usr/bin/tool-hard")
    sparse = root / "var/lib/sparse.img"
    sparse.parent.mkdir(parents=True)
    with open(sparse, "wb") as f:
        f.truncate(16 * MiB)
        f.seek(12 * MiB)
        f.write(b"end of sparse file")
    if many:
        d = root / "many"
        d.mkdir()
        for i in range(many):
            (d / f"f{i:05d}.txt").write_text(f"file {i}\n")
    for p in [*sorted(root.rglob("*"), reverse=True), root]:
        os.utime(p, (MTIME, MTIME), follow_symlinks=False)
    return root


def plain_tree(root: Path) -> Path:
    """Only files and folders, for FAT and NTFS."""
    write_tree(
        root,
        {
            "Windows/System32/drivers/etc/hosts": "127.0.0.1 localhost\r\n",
            "Users/Alice/Documents/report.txt": "quarterly numbers\r\n" * 500,
            "Users/Alice/Pictures/photo.bin": random_bytes(2 * MiB + 7, 8),
        },
    )
    for p in [*sorted(root.rglob("*"), reverse=True), root]:
        os.utime(p, (MTIME, MTIME))
    return root


def build_linux_disk(work: Path, many: int = 10_000) -> Path:
    """GPT: p1 ext4 (with a folder of ``many`` files), p2 XFS, p3 FAT32, p4 LVM2 (vg0-data: ext4), p5 unknown."""
    tree = linux_tree(work / "linux-tree", many)
    small = linux_tree(work / "linux-small")
    fat = plain_tree(work / "fat-tree")
    disk = partition_table(
        work / "linux.raw",
        1024 * MiB,
        "gpt",
        [
            (1, 96, "L"),
            (97, 320, "L"),
            (417, 64, "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"),
            (481, 128, "E6D6D379-F507-44C2-A23C-238F2A3DF928"),
            (609, 8, "L"),
        ],
    )
    place(ext4_file(work / "p1.img", 96 * MiB, tree), disk, 1 * MiB)
    place(xfs_file(work / "p2.img", 320 * MiB, small, work), disk, 97 * MiB)
    place(fat32_file(work / "p3.img", 64 * MiB, fat), disk, 417 * MiB)
    place(lvm_ext4_file(work / "p4.img", 128 * MiB, "vg0", "data", 64, small), disk, 481 * MiB)
    with open(disk, "r+b") as f:  # p5: bytes that no filesystem claims
        f.seek(609 * MiB)
        f.write(random_bytes(8 * MiB, 9))
    for p in ("p1", "p2", "p3", "p4"):
        (work / f"{p}.img").unlink()
    return disk


def build_windows_disk(work: Path) -> Path:
    """MBR: p1 NTFS."""
    tree = plain_tree(work / "ntfs-tree")
    disk = partition_table(work / "windows.raw", 128 * MiB, "dos", [(1, 96, "7")])
    place(ntfs_file(work / "n1.img", 96 * MiB, tree, work), disk, 1 * MiB)
    (work / "n1.img").unlink()
    return disk
