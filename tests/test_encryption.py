"""Encrypted repositories: a wrong passphrase reads nothing and no stored object holds plaintext."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tests.conftest import MiB, Vbfs, random_bytes, sha256

MARKER = b"VBFS-PLAINTEXT-MARKER-0123456789"


def _image_with_marker(path: Path) -> Path:
    # Random bytes do not compress, so an unencrypted repository stores them (and the marker) as they are.
    block = bytearray(random_bytes(4 * MiB, 42))
    for off in range(0, len(block), 256 * 1024):
        block[off : off + len(MARKER)] = MARKER
    with open(path, "wb") as f:
        f.truncate(16 * MiB)
        f.seek(4 * MiB)
        f.write(block)
    return path


def _files_containing(repo: Path, needle: bytes) -> list[Path]:
    return [p for p in repo.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_encrypted_chunks_hold_no_plaintext(make_vbfs: Callable[..., Vbfs], tmp_path: Path) -> None:
    image = _image_with_marker(tmp_path / "secretguest.raw")
    plain = make_vbfs(tmp_path / "plain")
    plain.init("none")
    plain("backup", f"image://{image}")
    assert _files_containing(plain.repo / "chunks", MARKER), "control: a plaintext repository shows the marker"

    enc = make_vbfs(tmp_path / "enc", passphrase="s3cret passphrase")
    enc.init("repokey")
    enc("backup", f"image://{image}")
    assert not _files_containing(enc.repo, MARKER)
    assert not _files_containing(enc.repo, b"secretguest"), "guest names are not stored in plaintext either"
    assert not (enc.repo / "catalog.sqlite").exists(), "the catalog of an encrypted repository lives outside it"
    enc("restore", "secretguest@latest:/disks/secretguest.img", str(tmp_path / "out.img"))
    assert sha256(tmp_path / "out.img") == sha256(image)


def test_wrong_passphrase_is_refused(make_vbfs: Callable[..., Vbfs], tmp_path: Path) -> None:
    image = _image_with_marker(tmp_path / "g.raw")
    enc = make_vbfs(tmp_path / "enc", passphrase="right one")
    enc.init("repokey")
    enc("backup", f"image://{image}")
    wrong = make_vbfs(tmp_path / "enc", passphrase="wrong one")
    for args in (("snapshots",), ("restore", "g@latest:/disks/g.img", str(tmp_path / "x.img")), ("check",)):
        proc = wrong(*args, check=False)
        assert proc.returncode == 2
        assert proc.stderr.strip() == "vbfs: error: wrong passphrase for this repository"
    assert not (tmp_path / "x.img").exists()


def test_same_data_gets_different_names_in_different_repositories(
    make_vbfs: Callable[..., Vbfs], tmp_path: Path
) -> None:
    image = _image_with_marker(tmp_path / "g.raw")
    names = []
    for n in range(2):
        r = make_vbfs(tmp_path / f"enc{n}")
        r.init("repokey")
        r("backup", f"image://{image}")
        names.append({p.name for p in (r.repo / "chunks").glob("*/*")})
    assert not names[0] & names[1], "chunk ids are keyed per repository"
    assert json.loads((tmp_path / "enc0" / "config").read_text())["encryption"] == "repokey"
