"""MBR disks with an extended partition: volumes named as Linux names them, through backup, mount, find, restore.

The disk is made by sfdisk: p1 a primary partition, slot 2 an extended partition holding two logical partitions
(p5, p6), and p3 a primary partition placed after the extended one on the disk. Each holds ext4 with its own
files. The hostile variants have their chain of extended boot records patched: a link that loops back, and a link
that points outside the extended partition.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import MiB, Mount, Vbfs, copy_sparse, random_bytes
from vbfs.testing.images import blank, ext4_file, have, place, write_tree

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not have("sfdisk", "mkfs.ext4"), reason="needs sfdisk (fdisk) and mkfs.ext4 (e2fsprogs)"),
]

# name -> (start MiB, size MiB); the extended partition (slot 2) spans 9 .. 28 MiB
LAYOUT = {"p1": (1, 8), "p5": (10, 8), "p6": (19, 8), "p3": (28, 8)}
EXTENDED = (9, 19)
NAMES = ["p1", "p3", "p5", "p6"]


def content(name: str) -> dict[str, bytes | str]:
    seed = int(name[1:])
    return {
        f"data/{name}.bin": random_bytes(200_000 + seed, seed),
        "data/deep/which.txt": f"this is {name}\n".encode(),
    }


@pytest.fixture(scope="module")
def mbr_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("mbr")
    disk = blank(work / "web01.raw", 40 * MiB)
    lines = ["label: dos"]
    for n, (start, size, ptype) in {
        1: (*LAYOUT["p1"], "83"),
        2: (*EXTENDED, "5"),
        3: (*LAYOUT["p3"], "83"),
        5: (*LAYOUT["p5"], "83"),
        6: (*LAYOUT["p6"], "83"),
    }.items():
        lines.append(f"{disk}{n}: start={start * 2048}, size={size * 2048}, type={ptype}")
    subprocess.run(["sfdisk", "-q", str(disk)], input="\n".join(lines).encode() + b"\n", check=True)
    listed = subprocess.run(["sfdisk", "-d", str(disk)], check=True, capture_output=True, text=True).stdout
    for n in (1, 2, 3, 5, 6):
        assert f"{disk}{n} :" in listed, listed
    for name, (start, size) in LAYOUT.items():
        tree = write_tree(work / f"tree-{name}", content(name))
        fs = ext4_file(work / f"{name}.img", size * MiB, tree)
        place(fs, disk, start * MiB)
        fs.unlink()
    return disk


def entries(data: bytes, at: int) -> list[tuple[int, int, int]]:
    """(type, start, count) of the four entries of the MBR or EBR at byte ``at``."""
    return [struct.unpack_from("<4xB3xII", data, at + 446 + 16 * i) for i in range(4)]


def set_link(image: Path, ebr: int, start: int, count: int) -> None:
    """Point the link entry (the 2nd) of the EBR at byte ``ebr`` at ``start`` sectors from the extended partition."""
    with open(image, "r+b") as f:
        f.seek(ebr + 446 + 16)
        f.write(struct.pack("<B3xB3xII", 0, 0x05, start, count))


def vm_volumes(m: Mount) -> list[dict[str, object]]:
    disks = json.loads((m.path / "web01" / "latest" / "vm.json").read_text())["disks"]
    assert [d["name"] for d in disks] == ["web01"]
    return list(disks[0]["volumes"])


def assert_files(m: Mount, names: list[str]) -> None:
    root = m.path / "web01" / "latest" / "files" / "web01"
    assert sorted(os.listdir(root)) == names
    for name in names:
        for rel, data in content(name).items():
            assert (root / name / rel).read_bytes() == data, f"{name}/{rel}"


def test_primaries_by_slot_and_logical_partitions_from_p5(
    vbfs: Vbfs, mounted: Callable[[Vbfs], Mount], mbr_disk: Path, tmp_path: Path
) -> None:
    image = copy_sparse(mbr_disk, tmp_path / "web01.raw")
    vbfs("backup", f"image://{image}")

    m = mounted(vbfs)
    assert_files(m, NAMES)

    volumes = vm_volumes(m)
    assert [(v["name"], v["offset"], v["size"], v["filesystem"]) for v in volumes] == [
        (name, LAYOUT[name][0] * MiB, LAYOUT[name][1] * MiB, "ext") for name in NAMES
    ]

    found = vbfs("find", "--json", "/files/web01/*/data/*.bin").stdout
    paths = sorted(hit["path"] for hit in json.loads(found))
    assert paths == [f"/files/web01/{name}/data/{name}.bin" for name in NAMES]

    target = tmp_path / "restored"
    vbfs("restore", "web01@latest:/files/web01/p6/data", str(target))
    assert (target / "p6.bin").read_bytes() == content("p6")["data/p6.bin"]
    assert (target / "deep" / "which.txt").read_text() == "this is p6\n"
    assert sorted(p.name for p in target.iterdir()) == ["deep", "p6.bin"]


@pytest.mark.parametrize("damage", ["loop", "outside"])
def test_hostile_ebr_chain_ends_with_a_note(
    vbfs: Vbfs, mounted: Callable[[Vbfs], Mount], mbr_disk: Path, tmp_path: Path, damage: str
) -> None:
    image = copy_sparse(mbr_disk, tmp_path / "web01.raw")
    data = image.read_bytes()[: 30 * MiB]
    ptype, ext_start, ext_count = entries(data, 0)[1]
    assert ptype == 0x05 and ext_start == EXTENDED[0] * 2048
    first_ebr = ext_start * 512
    link_type, link_start, _ = entries(data, first_ebr)[1]
    assert link_type == 0x05
    second_ebr = first_ebr + link_start * 512
    if damage == "loop":  # the link after p6 leads back to the first EBR: p5, p6, p5, p6, ...
        set_link(image, second_ebr, 0, ext_count)
        shown, last, words = NAMES, "p6", "loops back"
    else:  # the link after p5 points past the end of the extended partition
        set_link(image, first_ebr, ext_count + 2048, 2048)
        shown, last, words = ["p1", "p3", "p5"], "p5", "points outside"

    out = vbfs("backup", f"image://{image}", timeout=120)
    assert "internal error" not in out.stderr and "Traceback" not in out.stderr, out.stderr

    m = mounted(vbfs)
    assert_files(m, shown)

    volumes = {str(v["name"]): v for v in vm_volumes(m)}
    assert sorted(volumes) == shown
    note = str(volumes[last]["note"])
    assert words in note and f"after {last}" in note and "slot 2" in note, note
    assert all(not volumes[n]["note"] for n in shown if n != last)


def test_endless_ebr_chain_is_cut_at_256_links(vbfs: Vbfs, tmp_path: Path) -> None:
    """300 links, each with a one-sector logical partition: the first 256 are shown (p5 .. p260), with a note."""
    image = blank(tmp_path / "web01.raw", 4 * MiB)
    ext_start, ext_count = 2048, 6144
    with open(image, "r+b") as f:
        mbr = bytearray(512)
        struct.pack_into("<B3xB3xII", mbr, 446, 0, 0x05, ext_start, ext_count)
        mbr[510:512] = b"\x55\xaa"
        f.write(mbr)
        for k in range(300):
            ebr = bytearray(512)
            struct.pack_into("<B3xB3xII", ebr, 446, 0, 0x83, 1, 1)  # its data: the sector after it
            if k < 299:
                struct.pack_into("<B3xB3xII", ebr, 462, 0, 0x05, 2 * (k + 1), 2)  # the next link
            ebr[510:512] = b"\x55\xaa"
            f.seek((ext_start + 2 * k) * 512)
            f.write(ebr)
    out = vbfs("backup", f"image://{image}", timeout=120)
    assert "internal error" not in out.stderr and "Traceback" not in out.stderr, out.stderr
    meta = tmp_path / "meta"
    meta.mkdir()
    vbfs("restore", "web01@latest:/vm.json", str(meta))
    volumes = json.loads((meta / "vm.json").read_text())["disks"][0]["volumes"]
    assert [v["name"] for v in volumes] == [f"p{n}" for n in range(5, 261)]
    assert [v["offset"] for v in volumes[:2]] == [(ext_start + 1) * 512, (ext_start + 3) * 512]
    note = volumes[-1]["note"]
    assert "longer than 256 links" in note and "after p260" in note, note
