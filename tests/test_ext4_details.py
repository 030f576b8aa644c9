"""ext4 details a guest's tools make without asking: data kept inside the inode (``inline_data``) and times
before 1970 and after 2038, with nanoseconds.

The images are made by mkfs.ext4 (``-O inline_data -d``) and then written through the kernel's own ext4 (a loop
mount), so that the inline folders that spill into the inode's attribute and the times are encoded as a guest
would encode them. Each image is backed up with the real CLI and read back through the FUSE mount and the catalog.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import MiB, Mount, Vbfs, random_bytes
from vbfs.testing.images import blank, write_tree

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="writing through the kernel's ext4 needs a loop mount")

INLINE_SIZES = (30, 59, 60, 61, 150)
# 2040-01-01 and 1969-07-20 (the second before it, plus nanoseconds: negative times keep positive nanoseconds)
TIMES = {"2040": 2_208_988_800 * 10**9 + 123_456_789, "1969": -14_182_940 * 10**9 - 987_654_321}
SPILL = [f"entry-{i:02d}" for i in range(12)]  # more than i_block holds: the rest goes into system.data


def _debugfs(image: Path, request: str) -> str:
    return subprocess.run(["debugfs", "-R", request, str(image)], check=True, capture_output=True, text=True).stdout


def _number(pattern: str, text: str) -> int:
    found = re.search(pattern, text)
    assert found, (pattern, text)
    return int(found.group(1), 0)


def _inline_flag(image: Path, path: str) -> bool:
    return bool(_number(r"Flags: (0x[0-9a-f]+)", _debugfs(image, f"stat {path}")) & 0x10000000)


def build(tmp_path: Path, name: str) -> tuple[Path, Path, Path]:
    """An ext4 image with inline data made by mkfs and by the kernel; (image, mkfs tree, kernel tree)."""
    files: dict[str, bytes | str] = {f"inl/f{n}": random_bytes(n, n) for n in INLINE_SIZES}
    files["inl/small/x"] = b"in a folder kept inside its inode\n"
    made = write_tree(tmp_path / f"{name}-mkfs", files)
    later = tmp_path / f"{name}-kernel"
    kernel_files: dict[str, bytes | str] = {f"spill/{e}": e for e in SPILL}
    write_tree(later, kernel_files | {"t/f2040": "2040\n", "t/f1969": "1969\n"})
    for what in ("2040", "1969"):
        (later / f"t/d{what}").mkdir()
    subprocess.run(["touch", "-d", "2040-01-01", str(later / "t/f2040"), str(later / "t/d2040")], check=True)
    subprocess.run(["touch", "-d", "1969-07-20", str(later / "t/f1969"), str(later / "t/d1969")], check=True)
    for what, ns in TIMES.items():
        for kind in "fd":
            os.utime(later / f"t/{kind}{what}", ns=(ns, ns))
    image = blank(tmp_path / f"{name}.raw", 32 * MiB)
    # 512-byte inodes: room in the inode for 150 bytes of data (256-byte ones keep about 120)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-I", "512", "-O", "inline_data", "-d", str(made), str(image)],
        check=True,
        capture_output=True,
    )
    mnt = tmp_path / f"{name}-mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True, capture_output=True)
    try:
        subprocess.run(["cp", "-a", f"{later}/.", str(mnt)], check=True, capture_output=True)
    finally:
        subprocess.run(["umount", str(mnt)], check=True, capture_output=True)
    for path in ["/inl/small", "/spill", *(f"/inl/f{n}" for n in INLINE_SIZES)]:
        assert _inline_flag(image, path), path  # what the test is about
    assert _number(r"Size: (\d+)", _debugfs(image, "stat /spill")) > 60  # it goes on in system.data
    return image, made, later


def _found(vbfs: Vbfs) -> dict[str, dict[str, int]]:
    return {f["path"]: f for f in json.loads(vbfs("find", "*", "--json").stdout)}


@needs_root
def test_inline_data_and_times_past_2038_and_before_1970(
    vbfs: Vbfs, mounted: Callable[[Vbfs], Mount], tmp_path: Path
) -> None:
    image, made, later = build(tmp_path, "inline")
    backup = vbfs("backup", f"image://{image}", "--json")
    assert json.loads(backup.stdout).get("notes", []) == [], backup.stdout

    m = mounted(vbfs)
    vol = m.path / "inline/latest/files/inline/whole"
    assert sorted(os.listdir(vol / "inl")) == sorted([*(f"f{n}" for n in INLINE_SIZES), "small"])
    assert os.listdir(vol / "inl/small") == ["x"]
    assert (vol / "inl/small/x").read_bytes() == (made / "inl/small/x").read_bytes()
    for n in INLINE_SIZES:
        assert (vol / f"inl/f{n}").read_bytes() == random_bytes(n, n), n
        assert os.stat(vol / f"inl/f{n}").st_size == n
    assert sorted(os.listdir(vol / "spill")) == SPILL
    assert all((vol / "spill" / e).read_bytes() == e.encode() for e in SPILL)
    for what in TIMES:
        for kind in "fd":
            rel = f"t/{kind}{what}"
            want = os.stat(later / rel)
            got = os.stat(vol / rel)
            assert got.st_mtime_ns == want.st_mtime_ns, rel  # (atimes: the copy into the image read the source)
    assert os.stat(later / "t/f2040").st_mtime_ns == TIMES["2040"]  # the source had what the test means

    found = _found(vbfs)
    where = "/files/inline/whole"
    for n in INLINE_SIZES:
        assert found[f"{where}/inl/f{n}"]["size"] == n
    assert {f"{where}/spill/{e}" for e in SPILL} <= set(found)
    for what, ns in TIMES.items():
        assert found[f"{where}/t/f{what}"]["mtime_ns"] == ns
        assert found[f"{where}/t/d{what}"]["mtime_ns"] == ns
    assert "Traceback" not in m.log() and "internal error" not in m.log()


def _system_data(image: Path, path: str) -> int:
    """The byte offset in ``image`` of the e_value_size field of the "system.data" attribute of ``path``."""
    found = re.search(r"located at block (\d+), offset (0x[0-9a-f]+)", _debugfs(image, f"imap {path}"))
    assert found, path
    block_size = _number(r"Block size:\s+(\d+)", _debugfs(image, "stats"))
    at = int(found.group(1)) * block_size + int(found.group(2), 16)
    with open(image, "rb") as f:
        f.seek(at)
        raw = f.read(512)
    first = 128 + struct.unpack_from("<H", raw, 128)[0] + 4
    off = first
    while raw[off : off + 4] != b"\0\0\0\0":
        name_len, index = raw[off], raw[off + 1]
        if index == 7 and raw[off + 16 : off + 16 + name_len] == b"data":
            return at + off + 8
        off = (off + 16 + name_len + 3) & ~3
    raise AssertionError(f"{path} has no system.data attribute")


@needs_root
def test_a_system_data_attribute_out_of_bounds_is_a_note_and_the_rest_is_shown(
    vbfs: Vbfs, mounted: Callable[[Vbfs], Mount], tmp_path: Path
) -> None:
    image, _made, _later = build(tmp_path, "hostile")
    order = [e for e in re.findall(r"\(\d+\) (\S+)", _debugfs(image, "ls /spill")) if e not in (".", "..")]
    assert sorted(order) == SPILL
    with open(image, "r+b") as f:
        for path in ("/spill", "/inl/f150"):
            f.seek(_system_data(image, path))
            f.write(struct.pack("<I", 0x7FFF0000))

    backup = vbfs("backup", f"image://{image}", "--json")
    assert "Traceback" not in backup.stderr and "internal error" not in backup.stderr, backup.stderr
    notes = json.loads(backup.stdout).get("notes", [])
    assert any("spill" in n and "only its first entries" in n and "outside the inode" in n for n in notes), notes
    assert any("f150" in n and "150" in n and "inline data" in n for n in notes), notes

    found = _found(vbfs)
    where = "/files/hostile/whole"
    shown = sorted(p.rsplit("/", 1)[1] for p in found if p.startswith(f"{where}/spill/"))
    assert shown and shown == sorted(order[: len(shown)]) and len(shown) < len(SPILL), shown  # those of i_block
    assert found[f"{where}/inl/f61"]["size"] == 61

    m = mounted(vbfs)
    vol = m.path / "hostile/latest/files/hostile/whole"
    assert sorted(os.listdir(vol / "spill")) == shown
    assert all((vol / "spill" / e).read_bytes() == e.encode() for e in shown)
    with pytest.raises(OSError) as err:
        (vol / "inl/f150").read_bytes()
    assert err.value.errno == 5
    for n in INLINE_SIZES[:-1]:
        assert (vol / f"inl/f{n}").read_bytes() == random_bytes(n, n), n
    assert os.stat(vol / "t/f2040").st_mtime_ns == TIMES["2040"]
    assert "Traceback" not in m.log() and "internal error" not in m.log()


def _inode(extra_isize: int = 32, entry: bytes = b"", value: bytes = b"", size: int = 512) -> bytes:
    raw = bytearray(size)
    raw[40:100] = bytes(range(60))
    struct.pack_into("<H", raw, 128, extra_isize)
    start = 128 + extra_isize
    if entry:
        struct.pack_into("<I", raw, start, 0xEA020000)
        raw[start + 4 : start + 4 + len(entry)] = entry
        raw[size - len(value) : size] = value
    return bytes(raw)


def _entry(value_offs: int, value_size: int, name: bytes = b"data", index: int = 7) -> bytes:
    return struct.pack("<BBHIII", len(name), index, value_offs, 0, value_size, 0) + name


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (_inode(extra_isize=30), "bad extra inode size"),
        (_inode(extra_isize=400), "bad extra inode size"),
        (_inode(entry=_entry(512 - 164 - 8, 8, index=1)), "no system.data"),
        (_inode(entry=_entry(512 - 164 - 8, 0x7FFF0000)), "outside the inode"),
        (_inode(entry=_entry(0xFFF0, 8)), "outside the inode"),
        (_inode(entry=_entry(0, 8)), "outside the inode"),  # the value would cover its own entry
        (_inode(entry=struct.pack("<BBHIII", 255, 7, 0, 0, 0, 0), size=256), "crosses the end of the inode"),
    ],
)
def test_inline_attribute_offsets_are_checked_against_the_inode(raw: bytes, why: str) -> None:
    from vbfs.guestfs.filesystems import ext_inline_data

    head, rest, reason = ext_inline_data(raw)
    assert head == bytes(range(60)) and rest == b"" and why in reason, reason


def test_inline_attribute_value_is_read_where_its_entry_says() -> None:
    from vbfs.guestfs.filesystems import ext_inline_data

    value = b"the rest of the file"
    raw = _inode(entry=_entry(512 - 164 - len(value), len(value)), value=value)
    assert ext_inline_data(raw) == (bytes(range(60)), value, "")
