"""Filesystem adapters: ext2/3/4, XFS, FAT12/16/32, NTFS and Btrfs through dissect, behind :class:`GuestFS`.

``detect`` names the filesystem on a volume by its magic numbers (without trusting anything else in it);
``open_filesystem`` opens it with the adapter registered for that name.

Each adapter checks what dissect would otherwise trust: a folder is read block by block once its size is known
to fit the volume, a symlink's target only when its length is sane, a FAT cluster chain is walked with loop
detection and never longer than the volume has clusters, and a file's size is checked against what its
filesystem can hold (:meth:`GuestFS._bound`).
"""

from __future__ import annotations

import io
import os
import stat
import struct
from collections.abc import Iterator
from typing import Any, BinaryIO

from vbfs.guestfs.bounds import FILE_SIZE_MAX
from vbfs.guestfs.model import GuestEntry, GuestFS, runs_to_extents

S_IFMT_DIR = stat.S_IFDIR


def detect(fh: Any, size: int) -> str | None:
    """The filesystem type on a volume, by magic numbers; ``None`` when none is recognised."""
    fh.seek(0)
    head = fh.read(4096)
    if len(head) < 1024:
        return None
    if head[:4] == b"XFSB":
        return "xfs"
    if head[3:11] == b"NTFS    ":
        return "ntfs"
    if len(head) >= 1082 and head[1080:1082] == b"\x53\xef":
        return "ext"
    if head[510:512] == b"\x55\xaa" and (head[82:87] == b"FAT32" or head[54:59] in (b"FAT12", b"FAT16", b"FAT  ")):
        return "fat"
    if size > 0x10048:
        fh.seek(0x10040)
        if fh.read(8) == b"_BHRfS_M":
            return "btrfs"
    return None


EXT4_INLINE_DATA_FL = 0x10000000
_EXT_INODE = struct.Struct("<HHIIIIIHH")  # i_mode i_uid i_size_lo i_atime i_ctime i_mtime i_dtime i_gid i_links_count
_DIRENT = struct.Struct("<IHBB")


def parse_ext_directory(data: bytes, block_size: int, inodes_count: int) -> list[tuple[int, bytes]]:
    """The (inode, name) entries of an ext2/3/4 directory's blocks, checked as the kernel checks them.

    dissect's own walk skips entries it cannot make sense of; a damaged folder must be an error instead of a
    shorter listing. Hash-tree blocks hide inside entries that cover them, so they need no special case.
    """
    out = []
    for base in range(0, len(data) - len(data) % block_size, block_size):
        off = 0
        while off < block_size:
            if off + 12 > block_size:
                raise ValueError(f"directory block {base // block_size}: entry at {off} crosses the block end")
            ino, rec_len, name_len, _ftype = _DIRENT.unpack_from(data, base + off)
            if rec_len == 0 and block_size == 65536:
                rec_len = 65536
            if rec_len < 12 or rec_len % 4 or off + rec_len > block_size:
                raise ValueError(f"directory block {base // block_size}: bad entry length {rec_len} at {off}")
            if ino:
                if name_len + 8 > rec_len or ino > inodes_count or name_len == 0:
                    raise ValueError(f"directory block {base // block_size}: bad entry at {off}")
                out.append((ino, data[base + off + 8 : base + off + 8 + name_len]))
            off += rec_len
    return out


EXT_INLINE_HEAD = 60  # bytes of inline data kept in i_block; the rest is the value of the "system.data" xattr
_EXT_XATTR_MAGIC = 0xEA020000
_EXT_XATTR_ENTRY = struct.Struct("<BBHIII")  # e_name_len e_name_index e_value_offs e_value_inum e_value_size e_hash
_EXT_XATTR_SYSTEM = 7  # the "system." name index


def ext_inline_data(raw: bytes) -> tuple[bytes, bytes, str]:
    """The inline data of an ext4 inode (its bytes as the inode table has them): (the 60 bytes of i_block, the
    value of its in-inode "system.data" attribute, why that value could not be read or "").

    Every offset and length of the attribute area is checked against the inode: a damaged one gives an empty
    value and a reason, never a read outside the inode.
    """
    head = raw[40 : 40 + EXT_INLINE_HEAD]
    if len(raw) < 132:
        return head, b"", "the inode has no room for attributes"
    (extra_isize,) = struct.unpack_from("<H", raw, 128)
    start = 128 + extra_isize
    if extra_isize % 4 or start + 4 > len(raw):
        return head, b"", f"bad extra inode size {extra_isize}"
    if struct.unpack_from("<I", raw, start)[0] != _EXT_XATTR_MAGIC:
        return head, b"", "no system.data attribute"
    first = start + 4  # value offsets count from the first entry
    off = first
    while off + 4 <= len(raw) and raw[off : off + 4] != b"\0\0\0\0":
        if off + _EXT_XATTR_ENTRY.size > len(raw):
            return head, b"", f"attribute entry at {off - first} crosses the end of the inode"
        name_len, index, value_offs, value_inum, value_size, _hash = _EXT_XATTR_ENTRY.unpack_from(raw, off)
        name_end = off + _EXT_XATTR_ENTRY.size + name_len
        if name_end > len(raw):
            return head, b"", f"attribute name at {off - first} crosses the end of the inode"
        if index == _EXT_XATTR_SYSTEM and raw[off + _EXT_XATTR_ENTRY.size : name_end] == b"data":
            if value_inum:
                return head, b"", "the system.data value is kept in another inode"
            if value_size and (first + value_offs < name_end or first + value_offs + value_size > len(raw)):
                return head, b"", f"system.data value of {value_size} bytes at {value_offs} lies outside the inode"
            return head, raw[first + value_offs : first + value_offs + value_size], ""
        off = (name_end + 3) & ~3
    return head, b"", "no system.data attribute"


def ext_time_ns(seconds: int, extra: int | None) -> int:
    """An ext2/3/4 time in nanoseconds, as the kernel's ext4_decode_extra_time reads it.

    ``seconds`` is the 32-bit field (signed: times before 1970 are negative); ``extra`` the matching ``*_extra``
    field (``None`` where the inode has none): its low 2 bits extend the seconds past 2038 (bits 32 and 33 added
    to the signed value), its upper 30 bits are the nanoseconds.
    """
    seconds = (seconds & 0xFFFFFFFF) - ((seconds & 0x80000000) << 1)
    if extra is None:
        return seconds * 1_000_000_000
    return (seconds + ((extra & 3) << 32)) * 1_000_000_000 + ((extra & 0xFFFFFFFF) >> 2)


def _ext_times(raw: bytes) -> tuple[int, int, int]:
    """(mtime, atime, ctime) in nanoseconds of an ext inode's bytes; an ``*_extra`` field counts only where the
    inode's extra size covers it."""
    mtime, atime, ctime = struct.unpack_from("<I", raw, 16)[0], *struct.unpack_from("<II", raw, 8)
    extra_isize = struct.unpack_from("<H", raw, 128)[0] if len(raw) >= 130 else 0

    def extra(at: int) -> int | None:
        if extra_isize >= at + 4 - 128 and len(raw) >= at + 4:
            return int(struct.unpack_from("<I", raw, at)[0])
        return None

    return ext_time_ns(mtime, extra(136)), ext_time_ns(atime, extra(140)), ext_time_ns(ctime, extra(132))


def _ts(value: Any) -> int:
    return int(value) if isinstance(value, int) else 0


def _inode_entry(fs: GuestFS, node: Any, name: str, *, mode: int, uid: int, gid: int, nlink: int) -> GuestEntry:
    """An entry of a Unix filesystem whose dissect inode has size, times, ``inum`` and ``link``."""
    entry = GuestEntry(
        name=name,
        ino=int(node.inum),
        mode=mode,
        size=int(node.size),
        uid=uid,
        gid=gid,
        nlink=nlink,
        mtime_ns=_ts(node.mtime_ns),
        atime_ns=_ts(node.atime_ns),
        ctime_ns=_ts(node.ctime_ns),
    )
    if stat.S_ISLNK(mode):
        entry.target, entry.damage = fs._link_target(entry.size, lambda: str(node.link))
    return entry


class ExtGuestFS(GuestFS):
    fstype = "ext4"
    folder_sizes = True

    def __init__(self, fh: Any, label: str):
        super().__init__(fh, label)
        from dissect.extfs import ExtFS

        with self._guard("superblock"):
            self.fs = ExtFS(fh)
            # extents address 2^32 blocks; block maps (ext2/3) less
            self.max_file_size = min(FILE_SIZE_MAX, (1 << 32) * int(self.fs.block_size))

    def _entry(self, node: Any, name: str) -> GuestEntry:
        inum = int(node.inum)
        raw = self._inode_bytes(inum)
        entry = self._fast_entry(inum, name, raw) if raw is not None else None
        if entry is not None and raw is not None:
            inline = self._inline(raw)
            if entry.is_symlink and not inline:
                entry.target, entry.damage = self._link_target(entry.size, lambda: str(node.link))
        else:
            ino = node.inode
            raw = bytes(ino.dumps())
            inline = self._inline(raw)
            entry = _inode_entry(
                self,
                node,
                name,
                mode=int(ino.i_mode),
                uid=int(ino.i_uid) | (int(ino.i_uid_high) << 16),
                gid=int(ino.i_gid) | (int(ino.i_gid_high) << 16),
                nlink=int(ino.i_links_count),
            )
            entry.mtime_ns, entry.atime_ns, entry.ctime_ns = _ext_times(raw)  # (dissect reads them unsigned)
        if inline and (entry.is_file or entry.is_symlink):
            self._check_inline(entry, raw)
        self._check_block_map(node, entry)
        return entry

    @staticmethod
    def _inline(raw: bytes) -> bool:
        """Whether an inode (its bytes) keeps its data inside itself (EXT4_INLINE_DATA_FL)."""
        return bool(struct.unpack_from("<I", raw, 32)[0] & EXT4_INLINE_DATA_FL)

    def _raw(self, inum: int) -> bytes:
        raw = self._inode_bytes(inum)
        return raw if raw is not None else bytes(self.fs.get_inode(inum).inode.dumps())

    def _check_inline(self, entry: GuestEntry, raw: bytes) -> None:
        """A file or symlink kept inside its inode: its size must be what the inode holds (60 bytes in i_block,
        the rest in the "system.data" attribute); a symlink's target is read from there."""
        head, rest, why = ext_inline_data(raw)
        data = head + rest
        if entry.size > len(data):
            entry.damage = f"size {entry.size} is more than the {len(data)} bytes of inline data"
            entry.damage += f" ({why})" if why else ""
            entry.target = None
            self.note(f"{entry.name} (inode {entry.ino}): {entry.damage}")
        elif entry.is_symlink:
            target = data[: entry.size]
            entry.target, entry.damage = self._link_target(entry.size, lambda: target.decode(errors="surrogateescape"))

    def _check_block_map(self, node: Any, entry: GuestEntry) -> None:
        """A file mapped by block lists (not extents) is read through a list of all its blocks: beyond the
        volume's size that list alone would be larger than any sane file of the volume."""
        from dissect.extfs.c_ext import c_ext

        if entry.is_file and self.volume_size and entry.size > self.volume_size:
            flags = int(node.inode.i_flags)
            if not flags & (c_ext.EXT4_EXTENTS_FL | EXT4_INLINE_DATA_FL):
                entry.damage = f"size {entry.size} (block-mapped) is more than the volume holds"

    def _inode_bytes(self, inum: int) -> bytes | None:
        """Inode ``inum`` as the inode table has it (at most one block of it); ``None`` where the geometry cannot
        be told, so that dissect's parser is used instead."""
        fs = self.fs
        try:
            per_group = int(fs.sb.s_inodes_per_group)
            inode_size = int(fs.sb.s_inode_size)
            group, index = divmod(inum - 1, per_group)
            gd = fs._read_group_desc(group)
            table = int(gd.bg_inode_table_lo)
            if fs._group_desc_struct.__name__ == "ext4_group_desc":
                table |= int(gd.bg_inode_table_hi) << 32
        except (AttributeError, ZeroDivisionError):
            return None
        fs.fh.seek(table * int(fs.block_size) + index * inode_size)
        raw = bytes(fs.fh.read(min(inode_size, int(fs.block_size))))
        if len(raw) < 128:
            raise ValueError(f"inode {inum} lies beyond the end of the volume")
        return raw

    def _fast_entry(self, inum: int, name: str, raw: bytes | None = None) -> GuestEntry | None:
        """The fields of an inode that the tree shows, unpacked straight from its bytes (``raw``, or read).

        Parsing the whole inode structure is most of the cost of listing a large folder; this reads only what is
        shown. It gives the same values as dissect's parser (a test compares the two on every inode of the test
        images), except for times before 1970 and after 2038, which dissect reads unsigned, and returns ``None``
        where it cannot tell, so that the parser is used instead.
        """
        if raw is None:
            raw = self._inode_bytes(inum)
            if raw is None:
                return None
        mode, uid, size_lo, _atime, _ctime, _mtime, _dtime, gid, nlink = _EXT_INODE.unpack_from(raw, 0)
        (size_hi,) = struct.unpack_from("<I", raw, 108)
        uid_hi, gid_hi = struct.unpack_from("<HH", raw, 120)
        mtime_ns, atime_ns, ctime_ns = _ext_times(raw)

        rdev = 0
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):  # the device number is kept in i_block
            old, new = struct.unpack_from("<II", raw, 40)
            if old:
                rdev = os.makedev((old >> 8) & 0xFF, old & 0xFF)
            else:
                rdev = os.makedev((new & 0xFFF00) >> 8, (new & 0xFF) | ((new >> 12) & 0xFFF00))

        return GuestEntry(
            name=name,
            ino=inum,
            mode=mode,
            size=size_lo | size_hi << 32,
            uid=uid | uid_hi << 16,
            gid=gid | gid_hi << 16,
            nlink=nlink,
            mtime_ns=mtime_ns,
            atime_ns=atime_ns,
            ctime_ns=ctime_ns,
            rdev=rdev,
        )

    def _root(self) -> GuestEntry:
        return self._entry(self.fs.get(2), "")

    def _resolve(self, entry: GuestEntry) -> Any:
        return self.fs.get_inode(entry.ino)

    def _listdir(self, entry: GuestEntry) -> Iterator[GuestEntry]:
        node = self._resolve(entry)
        raw = self._raw(entry.ino)
        if self._inline(raw):  # a small folder kept inside its inode
            for ino, name in self._inline_folder(entry, raw):
                yield self._entry(self.fs.get_inode(ino), name.decode(errors="surrogateescape"))
            return
        size = (int(node.inode.i_size_high) << 32) | int(node.inode.i_size_lo)
        if size > self.folder_limit:  # (checked on the entry too; the root has no entry that was checked)
            raise ValueError(f"folder size {size} is more than the volume can hold")
        block_size = int(self.fs.block_size)
        inodes = int(self.fs.sb.s_inodes_count)
        stream = node.open()
        while block := stream.read(block_size):  # one block at a time: a folder is never read whole
            for ino, name in parse_ext_directory(block, block_size, inodes):
                if name in (b".", b".."):
                    continue
                yield self._entry(self.fs.get_inode(ino), name.decode(errors="surrogateescape"))

    def _inline_folder(self, entry: GuestEntry, raw: bytes) -> list[tuple[int, bytes]]:
        """The (inode, name) entries of a folder kept inside its inode: i_block holds the parent's inode number
        (4 bytes) and then entries, the "system.data" attribute the entries that did not fit.

        Damage in i_block is an error (nothing of the folder can be trusted); damage of the attribute is a note,
        and the entries of i_block are still listed."""
        inodes = int(self.fs.sb.s_inodes_count)
        head, rest, why = ext_inline_data(raw)
        if len(head) < EXT_INLINE_HEAD:
            raise ValueError("the inline folder is cut short")
        found = parse_ext_directory(head[4:], EXT_INLINE_HEAD - 4, inodes)
        if why and entry.size > EXT_INLINE_HEAD:
            self.note(f"folder {entry.name or '/'} (inode {entry.ino}): only its first entries are shown ({why})")
        elif rest:
            try:
                found += parse_ext_directory(rest, len(rest), inodes)
            except ValueError as exc:
                self.note(f"folder {entry.name or '/'} (inode {entry.ino}): only its first entries are shown ({exc})")
        return [(ino, name) for ino, name in found if name not in (b".", b"..")]

    def _open(self, entry: GuestEntry) -> BinaryIO:
        raw = self._raw(entry.ino)
        if self._inline(raw):  # (its size was checked against what the inode holds when it was listed)
            head, rest, _why = ext_inline_data(raw)
            return io.BytesIO((head + rest)[: entry.size])
        return super()._open(entry)

    def _data_extents(self, entry: GuestEntry) -> list[tuple[int, int]] | None:
        if self._inline(self._raw(entry.ino)):
            return None
        node = self._resolve(entry)
        return runs_to_extents(node.dataruns(), int(self.fs.block_size), entry.size)


class XfsGuestFS(GuestFS):
    fstype = "xfs"
    folder_sizes = True

    def __init__(self, fh: Any, label: str):
        super().__init__(fh, label)
        from dissect.xfs import XFS

        with self._guard("superblock"):
            self.fs = XFS(fh)

    def _entry(self, node: Any, name: str) -> GuestEntry:
        ino = node.inode
        return _inode_entry(
            self,
            node,
            name,
            mode=int(ino.di_mode),
            uid=int(ino.di_uid),
            gid=int(ino.di_gid),
            nlink=int(ino.di_nlink) or int(ino.di_onlink),
        )

    def _root(self) -> GuestEntry:
        return self._entry(self.fs.root, "")

    def _resolve(self, entry: GuestEntry) -> Any:
        return self.fs.get_inode(entry.ino)

    def _listdir(self, entry: GuestEntry) -> Iterator[GuestEntry]:
        node = self._resolve(entry)
        if int(node.size) > self.folder_limit:  # dissect walks every block up to the size
            raise ValueError(f"folder size {int(node.size)} is more than the volume can hold")
        return (self._entry(n, n.filename) for n in node.iterdir() if n.filename not in (".", ".."))

    def _data_extents(self, entry: GuestEntry) -> list[tuple[int, int]] | None:
        from dissect.xfs.c_xfs import c_xfs

        node = self._resolve(entry)
        fmt = node.inode.di_format
        if fmt not in (c_xfs.xfs_dinode_fmt.XFS_DINODE_FMT_EXTENTS, c_xfs.xfs_dinode_fmt.XFS_DINODE_FMT_BTREE):
            return None
        return runs_to_extents(node.dataruns, int(self.fs.block_size), entry.size)


def _bounded_chain(fat: Any, clusters: int) -> None:
    """Make ``fat.chain`` stop with an error at a loop (Brent's cycle detection, constant memory) and after
    ``clusters`` steps (no chain is longer than the volume has clusters)."""
    walk = fat.chain

    def chain(first: int) -> Iterator[int]:
        power = lam = 1
        tortoise = None
        for steps, cluster in enumerate(walk(first), 1):
            if cluster == tortoise:
                raise ValueError(f"the cluster chain from cluster {first} loops")
            if steps > clusters:
                raise ValueError(f"the cluster chain from cluster {first} is longer than the volume")
            yield cluster
            if power == lam:
                tortoise, power, lam = cluster, power * 2, 0
            lam += 1

    fat.chain = chain


class FatGuestFS(GuestFS):
    """FAT has no owners, modes or inode numbers: folders are 0755, files 0644 (0444 when read-only), owned by
    root; the inode number stands in as the entry's first cluster (or its position for empty files)."""

    fstype = "fat"
    max_file_size = 0xFFFFFFFF

    def __init__(self, fh: Any, label: str):
        super().__init__(fh, label)
        from dissect.fat import FATFS

        with self._guard("boot sector"):
            self.fs = FATFS(fh)
            data = int(self.fs.total_sectors) - int(self.fs.first_data_sector)
            self.clusters = max(0, data // max(1, int(self.fs.bpb.BPB_SecPerClus)))
            _bounded_chain(self.fs.fat, self.clusters)
        self._next_ino = 1 << 40

    def _entry(self, node: Any, name: str) -> GuestEntry:
        is_dir = node.is_directory()
        perm = 0o755 if is_dir else 0o444 if node.is_readonly() else 0o644
        mode = (stat.S_IFDIR if is_dir else stat.S_IFREG) | perm
        cluster = int(node.cluster or 0)
        if cluster:
            ino = cluster
        else:
            self._next_ino += 1
            ino = self._next_ino
        mtime = node.mtime
        mtime_ns = int(mtime.timestamp() * 1e9) if mtime is not None else 0
        return GuestEntry(
            name=name,
            ino=ino,
            mode=mode,
            size=0 if is_dir else int(node.size),
            nlink=2 if is_dir else 1,
            mtime_ns=mtime_ns,
            atime_ns=mtime_ns,
            ctime_ns=mtime_ns,
            handle=node,
        )

    def _root(self) -> GuestEntry:
        root = self._entry(self.fs.root, "")
        root.ino = 1
        return root

    @staticmethod
    def _name(node: Any) -> str:
        """The long name, or the short name with the case flags that Windows and Linux honour (NT bits 3, 4)."""
        if node.ldirents or node.dirent is None:
            return str(node.name)
        flags = int(node.dirent.DIR_NTRes)
        base, dot, ext = str(node.short_name).partition(".")
        if flags & 0x08:
            base = base.lower()
        if flags & 0x10:
            ext = ext.lower()
        return base + dot + ext

    def _listdir(self, entry: GuestEntry) -> Iterator[GuestEntry]:
        for n in entry.handle.iterdir():
            if n.is_volume_id() or n.name in (".", ".."):
                continue
            yield self._entry(n, self._name(n))

    def _open(self, entry: GuestEntry) -> Any:
        node = entry.handle
        held = sum(count for _, count in node.dataruns()) * int(self.fs.cluster_size)
        if entry.size > held:  # FAT has no holes: the chain must hold the whole size
            raise ValueError(f"size {entry.size} is more than its cluster chain holds ({held})")
        return node.open()


class NtfsGuestFS(GuestFS):
    """NTFS: names in their long (Win32) form; modes are 0755 for folders and 0644 for files, owned by root.

    Symbolic links and junctions (reparse points) are shown as symlinks. vbfs does not know which drive letter
    the guest gave the volume, so a target is inside the volume when it is found there:

    - an absolute target (``\\??\\X:\\path``, ``X:\\path``; any letter) whose every component is found in this
      volume, from its root, is shown as a relative link from the link's own folder, with the names as the
      volume spells them (Windows compares names without case; the mount does not);
    - a relative symbolic link that stays below the volume's root is shown relative too (components not found
      are kept as written: the link dangles inside the volume);
    - any other target (another volume, a UNC share, ``\\??\\Volume{...}``, a relative one that climbs above the
      root, an absolute one not found) is shown as the guest's Windows text with every ``/`` made ``\\``: one
      file name on Linux, which resolves to nothing, neither on the host nor elsewhere in the mount.

    Reparse data is the guest's: every length and offset is checked; a damaged buffer is a note, and its entry
    is shown as an empty file.
    """

    fstype = "ntfs"
    REPARSE_MAX = 16 * 1024  # the largest reparse buffer Windows writes (MAXIMUM_REPARSE_DATA_BUFFER_SIZE)
    TAG_MOUNT_POINT, TAG_SYMLINK = 0xA0000003, 0xA000000C
    ROOT = 5  # the root folder's MFT record
    PARTS_MAX = 1024  # components of a target that are looked up

    def __init__(self, fh: Any, label: str):
        super().__init__(fh, label)
        from dissect.ntfs import NTFS

        with self._guard("boot sector"):
            self.fs = NTFS(fh)
        # folder record → its guest path below the volume (folders only: a link's target is computed from them)
        self._places: dict[int, tuple[str, ...]] = {self.ROOT: ()}

    @staticmethod
    def _attributes(record: Any) -> Any:
        """The record's attributes; one whose parse fails (a reparse buffer too short for dissect) is kept
        unparsed instead of failing the whole record."""
        try:
            return record.attributes
        except Exception:
            from io import BytesIO

            from dissect.ntfs.attr import Attribute, AttributeHeader
            from dissect.ntfs.c_ntfs import ATTRIBUTE_TYPE_CODE
            from dissect.ntfs.util import AttributeMap

            fh, offset, attrs = BytesIO(record.data), record.header.FirstAttributeOffset, AttributeMap()
            while offset < len(record.data):
                try:
                    header = AttributeHeader(fh, offset, record)
                except EOFError:
                    break
                if header.type == ATTRIBUTE_TYPE_CODE.END or header.record_length == 0:
                    break
                try:
                    attr = Attribute(header, record)
                except Exception:
                    if header.type != ATTRIBUTE_TYPE_CODE.REPARSE_POINT:
                        raise
                    attr = Attribute.__new__(Attribute)
                    attr.header, attr.record, attr.attribute = header, record, None
                attrs.add(attr)
                offset += header.record_length
            record.__dict__["attributes"] = attrs  # (a cached_property of dissect's record)
            return attrs

    def _reparse_link(self, attr: Any) -> tuple[int, str, bool] | None:
        """(tag, substitute name, relative) of a symlink or junction; ``None`` for another kind of reparse point;
        ``ValueError`` when the buffer is damaged."""
        size = int(attr.header.size)
        if size < 8 or size > 8 + self.REPARSE_MAX:
            raise ValueError(f"reparse buffer of {size} bytes")
        raw = bytes(attr.header.data())[:size]
        tag, length = struct.unpack_from("<IH", raw, 0)
        if tag not in (self.TAG_MOUNT_POINT, self.TAG_SYMLINK):
            return None
        if 8 + length > len(raw):
            raise ValueError(f"reparse data length {length} is more than the {len(raw) - 8} bytes it has")
        data = raw[8 : 8 + length]
        head = 12 if tag == self.TAG_SYMLINK else 8
        if len(data) < head:
            raise ValueError(f"reparse data of {len(data)} bytes has no room for its header")
        offset, count = struct.unpack_from("<HH", data, 0)
        relative = tag == self.TAG_SYMLINK and bool(struct.unpack_from("<I", data, 8)[0] & 1)
        names = data[head:]
        if offset + count > len(names) or offset % 2 or count % 2 or count == 0:
            raise ValueError(f"substitute name at {offset}+{count} outside the {len(names)} bytes of names")
        try:
            text = names[offset : offset + count].decode("utf-16-le")
        except UnicodeDecodeError:
            raise ValueError("substitute name is no UTF-16") from None
        text = text.rstrip("\0")
        if not text or "\0" in text:
            raise ValueError("substitute name is empty or holds a NUL")
        return tag, text, relative

    @staticmethod
    def _safe_name(name: str) -> bool:
        return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name

    def _lookup(self, parts: list[str], strict: bool) -> list[str] | None:
        """The components ``parts`` (below the root) as this volume spells them; ``None`` when one is not found
        (``strict``) or is no safe name. Reparse points on the way are not followed."""
        from dissect.ntfs.c_ntfs import ATTRIBUTE_TYPE_CODE, FILE_NAME_DOS
        from dissect.ntfs.util import segment_reference

        out: list[str] = []
        record: Any = self.fs.mft.root
        for i, part in enumerate(parts):
            found = None
            try:
                if record.is_dir() and not record.is_reparse_point():
                    child = record.index("$I30").search(part).dereference()
                    for fn in self._attributes(child)[ATTRIBUTE_TYPE_CODE.FILE_NAME]:
                        if fn.flags != FILE_NAME_DOS and segment_reference(fn.attr.ParentDirectory) == record.segment:
                            found = str(fn.file_name)
                            break
            except Exception:  # not found, or damaged on the way: not found either
                found = None
            if found is None:
                if strict:
                    return None
                out += parts[i:]
                break
            out.append(found)
            record = child
        return out if all(self._safe_name(p) for p in out) else None

    def _link_text(self, text: str, relative: bool, folder: tuple[str, ...] | None) -> str:
        """What a link shows: relative within the volume, or the guest's text made inert (see the class)."""
        inert = text.replace("/", "\\")
        if inert in (".", ".."):
            inert = "\\" + inert
        if folder is None or text.count("\\") > self.PARTS_MAX:
            return inert
        if relative:
            if text.startswith("\\"):
                return inert
            parts: list[str] = list(folder)
            for part in text.split("\\"):
                if part in ("", "."):
                    continue
                if part == "..":
                    if not parts:
                        return inert  # above the volume's root
                    parts.pop()
                else:
                    parts.append(part)
            found = self._lookup(parts, strict=False)
        else:
            path = text
            for prefix in ("\\??\\", "\\\\?\\", "\\\\.\\"):
                if path.startswith(prefix):
                    path = path[len(prefix) :]
                    break
            if len(path) < 2 or path[1] != ":" or not path[0].isascii() or not path[0].isalpha():
                return inert  # UNC, a volume GUID, a device: another place
            if path[2:] and not path[2:].startswith("\\"):
                return inert  # (drive-relative: "C:x")
            parts = []
            for part in path[2:].split("\\"):
                if part in ("", "."):
                    continue
                if part == "..":
                    if parts:
                        parts.pop()
                else:
                    parts.append(part)
            found = self._lookup(parts, strict=True)
        if found is None:
            return inert
        common = 0
        while common < min(len(folder), len(found)) and folder[common] == found[common]:
            common += 1
        rel = [".."] * (len(folder) - common) + found[common:]
        return "/".join(rel) or "."

    def _entry(self, record: Any, name: str, folder: tuple[str, ...] | None = None) -> GuestEntry:
        from dissect.ntfs.c_ntfs import ATTRIBUTE_TYPE_CODE, FILE_NAME_DOS

        attrs = self._attributes(record)
        is_dir = record.is_dir()
        times = attrs[ATTRIBUTE_TYPE_CODE.STANDARD_INFORMATION]
        mtime_ns = atime_ns = ctime_ns = 0
        if times:
            si = times[0]
            mtime_ns = _ts(si.last_modification_time_ns)
            atime_ns = _ts(getattr(si, "last_access_time_ns", mtime_ns))
            ctime_ns = _ts(si.last_change_time_ns)
        target: str | None = None
        damage = ""
        link = None
        broken = ""
        if ATTRIBUTE_TYPE_CODE.REPARSE_POINT in attrs:
            try:
                link = self._reparse_link(attrs[ATTRIBUTE_TYPE_CODE.REPARSE_POINT][0])
            except Exception as exc:
                broken = str(exc) or type(exc).__name__
                self.note(f"{name} (MFT record {record.segment}): damaged reparse point ({broken}): an empty file")
        if broken:
            mode, size = stat.S_IFREG | 0o644, 0
        elif link is not None:
            mode = stat.S_IFLNK | 0o777
            shown = self._link_text(link[1], link[2], folder)
            target, damage = self._link_target(len(shown.encode(errors="surrogateescape")), lambda: shown)
            size = len(shown.encode(errors="surrogateescape"))
        elif is_dir:
            mode, size = stat.S_IFDIR | 0o755, 0
        else:
            mode = stat.S_IFREG | 0o644
            size = int(record.size()) if record.has_stream("") else 0
        # Each hard link has its own $FILE_NAME (the same name in two folders is two links). DOS-only 8.3 aliases
        # of long names are not counted: they are no links of their own (a name valid in both is one attribute).
        links = sum(1 for fn in attrs[ATTRIBUTE_TYPE_CODE.FILE_NAME] if fn.flags != FILE_NAME_DOS)
        return GuestEntry(
            name=name,
            ino=int(record.segment),
            mode=mode,
            size=size,
            nlink=max(1, links) if not stat.S_ISDIR(mode) else 2,
            mtime_ns=mtime_ns,
            atime_ns=atime_ns,
            ctime_ns=ctime_ns,
            target=target,
            damage=damage,
        )

    def _root(self) -> GuestEntry:
        return self._entry(self.fs.mft.root, "")

    def _resolve(self, entry: GuestEntry) -> Any:
        return self.fs.mft.get(entry.ino)

    def _listdir(self, entry: GuestEntry) -> list[GuestEntry]:
        out: list[GuestEntry] = []
        seen = set()
        record = self._resolve(entry)
        folder = self._places.get(entry.ino)
        for name, idx in record.listdir(ignore_dos=True).items():
            if name == "." or (name.startswith("$") and record.segment == 5):  # NTFS metadata files in the root
                continue
            child = idx.dereference() if hasattr(idx, "dereference") else idx
            if (name, child.segment) in seen:
                continue
            seen.add((name, child.segment))
            e = self._entry(child, name, folder)
            if e.is_dir and folder is not None:
                self._places.setdefault(e.ino, (*folder, name))
            out.append(e)
        return out


class BtrfsGuestFS(GuestFS):
    """Btrfs: the top level of the volume, with every subvolume and snapshot a folder at its place.

    Inode numbers are per subvolume (a subvolume's root is 256 in every one), so an entry's number is the pair
    (subvolume id, inode) in one integer. A snapshot that was taken of a subvolume holding another one holds no
    subvolume there, only a name: that place is an empty folder, as the guest's kernel shows it.
    """

    fstype = "btrfs"
    EMPTY_SUBVOL_DIR = 2  # the inode number the kernel gives such a place
    SUBVOL_RDONLY = 1  # a root item's flag of a read-only subvolume
    NOTE_SUBVOLUMES = 50  # subvolumes named in vm.json (a guest may keep hundreds of snapshots)

    def __init__(self, fh: Any, label: str):
        super().__init__(fh, label)
        from dissect.btrfs import Btrfs

        with self._guard("superblock"):
            self.fs = Btrfs(fh)

    @classmethod
    def volume_notes(cls, fh: Any, label: str) -> list[str]:
        fs = cls(fh, label)
        with fs._guard("subvolumes"):
            default = fs.fs.default_subvolume
            name = default.path or "(top level)"
            notes = [f"default subvolume: {name} (id {default.objectid})"]
            others = sorted(
                s.path + (" (read-only)" if int(s.tree.root_item.flags) & cls.SUBVOL_RDONLY else "")
                for s in fs.fs.subvolumes()
                if s.objectid != default.objectid and s.path
            )
            if len(others) > cls.NOTE_SUBVOLUMES:
                others[cls.NOTE_SUBVOLUMES :] = [f"and {len(others) - cls.NOTE_SUBVOLUMES} more"]
            if others:
                notes.append("other subvolumes: " + ", ".join(others))
        return notes

    def _entry(self, node: Any, name: str) -> GuestEntry:
        entry = _inode_entry(
            self, node, name, mode=int(node.mode), uid=int(node.uid), gid=int(node.gid), nlink=int(node.inode.nlink)
        )
        entry.handle = node  # the inode number alone does not find the object again: keep it
        entry.ino = int(node.subvolume.objectid) << 64 | entry.ino
        return entry

    def _root(self) -> GuestEntry:
        from dissect.btrfs.c_btrfs import c_btrfs

        return self._entry(self.fs.open_subvolume(c_btrfs.BTRFS_FS_TREE_OBJECTID).root, "")

    def _subvolume_root(self, folder: Any, objectid: int, name: str) -> Any:
        """The root of the subvolume a folder's entry names, if it is attached there (its root reference names that
        folder and the subvolume still exists); ``None`` for a name a snapshot kept without the subvolume."""
        from dissect.btrfs.c_btrfs import c_btrfs

        root_tree = self.fs._root_tree
        try:
            _, data = root_tree.find(folder.subvolume.objectid, c_btrfs.BTRFS_ROOT_REF_KEY, objectid)
            root_tree.find(objectid, c_btrfs.BTRFS_ROOT_ITEM_KEY)
        except KeyError:
            return None
        ref = c_btrfs.btrfs_root_ref(data)
        if int(ref.dirid) != int(folder.inum) or ref.name.decode(errors="surrogateescape") != name:
            return None
        return self.fs.open_subvolume(objectid, folder).root

    def _listdir(self, entry: GuestEntry) -> Iterator[GuestEntry]:
        from dissect.btrfs.c_btrfs import c_btrfs

        folder = entry.handle
        if folder is None:  # the empty place of a subvolume that a snapshot did not take
            return
        subvolume = folder.subvolume
        # the folder's entries in index order (0 and 1 are "." and ".."), as dissect's iterdir reads them
        for _, data in subvolume.tree.cursor().iter(folder.inum, c_btrfs.BTRFS_DIR_INDEX_KEY, 2, ignore_offset=True):
            item = c_btrfs.btrfs_dir_item(data)
            name = item.name.decode(errors="surrogateescape")
            where = item.location
            if where.type == c_btrfs.BTRFS_INODE_ITEM_KEY:
                yield self._entry(subvolume.inode(int(where.objectid), item.type, folder), name)
            elif where.type != c_btrfs.BTRFS_ROOT_ITEM_KEY:
                raise ValueError(f"entry {name!r} points at an item of type {int(where.type)}")
            elif (root := self._subvolume_root(folder, int(where.objectid), name)) is not None:
                yield self._entry(root, name)
            else:
                yield GuestEntry(
                    name=name,
                    ino=int(subvolume.objectid) << 64 | self.EMPTY_SUBVOL_DIR,
                    mode=stat.S_IFDIR | 0o755,
                    size=0,
                    mtime_ns=entry.mtime_ns,
                    atime_ns=entry.atime_ns,
                    ctime_ns=entry.ctime_ns,
                )

    def _open(self, entry: GuestEntry) -> Any:
        # zlib and LZO extents need nothing beyond dissect; zstd needs compression.zstd (Python 3.14) or its
        # backport, a dependency of vbfs. Without it such a file is unsupported, not damaged.
        from dissect.btrfs import stream
        from dissect.btrfs.c_btrfs import c_btrfs

        from vbfs.guestfs.model import GuestDataError

        node = entry.handle
        if not stream.HAS_ZSTD and any(e.compression == c_btrfs.BTRFS_COMPRESS_ZSTD for e in node.extents()):
            raise GuestDataError(
                f"{self.label}: file {entry.name}: not supported: zstd-compressed extent (backports.zstd is missing)"
            )
        return node.open()


BUILTIN = {"ext": ExtGuestFS, "xfs": XfsGuestFS, "fat": FatGuestFS, "ntfs": NtfsGuestFS, "btrfs": BtrfsGuestFS}
