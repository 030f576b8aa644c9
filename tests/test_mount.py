"""The mounted tree, for real: FUSE, every supported guest filesystem, cp -a and vbfs restore, find and diff."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Mount, Vbfs, sha256
from tests.guest_images import MTIME
from vbfs.fuse.mount import is_mounted

pytestmark = pytest.mark.slow

LINUX_VOLUMES = ["p1", "p2", "vg0-data"]


def _compare_trees(src: Path, got: Path, *, owners: bool = True, modes: bool = True, mtimes: bool = True) -> int:
    """Compare ``got`` with ``src`` the way a restore should match; return the number of entries compared."""
    n = 0
    for s in sorted(src.rglob("*")):
        rel = s.relative_to(src)
        g = got / rel
        ss, gs = s.lstat(), g.lstat()
        assert stat.S_IFMT(ss.st_mode) == stat.S_IFMT(gs.st_mode), rel
        if modes:
            assert stat.S_IMODE(ss.st_mode) == stat.S_IMODE(gs.st_mode), rel
        if owners:
            assert (ss.st_uid, ss.st_gid) == (gs.st_uid, gs.st_gid), rel
        if s.is_symlink():
            assert os.readlink(s) == os.readlink(g), rel
        elif s.is_file():
            assert ss.st_size == gs.st_size and sha256(s) == sha256(g), rel
            assert ss.st_nlink == gs.st_nlink, rel
            if mtimes:
                assert ss.st_mtime_ns == gs.st_mtime_ns, rel
        n += 1
    return n


@pytest.fixture
def backed_up(vbfs: Vbfs, guest_disks: dict[str, Path]) -> Vbfs:
    vbfs("backup", f"image://{guest_disks['linux']}")
    vbfs("backup", f"image://{guest_disks['windows']}")
    return vbfs


def test_every_filesystem_reads_back_exactly(
    backed_up: Vbfs, guest_disks: dict[str, Path], mounted: Callable[[Vbfs], Mount], tmp_path: Path
) -> None:
    m = mounted(backed_up)
    work = guest_disks["work"]
    snap = m.path / "linux" / "latest"
    assert sorted(os.listdir(snap)) == ["disks", "files", "vm.json"]
    assert sorted(os.listdir(snap / "files" / "linux")) == ["p1", "p2", "p3", "vg0-data"]
    for vol in LINUX_VOLUMES:
        out = tmp_path / f"cp-{vol}"
        subprocess.run(["cp", "-a", str(snap / "files" / "linux" / vol), str(out)], check=True)
        src = work / ("linux-tree" if vol == "p1" else "linux-small")
        for extra in ("lost+found",):
            if (out / extra).exists():
                subprocess.run(["rm", "-rf", str(out / extra)], check=True)
        assert _compare_trees(src, out) >= 15, vol
        # hard links are one inode in the mount, as in the guest
        a = os.stat(snap / "files" / "linux" / vol / "usr/bin/tool")
        b = os.stat(snap / "files" / "linux" / vol / "usr/bin/tool-hard")
        assert a.st_ino == b.st_ino and a.st_nlink == 2
        # the guest's absolute symlink is shown as it is
        assert os.readlink(snap / "files" / "linux" / vol / "etc/localtime") == "/usr/share/zoneinfo/UTC"
    # sparse guest files read as zeros where they have holes
    with open(snap / "files/linux/p1/var/lib/sparse.img", "rb") as f:
        f.seek(12 * 1024 * 1024 - 4)
        assert f.read(22) == b"\0\0\0\0end of sparse file"
    for name, vol, tree in (("linux", "p3", "fat-tree"), ("windows", "p1", "ntfs-tree")):
        out = tmp_path / f"cp-{name}-{vol}"
        subprocess.run(["cp", "-r", str(m.path / name / "latest/files" / name / vol), str(out)], check=True)
        assert _compare_trees(work / tree, out, owners=False, modes=False, mtimes=False) >= 8
        got = os.stat(m.path / name / "latest/files" / name / vol / "Users/Alice/Pictures/photo.bin")
        assert got.st_mtime == MTIME, (name, vol)


def test_restore_of_files_and_folders(backed_up: Vbfs, guest_disks: dict[str, Path], tmp_path: Path) -> None:
    work = guest_disks["work"]
    for vol in LINUX_VOLUMES:
        out = tmp_path / f"restored-{vol}"
        backed_up("restore", f"linux@latest:/files/linux/{vol}/etc", str(out))
        assert _compare_trees(work / "linux-small" / "etc", out) >= 5
    backed_up("restore", "linux@latest:/files/linux/p1/home/alice/notes.txt", str(tmp_path))
    restored = tmp_path / "notes.txt"
    st = restored.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime) == (0o600, 1000, 1000, MTIME)
    assert restored.read_bytes() == (work / "linux-small/home/alice/notes.txt").read_bytes()
    out = tmp_path / "bin"
    backed_up("restore", "linux@latest:/files/linux/p1/usr/bin", str(out))
    assert os.stat(out / "tool").st_ino == os.stat(out / "tool-hard").st_ino
    assert os.readlink(out / "tool-link") == "tool"


def test_big_folder_concurrency_and_read_only(
    backed_up: Vbfs, guest_disks: dict[str, Path], mounted: Callable[[Vbfs], Mount]
) -> None:
    m = mounted(backed_up)
    many = m.path / "linux/latest/files/linux/p1/many"
    names = os.listdir(many)
    assert len(names) == 10_000 and len(set(names)) == 10_000
    # 8 readers at once, each a different file
    files = [
        "srv/big.bin",
        "usr/bin/tool",
        "etc/nginx/nginx.conf",
        "home/alice/notes.txt",
        "var/lib/sparse.img",
        "many/f04242.txt",
        "etc/hostname",
        "etc/shadow",
    ]
    want = {f: hashlib.sha256((guest_disks["work"] / "linux-tree" / f).read_bytes()).hexdigest() for f in files}
    got: dict[str, str] = {}

    def read(f: str) -> None:
        got[f] = hashlib.sha256((m.path / "linux/latest/files/linux/p1" / f).read_bytes()).hexdigest()

    threads = [threading.Thread(target=read, args=(f,)) for f in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want
    for attempt in (
        lambda: (many / "new.txt").write_text("x"),
        lambda: os.mkdir(many / "d"),
        lambda: os.unlink(many / "f00001.txt"),
    ):
        with pytest.raises(OSError) as err:
            attempt()
        assert err.value.errno == errno.EROFS


def test_disk_images_and_unknown_partitions(
    backed_up: Vbfs, guest_disks: dict[str, Path], mounted: Callable[[Vbfs], Mount]
) -> None:
    m = mounted(backed_up)
    disks = m.path / "linux/latest/disks"
    assert sorted(os.listdir(disks)) == ["linux-p5.img", "linux.img"]
    assert sha256(disks / "linux.img") == sha256(guest_disks["linux"])
    with open(guest_disks["linux"], "rb") as f:
        f.seek(609 * 1024 * 1024)
        assert (disks / "linux-p5.img").read_bytes() == f.read(8 * 1024 * 1024)
    vm = json.loads((m.path / "linux/latest/vm.json").read_text())
    volumes = {v["name"]: v for v in vm["disks"][0]["volumes"]}
    assert volumes["p5"]["filesystem"] is None and "no known filesystem" in volumes["p5"]["note"]
    assert volumes["p4"]["note"].startswith("LVM2 physical volume of volume group vg0")
    assert {volumes[v]["filesystem"] for v in ("p1", "p2", "p3", "vg0-data")} == {"ext", "xfs", "fat"}
    # cp --sparse=always of the disk image gives a sparse copy
    out = m.path.parent / "copy.img"
    subprocess.run(["cp", "--sparse=always", str(disks / "linux.img"), str(out)], check=True)
    assert out.stat().st_blocks * 512 < 200 * 1024 * 1024


def test_umount_after_the_mount_process_was_killed(backed_up: Vbfs, mounted: Callable[[Vbfs], Mount]) -> None:
    m = mounted(backed_up)
    pid = int(
        subprocess.run(
            ["pgrep", "-f", f"vbfs.cli mount {m.path}"], capture_output=True, text=True, check=True
        ).stdout.split()[0]
    )
    os.kill(pid, 9)
    with pytest.raises(OSError):
        os.listdir(m.path)
    assert is_mounted(m.path), "a killed mount stays behind until it is unmounted"
    backed_up("umount", str(m.path))
    assert not is_mounted(m.path)
    gone = backed_up("umount", str(m.path), check=False)
    assert gone.returncode == 2 and "not mounted" in gone.stderr
