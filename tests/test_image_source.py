"""The image source on what real hosts hold: truncated images, qcow2 backing chains, block devices."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import MiB, Vbfs, copy_sparse, sha256
from tests.test_errors import one_line_error
from vbfs.testing.images import convert

FORMATS = {"qcow2": "", "vmdk": "", "vhd": "force_size=on", "vhdx": "block_size=1048576"}


def no_snapshot_stored(vbfs: Vbfs) -> None:
    assert json.loads(vbfs("snapshots", "--json").stdout) == []
    assert not [p for p in (vbfs.repo / "snapshots").rglob("*") if p.is_file()], "no manifest may land"
    assert json.loads(vbfs("check", "--json").stdout)["ok"]


@pytest.mark.parametrize("cut", ["half", "header"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_truncated_image_fails_in_one_line(
    vbfs: Vbfs, template_image: Path, tmp_path: Path, fmt: str, cut: str
) -> None:
    made = convert(template_image, fmt, tmp_path / f"made.{fmt}", FORMATS[fmt])
    # copied as images are (cp, rsync -S): zero blocks become holes, which qemu reports as zeros past the cut too
    image = copy_sparse(made, tmp_path / f"web01.{fmt}")
    size = image.stat().st_size
    with open(image, "r+b") as f:
        # half: the clusters of the second half are gone, cut at a cluster boundary (a qcow2 cut so was backed up
        # as zeros); header: only the first 4 KiB are left, the tables after it are gone
        f.truncate(size // 2 // (64 * 1024) * (64 * 1024) if cut == "half" else 4096)
    one_line_error(vbfs("backup", f"image://{image}", check=False), str(image), "truncated")
    no_snapshot_stored(vbfs)


def qemu_raw(image: Path, out: Path) -> Path:
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(out)], check=True, capture_output=True)
    return out


def qemu_write(image: Path, pattern: int, offset: int, length: int) -> None:
    cmd = f"write -P {pattern:#x} {offset} {length}"
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmd, str(image)], check=True, capture_output=True)


def overlay(image: Path, backing: str, backing_format: str, size: int | None = None, unsafe: bool = False) -> Path:
    args = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", backing_format, *(["-u"] if unsafe else [])]
    subprocess.run([*args, str(image), *([str(size)] if size else [])], check=True, capture_output=True)
    return image


def backup_and_compare(vbfs: Vbfs, image: Path, tmp_path: Path) -> dict[str, object]:
    out = json.loads(vbfs("backup", f"image://{image}", "--guest", "web01", "--json").stdout)
    target = tmp_path / f"restored-{image.stem}.img"
    vbfs("restore", f"web01@latest:/disks/{image.stem}.img", str(target))
    want = qemu_raw(image, tmp_path / f"want-{image.stem}.raw")
    assert target.stat().st_size == want.stat().st_size
    assert sha256(target) == sha256(want), "the overlay's contents through its chain"
    return out


def test_overlay_with_absolute_backing_path(vbfs: Vbfs, template_image: Path, tmp_path: Path) -> None:
    """libvirt writes absolute backing paths; a chain of two: overlay -> qcow2 base named by its absolute path."""
    (tmp_path / "pool").mkdir()
    base = convert(template_image, "qcow2", tmp_path / "pool" / "base.qcow2")
    top = overlay(tmp_path / "web01-top.qcow2", str(base.resolve()), "qcow2")
    qemu_write(top, 0x5A, 20 * MiB, 3 * MiB)  # over some of the base's files
    qemu_write(top, 0x6B, 50 * MiB, 64 * 1024)  # where the base has nothing
    out = backup_and_compare(vbfs, top, tmp_path)
    stats = out["stats"]
    assert isinstance(stats, dict)
    assert stats["read_bytes"] < 24 * MiB, "only what the chain allocates is read"
    vbfs("restore", "web01@latest:/vm.json", str(tmp_path))
    chain = json.loads((tmp_path / "vm.json").read_text())["metadata"]["image"]["backing_chain"]
    assert chain == [str(base.resolve())]
    assert f"{top} is read through its backing files {base.resolve()}" in out["notes"]


def test_overlay_chain_with_relative_paths_and_smaller_raw_base(
    vbfs: Vbfs, template_image: Path, tmp_path: Path
) -> None:
    """top -> mid (relative name) -> ../base.raw (relative to mid's folder, half the size of the overlay)."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    base = copy_sparse(template_image, tmp_path / "a" / "base.raw")
    os.truncate(base, 32 * MiB)  # past its end the chain reads zeros
    mid = overlay(tmp_path / "a" / "b" / "mid.qcow2", "../base.raw", "raw", 64 * MiB)
    qemu_write(mid, 0x11, 30 * MiB, 4 * MiB)  # across the end of the base
    top = overlay(tmp_path / "a" / "b" / "web01.qcow2", "mid.qcow2", "qcow2")
    qemu_write(top, 0x22, 31 * MiB, 64 * 1024)
    backup_and_compare(vbfs, top, tmp_path)


def test_missing_backing_file_is_one_line(vbfs: Vbfs, template_image: Path, tmp_path: Path) -> None:
    base = convert(template_image, "qcow2", tmp_path / "base.qcow2")
    top = overlay(tmp_path / "web01.qcow2", str(base), "qcow2")
    base.unlink()
    one_line_error(vbfs("backup", f"image://{top}", check=False), "backing file", str(base), "missing")
    no_snapshot_stored(vbfs)


def test_backing_chain_loop_is_one_line(vbfs: Vbfs, tmp_path: Path) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    overlay(b, "a.qcow2", "qcow2", 64 * MiB, unsafe=True)  # a.qcow2 does not exist yet
    overlay(a, "b.qcow2", "qcow2", 64 * MiB, unsafe=True)
    one_line_error(vbfs("backup", f"image://{a}", check=False), "backing chain loops")
    no_snapshot_stored(vbfs)


def test_truncated_backing_file_fails(vbfs: Vbfs, template_image: Path, tmp_path: Path) -> None:
    base = convert(template_image, "qcow2", tmp_path / "base.qcow2")
    top = overlay(tmp_path / "web01.qcow2", str(base), "qcow2")
    os.truncate(base, base.stat().st_size // 2)
    one_line_error(vbfs("backup", f"image://{top}", check=False), "truncated or damaged", "backing file")
    no_snapshot_stored(vbfs)


@pytest.mark.skipif(os.geteuid() != 0, reason="loop devices need root")
def test_block_device(vbfs: Vbfs, template_image: Path, tmp_path: Path) -> None:
    image = copy_sparse(template_image, tmp_path / "disk.raw")
    dev = subprocess.run(
        ["losetup", "--find", "--show", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        out = json.loads(vbfs("backup", f"image://{dev}", "--guest", "web01", "--json").stdout)
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)
    disk = Path(dev).name
    assert out["stats"]["read_bytes"] == 64 * MiB, "a device is read whole"
    assert out["stats"]["zero_bytes"] >= 40 * MiB, "its all-zero chunks are not stored"
    target = tmp_path / "restored.img"
    vbfs("restore", f"web01@latest:/disks/{disk}.img", str(target))
    assert sha256(target) == sha256(template_image)
    names = [e["name"] for e in json.loads(vbfs("ls", "web01@latest:/files", "--json").stdout)]
    assert names, "the guest's files are indexed as for an image file"
