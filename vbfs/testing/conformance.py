"""A conformance check for hypervisor plugins: run it against your plugin in your own tests.

``check_hypervisor(hv, guest)`` takes a snapshot and checks what the backup engine relies on: disks have unique,
usable names and a size; extents are sorted, inside the disk and non-overlapping; ``read`` gives exactly the
bytes asked for; reading the same range twice gives the same bytes; and the snapshot's context manager returns
normally. It raises ``AssertionError`` with a sentence on the first broken promise.
"""

from __future__ import annotations

from vbfs.engine.backup import check_name
from vbfs.sources import Extent, Hypervisor


def _check_extents(extents: list[Extent] | None, size: int, what: str) -> None:
    if extents is None:
        return
    end = 0
    for e in extents:
        assert e.length > 0, f"{what}: empty extent {e}"
        assert e.offset >= end, f"{what}: extents overlap or are not sorted at {e}"
        assert e.end <= size, f"{what}: extent {e} goes past the end of the disk ({size})"
        end = e.end


def check_hypervisor(hv: Hypervisor, guest: str, probe: int = 1024 * 1024) -> None:
    names = [g.name for g in hv.guests()]
    assert guest in names, f"guest {guest!r} is not in the plugin's guest list {names}"
    with hv.snapshot(guest) as snap:
        disks = snap.disks()
        assert disks, "the snapshot has no disks"
        seen = set()
        for d in disks:
            check_name("disk", d.name)
            assert d.name not in seen, f"two disks are named {d.name!r}"
            seen.add(d.name)
            assert d.size > 0, f"disk {d.name} has no size"
            _check_extents(snap.allocated_extents(d), d.size, f"disk {d.name} allocated extents")
            n = min(probe, d.size)
            first = snap.read(d, 0, n)
            assert len(first) == n, f"disk {d.name}: read(0, {n}) gave {len(first)} bytes"
            assert snap.read(d, 0, n) == first, f"disk {d.name}: two reads of the same range differ"
            tail = snap.read(d, d.size - 512, 512)
            assert len(tail) == 512, f"disk {d.name}: the last sector cannot be read"
        assert snap.consistency in ("crash-consistent", "filesystem-consistent", "application-consistent"), (
            f"unknown consistency {snap.consistency!r}"
        )
        assert isinstance(snap.metadata(), dict), "metadata() must be a dict"
        for fname, content in snap.config_files().items():
            check_name("config file", fname)
            assert isinstance(content, bytes), f"config file {fname} must be bytes"
