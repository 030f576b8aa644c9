"""Damaged chunks are found and named; restores refuse to write wrong data; the catalog is only an index."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import MiB, Vbfs, copy_sparse, sha256


def _largest_chunk(repo: Path) -> Path:
    return max((repo / "chunks").glob("*/*"), key=lambda p: p.stat().st_size)


def test_flipped_byte_is_found_and_restore_refuses(vbfs: Vbfs, template_image: Path, tmp_path: Path) -> None:
    image = copy_sparse(template_image, tmp_path / "web01.raw")
    snap = json.loads(vbfs("backup", f"image://{image}", "--json").stdout)
    assert vbfs("check", "--verify-data").returncode == 0

    victim = _largest_chunk(vbfs.repo)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))

    # a structural check does not read chunk contents; verify-data does
    assert vbfs("check").returncode == 0
    bad = vbfs("check", "--verify-data", check=False)
    assert bad.returncode == 3
    damaged = [line for line in bad.stderr.splitlines() if "damaged" in line]
    assert damaged, bad.stderr
    assert f"web01@{snap['name']}" in damaged[0] and "disk web01 offset" in damaged[0]
    offset = int(damaged[0].split("offset ")[1].split(":")[0])
    assert offset % MiB == 0

    target = tmp_path / "restored.img"
    failed = vbfs("restore", "web01@latest:/disks/web01.img", str(target), check=False)
    assert failed.returncode != 0
    assert failed.stderr.startswith("vbfs: error:") and "damaged" in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1 and "Traceback" not in failed.stderr
    assert not target.exists() and not list(tmp_path.glob(".restored.img*")), "no partial file is left"


def test_missing_chunk_is_found(vbfs: Vbfs, template_image: Path, tmp_path: Path) -> None:
    image = copy_sparse(template_image, tmp_path / "web01.raw")
    vbfs("backup", f"image://{image}")
    _largest_chunk(vbfs.repo).unlink()
    bad = vbfs("check", "--json", check=False)
    assert bad.returncode == 3
    assert any("missing" in e for e in json.loads(bad.stdout)["errors"])


def test_catalog_rebuild_gives_the_same_listing(vbfs: Vbfs, template_image: Path, tmp_path: Path) -> None:
    for name in ("web01", "web02"):
        image = copy_sparse(template_image, tmp_path / f"{name}.raw")
        vbfs("backup", f"image://{image}")
        vbfs("backup", f"image://{image}")
    before = vbfs("snapshots", "--json").stdout
    assert len(json.loads(before)) == 4
    (vbfs.repo / "catalog.sqlite").unlink()
    for extra in ("-wal", "-shm"):
        (vbfs.repo / f"catalog.sqlite{extra}").unlink(missing_ok=True)
    assert "4 snapshot(s)" in vbfs("catalog", "rebuild").stdout
    assert vbfs("snapshots", "--json").stdout == before
    # a lost catalog is also recreated on its own the next time the repository is read
    (vbfs.repo / "catalog.sqlite").unlink()
    assert vbfs("snapshots", "--json").stdout == before


def test_restore_after_catalog_loss(vbfs: Vbfs, template_image: Path, tmp_path: Path) -> None:
    image = copy_sparse(template_image, tmp_path / "web01.raw")
    vbfs("backup", f"image://{image}")
    (vbfs.repo / "catalog.sqlite").unlink()
    vbfs("restore", "web01@latest:/disks/web01.img", str(tmp_path / "out.img"))
    assert sha256(tmp_path / "out.img") == sha256(image)
