"""Linux software RAID1 members and LUKS volumes on a guest disk, through backup and mount.

The disk is a GPT made by sfdisk: p1 and p2 are partitions of the Linux RAID type, the two members of one RAID1
array (an md 1.2 superblock at 4 KiB of each, written here as the kernel reads it, and the same ext4 image at
the data offset of both); p3 holds a LUKS2 header written over the start of an ext4 image, so a reader that probed
the ciphertext for a filesystem would find one. The hostile variants patch p1's superblock.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import MiB, Mount, Vbfs, copy_sparse, random_bytes
from vbfs.testing.images import ext4_file, have, partition_table, place, write_tree

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not have("sfdisk", "mkfs.ext4"), reason="needs sfdisk (fdisk) and mkfs.ext4 (e2fsprogs)"),
]

RAID = "A19D880F-05FC-4D3B-A006-743F0F84911E"
LINUX = "0FC63DAF-8483-4772-8E79-3D693D477DE4"
LAYOUT = {"p1": (1, 20), "p2": (21, 20), "p3": (41, 4)}  # start MiB, size MiB
DATA_OFFSET = 2048  # sectors from the start of a member
DATA_SECTORS = 19 * 2048
ARRAY_UUID = bytes.fromhex("0badc0de11223344556677889900aabb")
MD_UUID = "0badc0de:11223344:55667788:9900aabb"
LUKS_UUID = "3f0e2d4c-5b6a-4798-8a7b-6c5d4e3f2a1b"
FILES: dict[str, bytes | str] = {"data/raid.bin": random_bytes(300_000, 7), "etc/hostname": "web01\n"}


def md_superblock(dev_number: int, level: int = 1, data_offset: int = DATA_OFFSET) -> bytes:
    """An md 1.2 superblock of a clean two-device array, with its checksum."""
    sb = bytearray(256 + 2 * 2)
    struct.pack_into("<IIII", sb, 0, 0xA92B4EFC, 1, 0, 0)
    sb[16:32] = ARRAY_UUID
    sb[32:42] = b"web01:data"
    struct.pack_into("<Q", sb, 64, 1_700_000_000)
    struct.pack_into("<iIQII", sb, 72, level, 0, DATA_SECTORS, 0, 2)
    struct.pack_into("<QQQQ", sb, 128, data_offset, DATA_SECTORS, 8, 0)
    struct.pack_into("<I", sb, 160, dev_number)
    sb[168:184] = bytes([dev_number + 1]) * 16
    struct.pack_into("<QQQ", sb, 192, 1_700_000_100, 42, 2**64 - 1)
    struct.pack_into("<I", sb, 220, 2)
    struct.pack_into("<HH", sb, 256, 0, 1)
    words = struct.unpack_from(f"<{len(sb) // 4}I", sb)
    total = sum(words)
    struct.pack_into("<I", sb, 216, ((total & 0xFFFFFFFF) + (total >> 32)) & 0xFFFFFFFF)
    return bytes(sb)


def luks2_header() -> bytes:
    """The binary header's first KiB (its fields end at byte 512; the rest of it is padding)."""
    head = bytearray(1024)
    head[0:6] = b"LUKS\xba\xbe"
    struct.pack_into(">HQQ", head, 6, 2, 16384, 1)
    head[72:78] = b"sha256"
    head[104:168] = random_bytes(64, 3)
    head[168 : 168 + len(LUKS_UUID)] = LUKS_UUID.encode()
    return bytes(head)


def write_at(image: Path, offset: int, data: bytes) -> None:
    with open(image, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.fixture(scope="module")
def raid_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("md")
    disk = partition_table(
        work / "web01.raw",
        48 * MiB,
        "gpt",
        [(*LAYOUT["p1"], RAID), (*LAYOUT["p2"], RAID), (*LAYOUT["p3"], LINUX)],
    )
    fs = ext4_file(work / "data.img", DATA_SECTORS * 512, write_tree(work / "tree", FILES))
    for number, name in enumerate(("p1", "p2")):
        start = LAYOUT[name][0] * MiB
        place(fs, disk, start + DATA_OFFSET * 512)
        write_at(disk, start + 4096, md_superblock(number))
    inner = ext4_file(work / "inner.img", 4 * MiB, write_tree(work / "inner", {"secret.txt": "plain\n"}))
    place(inner, disk, LAYOUT["p3"][0] * MiB)
    write_at(disk, LAYOUT["p3"][0] * MiB, luks2_header())  # ext4's superblock at 1 KiB is left in place
    return disk


def volumes(m: Mount) -> dict[str, dict[str, object]]:
    disks = json.loads((m.path / "web01" / "latest" / "vm.json").read_text())["disks"]
    return {v["name"]: v for v in disks[0]["volumes"]}


LUKS_NOTE = (
    f"LUKS-encrypted volume (LUKS2, uuid {LUKS_UUID}): shown as an image; its files cannot be read without the key"
)


def test_raid1_members_show_the_array_once_and_luks_is_an_image(
    vbfs: Vbfs, mounted: Callable[[Vbfs], Mount], raid_disk: Path, tmp_path: Path
) -> None:
    image = copy_sparse(raid_disk, tmp_path / "web01.raw")
    out = vbfs("backup", f"image://{image}")
    assert "internal error" not in out.stderr and "Traceback" not in out.stderr, out.stderr

    m = mounted(vbfs)
    root = m.path / "web01" / "latest" / "files" / "web01"
    assert sorted(os.listdir(root)) == ["md-data"]
    for rel, data in FILES.items():
        want = data.encode() if isinstance(data, str) else data
        assert (root / "md-data" / rel).read_bytes() == want

    vols = volumes(m)
    assert list(vols) == ["p1", "md-data", "p2", "p3"]
    md = vols["md-data"]
    assert (md["offset"], md["size"], md["filesystem"]) == (1 * MiB + DATA_OFFSET * 512, DATA_SECTORS * 512, "ext")
    assert f"array web01:data (md 1.2, uuid {MD_UUID})" in str(md["note"]) and "member p1" in str(md["note"])
    assert vols["p1"]["filesystem"] is None and "its data is shown as md-data" in str(vols["p1"]["note"])
    assert vols["p2"]["filesystem"] is None and "shown once, as md-data (from p1)" in str(vols["p2"]["note"])
    assert (vols["p3"]["filesystem"], vols["p3"]["note"]) == (None, LUKS_NOTE)

    luks = m.path / "web01" / "latest" / "disks" / "web01-p3.img"
    assert luks.stat().st_size == 4 * MiB
    assert luks.read_bytes()[:6] == b"LUKS\xba\xbe"


@pytest.mark.parametrize("damage", ["data past the end", "raid5"])
def test_hostile_or_unsupported_superblock_is_a_note(
    vbfs: Vbfs, mounted: Callable[[Vbfs], Mount], raid_disk: Path, tmp_path: Path, damage: str
) -> None:
    image = copy_sparse(raid_disk, tmp_path / "web01.raw")
    if damage == "raid5":
        for number, name in enumerate(("p1", "p2")):
            write_at(image, LAYOUT[name][0] * MiB + 4096, md_superblock(number, level=5))
    else:  # p1's data offset lies past the end of the member (and of the disk): p2 is the member shown
        write_at(image, LAYOUT["p1"][0] * MiB + 4096, md_superblock(0, data_offset=2**40))
    out = vbfs("backup", f"image://{image}", timeout=120)
    assert "internal error" not in out.stderr and "Traceback" not in out.stderr, out.stderr

    m = mounted(vbfs)
    vols = volumes(m)
    root = m.path / "web01" / "latest" / "files" / "web01"
    if damage == "raid5":
        assert list(vols) == ["p1", "p2", "p3"]
        for name in ("p1", "p2"):
            assert str(vols[name]["note"]).endswith("RAID level 5: not assembled"), vols[name]
        assert not root.exists() or os.listdir(root) == []
    else:
        assert list(vols) == ["p1", "p2", "md-data", "p3"]
        assert "md 1.2 superblock cannot be used" in str(vols["p1"]["note"])
        assert "lies outside the member" in str(vols["p1"]["note"])
        assert vols["md-data"]["offset"] == LAYOUT["p2"][0] * MiB + DATA_OFFSET * 512
        assert (root / "md-data" / "etc" / "hostname").read_text() == "web01\n"
    assert vols["p3"]["note"] == LUKS_NOTE
