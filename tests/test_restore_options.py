"""Restore as a user repeats it: folders merged into their target, what exists and differs refused or replaced,
dry runs, include and exclude patterns, a disk onto a block device, long names, the JSON summary.

Every test backs up a real GPT + ext4 image and runs the real ``vbfs restore``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import MiB, Vbfs, random_bytes, sha256
from vbfs.testing.images import ext4_file, gpt_ext4, write_tree

LONG = "n" * 251 + ".txt"  # 255 bytes: the longest name Linux allows
ROOT = "web01@latest:/files/web01/p1"
FILES: dict[str, bytes | str] = {
    "etc/hostname": "web01\n",
    "etc/nginx/nginx.conf": "worker_processes 2;\n" * 50,
    "etc/nginx/nginx.conf.bak": "worker_processes 1;\n",
    "srv/notes.txt": "top-level notes\n",
    "srv/data/report.txt": "".join(f"line {i}\n" for i in range(2000)),
    "srv/data/blob.bin": random_bytes(MiB, 7),
    f"long/{LONG}": "a name of 255 bytes\n",
}


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("options")
    tree = write_tree(work / "tree", FILES)
    return gpt_ext4(work / "web01.raw", 16 * MiB, tree)


@pytest.fixture
def backed_up(vbfs: Vbfs, image: Path) -> Vbfs:
    vbfs("backup", "--no-index", f"image://{image}")
    return vbfs


def tree_state(root: Path) -> dict[str, tuple[object, ...]]:
    """Every entry below ``root`` and ``root`` itself: type and mode, size, mtime, inode and content hash."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in ["", *dirnames, *filenames] if dirpath == str(root) else [*dirnames, *filenames]:
            p = Path(dirpath) / name if name else Path(dirpath)
            st = p.lstat()
            item: tuple[object, ...] = (stat.filemode(st.st_mode), st.st_size, st.st_mtime_ns, st.st_ino)
            if stat.S_ISREG(st.st_mode):
                item += (hashlib.sha256(p.read_bytes()).hexdigest(),)
            out[str(p.relative_to(root))] = item
    return out


def last_line(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stderr.strip().splitlines()[-1]


def test_a_folder_restored_twice_gives_the_same_tree(backed_up: Vbfs, tmp_path: Path) -> None:
    out = tmp_path / "srv"
    first = backed_up("restore", f"{ROOT}/srv", str(out))
    assert sorted(os.listdir(out)) == ["data", "notes.txt"]  # the folder became the target: no out/srv
    assert (out / "data/blob.bin").read_bytes() == FILES["srv/data/blob.bin"]
    assert first.stdout.startswith("restored 3 file(s), 0 unchanged (skipped)"), first.stdout
    before = tree_state(out)
    again = backed_up("restore", f"{ROOT}/srv", str(out))
    assert tree_state(out) == before, "a second restore changed the tree"
    assert again.stdout.startswith("restored 0 file(s), 3 unchanged (skipped)"), again.stdout
    # an existing folder that the user made: merged into, its own mode kept
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    (mine / "keep.txt").write_text("the user's own file\n")
    backed_up("restore", f"{ROOT}/srv", str(mine))
    assert sorted(os.listdir(mine)) == ["data", "keep.txt", "notes.txt"]
    assert stat.S_IMODE(mine.stat().st_mode) == 0o700
    assert (mine / "keep.txt").read_text() == "the user's own file\n"


def test_a_file_that_differs_is_refused_and_nothing_is_written(backed_up: Vbfs, tmp_path: Path) -> None:
    out = tmp_path / "etc"
    backed_up("restore", f"{ROOT}/etc", str(out))
    (out / "nginx/nginx.conf").write_text("the user's edit\n")
    (out / "hostname").unlink()  # the check comes first: this one is not restored either
    before = tree_state(out)
    refused = backed_up("restore", f"{ROOT}/etc", str(out), check=False)
    assert refused.returncode == 2, refused.stderr
    assert last_line(refused).startswith(f"vbfs: error: {out}/nginx/nginx.conf exists and differs from the snapshot")
    assert "--overwrite if-changed" in last_line(refused)
    assert tree_state(out) == before
    assert not [n for n in os.listdir(out) if n.startswith(".vbfs-restore-")]
    # a single file onto an existing file that differs: refused the same way
    one = backed_up("restore", f"{ROOT}/etc/nginx/nginx.conf", str(out / "nginx/nginx.conf"), check=False)
    assert one.returncode == 2 and f"{out}/nginx/nginx.conf exists and differs" in last_line(one)
    assert (out / "nginx/nginx.conf").read_text() == "the user's edit\n"


def test_if_changed_rewrites_only_what_differs(backed_up: Vbfs, tmp_path: Path) -> None:
    out = tmp_path / "srv"
    backed_up("restore", f"{ROOT}/srv", str(out))
    (out / "data/report.txt").write_text("the user's edit\n")
    kept = {n: (out / n).stat() for n in ("notes.txt", "data/blob.bin")}
    done = backed_up("restore", "--overwrite", "if-changed", f"{ROOT}/srv", str(out))
    assert done.stdout.startswith("restored 1 file(s) (1 replaced), 2 unchanged (skipped)"), done.stdout
    assert (out / "data/report.txt").read_text() == FILES["srv/data/report.txt"]
    for name, st in kept.items():
        now = (out / name).stat()
        assert (now.st_ino, now.st_mtime_ns, now.st_ctime_ns) == (st.st_ino, st.st_mtime_ns, st.st_ctime_ns), name
    # always: every file is written again (new inodes), the content is the snapshot's
    inodes = {n: (out / n).stat().st_ino for n in ("notes.txt", "data/blob.bin", "data/report.txt")}
    again = backed_up("restore", "--overwrite", "always", f"{ROOT}/srv", str(out))
    assert again.stdout.startswith("restored 3 file(s) (3 replaced), 0 unchanged"), again.stdout
    assert all((out / n).stat().st_ino != ino for n, ino in inodes.items())
    assert (out / "data/blob.bin").read_bytes() == FILES["srv/data/blob.bin"]


def test_a_dry_run_writes_nothing(backed_up: Vbfs, tmp_path: Path) -> None:
    out = tmp_path / "srv"
    backed_up("restore", f"{ROOT}/srv", str(out))
    (out / "data/report.txt").write_text("the user's edit\n")
    (out / "notes.txt").unlink()
    before = tree_state(out)
    dry = backed_up("restore", "--dry-run", "--overwrite", "if-changed", f"{ROOT}/srv", str(out))
    assert tree_state(out) == before
    lines = set(dry.stdout.splitlines())
    assert {f"+ {out}/notes.txt", f"M {out}/data/report.txt", f"= {out}/data/blob.bin"} <= lines, dry.stdout
    assert "would restore 2 file(s) (1 replaced), 1 unchanged (skipped)" in dry.stdout
    # with the default (never) a dry run lists what the restore would refuse, and exits as it would
    refused = backed_up("restore", "--dry-run", f"{ROOT}/srv", str(out), check=False)
    assert refused.returncode == 2 and f"! {out}/data/report.txt" in refused.stdout.splitlines()
    assert tree_state(out) == before
    # a target that does not exist is not made
    new = tmp_path / "new"
    listed = backed_up("restore", "--dry-run", f"{ROOT}/srv", str(new))
    assert not new.exists() and f"+ {new}/data/blob.bin" in listed.stdout.splitlines()


def test_include_and_exclude(backed_up: Vbfs, tmp_path: Path) -> None:
    out = tmp_path / "some"
    backed_up("restore", "--include", "etc/nginx", "--exclude", "*.bak", ROOT, str(out))
    assert sorted(os.listdir(out)) == ["etc"] and sorted(os.listdir(out / "etc")) == ["nginx"]
    assert os.listdir(out / "etc/nginx") == ["nginx.conf"]
    # a pattern without '/' matches a name at any depth; '*' never crosses a '/', '**' does
    txt = tmp_path / "txt"
    backed_up("restore", "--include", "*.txt", f"{ROOT}/srv", str(txt))
    assert sorted(str(p.relative_to(txt)) for p in txt.rglob("*") if p.is_file()) == ["data/report.txt", "notes.txt"]
    top = tmp_path / "top"
    backed_up("restore", "--include", "/*.txt", f"{ROOT}/srv", str(top))
    assert os.listdir(top) == ["notes.txt"]
    deep = tmp_path / "deep"
    backed_up("restore", "--include", "/**/report.txt", f"{ROOT}/srv", str(deep))
    assert [str(p.relative_to(deep)) for p in deep.rglob("*") if p.is_file()] == ["data/report.txt"]
    # an include that matches nothing: an error when it is the only one, nothing made; a warning beside others
    none = tmp_path / "none"
    bad = backed_up("restore", "--include", "/report.txt", f"{ROOT}/srv", str(none), check=False)
    assert bad.returncode == 2 and "matched nothing" in last_line(bad) and not none.exists()
    part = tmp_path / "part"
    warned = backed_up("restore", "--include", "notes.txt", "--include", "nope*", f"{ROOT}/srv", str(part))
    assert "vbfs: warning: --include 'nope*' matched nothing" in warned.stderr
    assert os.listdir(part) == ["notes.txt"]


def test_a_255_byte_name_restores(backed_up: Vbfs, tmp_path: Path) -> None:
    out = tmp_path / "long"
    backed_up("restore", f"{ROOT}/long", str(out))
    assert (out / LONG).read_text() == "a name of 255 bytes\n"
    # one file alone into an existing folder, then replaced there (a new file renamed over it)
    into = tmp_path / "into"
    into.mkdir()
    backed_up("restore", f"{ROOT}/long/{LONG}", str(into))
    ino = (into / LONG).stat().st_ino
    backed_up("restore", "--overwrite", "always", f"{ROOT}/long/{LONG}", str(into))
    assert (into / LONG).read_text() == "a name of 255 bytes\n" and (into / LONG).stat().st_ino != ino
    assert os.listdir(into) == [LONG]


def test_the_summary_as_json(backed_up: Vbfs, tmp_path: Path) -> None:
    out = tmp_path / "srv"
    first = json.loads(backed_up("restore", "--json", f"{ROOT}/srv", str(out)).stdout)
    assert (first["files"], first["skipped"], first["overwritten"], first["failed"]) == (3, 0, 0, [])
    assert first["bytes"] >= MiB and first["dry_run"] is False
    (out / "notes.txt").write_text("changed\n")
    again = backed_up("restore", "--json", "--overwrite", "if-changed", f"{ROOT}/srv", str(out))
    assert {k: json.loads(again.stdout)[k] for k in ("files", "skipped", "overwritten")} == {
        "files": 1,
        "skipped": 2,
        "overwritten": 1,
    }


# ---- onto a block device -------------------------------------------------------------------------------------


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Callable[[Path], str]]:
    """Attach files as loop devices; each is detached (and unmounted) after the test."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("loop devices need root and losetup")
    attached: list[str] = []

    def attach(backing: Path) -> str:
        dev = subprocess.run(
            ["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=True
        ).stdout.strip()
        attached.append(dev)
        return dev

    yield attach
    for dev in attached:
        subprocess.run(["umount", dev], capture_output=True)
        subprocess.run(["losetup", "-d", dev], capture_output=True)


def _run(vbfs: Vbfs, *args: str) -> subprocess.CompletedProcess[str]:
    """``vbfs`` with no terminal on stdin (so it cannot ask)."""
    return subprocess.run(
        [sys.executable, "-m", "vbfs.cli", *args],
        env=vbfs.env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_disk_restores_onto_a_loop_device(
    backed_up: Vbfs, image: Path, tmp_path: Path, loop_device: Callable[[Path], str]
) -> None:
    size = image.stat().st_size
    backing = tmp_path / "device.img"
    old = random_bytes(size + 4 * MiB, 11)  # old data everywhere: the disk's holes must become zeros
    backing.write_bytes(old)
    dev = loop_device(backing)
    spec = "web01@latest:/disks/web01.img"
    asked = _run(backed_up, "restore", spec, dev)
    assert asked.returncode == 2 and "--force" in last_line(asked), asked.stderr
    dry = _run(backed_up, "restore", "--dry-run", spec, dev)
    assert dry.returncode == 0 and "would write web01.img onto" in dry.stdout, dry.stderr
    assert backing.read_bytes() == old, "nothing is written without --force, nor by a dry run"
    done = _run(backed_up, "restore", "--force", spec, dev)
    assert done.returncode == 0, done.stderr
    assert f"wrote web01.img onto {dev}" in done.stdout
    with open(dev, "rb") as f:
        written = f.read(size + 4 * MiB)
    assert hashlib.sha256(written[:size]).hexdigest() == sha256(image)
    assert written[size:] == old[size:], "what lies after the disk's end is left as it was"
    # a device smaller than the disk
    small = tmp_path / "small.img"
    small.write_bytes(bytes(size // 2))
    refused = _run(backed_up, "restore", "--force", spec, loop_device(small))
    assert refused.returncode == 2 and "less than the disk's" in last_line(refused), refused.stderr
    assert small.read_bytes() == bytes(size // 2)


def test_a_mounted_device_is_refused(
    backed_up: Vbfs, image: Path, tmp_path: Path, loop_device: Callable[[Path], str]
) -> None:
    backing = tmp_path / "fs.img"
    backing.write_bytes(bytes(image.stat().st_size))
    subprocess.run(["mkfs.ext4", "-q", "-F", str(backing)], check=True, capture_output=True)
    dev = loop_device(backing)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", dev, str(mnt)], check=True, capture_output=True)
    try:
        (mnt / "mine.txt").write_text("on the mounted filesystem\n")
        refused = _run(backed_up, "restore", "--force", "web01@latest:/disks/web01.img", dev)
        assert refused.returncode == 2, refused.stderr
        assert last_line(refused) == f"vbfs: error: {dev} is in use (mounted on {mnt}): nothing was written"
        assert (mnt / "mine.txt").read_text() == "on the mounted filesystem\n"
    finally:
        subprocess.run(["umount", str(mnt)], check=True, capture_output=True)


def test_a_damaged_chunk_says_the_device_was_written_in_part(
    backed_up: Vbfs, image: Path, tmp_path: Path, loop_device: Callable[[Path], str]
) -> None:
    biggest = max((p for p in (backed_up.repo / "chunks").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as f:  # one bit of the largest chunk the disk needs
        f.seek(biggest.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))
    backing = tmp_path / "device.img"
    backing.write_bytes(random_bytes(image.stat().st_size, 13))
    dev = loop_device(backing)
    done = _run(backed_up, "restore", "--force", "web01@latest:/disks/web01.img", dev)
    assert done.returncode == 3, done.stderr
    assert "internal error" not in done.stderr
    assert last_line(done).endswith(f"{dev} was written in part and holds no usable copy of web01.img"), done.stderr


# ---- what a review found -------------------------------------------------------------------------------------


def test_a_glob_that_cannot_be_is_an_error_and_a_range_never_crosses_a_slash(backed_up: Vbfs, tmp_path: Path) -> None:
    out = tmp_path / "out"
    bad = backed_up("restore", "--include", "[z-a]*", ROOT, str(out), check=False)
    assert (
        bad.returncode == 2
        and last_line(bad) == "vbfs: error: the pattern '[z-a]*' is not a glob: bad character range z-a"
    )
    # [.-0] holds '/' (between '.' and '0'): it still matches within one name only, as '*' and '?' do
    crossing = backed_up("restore", "--include", "srv[.-0]data", ROOT, str(out), check=False)
    assert crossing.returncode == 2 and "matched nothing" in last_line(crossing), crossing.stdout
    assert not out.exists()


@pytest.fixture(scope="module")
def odd_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A guest with a symlink and folders nested more deeply than restore goes."""
    work = tmp_path_factory.mktemp("odd")
    deep = "/".join(["d"] * 300)
    tree = write_tree(work / "tree", {"etc/notes.txt": "notes\n", f"{deep}/bottom.txt": "bottom\n"})
    os.symlink("/etc/hostname", tree / "etc/lnk")
    return ext4_file(work / "odd.raw", 16 * MiB, tree)


def test_a_symlink_restored_to_a_new_name_is_compared_under_that_name(
    vbfs: Vbfs, odd_image: Path, tmp_path: Path
) -> None:
    vbfs("backup", "--no-index", f"image://{odd_image}")
    spec = "odd@latest:/files/odd/whole/etc/lnk"
    out = tmp_path / "out"
    out.mkdir()
    vbfs("restore", spec, str(out / "mine"))
    assert os.readlink(out / "mine") == "/etc/hostname"
    again = vbfs("restore", spec, str(out / "mine"))
    assert again.stdout.startswith("restored 0 file(s), 1 unchanged (skipped)"), again.stdout
    # "mine" points elsewhere; a symlink beside it named as in the snapshot and pointing as in the snapshot
    # says nothing about "mine"
    (out / "mine").unlink()
    os.symlink("/somewhere/else", out / "mine")
    os.symlink("/etc/hostname", out / "lnk")
    refused = vbfs("restore", spec, str(out / "mine"), check=False)
    assert refused.returncode == 2 and f"{out}/mine exists and differs" in last_line(refused), refused.stderr
    replaced = vbfs("restore", "--overwrite", "if-changed", spec, str(out / "mine"))
    assert replaced.stdout.startswith("restored 1 file(s) (1 replaced)"), replaced.stdout
    assert os.readlink(out / "mine") == "/etc/hostname"


def test_folders_too_deep_are_reported_with_include_too(vbfs: Vbfs, odd_image: Path, tmp_path: Path) -> None:
    vbfs("backup", "--no-index", f"image://{odd_image}")
    out = tmp_path / "out"
    done = vbfs("restore", "--include", "*.txt", "odd@latest:/files/odd/whole", str(out), check=False)
    # the check could not look below level 256: whether *.txt files are there is not known, and the user is told
    assert done.returncode == 3 and "nested more than 256 deep" in done.stderr, done.stderr
    assert (out / "etc/notes.txt").read_text() == "notes\n"
    assert not list(out.rglob("bottom.txt"))
