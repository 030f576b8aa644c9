"""The ``image`` source: backs up disk image files as a guest with one disk.

``image:///var/lib/images/web01.qcow2`` is a guest ``web01`` with one disk ``web01`` (``disks/web01.img`` in the
tree). Formats: raw (sparse-aware: only the extents that SEEK_DATA/SEEK_HOLE report are read), qcow2, VMDK, VHD and
VHDX. The virtual contents of the non-raw formats are read in user space by dissect.hypervisor. Allocation maps:
VHDX from its block allocation table (through dissect); qcow2, VMDK and VHD from ``qemu-img map`` when qemu-utils
is installed. Without a map every block is read and all-zero chunks are dropped by the engine, which gives the
same backup more slowly.

Image files have no change tracking, so :meth:`ImageSnapshot.changed_extents` always answers "unknown" and every
backup reads the whole image and deduplicates by hash. The "snapshot" is the file as it is when read: back up
images of running guests through their hypervisor's plugin instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from vbfs.errors import SourceError
from vbfs.plugins import Registry, hookimpl
from vbfs.sources import CRASH_CONSISTENT, ChangeToken, DiskInfo, Extent, GuestInfo, SourceURL

__version__ = "0.1.0"

SECTOR = 512
FORMATS = ("raw", "qcow2", "vmdk", "vhd", "vhdx")
VHDX_FULLY_PRESENT = 6
VHDX_PARTIALLY_PRESENT = 7


def detect_format(path: Path) -> str:
    """The image format by its magic bytes; ``raw`` when none matches."""
    with open(path, "rb") as f:
        head = f.read(512)
        if head[:4] == b"QFI\xfb":
            return "qcow2"
        if head[:8] == b"vhdxfile":
            return "vhdx"
        if head[:4] == b"KDMV" or head[:21] == b"# Disk DescriptorFile":
            return "vmdk"
        if head[:8] == b"conectix":
            return "vhd"
        size = f.seek(0, os.SEEK_END)
        if size >= 512:
            f.seek(size - 512)
            if f.read(8) == b"conectix":
                return "vhd"
    return "raw"


def _data_extents_raw(fd: int, size: int) -> list[Extent]:
    """Allocated extents of a sparse file through SEEK_DATA/SEEK_HOLE."""
    out: list[Extent] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append(Extent(start, min(end, size) - start))
        pos = end
    return out


def _qemu_img_map(path: Path, fmt: str, size: int) -> list[Extent] | None:
    exe = shutil.which("qemu-img")
    if exe is None:
        return None
    qfmt = {"vhd": "vpc"}.get(fmt, fmt)
    proc = subprocess.run([exe, "map", "--output=json", "-f", qfmt, str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        msg = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "qemu-img map failed"
        raise SourceError(f"{path}: not a readable {fmt} image ({msg.removeprefix('qemu-img: ')})")
    out: list[Extent] = []
    for e in json.loads(proc.stdout):
        if e.get("data") and not e.get("zero"):
            start, length = int(e["start"]), int(e["length"])
            if out and out[-1].end == start:
                out[-1] = Extent(out[-1].offset, out[-1].length + length)
            else:
                out.append(Extent(start, min(length, size - start)))
    return out


class ImageFile:
    """Random access to the virtual contents of one image file."""

    def __init__(self, path: Path):
        self.path = path
        self.format = detect_format(path)
        self._lock = threading.Lock()
        self._fh: BinaryIO | None = None
        self._stream: Any = None
        self._fd = -1
        try:
            if self.format == "raw":
                self._fd = os.open(path, os.O_RDONLY)
                self.size = os.fstat(self._fd).st_size
                with contextlib.suppress(OSError):  # a larger readahead window for the sequential read
                    os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                if self.size == 0 or self.size % SECTOR:
                    raise SourceError(
                        f"{path}: not a disk image (raw images are a whole number of 512-byte sectors, "
                        f"this file has {self.size} bytes)"
                    )
            else:
                self._stream = self._open_dissect()
                self.size = int(self._stream.size)
        except SourceError:
            self.close()
            raise
        except Exception as exc:  # dissect raises a zoo of errors on damaged headers
            self.close()
            why = str(exc) or type(exc).__name__
            raise SourceError(f"{path}: damaged or unsupported {self.format} image ({why})") from None

    def _open_dissect(self) -> Any:
        from dissect.hypervisor.disk import qcow2, vhd, vhdx, vmdk

        if self.format == "qcow2":
            return qcow2.QCow2(self.path).open()
        if self.format == "vhdx":
            return vhdx.VHDX(self.path)
        if self.format == "vmdk":
            return vmdk.VMDK(self.path)
        self._fh = open(self.path, "rb")  # noqa: SIM115 - kept open for the snapshot's lifetime, closed in close()
        return vhd.VHD(self._fh)

    def allocated_extents(self) -> list[Extent] | None:
        if self.format == "raw":
            return _data_extents_raw(self._fd, self.size)
        if self.format == "vhdx":
            return self._vhdx_extents()
        return _qemu_img_map(self.path, self.format, self.size)

    def _vhdx_extents(self) -> list[Extent] | None:
        """Payload blocks marked present in the VHDX block allocation table (qemu-img map cannot tell)."""
        vhdx = self._stream
        if vhdx.parent is not None:
            return None
        bs = int(vhdx.block_size)
        out: list[Extent] = []
        with self._lock:
            for block in range(-(-self.size // bs)):
                if vhdx.bat.pb(block).state in (VHDX_FULLY_PRESENT, VHDX_PARTIALLY_PRESENT):
                    start = block * bs
                    length = min(bs, self.size - start)
                    if out and out[-1].end == start:
                        out[-1] = Extent(out[-1].offset, out[-1].length + length)
                    else:
                        out.append(Extent(start, length))
        return out

    def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        try:
            if self.format == "raw":
                data = os.pread(self._fd, length, offset)
            else:
                with self._lock:
                    self._stream.seek(offset)
                    data = self._stream.read(length)
        except OSError as exc:
            raise SourceError(f"{self.path}: read error at offset {offset}: {exc.strerror or exc}") from None
        except Exception as exc:
            why = str(exc) or type(exc).__name__
            raise SourceError(f"{self.path}: damaged {self.format} image at offset {offset} ({why})") from None
        if len(data) != length:
            raise SourceError(
                f"{self.path}: image is truncated or damaged (short read at offset {offset}: "
                f"{len(data)} of {length} bytes)"
            )
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        for obj in (self._stream, self._fh):
            close = getattr(obj, "close", None)
            if close is not None:
                with suppress(Exception):
                    close()
        self._stream = self._fh = None


class ImageSnapshot:
    consistency = CRASH_CONSISTENT

    def __init__(self, image: ImageFile, disk_name: str, guest: str):
        self.image = image
        self.guest = guest
        self.disk = DiskInfo(disk_name, image.size, {"format": image.format, "path": str(image.path)})

    def disks(self) -> list[DiskInfo]:
        return [self.disk]

    def allocated_extents(self, disk: DiskInfo) -> list[Extent] | None:
        return self.image.allocated_extents()

    def changed_extents(self, disk: DiskInfo, since: ChangeToken) -> list[Extent] | None:
        return None  # image files carry no change tracking

    def read(self, disk: DiskInfo, offset: int, length: int) -> bytes:
        return self.image.read(offset, length)

    def change_token(self, disk: DiskInfo) -> ChangeToken | None:
        return None

    def metadata(self) -> dict[str, Any]:
        st = self.image.path.stat()
        return {
            "hypervisor": "image",
            "image": {
                "path": str(self.image.path),
                "format": self.image.format,
                "virtual_size": self.image.size,
                "file_size": st.st_size,
                "mtime": int(st.st_mtime),
            },
            "consistency_note": "the image file as found; it is consistent only if no running guest writes to it",
        }

    def config_files(self) -> dict[str, bytes]:
        return {}


class ImageHypervisor:
    """A "hypervisor" whose only guest is one image file."""

    scheme: ClassVar[str] = "image"

    def __init__(self, url: SourceURL, options: Mapping[str, Any]):
        if url.host:
            raise SourceError(f"image URLs name a local file: image:///path/to/disk.qcow2, not {url.raw}")
        self.path = Path(url.path)
        if not self.path.exists():
            raise SourceError(f"{self.path}: no such file")
        if not (self.path.is_file() or self.path.is_block_device()):
            raise SourceError(f"{self.path}: not a disk image (not a regular file or block device)")
        self.disk_name = self.path.stem or "disk"
        self.guest_name = str(options.get("guest") or self.disk_name)

    def guests(self) -> list[GuestInfo]:
        image = ImageFile(self.path)
        try:
            return [
                GuestInfo(
                    self.guest_name,
                    "image",
                    (DiskInfo(self.disk_name, image.size, {"format": image.format}),),
                )
            ]
        finally:
            image.close()

    def default_guest(self) -> str | None:
        return self.guest_name

    def remove_leftovers(self, guest: str) -> list[str]:
        return []

    @contextmanager
    def snapshot(self, guest: str, since: Mapping[str, ChangeToken] | None = None) -> Iterator[ImageSnapshot]:
        image = ImageFile(self.path)
        try:
            yield ImageSnapshot(image, self.disk_name, guest)
        finally:
            image.close()

    def close(self) -> None:
        pass


@hookimpl
def vbfs_register_hypervisors(registry: Registry) -> None:
    registry.add_hypervisor(ImageHypervisor.scheme, ImageHypervisor)
