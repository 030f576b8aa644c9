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
        whole.note = "no partition table and no known filesystem"
        return [whole]
    out: list[Volume] = []
    for part in table.partitions:
        ptype = part.type
        if isinstance(ptype, int) and ptype in EXTENDED_MBR_TYPES:
            continue
        size = part.size
        last, first = getattr(part.raw, "last_lba", None), getattr(part.raw, "first_lba", None)
        if part.size > 0 and last is not None and first is not None:  # GPT's last LBA is inclusive
            size = (int(last) - int(first) + 1) * table.sector_size
        _add_partition(out, disk, whole, f"p{part.number}", part.offset, size, ptype)
    return out


def _add_partition(
    out: list[Volume], disk: RangeReader, whole: Volume, name: str, offset: int, size: int, ptype: object
) -> Volume:
    """Append the volume of one partition (and the logical volumes in it, for an LVM2 physical volume)."""
    if size <= 0 or offset + size > disk.size:
        vol = Volume(name, offset, max(0, size), whole.reader, None, "partition lies outside the disk")
        out.append(vol)
        return vol
    vol = Volume(name, offset, size, disk.sub(offset, size))
    if ptype in (LVM_GPT_TYPE, LVM_MBR_TYPE) or _is_lvm_pv(vol.reader):
        lvs, vol.note = _lvm_volumes(vol.reader, vol.name)
        out.append(vol)
        out.extend(lvs)
        return vol
    _identify(vol)
    out.append(vol)
    return vol


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
    for p in primaries:
        _add_partition(out, disk, whole, f"p{p.number}", p.offset, p.size, p.type)
    loose: list[str] = []
    for logical, note in chains:
        last = None
        for p in logical:
            last = _add_partition(out, disk, whole, f"p{p.number}", p.offset, p.size, p.type)
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
