"""Backup and restore of disk image files through the real CLI: byte-identical, sparse, deduplicated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import MiB, Vbfs, copy_sparse, sha256
from vbfs.testing.images import convert


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vhdx", "vmdk", "vhd"])
def test_restore_is_byte_identical_and_sparse(vbfs: Vbfs, template_image: Path, tmp_path: Path, fmt: str) -> None:
    image = tmp_path / f"web01.{fmt}"
    if fmt == "raw":
        copy_sparse(template_image, image)
    else:
        # VHDX allocates in blocks (qemu picks 8 MiB here); 1 MiB blocks make "unallocated is not read" visible.
        # VHD sizes are rounded to a CHS geometry unless force_size keeps the raw size.
        options = {"vhdx": "block_size=1048576", "vhd": "force_size=on"}.get(fmt, "")
        convert(template_image, fmt, image, options)
    out = json.loads(vbfs("backup", f"image://{image}", "--json").stdout)
    assert out["guest"] == "web01"
    assert out["stats"]["read_bytes"] < 32 * MiB, "unallocated space must not be read"
    target = tmp_path / "restored.img"
    vbfs("restore", "web01@latest:/disks/web01.img", str(target))
    assert target.stat().st_size == template_image.stat().st_size
    assert sha256(target) == sha256(template_image)
    assert allocated(target) < 24 * MiB, "the restored disk must be sparse"


def test_second_backup_stores_almost_nothing(vbfs: Vbfs, template_image: Path, tmp_path: Path) -> None:
    image = tmp_path / "web01.raw"
    copy_sparse(template_image, image)
    first = json.loads(vbfs("backup", f"image://{image}", "--json").stdout)["stats"]
    second = json.loads(vbfs("backup", f"image://{image}", "--json").stdout)["stats"]
    assert first["new_bytes"] > 8 * MiB
    assert second["new_bytes"] == 0
    assert second["stored_bytes"] < 64 * 1024  # only the (shared) chunk list and manifest
    assert second["dedup_bytes"] == first["new_bytes"]


def test_two_guests_from_one_template_share_chunks(vbfs: Vbfs, template_image: Path, tmp_path: Path) -> None:
    imgs = []
    for n, name in enumerate(("web01", "web02")):
        img = copy_sparse(template_image, tmp_path / f"{name}.raw")
        with open(img, "r+b") as f:  # each clone then changes a little: its own hostname block, say
            f.seek(20 * MiB + n * 4096)
            f.write(name.encode() * 100)
        imgs.append(img)
    a = json.loads(vbfs("backup", f"image://{imgs[0]}", "--json").stdout)["stats"]
    b = json.loads(vbfs("backup", f"image://{imgs[1]}", "--json").stdout)["stats"]
    assert a["new_bytes"] > 8 * MiB
    assert b["new_bytes"] <= MiB, "only the chunk the clone changed is new"
    assert b["dedup_bytes"] >= a["new_bytes"] - MiB
    listed = json.loads(vbfs("snapshots", "--json").stdout)
    assert sorted(s["guest"] for s in listed) == ["web01", "web02"]


def test_restore_of_vm_json_and_listing(vbfs: Vbfs, template_image: Path, tmp_path: Path) -> None:
    image = tmp_path / "db01.qcow2"
    convert(template_image, "qcow2", image)
    vbfs("backup", f"image://{image}")
    names = [e["name"] for e in json.loads(vbfs("ls", "db01@latest", "--json").stdout)]
    assert names == ["vm.json", "disks", "files"]
    vbfs("restore", "db01@latest:/vm.json", str(tmp_path))
    meta = json.loads((tmp_path / "vm.json").read_text())
    assert meta["metadata"]["image"]["format"] == "qcow2"
    assert meta["consistency"] == "crash-consistent"


def test_snapshot_specs(vbfs: Vbfs, template_image: Path, tmp_path: Path) -> None:
    image = tmp_path / "web01.raw"
    copy_sparse(template_image, image)
    first = json.loads(vbfs("backup", f"image://{image}", "--json").stdout)
    with open(image, "r+b") as f:
        f.seek(40 * MiB)
        f.write(b"changed" * 1000)
    second = json.loads(vbfs("backup", f"image://{image}", "--json").stdout)
    for spec, want in (
        (f"web01@{first['id'][:8]}", first),
        (f"web01@{first['name']}", first),
        ("web01@latest", second),
        (f"web01@{second['time']}", second),
    ):
        target = tmp_path / "out.img"
        target.unlink(missing_ok=True)
        vbfs("restore", f"{spec}:/disks/web01.img", str(target))
        data = target.read_bytes()[40 * MiB : 40 * MiB + 7]
        assert (data == b"changed") == (want is second), spec
    bad = vbfs("restore", "web01@1999-01-01:/disks/web01.img", str(tmp_path / "x"), check=False)
    assert bad.returncode != 0 and "no snapshot at or before" in bad.stderr
