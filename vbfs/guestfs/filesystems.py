"""Filesystem adapters: ext2/3/4, XFS, FAT12/16/32, NTFS and Btrfs through dissect, behind :class:`GuestFS`.

``detect`` names the filesystem on a volume by its magic numbers (without trusting anything else in it);
``open_filesystem`` opens it with the adapter registered for that name.

Each adapter checks what dissect would otherwise trust: a folder is read block by block once its size is known
to fit the volume, a symlink's target only when its length is sane, a FAT cluster chain is walked with loop
detection and never longer than the volume has clusters, and a file's size is checked against what its
filesystem can hold (:meth:`GuestFS._bound`).
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterator
from typing import Any

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
        fast = self._fast_entry(int(node.inum), name)
        if fast is not None:
            if fast.is_symlink:
                fast.target, fast.damage = self._link_target(fast.size, lambda: str(node.link))
            self._check_block_map(node, fast)
            return fast
        ino = node.inode
        entry = _inode_entry(
            self,
            node,
            name,
            mode=int(ino.i_mode),
            uid=int(ino.i_uid) | (int(ino.i_uid_high) << 16),
            gid=int(ino.i_gid) | (int(ino.i_gid_high) << 16),
            nlink=int(ino.i_links_count),
        )
        self._check_block_map(node, entry)
        return entry

    def _check_block_map(self, node: Any, entry: GuestEntry) -> None:
        """A file mapped by block lists (not extents) is read through a list of all its blocks: beyond the
        volume's size that list alone would be larger than any sane file of the volume."""
        from dissect.extfs.c_ext import c_ext

        if entry.is_file and self.volume_size and entry.size > self.volume_size:
            flags = int(node.inode.i_flags)
            if not flags & (c_ext.EXT4_EXTENTS_FL | EXT4_INLINE_DATA_FL):
                entry.damage = f"size {entry.size} (block-mapped) is more than the volume holds"

    def _fast_entry(self, inum: int, name: str) -> GuestEntry | None:
        """The fields of an inode that the tree shows, unpacked straight from its bytes.

        Parsing the whole inode structure is most of the cost of listing a large folder; this reads only what is
        shown. It gives the same values as dissect's parser (a test compares the two on every inode of the test
        images) and returns ``None`` where it cannot tell, so that the parser is used instead.
        """
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
        raw = fs.fh.read(min(inode_size, 160))
        if len(raw) < 128:
            raise ValueError(f"inode {inum} lies beyond the end of the volume")
        mode, uid, size_lo, atime, ctime, mtime, _dtime, gid, nlink = _EXT_INODE.unpack_from(raw, 0)
        (size_hi,) = struct.unpack_from("<I", raw, 108)
        uid_hi, gid_hi = struct.unpack_from("<HH", raw, 120)
        extra_isize = struct.unpack_from("<H", raw, 128)[0] if inode_size > 128 and len(raw) >= 130 else 0

        def ns(seconds: int, extra_at: int) -> int:
            extra = 0
            if inode_size > 128 and extra_isize >= extra_at + 4 - 128 and len(raw) >= extra_at + 4:
                extra = struct.unpack_from("<I", raw, extra_at)[0]
            return ((seconds | (extra & 3) << 32) * 1_000_000_000) + (extra >> 2)

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
            mtime_ns=ns(mtime, 136),
            atime_ns=ns(atime, 140),
            ctime_ns=ns(ctime, 132),
            rdev=rdev,
        )

    def _root(self) -> GuestEntry:
        return self._entry(self.fs.get(2), "")

    def _resolve(self, entry: GuestEntry) -> Any:
        return self.fs.get_inode(entry.ino)

    def _listdir(self, entry: GuestEntry) -> Iterator[GuestEntry]:
        node = self._resolve(entry)
        if int(node.inode.i_flags) & EXT4_INLINE_DATA_FL:  # small folders kept inside the inode: dissect's walk
            yield from (self._entry(n, n.filename) for n in node.iterdir() if n.filename not in (".", ".."))
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

    def _data_extents(self, entry: GuestEntry) -> list[tuple[int, int]] | None:
        node = self._resolve(entry)
        if int(node.inode.i_flags) & EXT4_INLINE_DATA_FL:
            return None
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
    Symbolic links and junctions are shown as symlinks to their substitute name."""

    fstype = "ntfs"

    def __init__(self, fh: Any, label: str):
        super().__init__(fh, label)
        from dissect.ntfs import NTFS

        with self._guard("boot sector"):
            self.fs = NTFS(fh)

    def _entry(self, record: Any, name: str) -> GuestEntry:
        from dissect.ntfs.c_ntfs import ATTRIBUTE_TYPE_CODE

        is_dir = record.is_dir()
        times = record.attributes[ATTRIBUTE_TYPE_CODE.STANDARD_INFORMATION]
        mtime_ns = atime_ns = ctime_ns = 0
        if times:
            si = times[0]
            mtime_ns = _ts(si.last_modification_time_ns)
            atime_ns = _ts(getattr(si, "last_access_time_ns", mtime_ns))
            ctime_ns = _ts(si.last_change_time_ns)
        target: str | None = None
        damage = ""
        if record.is_reparse_point() and (record.is_symlink() or record.is_mount_point()):
            mode = stat.S_IFLNK | 0o777
            name_of = str(record.reparse_point_substitute_name).replace("\\", "/")
            size = len(name_of.encode(errors="surrogateescape"))
            target, damage = self._link_target(size, lambda: name_of)
        elif is_dir:
            mode, size = stat.S_IFDIR | 0o755, 0
        else:
            mode = stat.S_IFREG | 0o644
            size = int(record.size()) if record.has_stream("") else 0
        names = {n for n in record.filenames(ignore_dos=True)}
        return GuestEntry(
            name=name,
            ino=int(record.segment),
            mode=mode,
            size=size,
            nlink=max(1, len(names)) if not is_dir else 2,
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
        for name, idx in record.listdir(ignore_dos=True).items():
            if name == "." or (name.startswith("$") and record.segment == 5):  # NTFS metadata files in the root
                continue
            child = idx.dereference() if hasattr(idx, "dereference") else idx
            if (name, child.segment) in seen:
                continue
            seen.add((name, child.segment))
            out.append(self._entry(child, name))
        return out


class BtrfsGuestFS(GuestFS):
    """Btrfs: the default subvolume."""

    fstype = "btrfs"

    def __init__(self, fh: Any, label: str):
        super().__init__(fh, label)
        from dissect.btrfs import Btrfs

        with self._guard("superblock"):
            self.fs = Btrfs(fh)

    def _entry(self, node: Any, name: str) -> GuestEntry:
        entry = _inode_entry(
            self, node, name, mode=int(node.mode), uid=int(node.uid), gid=int(node.gid), nlink=int(node.inode.nlink)
        )
        entry.handle = node  # Btrfs inode numbers are per subvolume: keep the object
        entry.ino = int(node.subvolume.objectid) << 64 | entry.ino  # (a subvolume's root is 256 in every one)
        return entry

    def _root(self) -> GuestEntry:
        return self._entry(self.fs.get("/"), "")

    def _listdir(self, entry: GuestEntry) -> Iterator[GuestEntry]:
        return (self._entry(n, name) for name, n in entry.handle.iterdir() if name not in (".", ".."))


BUILTIN = {"ext": ExtGuestFS, "xfs": XfsGuestFS, "fat": FatGuestFS, "ntfs": NtfsGuestFS, "btrfs": BtrfsGuestFS}
