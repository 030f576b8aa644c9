"""Build test disk images with real partition tables and filesystems, without mounting anything.

Uses sfdisk (fdisk), mkfs.ext4 -d (e2fsprogs) and qemu-img (qemu-utils). Every function returns the path it made.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

MiB = 1024 * 1024


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def write_tree(root: Path, files: dict[str, bytes | str]) -> Path:
    """Create ``files`` (relative path → content) below ``root``."""
    for rel, content in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content.encode() if isinstance(content, str) else content)
    return root


def gpt_ext4(path: Path, size: int, tree: Path, fs_size: int | None = None) -> Path:
    """A GPT disk of ``size`` bytes with one Linux partition from 1 MiB holding ext4 made from ``tree``.

    The file is sparse: only what mkfs writes is allocated.
    """
    if path.exists():
        path.unlink()
    with open(path, "wb") as f:
        f.truncate(size)
    part_size = (fs_size or (size - 2 * MiB)) // 512
    _run("sh", "-c", f"printf 'label: gpt\\nstart=2048, size={part_size}, type=L\\n' | sfdisk -q '{path}'")
    _run(
        "mkfs.ext4",
        "-q",
        "-F",
        "-E",
        f"offset={MiB}",
        "-d",
        str(tree),
        "-L",
        "vbfs-test",
        str(path),
        f"{part_size // 2}k",
    )
    return path


def convert(raw: Path, fmt: str, out: Path, options: str = "") -> Path:
    """Convert a raw image to qcow2, vmdk, vhd or vhdx with qemu-img (``options`` as for ``qemu-img -o``)."""
    qfmt = {"vhd": "vpc"}.get(fmt, fmt)
    _run(
        "qemu-img",
        "convert",
        "-f",
        "raw",
        "-O",
        qfmt,
        *(["-o", options] if options else []),
        str(raw),
        str(out),
    )
    return out


def have(*tools: str) -> bool:
    return all(shutil.which(t) or os.path.exists(f"/usr/sbin/{t}") or os.path.exists(f"/sbin/{t}") for t in tools)


def place(part: Path, disk: Path, offset: int, block: int = 1024 * 1024) -> None:
    """Copy a partition image into a disk image at ``offset``, leaving zero blocks as holes."""
    zero = bytes(block)
    with open(part, "rb") as src, open(disk, "r+b") as dst:
        pos = 0
        while data := src.read(block):
            if data != zero[: len(data)]:
                dst.seek(offset + pos)
                dst.write(data)
            pos += len(data)


def partition_table(disk: Path, size: int, label: str, parts: list[tuple[int, int, str]]) -> Path:
    """A sparse disk of ``size`` bytes with a ``gpt`` or ``dos`` table of (start MiB, size MiB, type) partitions."""
    if disk.exists():
        disk.unlink()
    with open(disk, "wb") as f:
        f.truncate(size)
    script = f"label: {label}\n" + "".join(
        f"start={start * 2048}, size={length * 2048}, type={ptype}\n" for start, length, ptype in parts
    )
    subprocess.run(["sfdisk", "-q", str(disk)], input=script.encode(), check=True, capture_output=True)
    return disk


def blank(path: Path, size: int) -> Path:
    if path.exists():
        path.unlink()
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def ext4_file(path: Path, size: int, tree: Path) -> Path:
    blank(path, size)
    _run("mkfs.ext4", "-q", "-F", "-I", "256", "-d", str(tree), str(path))
    return path


def fat32_file(path: Path, size: int, tree: Path) -> Path:
    """FAT32 filled with mtools (no mount): regular files and folders only."""
    blank(path, size)
    _run("mkfs.vfat", "-F", "32", "-n", "VBFSTEST", str(path))
    items = [str(p) for p in sorted(tree.iterdir())]
    if items:
        _run("mcopy", "-s", "-p", "-m", "-i", str(path), *items, "::/")
    return path


class LoopDevice:
    """``losetup`` a file (root only) and detach it on exit."""

    def __init__(self, path: Path, offset: int = 0, size: int | None = None):
        args = ["losetup", "--find", "--show", "-o", str(offset)]
        if size is not None:
            args += ["--sizelimit", str(size)]
        self.dev = subprocess.run([*args, str(path)], check=True, capture_output=True, text=True).stdout.strip()

    def __enter__(self) -> str:
        return self.dev

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["losetup", "-d", self.dev], check=False, capture_output=True)


def _mounted_copy(dev_or_file: str, fstype: str, tree: Path, workdir: Path) -> None:
    mnt = workdir / f"mnt-{os.getpid()}"
    mnt.mkdir(exist_ok=True)
    if fstype == "ntfs":
        subprocess.run(["ntfs-3g", dev_or_file, str(mnt)], check=True, capture_output=True)
    else:
        subprocess.run(["mount", "-t", fstype, dev_or_file, str(mnt)], check=True, capture_output=True)
    try:
        if fstype == "ntfs":
            _run("cp", "-r", "--preserve=timestamps", f"{tree}/.", str(mnt))
        else:
            _run("cp", "-a", f"{tree}/.", str(mnt))
    finally:
        umount = ["fusermount3", "-u"] if fstype == "ntfs" else ["umount"]
        subprocess.run([*umount, str(mnt)], check=True, capture_output=True)
        mnt.rmdir()


def xfs_file(path: Path, size: int, tree: Path, workdir: Path) -> Path:
    """XFS (at least 300 MiB) populated through a loop mount: needs root and a kernel that mounts XFS."""
    blank(path, size)
    _run("mkfs.xfs", "-q", "-f", str(path))
    with LoopDevice(path) as dev:
        _mounted_copy(dev, "xfs", tree, workdir)
    return path


def ntfs_file(path: Path, size: int, tree: Path, workdir: Path, start_sector: int = 2048) -> Path:
    """NTFS made by mkntfs and filled through ntfs-3g (a FUSE mount of the file): regular files and folders."""
    blank(path, size)
    _run(
        "mkntfs",
        "-q",
        "-F",
        "-Q",
        "-s",
        "512",
        "-p",
        str(start_sector),
        "-H",
        "255",
        "-S",
        "63",
        "-L",
        "VBFSTEST",
        str(path),
    )
    _mounted_copy(str(path), "ntfs", tree, workdir)
    return path


LVM_CONFIG = (
    'devices { filter = [ "a|.*|" ] obtain_device_list_from_udev = 0 use_devicesfile = 0 } '
    "activation { udev_sync = 0 udev_rules = 0 } global { activation = 0 }"
)


def lvm_ext4_file(path: Path, size: int, vg: str, lv: str, lv_mib: int, tree: Path) -> Path:
    """An LVM2 physical volume holding volume group ``vg`` with logical volume ``lv`` carrying ext4.

    No device-mapper is needed: the metadata is written with the LVM tools on a loop device (activation off) and
    the filesystem is written straight into the volume's extents.
    """
    blank(path, size)
    cfg = ["--config", LVM_CONFIG]
    with LoopDevice(path) as dev:
        _run("pvcreate", *cfg, "-q", "-ff", "-y", dev)
        _run("vgcreate", *cfg, "-q", vg, dev)
        _run("lvcreate", *cfg, "-q", "-an", "-Zn", "-L", f"{lv_mib}m", "-n", lv, vg)

        def report(tool: str, field: str, what: str) -> str:
            args = [tool, *cfg, "--noheadings", "--units", "b", "--nosuffix", "-o", field, what]
            return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()

        pe_start = report("pvs", "pe_start", dev)
        extent = report("vgs", "vg_extent_size", vg)
        ranges = report("lvs", "seg_pe_ranges", f"{vg}/{lv}")
        # the volume group must not outlive the test: remove it from the tools' view, keep the bytes
        subprocess.run(["vgchange", *cfg, "-q", "-an", vg], capture_output=True)
    first_pe = int(ranges.split(":")[1].split("-")[0])
    offset = int(float(pe_start)) + first_pe * int(float(extent))
    _run(
        "mkfs.ext4", "-q", "-F", "-I", "256", "-E", f"offset={offset}", "-d", str(tree), str(path), f"{lv_mib * 1024}k"
    )
    return path
