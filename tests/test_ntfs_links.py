"""NTFS junctions and symbolic links (reparse points) through a real mount.

ntfs-3g writes the reparse buffers as Windows would (through its ``system.ntfs_reparse_data`` attribute); two
of them are then damaged in the image, as a hostile guest could. The disk is backed up and read back through
``vbfs mount``: links inside the volume are relative and lead to the guest's files, links elsewhere lead nowhere.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import MiB, Mount, Vbfs
from tests.guest_images import ntfs3g_mounted, run
from vbfs.testing.images import blank, have, partition_table, place

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="ntfs-3g needs root")

MOUNT_POINT, SYMLINK = 0xA0000003, 0xA000000C
HELLO = b"hello from alice\r\n" * 50
REPORT = b"quarterly report\r\n" * 300


def reparse(tag: int, substitute: str, printed: str, flags: int | None = None) -> bytes:
    """A reparse buffer of a junction (``flags`` None) or a symbolic link (flags 0 absolute, 1 relative)."""
    sub, prt = substitute.encode("utf-16-le"), printed.encode("utf-16-le")
    head = struct.pack("<HHHH", 0, len(sub), len(sub) + 2, len(prt))
    if flags is not None:
        head += struct.pack("<I", flags)
    data = head + sub + b"\0\0" + prt + b"\0\0"
    return struct.pack("<IHH", tag, len(data), 0) + data


# name → (reparse buffer, is a folder)
LINKS = {
    "Profile": (reparse(MOUNT_POINT, "\\??\\C:\\USERS\\alice", "C:\\USERS\\alice"), True),
    "Users/alice/Links/report-abs": (reparse(SYMLINK, "\\??\\C:\\Data\\report.txt", "C:\\Data\\report.txt", 0), False),
    "Users/alice/Links/report-rel": (reparse(SYMLINK, "..\\..\\..\\Data\\report.txt", "..\\..\\..\\Data", 1), False),
    "OtherDrive": (reparse(MOUNT_POINT, "\\??\\D:\\Shares\\team", "D:\\Shares\\team"), True),
    "Share": (reparse(SYMLINK, "\\??\\UNC\\fileserver\\share\\x", "\\\\fileserver\\share\\x", 0), False),
    "Missing": (reparse(MOUNT_POINT, "\\??\\C:\\NoSuchFolder", "C:\\NoSuchFolder"), True),
    "Climb": (reparse(SYMLINK, "..\\..\\..\\..\\etc\\passwd", "..\\..\\..\\..\\etc\\passwd", 1), False),
    "Slashes": (reparse(SYMLINK, "\\??\\C:\\Data/../../../../../etc", "x", 0), False),
    "BadOffset": (reparse(SYMLINK, "\\??\\C:\\BADOFFSETMARK", "C:\\BADOFFSETMARK", 0), False),
    "TooShort": (reparse(SYMLINK, "\\??\\C:\\TOOSHORTMARK", "C:\\TOOSHORTMARK", 0), False),
}


def _damage(image: Path) -> None:
    """BadOffset: its substitute name's offset points past the buffer. TooShort: its attribute's value is 6
    bytes (less than a reparse header)."""
    data = bytearray(image.read_bytes())

    def at(mark: str) -> int:
        needle = f"\\??\\C:\\{mark}".encode("utf-16-le")
        found = data.find(needle)
        assert found > 0 and data.find(needle, found + 1) == -1, mark
        value = found - 20  # the reparse header (8) and the symlink header (12) before its names
        assert struct.unpack_from("<I", data, value)[0] == SYMLINK, mark
        return value

    def poke(offset: int, fmt: str, value: int) -> None:
        assert all((offset + i) % 512 < 510 for i in range(struct.calcsize(fmt)))  # clear of the fixups
        struct.pack_into(fmt, data, offset, value)

    poke(at("BADOFFSETMARK") + 8, "<H", 0x7FF0)  # SubstituteNameOffset
    value = at("TOOSHORTMARK")
    header = value - struct.unpack_from("<H", data, value - 4)[0]  # the resident attribute's value offset
    assert struct.unpack_from("<I", data, header)[0] == 0xC0  # $REPARSE_POINT
    poke(header + 16, "<I", 6)  # ValueLength
    image.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def links_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if not have("mkntfs", "ntfs-3g", "fusermount3", "sfdisk"):
        pytest.skip("needs ntfs-3g and sfdisk")
    work = tmp_path_factory.mktemp("ntfslinks")
    part = blank(work / "n1.img", 32 * MiB)
    run("mkntfs", "-q", "-F", "-Q", "-s", "512", "-p", "2048", "-H", "255", "-S", "63", "-L", "C", str(part))
    mnt = work / "mnt"
    mnt.mkdir()
    with ntfs3g_mounted(part, mnt):
        (mnt / "Users/alice/Links").mkdir(parents=True)
        (mnt / "Users/alice/hello.txt").write_bytes(HELLO)
        (mnt / "Data").mkdir()
        (mnt / "Data/report.txt").write_bytes(REPORT)
        for rel, (buffer, folder) in LINKS.items():
            if folder:
                (mnt / rel).mkdir()
            else:
                (mnt / rel).write_bytes(b"")
            os.setxattr(mnt / rel, "system.ntfs_reparse_data", buffer)
    _damage(part)
    disk = partition_table(work / "winvm.raw", 64 * MiB, "dos", [(1, 32, "7")])
    place(part, disk, MiB)
    part.unlink()
    yield disk


@pytest.fixture
def root(vbfs: Vbfs, links_disk: Path, mounted: Callable[[Vbfs], Mount]) -> Iterator[tuple[Path, Mount]]:
    vbfs("backup", f"image://{links_disk}")
    m = mounted(vbfs)
    yield m.path / "winvm/latest/files/winvm/p1", m


def test_links_inside_the_volume_are_relative_and_lead_to_the_files(root: tuple[Path, Mount]) -> None:
    p1, m = root
    # a junction to C:\USERS\alice: relative, spelled as the volume spells it (the mount is case-sensitive)
    assert os.readlink(p1 / "Profile") == "Users/alice"
    assert (p1 / "Profile/hello.txt").read_bytes() == HELLO
    assert sorted(os.listdir(p1 / "Profile")) == ["Links", "hello.txt"]
    # absolute and relative symbolic links to one file, from a folder three levels down
    links = p1 / "Users/alice/Links"
    assert os.readlink(links / "report-abs") == "../../../Data/report.txt"
    assert os.readlink(links / "report-rel") == "../../../Data/report.txt"
    with open(links / "report-abs", "rb") as f:
        assert f.read() == REPORT
    assert (p1 / "Profile/Links/report-rel").read_bytes() == REPORT
    assert os.path.realpath(links / "report-rel") == os.path.realpath(p1 / "Data/report.txt")
    assert "internal error" not in m.log()


def test_links_elsewhere_lead_nowhere(root: tuple[Path, Mount]) -> None:
    p1, _ = root
    shown = {
        "OtherDrive": "\\??\\D:\\Shares\\team",
        "Share": "\\??\\UNC\\fileserver\\share\\x",
        "Missing": "\\??\\C:\\NoSuchFolder",  # an absolute target that is not in this volume
        "Climb": "..\\..\\..\\..\\etc\\passwd",  # above the volume's root
        "Slashes": "\\??\\C:\\Data\\..\\..\\..\\..\\..\\etc",  # a "/" of the guest never becomes a separator
    }
    for name, text in shown.items():
        link = p1 / name
        assert stat.S_ISLNK(os.lstat(link).st_mode), name
        assert os.readlink(link) == text, name
        assert "/" not in os.readlink(link)  # one file name beside the link: nothing on the host, nothing else
        assert not os.path.exists(link), name
        assert os.path.dirname(os.path.realpath(link)) == os.path.realpath(p1), name


def test_a_damaged_reparse_buffer_is_a_note_and_an_empty_file(root: tuple[Path, Mount]) -> None:
    p1, m = root
    for name in ("BadOffset", "TooShort"):
        st = os.lstat(p1 / name)
        assert stat.S_ISREG(st.st_mode) and st.st_size == 0, name
        assert (p1 / name).read_bytes() == b""
    log = m.log()
    assert "BadOffset (MFT record" in log and "damaged reparse point (substitute name at 32752+" in log
    assert "TooShort (MFT record" in log and "damaged reparse point (reparse buffer of 6 bytes)" in log
    assert "internal error" not in log
    # the rest of the folder is listed as it is
    assert {"Profile", "Users", "Data", "Share", "BadOffset", "TooShort"} <= set(os.listdir(p1))
