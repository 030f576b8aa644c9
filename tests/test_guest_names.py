"""Names from the source in the repository, and who may read what vbfs writes.

Distinct guests are never kept as one (``latest`` of one is never another's), disk and config-file names that
are not plain are kept under a mapped name with a note instead of being refused, and the repository, catalog,
cache and mount log are private (0600 files, 0700 folders) unless ``--umask`` says otherwise.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import MiB, Mount, Vbfs, random_bytes, sha256


def small_disk(path: Path, seed: int) -> Path:
    path.write_bytes(random_bytes(MiB, seed))
    return path


def backup(vbfs: Vbfs, image: Path, guest: str) -> tuple[dict[str, object], str]:
    proc = vbfs("backup", f"image://{image}", "--guest", guest, "--json")
    return json.loads(proc.stdout), proc.stderr


def restore_disk(vbfs: Vbfs, guest: str, disk: str, target: Path) -> Path:
    vbfs("restore", f"{guest}@latest:/disks/{disk}.img", str(target))
    return target


@pytest.mark.parametrize(
    "names",
    [
        ["a/b", "a_b", "a\nb"],
        ["x" * 200 + "A" * 100, "x" * 200 + "B" * 100],
    ],
    ids=["same-when-sanitised", "300-characters"],
)
def test_distinct_guests_never_merge(vbfs: Vbfs, tmp_path: Path, names: list[str]) -> None:
    kept: dict[str, str] = {}
    for n, name in enumerate(names):
        image = small_disk(tmp_path / f"d{n}.raw", seed=n)
        out, _ = backup(vbfs, image, name)
        kept[name] = str(out["guest"])
    assert len(set(kept.values())) == len(names), kept
    listed = json.loads(vbfs("snapshots", "--json").stdout)
    assert sorted(s["guest"] for s in listed) == sorted(kept.values())
    for n, name in enumerate(names):
        got = restore_disk(vbfs, kept[name], f"d{n}", tmp_path / f"out{n}.img")
        assert sha256(got) == sha256(tmp_path / f"d{n}.raw"), f"latest of {name!r} is its own disk"
    # a plain name is kept as it is; the original of a mapped one is in the snapshot's vm.json
    for n, (name, stored) in enumerate(kept.items()):
        assert (stored == name) == ("/" not in name and "\n" not in name and len(name) <= 201)
        assert len(stored.encode()) <= 255
        (tmp_path / f"meta{n}").mkdir()
        vbfs("restore", f"{stored}@latest:/vm.json", str(tmp_path / f"meta{n}"))
        meta = json.loads((tmp_path / f"meta{n}" / "vm.json").read_text())
        assert meta["source"]["guest"] == name
        if stored != name:
            assert any(repr(name) in note and repr(stored) in note for note in meta["notes"]), meta["notes"]


def test_guest_with_an_at_sign_keeps_its_name(vbfs: Vbfs, tmp_path: Path) -> None:
    image = small_disk(tmp_path / "d0.raw", seed=7)
    out, _ = backup(vbfs, image, "db@primary")
    assert out["guest"] == "db@primary"
    assert [s["guest"] for s in json.loads(vbfs("snapshots", "--json").stdout)] == ["db@primary"]


def test_snapshot_spec_of_a_guest_with_an_at_sign(vbfs: Vbfs, tmp_path: Path) -> None:
    image = small_disk(tmp_path / "d0.raw", seed=7)
    backup(vbfs, image, "db@primary")
    got = restore_disk(vbfs, "db@primary", "d0", tmp_path / "out.img")
    assert sha256(got) == sha256(image)


@pytest.mark.parametrize("file_name", ["web(1).raw", "wéb.raw"])
def test_disk_names_that_are_not_plain(vbfs: Vbfs, tmp_path: Path, file_name: str) -> None:
    image = small_disk(tmp_path / file_name, seed=3)
    out, _ = backup(vbfs, image, "web01")
    disks = [e["name"] for e in json.loads(vbfs("ls", "web01@latest:/disks", "--json").stdout)]
    assert len(disks) == 1 and disks[0].endswith(".img")
    kept = disks[0].removesuffix(".img")
    assert kept != Path(file_name).stem and "~" in kept
    notes = out["notes"]
    assert isinstance(notes, list)
    assert any(f"disk {Path(file_name).stem!r} is kept as {kept!r}" in note for note in notes), notes
    got = restore_disk(vbfs, "web01", kept, tmp_path / "out.img")
    assert sha256(got) == sha256(image)


def modes(root: Path) -> dict[str, str]:
    """Every file and folder below (and of) root with a permission other than 0600 / 0700."""
    wrong = {}
    for p in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(p.lstat().st_mode)
        want = 0o700 if p.is_dir() else 0o600
        if mode != want:
            wrong[str(p.relative_to(root.parent))] = oct(mode)
    return wrong


def fill(vbfs: Vbfs, template_image: Path, tmp_path: Path) -> None:
    image = tmp_path / "web01.raw"
    image.write_bytes(template_image.read_bytes())
    vbfs("backup", f"image://{image}")


def test_plaintext_repository_catalog_and_mount_log_are_private(
    vbfs: Vbfs, template_image: Path, tmp_path: Path, mounted: Callable[[Vbfs], Mount]
) -> None:
    fill(vbfs, template_image, tmp_path)
    m = mounted(vbfs)
    assert (vbfs.repo / "catalog.sqlite").exists() and (vbfs.repo / "mount.log").exists()
    vbfs("umount", str(m.path))
    assert modes(vbfs.repo) == {}


def test_encrypted_repository_cache_is_private(
    make_vbfs: Callable[..., Vbfs], template_image: Path, tmp_path: Path, mounted: Callable[[Vbfs], Mount]
) -> None:
    v = make_vbfs()
    v.init("repokey")
    fill(v, template_image, tmp_path)
    m = mounted(v)
    vbfs_cache = tmp_path / "cache" / "vbfs"
    assert list(vbfs_cache.glob("*/catalog.sqlite")) and list(vbfs_cache.glob("*/mount.log"))
    v("umount", str(m.path))
    assert modes(v.repo) == {}
    assert modes(vbfs_cache) == {}


def test_an_older_wider_mount_log_is_narrowed(vbfs: Vbfs, mounted: Callable[[Vbfs], Mount]) -> None:
    log = vbfs.repo / "mount.log"
    log.write_text("written by an older vbfs\n")
    log.chmod(0o644)
    m = mounted(vbfs)
    vbfs("umount", str(m.path))
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert log.read_text().startswith("written by an older vbfs\n"), "the log is appended to, not replaced"


@pytest.mark.parametrize("how", ["option", "environment"])
def test_umask_asks_for_other_modes(make_vbfs: Callable[..., Vbfs], tmp_path: Path, how: str) -> None:
    v = make_vbfs()
    for command in (["init", "-e", "none"], ["snapshots"]):
        if how == "option":
            v("--umask", "0027", *command)
        else:
            v(*command, extra_env={"VBFS_UMASK": "0027"})
    assert stat.S_IMODE(v.repo.stat().st_mode) == 0o750
    assert stat.S_IMODE((v.repo / "snapshots").stat().st_mode) == 0o750
    assert stat.S_IMODE((v.repo / "catalog.sqlite").stat().st_mode) == 0o640


def test_bad_umask_is_one_line(vbfs: Vbfs) -> None:
    from tests.test_errors import one_line_error

    one_line_error(vbfs("--umask", "0999", "snapshots", check=False), "--umask", "octal")
