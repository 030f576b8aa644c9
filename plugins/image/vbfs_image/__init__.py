"""The ``image`` source: backs up disk image files as a guest with one disk.

``image:///var/lib/images/web01.qcow2`` is a guest ``web01`` with one disk ``web01`` (``disks/web01.img`` in the
tree). Formats: raw (sparse-aware: only the extents that SEEK_DATA/SEEK_HOLE report are read), qcow2, VMDK, VHD and
VHDX. The virtual contents of the non-raw formats are read in user space by dissect.hypervisor. Allocation maps:
VHDX from its block allocation table (through dissect); qcow2, VMDK and VHD from ``qemu-img map`` when qemu-utils
is installed. Without a map every block is read and all-zero chunks are dropped by the engine, which gives the
same backup more slowly.

A qcow2 overlay is read through its backing chain (qcow2 or raw backing files, named by absolute paths as libvirt
writes them or relative to the overlay's folder), at most ``MAX_CHAIN`` images deep and never in a loop; the chain
is listed in the snapshot's metadata. A block device (``image:///dev/vg/lv``, ``/dev/loop0``) is a raw disk of the
device's size, read whole (a device has no holes to skip; the engine drops its all-zero chunks).

A damaged image never becomes a backup of zeros: a host offset of the allocation map (or of the VHDX block table)
past the end of the file, a VHD without its footer at the end, a table that runs past the end or a short read
all fail the backup with one line that says the image is truncated or damaged.

Image files have no change tracking, so :meth:`ImageSnapshot.changed_extents` always answers "unknown" and every
backup reads the whole image and deduplicates by hash. The "snapshot" is the file as it is when read: back up
images of running guests through their hypervisor's plugin instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
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
MAX_CHAIN = 16  # images in a backing chain, the overlay included
MB = 1024 * 1024


def file_size(path: Path) -> int:
    """Bytes in a file or block device (``st_size`` is 0 for a device; the end of either is where a seek stops)."""
    with open(path, "rb") as f:
        return f.seek(0, os.SEEK_END)


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


def _qemu_img_map(path: Path, fmt: str, size: int, layers: list[tuple[Path, int]] | None) -> list[Extent] | None:
    """The extents that hold data, through the backing chain, from ``qemu-img map``.

    ``layers`` (each file of the chain, the overlay first, with its size) checks each host offset: qemu reads past
    the end of a truncated file as zeros, so an offset beyond its file means lost data, not a zero block.
    """
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
        depth = int(e.get("depth", 0))
        if layers is not None and "offset" in e and depth < len(layers):
            end = int(e["offset"]) + int(e["length"])
            layer, layer_size = layers[depth]
            if end > layer_size:
                where = "" if depth == 0 else f"backing file {layer}: "
                raise SourceError(
                    f"{path}: image is truncated or damaged ({where}data is mapped up to byte {end} of a "
                    f"{layer_size}-byte file)"
                )
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
        self._files: list[BinaryIO] = []  # every file of the image (a chain has several), closed in close()
        self._stream: Any = None
        self._fd = -1
        self.block_device = False
        self.chain: list[Path] = [path]  # the overlay, then its backing files
        self.layers: list[tuple[Path, int]] = []  # the files that hold the chain's data, with their sizes
        try:
            if self.format == "raw":
                self._fd = os.open(path, os.O_RDONLY)
                self.block_device = stat.S_ISBLK(os.fstat(self._fd).st_mode)
                self.size = os.lseek(self._fd, 0, os.SEEK_END)
                self.file_size = self.size
                with contextlib.suppress(OSError):  # a larger readahead window for the sequential read
                    os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                if self.size == 0 or self.size % SECTOR:
                    what = "device" if self.block_device else "file"
                    raise SourceError(
                        f"{path}: not a disk image (raw images are a whole number of 512-byte sectors, "
                        f"this {what} has {self.size} bytes)"
                    )
            else:
                self.file_size = file_size(path)
                self.block_device = path.is_block_device()
                self._check_footer()
                self._stream = self._open_dissect()
                self.size = int(self._stream.size)
        except SourceError:
            self.close()
            raise
        except Exception as exc:  # dissect raises a zoo of errors on damaged headers
            self.close()
            if isinstance(exc, EOFError):
                raise SourceError(
                    f"{path}: damaged or unsupported {self.format} image (truncated: its tables run past the end "
                    f"of the {self.file_size}-byte file)"
                ) from None
            why = str(exc) or type(exc).__name__
            raise SourceError(f"{path}: damaged or unsupported {self.format} image ({why})") from None

    def _check_footer(self) -> None:
        """A VHD ends with its footer (a dynamic one also starts with a copy): without it the end was cut off."""
        if self.format != "vhd":
            return
        with open(self.path, "rb") as f:
            f.seek(max(0, self.file_size - SECTOR))
            if f.read(8) != b"conectix":
                raise SourceError(f"{self.path}: image is truncated or damaged (no VHD footer at its end)")

    def _open(self, path: Path) -> BinaryIO:
        fh = open(path, "rb")  # noqa: SIM115 - kept open for the snapshot's lifetime, closed in close()
        self._files.append(fh)
        return fh

    def _open_dissect(self) -> Any:
        from dissect.hypervisor.disk import vhd, vhdx, vmdk

        if self.format == "qcow2":
            return self._open_qcow2(self.path)
        if self.format == "vhdx":
            return vhdx.VHDX(self.path)
        if self.format == "vmdk":
            return vmdk.VMDK(self.path)
        return vhd.VHD(self._open(self.path))

    def _open_qcow2(self, path: Path) -> Any:
        """A qcow2 image and, below it, its backing chain: qcow2 or raw files by absolute or relative names."""
        from dissect.hypervisor.disk import qcow2

        # dissect is given open files, not paths: it looks for backing and data files only beside the image.
        image = qcow2.QCow2(self._open(path), allow_no_backing_file=True, allow_no_data_file=True)
        layer = path
        if image.needs_data_file:
            layer = self._linked_file(path, image.image_data_file or "", "data file")
            image.data_file = self._open(layer)
        self.layers.append((layer, file_size(layer)))
        if image.needs_backing_file:
            backing = self._linked_file(path, image.auto_backing_file or "", "backing file")
            if len(self.chain) >= MAX_CHAIN:
                raise SourceError(f"{self.path}: the backing chain is longer than {MAX_CHAIN} images")
            if any(os.path.samefile(backing, p) for p in self.chain):
                raise SourceError(f"{self.path}: the backing chain loops back to {backing}")
            self.chain.append(backing)
            fmt = (image.backing_format or "").lower() or detect_format(backing)
            if fmt == "qcow2":
                below = self._open_qcow2(backing)
                below_size = int(below.size)
            elif fmt == "raw":
                below, below_size = self._open(backing), file_size(backing)
                self.layers.append((backing, below_size))
            else:
                raise SourceError(
                    f"{self.path}: backing file {backing} is a {fmt} image (qcow2 and raw backing files are read)"
                )
            image.backing_file = _ZerosPastEnd(below, below_size)
        return image.open()

    def _linked_file(self, image: Path, name: str, what: str) -> Path:
        """A file that a qcow2 image names: an absolute path, or a path relative to the image's folder."""
        if not name:
            raise SourceError(f"{self.path}: image is damaged (its {what} name is empty)")
        found = Path(name) if os.path.isabs(name) else image.parent / name
        if not found.exists():
            where = "" if os.path.isabs(name) else f", looked for {found}"
            of = "" if image == self.path else f" of {image}"
            raise SourceError(f"{self.path}: {what} {name}{of} is missing{where}")
        return found

    def allocated_extents(self) -> list[Extent] | None:
        if self.block_device and self.format == "raw":
            return None  # a device has no holes: read all of it, the engine drops all-zero chunks
        if self.format == "raw":
            return _data_extents_raw(self._fd, self.size)
        if self.format == "vhdx":
            return self._vhdx_extents()
        # offsets of a VMDK made of a descriptor and extent files are in those files: only check single files
        single_file = self.format in ("qcow2", "vhd") or (self.format == "vmdk" and self._vmdk_is_sparse_file())
        layers = (self.layers or [(self.path, self.file_size)]) if single_file else None
        return _qemu_img_map(self.path, self.format, self.size, layers)

    def _vmdk_is_sparse_file(self) -> bool:
        with open(self.path, "rb") as f:
            return f.read(4) == b"KDMV"

    def _vhdx_extents(self) -> list[Extent] | None:
        """Payload blocks marked present in the VHDX block allocation table (qemu-img map cannot tell)."""
        vhdx = self._stream
        if vhdx.parent is not None:
            return None
        bs = int(vhdx.block_size)
        out: list[Extent] = []
        with self._lock:
            for block in range(-(-self.size // bs)):
                entry = vhdx.bat.pb(block)
                if entry.state in (VHDX_FULLY_PRESENT, VHDX_PARTIALLY_PRESENT):
                    start = block * bs
                    length = min(bs, self.size - start)
                    if entry.file_offset_mb * MB + length > self.file_size:
                        raise SourceError(
                            f"{self.path}: image is truncated or damaged (block {block} ends at byte "
                            f"{entry.file_offset_mb * MB + length} of a {self.file_size}-byte file)"
                        )
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
        for obj in (self._stream, *self._files):
            close = getattr(obj, "close", None)
            if close is not None:
                with suppress(Exception):
                    close()
        self._stream = None
        self._files = []


class _ZerosPastEnd:
    """A backing image as qemu reads it below an overlay: zeros past its end (an overlay may be the larger)."""

    def __init__(self, image: Any, size: int):
        self.image = image
        self.size = size
        self.pos = 0

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self.pos = offset if whence == os.SEEK_SET else self.pos + offset if whence == os.SEEK_CUR else self.size
        return self.pos

    def read(self, length: int = -1) -> bytes:
        if length < 0:
            length = max(0, self.size - self.pos)
        inside = max(0, min(length, self.size - self.pos))
        data = b""
        if inside:
            self.image.seek(self.pos)
            data = self.image.read(inside)
            if len(data) != inside:
                raise EOFError(f"short read in a backing file at offset {self.pos}")
        self.pos += length
        return data + bytes(length - len(data))


class ImageSnapshot:
    consistency = CRASH_CONSISTENT

    def __init__(self, image: ImageFile, disk_name: str, guest: str):
        self.image = image
        self.guest = guest
        self.disk = DiskInfo(disk_name, image.size, {"format": image.format, "path": str(image.path)})
        self.notes: list[str] = []
        if len(image.chain) > 1:  # the image names its backing files itself: say which host files were read
            self.notes.append(f"{image.path} is read through its backing files {', '.join(map(str, image.chain[1:]))}")

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
        image: dict[str, Any] = {
            "path": str(self.image.path),
            "format": self.image.format,
            "virtual_size": self.image.size,
            "file_size": self.image.file_size,
            "mtime": int(st.st_mtime),
        }
        if self.image.block_device:
            image["block_device"] = True
        if len(self.image.chain) > 1:
            image["backing_chain"] = [str(p) for p in self.image.chain[1:]]
        return {
            "hypervisor": "image",
            "image": image,
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
