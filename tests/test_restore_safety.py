"""Restore against a hostile guest: real ext4 images with planted names and links, the real CLI, a real mount.

The image is made with ``mkfs.ext4 -d`` (without metadata checksums) and then patched byte by byte: directory
entries get names no Linux tool can create (``../../../../x``, a ``/``, one name twice) and one entry is turned into
a hard link of its own ancestor folder. Every test restores next to a sentinel folder and checks that nothing
outside the restore target was created or changed.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import MiB, Mount, Vbfs, sha256
from vbfs.testing.images import blank, partition_table, place, write_tree

pytestmark = pytest.mark.slow

DOTDOT = "../../../../pwned-dotdot"  # from a target <around>/a/b/c/<t>: lands in <around>
LONG = "n" * 251 + ".txt"  # 255 bytes: the longest name Linux allows
SPEC = "hostile@latest:/files/hostile/whole"


@dataclass
class Hostile:
    image: Path
    around: Path  # the sentinel folder: targets are made in around/a/b/c
    absolute: str  # a guest name holding '/': an absolute path into the sentinel folder
    fat_image: Path  # GPT with a FAT partition whose folder dir/ holds a long name '../xy'

    def target(self, name: str) -> Path:
        return self.around / "a" / "b" / "c" / name


def _patch(image: Path, old: str, new: str) -> None:
    """Rename one directory entry in place (same length, so the entry's name_len and rec_len stay valid)."""
    raw = image.read_bytes()
    assert len(old.encode()) == len(new.encode())
    assert raw.count(old.encode()) == 1, old
    image.write_bytes(raw.replace(old.encode(), new.encode()))


def _inode(image: Path, path: str) -> int:
    out = subprocess.run(["debugfs", "-R", f"stat {path}", str(image)], capture_output=True, text=True, check=True)
    return int(out.stdout.split("Inode:")[1].split()[0])


def _link_to_ancestor(image: Path, name: str, ancestor: int) -> None:
    """Point the directory entry ``name`` at inode ``ancestor`` (a folder): a hard-linked folder cycle."""
    raw = bytearray(image.read_bytes())
    at = raw.find(name.encode())
    assert at > 0 and raw.count(name.encode()) == 1
    head = at - 8  # inode (4), rec_len (2), name_len (1), file_type (1), name
    assert raw[head + 6] == len(name)
    raw[head : head + 4] = ancestor.to_bytes(4, "little")
    raw[head + 7] = 2  # a folder
    image.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Hostile:
    if os.geteuid() != 0:
        pytest.skip("the hostile image has root-owned setuid files and device nodes")
    work = tmp_path_factory.mktemp("hostile")
    around = work / "around"
    write_tree(around, {"host-secret": "the host's own file\n", "hostdir/keep.txt": "the host's own folder\n"})
    os.chmod(around / "host-secret", 0o640)
    (around / "a/b/c").mkdir(parents=True)
    absolute = f"{around}/pwned-abs"
    tree = write_tree(
        work / "tree",
        {
            "evil/" + "A" * len(DOTDOT): "escaped with ..\n",
            "evil/" + "B" * len(absolute): "escaped with an absolute name\n",
            "evil/plain.txt": "an ordinary file beside them\n",
            "victim/passwd": "root:x:0:0::/root:/bin/sh\n",
            "dups/upload1/a.txt": "the guest's upload\n",
            "bin/su": b"\x7fELF su\n",
            "bin/sg": b"\x7fELF sg\n",
            f"long/{LONG}": "a name of 255 bytes\n",
            "cyc/inner/backlink-placeholder": "",
        },
    )
    os.chmod(tree / "victim/passwd", 0o4755)
    # the old restore wrote through this: the temporary name it used, as a symlink to a host file
    os.symlink(around / "host-secret", tree / "victim/.passwd.vbfs-partial")
    os.symlink(around / "hostdir", tree / "dups/upload2")  # after upload1 on disk: mkfs -d adds names sorted
    os.chmod(tree / "bin/su", 0o4755)
    os.chmod(tree / "bin/sg", 0o2755)
    (tree / "dev").mkdir()
    os.mknod(tree / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(tree / "dev/disk", stat.S_IFBLK | 0o660, os.makedev(259, 70000))  # a new-style (32-bit) number
    os.mkfifo(tree / "dev/fifo")
    for name, mode in (("null", 0o666), ("disk", 0o660), ("fifo", 0o600)):
        os.chmod(tree / "dev" / name, mode)
    image = blank(work / "hostile.raw", 16 * MiB)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-I", "256", "-O", "^metadata_csum", "-d", str(tree), str(image)],
        check=True,
        capture_output=True,
    )
    _patch(image, "A" * len(DOTDOT), DOTDOT)
    _patch(image, "B" * len(absolute), absolute)
    _patch(image, "upload1", "uploads")
    _patch(image, "upload2", "uploads")
    _link_to_ancestor(image, "backlink-placeholder", _inode(image, "/cyc"))
    return Hostile(image, around, absolute, _fat_image(work))


def _fat_image(work: Path) -> Path:
    """FAT16 whose long name ``q+zzz`` (a '+' needs a long name; 5 characters fill the first UTF-16 slot of its
    long-name entry) becomes ``../xy``. The long-name checksum covers the short name only, so it stays valid."""
    tree = write_tree(work / "fat-tree", {"dir/q+zzz": "a FAT long name with ..\n", "dir/plain.txt": "plain\n"})
    part = blank(work / "fat-part.img", 16 * MiB)
    subprocess.run(["mkfs.vfat", str(part)], check=True, capture_output=True)
    mcopy = ["mcopy", "-s", "-p", "-m", "-i", str(part), str(tree / "dir"), "::/"]
    subprocess.run(mcopy, check=True, capture_output=True)
    raw = part.read_bytes()
    old, new = "q+zzz".encode("utf-16-le"), "../xy".encode("utf-16-le")
    assert raw.count(old) == 1
    part.write_bytes(raw.replace(old, new))
    disk = partition_table(work / "fat.raw", 24 * MiB, "gpt", [(1, 16, "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7")])
    place(part, disk, MiB)
    return disk


@pytest.fixture
def backed_up(vbfs: Vbfs, hostile: Hostile) -> Vbfs:
    vbfs("backup", "--no-index", f"image://{hostile.image}")
    return vbfs


def listing(root: Path, skip: set[Path]) -> dict[str, tuple[object, ...]]:
    """Every entry below ``root`` (symlinks not followed) with its type, mode, owner, size, time and content hash."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [n for n in dirnames if here / n not in skip]
        for n in dirnames + filenames:
            p = here / n
            if p in skip:
                continue
            st = p.lstat()
            item: tuple[object, ...] = (stat.filemode(st.st_mode), st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns)
            if p.is_symlink():
                item += (os.readlink(p),)
            elif p.is_file():
                item += (sha256(p),)
            out[str(p.relative_to(root))] = item
    return out


@pytest.fixture
def untouched(hostile: Hostile) -> Iterator[Callable[..., None]]:
    """Register restore targets; after the test, everything else in the sentinel folder must be as it was."""
    targets: set[Path] = set()
    before = listing(hostile.around, skip={hostile.around / "a/b/c"})
    before_abc = set(os.listdir(hostile.around / "a/b/c"))
    secret = (hostile.around / "host-secret").read_bytes()

    def register(*paths: Path) -> None:
        targets.update(paths)

    yield register
    assert listing(hostile.around, skip={hostile.around / "a/b/c"}) == before
    left = set(os.listdir(hostile.around / "a/b/c")) - before_abc - {t.name for t in targets}
    assert not left, f"restore left {left} beside its targets"
    assert (hostile.around / "host-secret").read_bytes() == secret
    assert stat.S_IMODE((hostile.around / "host-secret").stat().st_mode) == 0o640


def notes(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("vbfs: note: ")]


def test_guest_names_with_dotdot_and_slash_stay_inside_the_target(
    backed_up: Vbfs, hostile: Hostile, untouched: Callable[..., None], mounted: Callable[[Vbfs], Mount]
) -> None:
    out = hostile.target("evil")
    untouched(out)
    done = backed_up("restore", f"{SPEC}/evil", str(out))
    assert "Traceback" not in done.stderr
    dotdot = DOTDOT.replace("/", "%2F")
    absolute = hostile.absolute.replace("/", "%2F")
    assert sorted(os.listdir(out)) == sorted([dotdot, absolute, "plain.txt"])
    assert (out / dotdot).read_text() == "escaped with ..\n"
    assert (out / absolute).read_text() == "escaped with an absolute name\n"
    said = "\n".join(notes(done))
    assert f"guest name {DOTDOT!r} is shown as {dotdot!r}" in said and "holds '/'" in said
    # the mount lists the folder (it used to be EIO for all of it) and logs why the names differ
    m = mounted(backed_up)
    evil = m.path / "hostile/latest/files/hostile/whole/evil"
    assert sorted(os.listdir(evil)) == sorted(os.listdir(out))
    assert (evil / "plain.txt").read_text() == "an ordinary file beside them\n"
    assert f"is shown as {absolute!r}" in m.log()


def test_a_planted_symlink_is_never_written_through(
    backed_up: Vbfs, hostile: Hostile, untouched: Callable[..., None]
) -> None:
    """The guest's symlink ``.passwd.vbfs-partial`` -> a host file, beside ``passwd``: restored twice into one target,
    so the second run also meets the link the first one made."""
    out = hostile.target("victim")
    untouched(out)
    for _ in range(2):
        backed_up("restore", f"{SPEC}/victim", str(out))
        assert (out / "passwd").read_text() == "root:x:0:0::/root:/bin/sh\n"
        assert stat.S_IMODE((out / "passwd").stat().st_mode) == 0o755
        assert os.readlink(out / ".passwd.vbfs-partial") == str(hostile.around / "host-secret")


def test_duplicate_names_and_a_symlink_in_the_way_of_a_folder(
    backed_up: Vbfs, hostile: Hostile, untouched: Callable[..., None], mounted: Callable[[Vbfs], Mount]
) -> None:
    """One folder lists ``uploads`` twice: a folder of files and a symlink to a host folder."""
    out = hostile.target("dups")
    untouched(out)
    backed_up("restore", f"{SPEC}/dups", str(out))
    names = sorted(os.listdir(out))
    assert len(names) == 2 and names[0] == "uploads" and names[1].startswith("uploads~"), names
    assert (out / "uploads/a.txt").read_text() == "the guest's upload\n"
    assert os.readlink(out / names[1]) == str(hostile.around / "hostdir")
    # a target that already holds a symlink where the snapshot has the folder (an earlier restore left it)
    os.unlink(out / "uploads/a.txt")
    os.rmdir(out / "uploads")
    os.symlink(hostile.around / "hostdir", out / "uploads")
    done = backed_up("restore", f"{SPEC}/dups", str(out))  # merged into the existing folder out
    assert not (out / "uploads").is_symlink() and (out / "uploads/a.txt").read_text() == "the guest's upload\n"
    assert any("replaced the symlink" in n for n in notes(done)), done.stderr
    m = mounted(backed_up)
    assert sorted(os.listdir(m.path / "hostile/latest/files/hostile/whole/dups")) == names
    assert "'uploads'" in m.log() and "more than once" in m.log()


def test_setuid_bits_only_with_keep_setuid(backed_up: Vbfs, hostile: Hostile, untouched: Callable[..., None]) -> None:
    plain, kept = hostile.target("bin"), hostile.target("bin-kept")
    untouched(plain, kept)
    done = backed_up("restore", f"{SPEC}/bin", str(plain))
    assert {n: stat.S_IMODE((plain / n).stat().st_mode) for n in ("su", "sg")} == {"su": 0o755, "sg": 0o755}
    said = notes(done)
    assert sum("without its setuid/setgid bits" in n for n in said) == 2, said
    backed_up("restore", "--keep-setuid", f"{SPEC}/bin", str(kept))
    assert {n: stat.S_IMODE((kept / n).stat().st_mode) for n in ("su", "sg")} == {"su": 0o4755, "sg": 0o2755}
    assert (kept / "su").stat().st_uid == 0


def test_device_nodes_and_fifos_only_with_devices(
    backed_up: Vbfs, hostile: Hostile, untouched: Callable[..., None]
) -> None:
    plain, made = hostile.target("dev"), hostile.target("dev-made")
    untouched(plain, made)
    done = backed_up("restore", f"{SPEC}/dev", str(plain))
    assert os.listdir(plain) == []
    assert any("skipped 3 device node(s), fifo(s) or socket(s)" in n and "--devices" in n for n in notes(done))
    backed_up("restore", "--devices", f"{SPEC}/dev", str(made))
    null, disk, fifo = ((made / n).lstat() for n in ("null", "disk", "fifo"))
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3) and stat.S_IMODE(null.st_mode) == 0o666
    assert stat.S_ISBLK(disk.st_mode) and disk.st_rdev == os.makedev(259, 70000) and stat.S_IMODE(disk.st_mode) == 0o660
    assert stat.S_ISFIFO(fifo.st_mode) and stat.S_IMODE(fifo.st_mode) == 0o600


def test_a_255_byte_name_restores(backed_up: Vbfs, hostile: Hostile, untouched: Callable[..., None]) -> None:
    out = hostile.target("long")
    untouched(out)
    backed_up("restore", f"{SPEC}/long", str(out))
    assert (out / LONG).read_text() == "a name of 255 bytes\n"
    # and one file alone, into an existing folder
    backed_up("restore", f"{SPEC}/long/{LONG}", str(out.parent))
    untouched(out.parent / LONG)
    assert (out.parent / LONG).read_text() == "a name of 255 bytes\n"


def test_a_folder_hard_linked_into_itself_is_restored_once(
    backed_up: Vbfs, hostile: Hostile, untouched: Callable[..., None]
) -> None:
    out = hostile.target("cyc")
    untouched(out)
    done = backed_up("restore", f"{SPEC}/cyc", str(out), timeout=60)
    assert "Traceback" not in done.stderr
    assert os.listdir(out) == ["inner"]
    assert not (out / "inner/backlink-placeholder/inner").exists()
    assert any("backlink-placeholder" in n for n in notes(done)), done.stderr


def test_a_folder_in_the_way_of_a_file_is_refused_and_nothing_is_left(
    backed_up: Vbfs, hostile: Hostile, untouched: Callable[..., None]
) -> None:
    out = hostile.target("refused")
    untouched(out)
    (out / "victim/passwd").mkdir(parents=True)
    (out / "victim/passwd/mine.txt").write_text("the user's own file\n")
    bad = backed_up("restore", f"{SPEC}/victim", str(out / "victim"), check=False)  # merged into out/victim
    assert bad.returncode != 0
    last = bad.stderr.strip().splitlines()[-1]
    assert last == f"vbfs: error: cannot restore {out}/victim/passwd: a folder is in the way", bad.stderr
    assert (out / "victim/passwd/mine.txt").read_text() == "the user's own file\n"
    assert not [n for n in os.listdir(out) if n.startswith(".vbfs-restore-")]


def test_disk_images_follow_the_umask(backed_up: Vbfs, hostile: Hostile, untouched: Callable[..., None]) -> None:
    out = hostile.target("disk.img")
    untouched(out)
    old = os.umask(0o077)
    try:
        backed_up("restore", "hostile@latest:/disks/hostile.img", str(out))
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert sha256(out) == sha256(hostile.image)


def test_a_stopped_restore_leaves_nothing_behind(
    vbfs: Vbfs, hostile: Hostile, untouched: Callable[..., None], tmp_path: Path
) -> None:
    """Ctrl-C or a SIGTERM in the middle of a large file: the private folder and the partial file are removed."""
    tree = write_tree(tmp_path / "tree", {"big.bin": os.urandom(64 * MiB)})
    image = blank(tmp_path / "big.raw", 100 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image)], check=True, capture_output=True)
    vbfs("backup", "--no-index", f"image://{image}")
    for signum in (signal.SIGINT, signal.SIGTERM):
        out = hostile.target(f"stopped-{signum}")
        untouched(out)
        args = [sys.executable, "-m", "vbfs.cli", "restore", "big@latest:/files/big/whole/big.bin", str(out)]
        before = set(os.listdir(out.parent))
        proc = subprocess.Popen(args, env=vbfs.env, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while set(os.listdir(out.parent)) == before:  # until the restore has made its temporary entry
            assert proc.poll() is None and time.monotonic() < deadline, "the restore ended before it was stopped"
            time.sleep(0.002)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
        assert "Traceback" not in err, err
        # The signal may come after the last byte (the restore then ends normally, with the whole file).
        assert proc.returncode == 0 or (proc.returncode == 130 and "vbfs: error: interrupted" in err), err
        left = set(os.listdir(out.parent)) - before
        if left == {out.name}:  # the signal came after the rename, while the restore synced: the file is whole
            assert sha256(out) == sha256(tree / "big.bin")
            left = set()
        assert not left, "a stopped restore leaves nothing behind"


def test_a_fat_long_name_with_dotdot_and_slash_stays_inside_the_target(
    vbfs: Vbfs, hostile: Hostile, untouched: Callable[..., None], mounted: Callable[[Vbfs], Mount]
) -> None:
    vbfs("backup", "--no-index", f"image://{hostile.fat_image}")
    out = hostile.target("fat-dir")
    untouched(out)
    done = vbfs("restore", "fat@latest:/files/fat/p1/dir", str(out))
    assert sorted(os.listdir(out)) == ["..%2Fxy", "plain.txt"]
    assert (out / "..%2Fxy").read_text() == "a FAT long name with ..\n"
    assert any("'../xy' is shown as '..%2Fxy'" in n for n in notes(done)), done.stderr
    m = mounted(vbfs)
    assert sorted(os.listdir(m.path / "fat/latest/files/fat/p1/dir")) == ["..%2Fxy", "plain.txt"]
    assert "'../xy' is shown as '..%2Fxy'" in m.log()
