"""vbfs's NBD client against a real NBD server: qemu-nbd exporting a qcow2 image with a persistent dirty bitmap."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vbfs_libvirt.nbd import BASE_ALLOCATION, STATE_DIRTY, STATE_ZERO, NbdClient, NbdError

from tests.conftest import MiB

pytestmark = pytest.mark.skipif(not shutil.which("qemu-nbd"), reason="qemu-nbd comes with qemu-utils")


def _qemu_io(image: Path, *commands: str) -> None:
    argv = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        argv += ["-c", c]
    subprocess.run([*argv, str(image)], check=True, capture_output=True)


@pytest.fixture
def export(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A 64 MiB qcow2: data at 1 MiB, then bitmap b0, then data at 8 MiB and zeroes at 16 MiB; served by qemu-nbd."""
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    _qemu_io(image, "write -P 0xab 1M 64k")
    subprocess.run(["qemu-img", "bitmap", "--add", str(image), "b0"], check=True)
    _qemu_io(image, "write -P 0xcd 8M 128k", "write -z 16M 1M")
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen(["qemu-nbd", "-r", "-f", "qcow2", "-B", "b0", "-x", "disk", "-k", str(sock), str(image)])
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        yield image, sock
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_block_status_of_allocation_and_dirty_bitmap(export: tuple[Path, Path]) -> None:
    _, sock = export
    with NbdClient("disk", unix_path=str(sock), meta_contexts=[BASE_ALLOCATION, "qemu:dirty-bitmap:b0"]) as c:
        assert c.size == 64 * MiB
        data = [(e.offset, e.length) for e in c.block_status(BASE_ALLOCATION) if not e.flags & STATE_ZERO]
        assert data == [(1 * MiB, 64 * 1024), (8 * MiB, 128 * 1024)]
        dirty = [(e.offset, e.length) for e in c.block_status("qemu:dirty-bitmap:b0") if e.flags & STATE_DIRTY]
        assert dirty == [(8 * MiB, 128 * 1024), (16 * MiB, 1 * MiB)], "writes after the bitmap, zero writes too"
        # a window in the middle, and extents that cover it exactly
        part = list(c.block_status(BASE_ALLOCATION, 1 * MiB + 4096, 8 * MiB))
        assert part[0].offset == 1 * MiB + 4096 and sum(e.length for e in part) == 8 * MiB


def test_pipelined_reads_with_holes_and_large_requests(export: tuple[Path, Path]) -> None:
    image, sock = export
    flat = image.parent / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(image), str(flat)], check=True)
    raw = flat.read_bytes()
    assert len(raw) == 64 * MiB
    ranges = [(1 * MiB - 10, 20), (8 * MiB, 128 * 1024), (0, 4096), (2 * MiB, 33 * MiB), (64 * MiB - 512, 512)]
    with NbdClient("disk", unix_path=str(sock), window=3) as c:
        got = list(c.read_ranges(ranges))
    assert [len(g) for g in got] == [n for _, n in ranges]
    for (offset, n), data in zip(ranges, got, strict=True):
        assert data == raw[offset : offset + n], f"bytes at {offset}"


def test_refusals_are_clear_errors(export: tuple[Path, Path]) -> None:
    _, sock = export
    with pytest.raises(NbdError, match="refused export 'nosuch'"):
        NbdClient("nosuch", unix_path=str(sock))
    with pytest.raises(NbdError, match="no metadata context 'qemu:dirty-bitmap:nosuch'"):
        NbdClient("disk", unix_path=str(sock), meta_contexts=["qemu:dirty-bitmap:nosuch"])
    with NbdClient("disk", unix_path=str(sock)) as c:
        with pytest.raises(NbdError, match="outside the export"):
            c.read(64 * MiB - 10, 20)
        with pytest.raises(NbdError, match="was not negotiated"):
            list(c.block_status(BASE_ALLOCATION))
        assert c.read(1 * MiB, 4) == b"\xab" * 4, "the connection still works after a refused request"
    with pytest.raises(NbdError, match=r"No such file|closed"):
        NbdClient("disk", unix_path=str(sock.parent / "nothing.sock"))
