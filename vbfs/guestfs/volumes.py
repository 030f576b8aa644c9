"""What a disk holds: partitions (MBR, GPT), LVM2 logical volumes in them, or a filesystem on the whole disk.

Names follow the tree of DESIGN.md: partitions are ``p<N>`` by their number in the table, LVM2 logical volumes
``<vg>-<lv>``, and a disk without a partition table that holds a filesystem is ``whole``. Every volume carries
the filesystem found on it, or a note that says why none is shown. The partition table and LVM2 metadata are
guest data too: :func:`discover` runs under a time budget like every other parser call.

An MBR is read here, numbered as Linux numbers it: a primary partition is ``p1`` .. ``p4`` by its slot in the
table (an empty slot leaves a gap), the logical partitions of an extended partition are ``p5``, ``p6``, ... in the
order of its chain of extended boot records (EBRs), and the extended partition itself is no volume. The chain is
guest data: it is followed for at most :data:`MAX_EBRS` links, never into a link met before or outside its
extended partition; where it stops early, the last partition read (or a ``whole`` entry) says so in its note.
GPT, APM and BSD tables are read by dissect.volume; GPT partitions are ``p<N>`` by their entry in the array.

Linux software RAID (md) members with a 1.x superblock (1.0 at the end, 1.1 at the start, 1.2 at 4 KiB of the
member) are found by their superblock (type 0xFD or the Linux RAID GPT type only make a missing one a note). A
RAID1 member holds the whole array at its data offset: it keeps its ``p<N>`` entry with a note, and the array's
data follows it as ``md-<name>`` (the array's name without its ``host:`` part, else its uuid), read like a
partition (a filesystem, an LVM2 physical volume or LUKS). A second member of the same array on the disk is only a
note. Other RAID levels are not assembled (a note). The superblock is guest data: its checksum, version, place
and every offset and size are checked against the member; one that fails is a note. A LUKS volume (1 or 2) is
never probed for a filesystem: it is shown as an image, with a note.
"""

from __future__ import annotations

import logging
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vbfs.guestfs.bounds import ParseTimeout, budget, parse_seconds
from vbfs.guestfs.filesystems import detect
from vbfs.guestfs.model import GuestDataError
from vbfs.guestfs.stream import RangeReader

log = logging.getLogger(__name__)

LVM_GPT_TYPE = uuid.UUID("e6d6d379-f507-44c2-a23c-238f2a3df928")
LVM_MBR_TYPE = 0x8E
RAID_GPT_TYPE = uuid.UUID("a19d880f-05fc-4d3b-a006-743f0f84911e")
RAID_MBR_TYPE = 0xFD
MD_MAGIC = 0xA92B4EFC
LUKS_MAGIC = b"LUKS\xba\xbe"
_MD_MAX_DEV = (4096 - 256) // 2  # roles a 1.x superblock may list (it fits in 4 KiB)
_MD_FEATURES_MOVING = 0x04 | 0x40  # a reshape under way, a data offset being changed
_MD_LEVELS = {-4: "multipath", -1: "linear", 0: "0", 1: "1", 4: "4", 5: "5", 6: "6", 10: "10"}
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
EXTENDED_MBR_TYPES = {0x05, 0x0F, 0x85}
SECTOR = 512
MAX_EBRS = 256  # links of one chain; Linux shows at most 256 partitions of a disk
_BOOT_SIGNATURE = b"\x55\xaa"
_VBR_NAMES = (b"MSDOS", b"MSWIN", b"NTFS", b"FAT", b"EXFAT", b"-FVE-FS-", b"SYSLINUX")  # OEM names of boot sectors


@dataclass
class Volume:
    name: str  # p1, vg0-root, whole
    offset: int  # on the disk; -1 for a logical volume (its extents may be anywhere)
    size: int
    reader: RangeReader = field(repr=False)
    fstype: str | None = None
    note: str = ""  # why no filesystem is shown, or what the volume is (an LVM physical volume, ...)

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "offset": self.offset,
            "size": self.size,
            "filesystem": self.fstype,
            "note": self.note,
        }


def _is_lvm_pv(reader: RangeReader) -> bool:
    for sector in range(4):
        reader.seek(sector * 512)
        if reader.read(8) == b"LABELONE":
            return True
    return False


def _lvm_volumes(reader: RangeReader, part_name: str) -> tuple[list[Volume], str]:
    from dissect.volume.lvm import LVM2

    try:
        lvm = LVM2(reader)
        vg = lvm.vg
    except Exception as exc:
        return [], f"LVM2 physical volume that cannot be read ({exc or type(exc).__name__})"
    out = []
    for lv in vg.lv:
        if not lv.is_visible:
            continue
        name = f"{vg.name}-{lv.name}"
        try:
            fh = lv.open()
            size = fh.seek(0, 2)
            fh.seek(0)
        except Exception as exc:
            out.append(Volume(name, -1, 0, reader, None, f"logical volume cannot be opened ({exc})"))
            continue
        sub = RangeReader(_reader_of(fh), size)
        vol = Volume(name, -1, size, sub)
        _identify(vol)
        out.append(vol)
    return out, f"LVM2 physical volume of volume group {vg.name}"


def _reader_of(fh: Any) -> Callable[[int, int], bytes]:
    """``read_at`` over a dissect stream (which keeps one position): each call seeks then reads."""
    import threading

    lock = threading.Lock()

    def read_at(offset: int, length: int) -> bytes:
        with lock:
            fh.seek(offset)
            return bytes(fh.read(length))

    return read_at


def _identify(vol: Volume) -> None:
    try:
        vol.fstype = detect(vol.reader, vol.size)
    except Exception as exc:
        vol.note = f"cannot be read ({exc})"
        return
    if vol.fstype is None and not vol.note:
        vol.note = "no known filesystem (ext2/3/4, XFS, FAT, NTFS, Btrfs) found"


def discover(disk: RangeReader) -> list[Volume]:
    """The volumes of one disk, in table order, logical volumes after the partition that holds them."""
    seconds = parse_seconds()
    try:
        with budget(seconds):
            return _discover(disk)
    except ParseTimeout:
        raise GuestDataError(f"the partition table took longer than {seconds:g} s to read (damaged?)") from None


def _discover(disk: RangeReader) -> list[Volume]:
    whole = Volume("whole", 0, disk.size, disk.sub(0, disk.size))
    arrays: dict[str, str] = {}
    if _luks_note(whole.reader):
        out: list[Volume] = []
        _fill(out, whole, None, arrays, md=False)
        return out
    _identify(whole)
    if whole.fstype is not None:  # a filesystem on the whole disk (a FAT/NTFS boot sector looks like an MBR)
        return [whole]
    mbr = _plain_mbr(disk)
    if mbr is not None:
        return _mbr_volumes(disk, whole, mbr)
    from dissect.volume.disk import Disk

    try:
        disk.seek(0)
        table = Disk(disk.sub(0, disk.size))
    except Exception:
        if _is_lvm_pv(whole.reader):
            lvs, note = _lvm_volumes(whole.reader, "whole")
            whole.note = note
            return [whole, *lvs]
        member, problem = _md_superblock(whole.reader)
        if member is not None or problem:
            whole.note = ""
            out = []
            _fill(out, whole, None, arrays, md=True)
            return out
        whole.note = "no partition table and no known filesystem"
        return [whole]
    out = []
    for part in table.partitions:
        ptype = part.type
        if isinstance(ptype, int) and ptype in EXTENDED_MBR_TYPES:
            continue
        size = part.size
        last, first = getattr(part.raw, "last_lba", None), getattr(part.raw, "first_lba", None)
        if part.size > 0 and last is not None and first is not None:  # GPT's last LBA is inclusive
            size = (int(last) - int(first) + 1) * table.sector_size
        _add_partition(out, disk, whole, f"p{part.number}", part.offset, size, ptype, arrays)
    return out


def _add_partition(
    out: list[Volume],
    disk: RangeReader,
    whole: Volume,
    name: str,
    offset: int,
    size: int,
    ptype: object,
    arrays: dict[str, str],
) -> Volume:
    """Append the volume of one partition and what it holds (logical volumes of an LVM2 physical volume, the
    data of a RAID1 array); ``arrays`` maps the uuid of each md array already shown on this disk to its name."""
    if size <= 0 or offset + size > disk.size:
        vol = Volume(name, offset, max(0, size), whole.reader, None, "partition lies outside the disk")
        out.append(vol)
        return vol
    vol = Volume(name, offset, size, disk.sub(offset, size))
    _fill(out, vol, ptype, arrays, md=True)
    return vol


def _fill(out: list[Volume], vol: Volume, ptype: object, arrays: dict[str, str], md: bool) -> None:
    """Append ``vol`` (a partition, the whole disk, or the data of an array) with what it holds."""
    luks = _luks_note(vol.reader)
    if luks:  # ciphertext: never probed for a filesystem
        vol.note = luks
        out.append(vol)
        return
    if md:
        member, problem = _md_superblock(vol.reader)
        if member is not None:
            _md_volumes(out, vol, member, arrays)
            return
        if problem or ptype in (RAID_GPT_TYPE, RAID_MBR_TYPE):
            vol.note = problem or "Linux RAID partition without an md 1.x superblock (0.90 metadata, or damaged)"
            _identify(vol)  # a RAID1 member of 0.90 (or 1.0) metadata holds its filesystem at its start
            out.append(vol)
            return
    if ptype in (LVM_GPT_TYPE, LVM_MBR_TYPE) or _is_lvm_pv(vol.reader):
        lvs, vol.note = _lvm_volumes(vol.reader, vol.name)
        out.append(vol)
        out.extend(lvs)
        return
    _identify(vol)
    out.append(vol)


def _luks_note(reader: RangeReader) -> str:
    """The note of a LUKS volume (its header's version and uuid), or "" when ``reader`` does not start with one."""
    reader.seek(0)
    head = reader.read(208)
    if len(head) < 208 or head[:6] != LUKS_MAGIC:
        return ""
    (version,) = struct.unpack_from(">H", head, 6)
    text = head[168:208].split(b"\0", 1)[0].decode("ascii", "replace")
    uid = text if text and all(c in "0123456789abcdefABCDEF-" for c in text) else "unreadable"
    kind = f"LUKS{version}" if version in (1, 2) else f"LUKS of unknown version {version}"
    return f"LUKS-encrypted volume ({kind}, uuid {uid}): shown as an image; its files cannot be read without the key"


# ---- Linux software RAID (md) ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _MdMember:
    """What a valid md 1.x superblock says; offsets and sizes in bytes, checked against the member."""

    version: str  # 1.0, 1.1, 1.2
    uuid: str  # as mdadm shows it: four groups of 8 hex digits joined by ':'
    name: str  # the array's name, "" when it has none
    level: int
    data_offset: int
    size: int  # of the array's data (RAID1: the whole array)
    problem: str  # why this member's data cannot be shown (a spare, being rebuilt, ...), or ""


def _md_superblock(reader: RangeReader) -> tuple[_MdMember | None, str]:
    """The md 1.x superblock of a member: (member, "") when valid, (None, note) when damaged, (None, "") when
    there is none."""
    size = reader.size
    places: list[tuple[str, int]] = []
    if size >= 8 * 4096:
        places += [("1.2", 4096), ("1.1", 0)]
    if size >= 32 * 512:
        places.append(("1.0", ((size // SECTOR - 16) & ~7) * SECTOR))
    problem = ""
    for version, at in places:
        reader.seek(at)
        raw = reader.read(4096)
        if len(raw) < 256 or struct.unpack_from("<I", raw, 0)[0] != MD_MAGIC:
            continue
        member, why = _md_parse(raw, version, at, size)
        if member is not None:
            return member, ""
        problem = problem or f"Linux RAID member whose md {version} superblock cannot be used ({why})"
    return None, problem


def _md_csum(raw: bytes, length: int) -> int:
    body = bytearray(raw[:length])
    body[216:220] = bytes(4)
    words = length // 4
    total = sum(struct.unpack_from(f"<{words}I", body))
    if length % 4 >= 2:
        total += struct.unpack_from("<H", body, words * 4)[0]
    return ((total & 0xFFFFFFFF) + (total >> 32)) & 0xFFFFFFFF


def _md_parse(raw: bytes, version: str, at: int, member_size: int) -> tuple[_MdMember | None, str]:
    major, features = struct.unpack_from("<II", raw, 4)
    set_name = raw[32:64]
    (level,) = struct.unpack_from("<i", raw, 72)
    (array_sectors,) = struct.unpack_from("<Q", raw, 80)
    data_offset, data_size, super_offset, recovery = struct.unpack_from("<QQQQ", raw, 128)
    (dev_number,) = struct.unpack_from("<I", raw, 160)
    (csum, max_dev) = struct.unpack_from("<II", raw, 216)
    if major != 1:
        return None, f"major version {major}, not 1"
    if max_dev > _MD_MAX_DEV:
        return None, f"it lists {max_dev} devices, more than {_MD_MAX_DEV}"
    length = 256 + 2 * max_dev
    if len(raw) < length or at + length > member_size:
        return None, "it is cut short by the end of the member"
    if _md_csum(raw, length) != csum:
        return None, "wrong checksum"
    if super_offset * SECTOR != at:
        return None, f"it says it lies at sector {super_offset}, but it lies at sector {at // SECTOR}"
    if level not in _MD_LEVELS:
        return None, f"unknown RAID level {level}"
    start, room, used = data_offset * SECTOR, data_size * SECTOR, array_sectors * SECTOR
    if start >= member_size or room <= 0 or start + room > member_size:
        return None, f"its data area (sector {data_offset}, {data_size} sectors) lies outside the member"
    if version == "1.0" and start + room > at:
        return None, "its data area overlaps the superblock"
    if version != "1.0" and start < at + length:
        return None, "its data area overlaps the superblock"
    if level == 1 and not 0 < used <= room:
        return None, f"array size {array_sectors} sectors does not fit its data area of {data_size} sectors"
    words = raw[16:32].hex()
    uid = ":".join(words[i : i + 8] for i in range(0, 32, 8))
    name = set_name.split(b"\0", 1)[0].decode("utf-8", "replace")
    problem = ""
    role = struct.unpack_from("<H", raw, 256 + 2 * dev_number)[0] if dev_number < max_dev else 0xFFFF
    if features & _MD_FEATURES_MOVING:
        problem = "the array is being reshaped"
    elif role in (0xFFFF, 0xFFFE, 0xFFFD):
        problem = {0xFFFF: "a spare", 0xFFFE: "a faulty member", 0xFFFD: "a journal"}[role]
    elif features & 0x02 and recovery < array_sectors:
        problem = "a member still being rebuilt"
    return _MdMember(version, uid, name, level, start, used, problem), ""


def _md_name(member: _MdMember, taken: set[str]) -> str:
    """``md-<name>`` of an array: its name without the ``host:`` part, in safe characters, else its uuid."""
    base = member.name.rsplit(":", 1)[-1]
    base = "".join(c if c in _NAME_CHARS else "_" for c in base)
    name = f"md-{base}"
    if not base.strip(".") or name in taken:
        name = f"md-{member.uuid.replace(':', '-')}"
    return name


def _md_volumes(out: list[Volume], vol: Volume, member: _MdMember, arrays: dict[str, str]) -> None:
    """Append a RAID member and, for the first member of a RAID1 array on the disk, the array's data."""
    label = member.name or member.uuid
    what = f"array {label} (md {member.version}, uuid {member.uuid})"
    out.append(vol)
    if member.level != 1:
        vol.note = f"Linux RAID member of {what}: RAID level {_MD_LEVELS[member.level]}: not assembled"
        return
    if member.problem:
        vol.note = f"RAID1 member of {what}: {member.problem}: its data is not shown"
        return
    first = arrays.get(member.uuid)
    if first is not None:
        vol.note = f"RAID1 member of {what}: the array is shown once, as {first}"
        return
    name = _md_name(member, {v.name for v in out})
    arrays[member.uuid] = f"{name} (from {vol.name})"
    vol.note = f"RAID1 member of {what}: its data is shown as {name}"
    data = Volume(name, vol.offset + member.data_offset, member.size, vol.reader.sub(member.data_offset, member.size))
    _fill(out, data, None, arrays, md=False)
    source = f"RAID1 {what}, read from member {vol.name}"
    data.note = f"{data.note}; {source}" if data.note else source


# ---- MBR ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """One of the four entries of an MBR or an EBR; ``start`` and ``count`` in sectors."""

    slot: int  # 0 .. 3
    type: int
    start: int
    count: int


@dataclass(frozen=True)
class _Part:
    number: int
    offset: int  # bytes, on the disk
    size: int
    type: int


def _entries(sector: bytes) -> list[_Entry]:
    out = []
    for slot in range(4):
        ptype, start, count = struct.unpack_from("<4xB3xII", sector, 446 + 16 * slot)
        out.append(_Entry(slot, ptype, start, count))
    return out


def _plain_mbr(disk: RangeReader) -> bytes | None:
    """Sector 0 when it is an MBR that is not the protective MBR of a GPT (nor a boot sector), else None."""
    disk.seek(0)
    sector = disk.read(SECTOR)
    if len(sector) < SECTOR or sector[510:512] != _BOOT_SIGNATURE:
        return None
    if any(name in sector[3:11] for name in _VBR_NAMES):
        return None
    if sector[18:38] == b"Hit Esc for .altboot" or sector[168:174] == b"\r\nQNX ":
        return None
    if any(e.type == 0xEE for e in _entries(sector)):
        return None
    return sector


def _mbr_volumes(disk: RangeReader, whole: Volume, mbr: bytes) -> list[Volume]:
    primaries: list[_Part] = []
    chains: list[tuple[list[_Part], str]] = []
    number = 5
    for e in _entries(mbr):
        if e.count == 0:  # an empty slot (Linux skips a slot by its size alone)
            continue
        if e.type in EXTENDED_MBR_TYPES:
            logical, note = _ebr_chain(disk, e, number)
            number += len(logical)
            chains.append((logical, note))
        else:
            primaries.append(_Part(e.slot + 1, e.start * SECTOR, e.count * SECTOR, e.type))
    out: list[Volume] = []
    arrays: dict[str, str] = {}
    for p in primaries:
        _add_partition(out, disk, whole, f"p{p.number}", p.offset, p.size, p.type, arrays)
    loose: list[str] = []
    for logical, note in chains:
        last = None
        for p in logical:
            last = _add_partition(out, disk, whole, f"p{p.number}", p.offset, p.size, p.type, arrays)
        if note and last is not None:
            last.note = f"{last.note}; {note}" if last.note else note
        elif note:
            loose.append(note)
    if loose:
        whole.note = "; ".join(loose)
        out.append(whole)
    return out


def _ebr_chain(disk: RangeReader, ext: _Entry, first_number: int) -> tuple[list[_Part], str]:
    """The logical partitions of the extended partition ``ext``, numbered from ``first_number``, and a note when
    the chain ends early (damaged or hostile)."""
    start, size = ext.start * SECTOR, ext.count * SECTOR
    end = start + size
    where = f"the extended partition in slot {ext.slot + 1}"
    parts: list[_Part] = []

    def after() -> str:
        return f"the logical partitions after p{parts[-1].number}" if parts else "its logical partitions"

    if start + SECTOR > disk.size:
        return parts, f"{where} lies outside the disk: {after()} are not shown"
    seen: set[int] = set()
    ebr, link_size = start, size
    for _ in range(MAX_EBRS):
        seen.add(ebr)
        disk.seek(ebr)
        sector = disk.read(SECTOR)
        if len(sector) < SECTOR or sector[510:512] != _BOOT_SIGNATURE:
            if ebr == start and not any(sector):  # an extended partition that holds nothing yet
                return parts, ""
            return parts, f"{where}: no extended boot record at byte {ebr}: {after()} are not shown"
        entries = _entries(sector)
        for e in entries:
            if e.count == 0 or e.type in EXTENDED_MBR_TYPES:
                continue
            offset, length = ebr + e.start * SECTOR, e.count * SECTOR
            # the 3rd and 4th entries of an EBR often hold garbage: kept only inside the link's room
            if e.slot >= 2 and (e.start * SECTOR + length > link_size or offset + length > end):
                continue
            parts.append(_Part(first_number + len(parts), offset, length, e.type))
        link = next((e for e in entries if e.count and e.type in EXTENDED_MBR_TYPES), None)
        if link is None:
            return parts, ""
        nxt = start + link.start * SECTOR
        if nxt + SECTOR > end:
            return parts, f"{where}: its chain points outside it (byte {nxt}): {after()} are not shown"
        if nxt in seen:
            return parts, f"{where}: its chain loops back to byte {nxt}: {after()} are not shown"
        ebr, link_size = nxt, link.count * SECTOR
    return parts, f"{where}: its chain is longer than {MAX_EBRS} links: {after()} are not shown"
