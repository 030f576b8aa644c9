"""What a disk holds: partitions (MBR, GPT), LVM2 logical volumes in them, or a filesystem on the whole disk.

Names follow the tree of DESIGN.md: partitions are ``p<N>`` by their number in the table, LVM2 logical volumes
``<vg>-<lv>``, and a disk without a partition table that holds a filesystem is ``whole``. Every volume carries
the filesystem found on it, or a note that says why none is shown. The partition table and LVM2 metadata are
guest data too: :func:`discover` runs under a time budget like every other parser call.
"""

from __future__ import annotations

import logging
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
        if part.size <= 0 or part.offset + part.size > disk.size:  # (checked again with the exact size below)
            out.append(
                Volume(
                    f"p{part.number}",
                    part.offset,
                    max(0, part.size),
                    whole.reader,
                    None,
                    "partition lies outside the disk",
                )
            )
            continue
        size = part.size
        last, first = getattr(part.raw, "last_lba", None), getattr(part.raw, "first_lba", None)
        if last is not None and first is not None:  # GPT's last LBA is inclusive
            size = (int(last) - int(first) + 1) * table.sector_size
        vol = Volume(f"p{part.number}", part.offset, size, disk.sub(part.offset, size))
        if ptype in (LVM_GPT_TYPE, LVM_MBR_TYPE) or _is_lvm_pv(vol.reader):
            lvs, vol.note = _lvm_volumes(vol.reader, vol.name)
            out.append(vol)
            out.extend(lvs)
            continue
        _identify(vol)
        out.append(vol)
    return out
