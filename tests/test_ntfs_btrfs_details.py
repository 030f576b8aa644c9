"""Btrfs files in zstd, LZO and zlib compressed extents, and NTFS hard links across folders, through a real mount.

The images are made by the kernel's Btrfs (a loop mount with ``compress=``) and by ntfs-3g, as a guest would write
them, then put in a partitioned disk, backed up and read back through ``vbfs mount``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import MiB, Mount, Vbfs, random_bytes
from tests.guest_images import ntfs3g_mounted, run, umount_quietly
from vbfs.testing.images import LoopDevice, blank, have, partition_table, place

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="loop mounts and ntfs-3g need root")

COMPRESSIONS = ("zstd", "lzo", "zlib")


def _text(kind: str, lines: int) -> bytes:
    return "".join(f"{kind} line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(lines)).encode()


def _btrfs_files(kind: str, seed: int) -> dict[str, bytes]:
    return {
        f"{kind}/text.txt": _text(kind, 60_000),  # ~3.5 MiB: many 128 KiB compressed extents
        f"{kind}/small.conf": _text(kind, 20)[:1500],  # small enough to be an inline (compressed) extent
        f"{kind}/mixed.bin": random_bytes(MiB + 4321, seed) + _text(kind, 20_000) + bytes(300_000),
    }


@pytest.fixture(scope="module")
def btrfs_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, dict[str, bytes]]]:
    """A GPT disk whose p1 is Btrfs with one folder of files per compression (written with ``compress=<kind>``),
    the partition's image alone, and the files."""
    if not have("mkfs.btrfs", "losetup", "sfdisk"):
        pytest.skip("needs btrfs-progs, losetup and sfdisk")
    work = tmp_path_factory.mktemp("btrfs")
    part = blank(work / "p1.img", 128 * MiB)
    run("mkfs.btrfs", "-q", "-f", "-L", "vbfs-btrfs", str(part))
    files: dict[str, bytes] = {}
    mnt = work / "mnt"
    mnt.mkdir()
    with LoopDevice(part) as dev:
        for seed, kind in enumerate(COMPRESSIONS):
            run("mount", "-t", "btrfs", "-o", f"compress={kind}", dev, str(mnt))
            try:
                for rel, content in _btrfs_files(kind, seed).items():
                    (mnt / rel).parent.mkdir(exist_ok=True)
                    (mnt / rel).write_bytes(content)
                    files[rel] = content
                run("sync", "-f", str(mnt))
            finally:
                umount_quietly(mnt)
    # the image really holds extents of each compression (1 zlib, 2 LZO, 3 zstd), or the test proves nothing
    from dissect.btrfs import Btrfs

    with open(part, "rb") as fh:
        fs = Btrfs(fh)
        for code, kind in ((3, "zstd"), (2, "lzo"), (1, "zlib")):
            assert code in {e.compression for e in fs.get(f"/{kind}/text.txt").extents()}, kind
    disk = partition_table(work / "btrfsvm.raw", 160 * MiB, "gpt", [(1, 128, "L")])
    place(part, disk, MiB)
    yield disk, part, files


def test_btrfs_compressed_files_read_back_exactly(
    vbfs: Vbfs, btrfs_disk: tuple[Path, Path, dict[str, bytes]], mounted: Callable[[Vbfs], Mount]
) -> None:
    disk, _, files = btrfs_disk
    vbfs("backup", f"image://{disk}")
    m = mounted(vbfs)
    root = m.path / "btrfsvm/latest/files/btrfsvm/p1"
    assert sorted(os.listdir(root)) == sorted(COMPRESSIONS)
    for rel, content in files.items():
        path = root / rel
        assert path.stat().st_size == len(content), rel
        assert path.read_bytes() == content, rel
    # a read from the middle of a compressed extent
    with open(root / "zstd/text.txt", "rb") as f:
        f.seek(1_000_003)
        assert f.read(70_000) == files["zstd/text.txt"][1_000_003:1_070_003]
    with open(root / "lzo/mixed.bin", "rb") as f:
        f.seek(MiB + 4000)
        assert f.read(200_000) == files["lzo/mixed.bin"][MiB + 4000 : MiB + 204_000]
    assert "damaged" not in m.log()


def test_btrfs_zstd_without_its_module_is_unsupported_not_damaged(
    btrfs_disk: tuple[Path, Path, dict[str, bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from dissect.btrfs import stream

    from vbfs.guestfs.filesystems import BtrfsGuestFS
    from vbfs.guestfs.model import GuestDataError

    _, part, files = btrfs_disk
    monkeypatch.setattr(stream, "HAS_ZSTD", False)  # as on an install without backports.zstd
    with open(part, "rb") as fh:
        fs = BtrfsGuestFS(fh, "vm p1")
        folders = {e.name: e for e in fs.listdir(fs.root())}
        zstd = {e.name: e for e in fs.listdir(folders["zstd"])}
        with pytest.raises(GuestDataError, match=r"file text\.txt: not supported: zstd-compressed extent") as err:
            fs.read(zstd["text.txt"], 0, 4096)
        assert "damaged" not in str(err.value)
        lzo = {e.name: e for e in fs.listdir(folders["lzo"])}
        assert fs.read(lzo["text.txt"], 0, 4096) == files["lzo/text.txt"][:4096]


@pytest.fixture(scope="module")
def ntfs_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An MBR disk whose p1 is NTFS written by ntfs-3g: a file hard-linked under the same name in two folders, a
    second file with two names in one folder, and a file of one name."""
    if not have("mkntfs", "ntfs-3g", "fusermount3", "sfdisk"):
        pytest.skip("needs ntfs-3g and sfdisk")
    work = tmp_path_factory.mktemp("ntfs")
    part = blank(work / "n1.img", 32 * MiB)
    run("mkntfs", "-q", "-F", "-Q", "-s", "512", "-p", "2048", "-H", "255", "-S", "63", "-L", "LINKS", str(part))
    mnt = work / "mnt"
    mnt.mkdir()
    with ntfs3g_mounted(part, mnt):
        (mnt / "Documents").mkdir()
        (mnt / "Archive").mkdir()
        (mnt / "Documents/report.txt").write_bytes(_text("report", 2000))
        os.link(mnt / "Documents/report.txt", mnt / "Archive/report.txt")
        (mnt / "Documents/notes.txt").write_bytes(b"notes\r\n" * 100)
        os.link(mnt / "Documents/notes.txt", mnt / "Documents/notes (link).txt")
        (mnt / "Documents/alone.txt").write_bytes(b"one name only\r\n")
    disk = partition_table(work / "ntfsvm.raw", 64 * MiB, "dos", [(1, 32, "7")])
    place(part, disk, MiB)
    part.unlink()
    yield disk


def test_ntfs_hard_links_across_folders(vbfs: Vbfs, ntfs_disk: Path, mounted: Callable[[Vbfs], Mount]) -> None:
    vbfs("backup", f"image://{ntfs_disk}")
    m = mounted(vbfs)
    root = m.path / "ntfsvm/latest/files/ntfsvm/p1"
    a, b = os.stat(root / "Documents/report.txt"), os.stat(root / "Archive/report.txt")
    assert (a.st_nlink, b.st_nlink) == (2, 2)
    assert a.st_ino == b.st_ino
    assert (root / "Archive/report.txt").read_bytes() == _text("report", 2000)
    c, d = os.stat(root / "Documents/notes.txt"), os.stat(root / "Documents/notes (link).txt")
    assert (c.st_nlink, d.st_nlink, c.st_ino) == (2, 2, d.st_ino)
    alone = os.stat(root / "Documents/alone.txt")
    assert alone.st_nlink == 1 and alone.st_ino not in (a.st_ino, c.st_ino)
    # a restore keeps them one file too
    out = m.path.parent / "restored"
    vbfs("restore", "ntfsvm@latest:/files/ntfsvm/p1", str(out))
    assert os.stat(out / "Documents/report.txt").st_ino == os.stat(out / "Archive/report.txt").st_ino
