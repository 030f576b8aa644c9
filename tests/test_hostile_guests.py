"""Guests whose filesystems were damaged on purpose: backup, mount and restore stay bounded in time and memory.

Each image is made with the filesystem's own mkfs, then patched where the filesystem's structures say (debugfs
and xfs_db set inode fields; a FAT entry is computed from the boot sector). Each case is backed up with the real
CLI, mounted, walked with ``find -exec cat`` under a watchdog, and restored; the damaged entry must be EIO with a
line in mount.log while everything else reads back exactly, and the peak memory of the backup and of the mount
process stays under :data:`MEMORY_BOUND`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import MiB, Mount, Vbfs, random_bytes
from vbfs.testing.images import blank, ext4_file, fat32_file, partition_table, place, write_tree

pytestmark = pytest.mark.slow

MEMORY_BOUND = 256 * MiB  # peak resident size of a backup, a mount or a restore of these small guests
ADDRESS_LIMIT = 6 * 1024 * MiB  # address space of each vbfs process: a runaway allocation fails, the host lives
WATCHDOG = 60.0  # seconds any one command (a backup, the walk of a mount, a restore) may take

# Run a command as a child, then report the child's peak resident size (ru_maxrss, KiB) on the last stderr line.
_MEASURE = """
import resource, subprocess, sys
def limit():
    resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
p = subprocess.run(sys.argv[1:], preexec_fn=limit)
print("peak-kib", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)
sys.exit(p.returncode)
"""


class Measured:
    def __init__(self, proc: subprocess.CompletedProcess[str], seconds: float):
        lines = proc.stderr.splitlines()
        assert lines and lines[-1].startswith("peak-kib "), proc.stderr
        self.peak = int(lines[-1].split()[1]) * 1024
        self.stderr = "\n".join(lines[:-1])
        self.stdout = proc.stdout
        self.returncode = proc.returncode
        self.seconds = seconds

    def __repr__(self) -> str:
        return f"<exit {self.returncode} in {self.seconds:.1f} s, peak {self.peak // MiB} MiB: {self.stderr[-500:]}>"


def measured(v: Vbfs, *args: str, env: dict[str, str] | None = None, timeout: float = WATCHDOG) -> Measured:
    """Run the real CLI with a watchdog and report its peak memory; a hang fails the test (the child is killed)."""
    code = _MEASURE.format(limit=ADDRESS_LIMIT)
    t0 = time.monotonic()
    with subprocess.Popen(
        [sys.executable, "-c", code, sys.executable, "-m", "vbfs.cli", *args],
        env=dict(v.env, **(env or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the watchdog stops the command with everything it started
    ) as child:
        try:
            stdout, stderr = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
            pytest.fail(f"vbfs {' '.join(args)} did not finish within {timeout:g} s")
    proc = subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)
    result = Measured(proc, time.monotonic() - t0)
    print(f"figures: vbfs {args[0]}: {result.seconds:.1f} s, peak {result.peak / MiB:.0f} MiB, exit {proc.returncode}")
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result
    return result


def vm_hwm(pid: int) -> int:
    """Peak resident size of a running process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


class LiveMount(Mount):
    """A background `vbfs mount` with its process id (printed by the command), unmounted by :meth:`close`."""

    def __init__(self, v: Vbfs, path: Path, env: dict[str, str] | None = None):
        super().__init__(v, path)
        path.mkdir(exist_ok=True)
        out = measured(v, "mount", str(path), env=env)  # the server inherits the address-space limit
        assert out.returncode == 0, out
        found = re.search(r"\(process (\d+),", out.stdout)
        assert found, out.stdout
        self.pid = int(found.group(1))

    def peak(self) -> int:
        peak = vm_hwm(self.pid)
        print(f"figures: mount VmHWM {peak / MiB:.0f} MiB")
        return peak

    def close(self) -> float:
        """Unmount with the CLI; returns how long that took (a hung parser must not hold it up)."""
        from vbfs.fuse.mount import is_mounted

        t0 = time.monotonic()
        if is_mounted(self.path):
            done = self.vbfs("umount", str(self.path), check=False, timeout=WATCHDOG)
            assert done.returncode == 0, done.stderr
        seconds = time.monotonic() - t0
        print(f"figures: umount {seconds:.1f} s")
        deadline = time.monotonic() + 10
        while Path(f"/proc/{self.pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if Path(f"/proc/{self.pid}").exists():
            os.kill(self.pid, signal.SIGKILL)
            pytest.fail("the mount process did not exit after vbfs umount")
        return seconds


def walk(top: Path, timeout: float = WATCHDOG) -> tuple[str, float]:
    """``find -type f -exec cat`` and ``find -type l -exec readlink`` below ``top``; (their stderr, seconds)."""
    t0 = time.monotonic()
    errors = []
    for action in (["-type", "f", "-exec", "cat", "{}", "+"], ["-type", "l", "-exec", "readlink", "{}", "+"]):
        try:
            proc = subprocess.run(
                ["find", str(top), *action],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"find {' '.join(action)} in {top} did not finish within {timeout:g} s")
        errors.append(proc.stderr)
    seconds = time.monotonic() - t0
    print(f"figures: walk of {top.name}: {seconds:.1f} s")
    return "".join(errors), seconds


def eio(path: Path, how: str = "read") -> bool:
    """Whether reading (``read``), listing (``list``) or following (``link``) ``path`` fails with EIO."""
    try:
        if how == "read":
            with open(path, "rb") as f:
                f.read(1 << 20)
        elif how == "list":
            os.listdir(path)
        else:
            os.readlink(path)
    except OSError as exc:
        return exc.errno == 5
    return False


def log_lines(m: Mount, *words: str) -> list[str]:
    return [line for line in m.log().splitlines() if "ERROR" in line and all(w in line for w in words)]


def assert_clean_log(m: Mount) -> None:
    text = m.log()
    assert "Traceback" not in text and "internal error" not in text, text[-3000:]


def restore_into(v: Vbfs, spec: str, target: Path) -> Measured:
    """``vbfs restore`` under the watchdog: it finishes, and on failure says why in a line (no traceback)."""
    out = measured(v, "restore", spec, str(target))
    if out.returncode != 0:  # notes may come first; the error is the last line
        assert out.returncode in (2, 3) and out.stderr.strip().splitlines()[-1].strip(), out
    return out


def outside(root: Path, target: Path, since: float) -> list[Path]:
    """Files below ``root`` changed after ``since`` that are not below ``target`` (a restore's escape); the
    repository and the cache, which vbfs writes on purpose (locks, catalog), are not counted."""
    found = []
    for p in root.rglob("*"):
        if p == target or target in p.parents or p.is_dir():
            continue
        if {"repo", "cache"} & {q.name for q in p.relative_to(root).parents if q.name}:
            continue
        try:
            if p.lstat().st_mtime >= since:
                found.append(p)
        except FileNotFoundError:
            continue
    return found


def _sif(image: Path, path: str, field: str, value: int | str) -> None:
    subprocess.run(["debugfs", "-w", "-R", f"sif {path} {field} {value}", str(image)], check=True, capture_output=True)


def _xfs_write(image: Path, path: str, field: str, value: int) -> None:
    subprocess.run(
        ["xfs_db", "-x", "-c", f"path {path}", "-c", "inode", "-c", f"write {field} {value}", str(image)],
        check=True,
        capture_output=True,
    )


def _xfs_image(path: Path, size: int, files: dict[str, bytes], big_folder: str, entries: int) -> Path:
    """XFS made by mkfs.xfs from a prototype file (no mount): ``files`` and a folder with ``entries`` files."""
    src = path.parent / f"{path.stem}-src"
    lines = ["/dev/null", "0 0", "d--755 0 0"]
    folders: dict[str, list[str]] = {}
    for rel, data in files.items():
        folder, name = rel.split("/")
        p = src / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        folders.setdefault(folder, []).append(f"{name} ---644 0 0 {p}")
    filler = src / "filler"
    filler.parent.mkdir(parents=True, exist_ok=True)
    filler.write_bytes(b"x\n")
    folders[big_folder] = [f"entry-with-a-longer-name-{i:04d} ---644 0 0 {filler}" for i in range(entries)]
    for folder, items in folders.items():
        lines += [f"{folder} d--755 0 0", *items, "$"]
    lines.append("$")
    proto = path.parent / f"{path.stem}.proto"
    proto.write_text("\n".join(lines) + "\n")
    blank(path, size)
    subprocess.run(["mkfs.xfs", "-q", "-f", "-p", str(proto), str(path)], check=True, capture_output=True)
    return path


# ---- the cases -----------------------------------------------------------------------------------------------------


def test_fat_cluster_chain_loop_is_eio_and_the_rest_reads(vbfs: Vbfs, tmp_path: Path) -> None:
    looped = random_bytes(40_000, 11)
    tree = write_tree(tmp_path / "tree", {"loop.bin": looped, "docs/readme.txt": "hello from FAT\n"})
    image = fat32_file(tmp_path / "fatloop.raw", 64 * MiB, tree)
    from dissect.fat import FATFS

    with open(image, "r+b") as f:  # the FAT entry of the file's last cluster points back at its first
        fs = FATFS(f)
        chain = list(fs.fat.chain(fs.get("/loop.bin").cluster))
        assert len(chain) > 1 and fs.fat.bits_per_entry == 32
        sector = int(fs.bpb.BPB_BytsPerSec)
        for n in range(int(fs.bpb.BPB_NumFATs)):
            f.seek(int(fs.bpb.BPB_RsvdSecCnt) * sector + n * int(fs.fat_size) * sector + chain[-1] * 4)
            f.write(struct.pack("<I", chain[0]))

    backup = measured(vbfs, "backup", f"image://{image}")
    assert backup.returncode == 0 and backup.peak < MEMORY_BOUND, backup
    m = LiveMount(vbfs, tmp_path / "mnt")
    try:
        vol = m.path / "fatloop/latest/files/fatloop/whole"
        errors, seconds = walk(vol)
        assert "loop.bin: Input/output error" in errors and seconds < WATCHDOG
        assert eio(vol / "loop.bin")
        assert (vol / "docs/readme.txt").read_text() == "hello from FAT\n"
        lines = log_lines(m, "loop.bin", "loops")
        assert lines, m.log()
        assert m.peak() < MEMORY_BOUND, m.peak()
        assert_clean_log(m)
    finally:
        m.close()
    started = time.time()
    out = restore_into(vbfs, "fatloop@latest:/files/fatloop/whole", tmp_path / "restored")
    assert out.peak < MEMORY_BOUND, out
    # The damaged file is named and left out; the rest of the volume is restored; the exit code says damage.
    assert out.returncode == 3 and "loop.bin" in out.stderr and "internal error" not in out.stderr, out
    assert not (tmp_path / "restored/loop.bin").exists()
    assert (tmp_path / "restored/docs/readme.txt").read_text() == "hello from FAT\n"
    assert not outside(tmp_path, tmp_path / "restored", started)
    docs = restore_into(vbfs, "fatloop@latest:/files/fatloop/whole/docs", tmp_path / "docs")
    assert docs.returncode == 0 and (tmp_path / "docs/readme.txt").read_text() == "hello from FAT\n"


def test_ext4_sizes_of_gibs_tibs_and_2_63_are_bounded(vbfs: Vbfs, tmp_path: Path) -> None:
    data = random_bytes(3 * MiB + 5, 12)
    tree = write_tree(
        tmp_path / "tree",
        {
            "etc/hostname": "ext4 guest\n",
            "srv/data.bin": data,
            "huge-folder/inside.txt": "never listed\n",
            "claims-2-60.bin": b"a" * 5000,
            "claims-2-63.bin": b"b" * 5000,
        },
    )
    os.symlink("/" + "long-target/" * 8, tree / "slow-link")  # longer than 60 bytes: stored in a block
    image = ext4_file(tmp_path / "extbig.raw", 32 * MiB, tree)
    _sif(image, "/slow-link", "size", 1 << 30)  # a symlink of 1 GiB
    _sif(image, "/huge-folder", "size", 1 << 42)  # a folder of 4 TiB
    _sif(image, "/claims-2-60.bin", "size", 1 << 60)
    _sif(image, "/claims-2-63.bin", "size", 1 << 63)

    backup = measured(vbfs, "backup", f"image://{image}")
    assert backup.returncode == 0 and backup.peak < MEMORY_BOUND, backup
    assert backup.seconds < 30, backup
    listed = json.loads(vbfs("snapshots", "--json").stdout)
    assert [s["guest"] for s in listed] == ["extbig"]
    m = LiveMount(vbfs, tmp_path / "mnt")
    try:
        vol = m.path / "extbig/latest/files/extbig/whole"
        errors, seconds = walk(vol)
        assert seconds < WATCHDOG
        for name in ("claims-2-60.bin", "claims-2-63.bin"):
            st = os.stat(vol / name)
            assert st.st_size >= 1 << 60, name  # listed, with a size the kernel can carry
            assert f"{name}: Input/output error" in errors, errors
            assert eio(vol / name)
            assert log_lines(m, name, "can hold"), m.log()
        assert eio(vol / "slow-link", "link") and log_lines(m, "slow-link", "longer than 4096")
        assert eio(vol / "huge-folder", "list") and log_lines(m, "huge-folder", "volume can hold")
        assert (vol / "etc/hostname").read_text() == "ext4 guest\n"
        assert (vol / "srv/data.bin").read_bytes() == data
        assert m.peak() < MEMORY_BOUND, m.peak()
        assert_clean_log(m)
    finally:
        m.close()
    started = time.time()
    out = restore_into(vbfs, "extbig@latest:/files/extbig/whole", tmp_path / "restored")
    assert out.peak < MEMORY_BOUND, out
    assert out.returncode == 3 and "internal error" not in out.stderr, out
    for name in ("claims-2-60.bin", "claims-2-63.bin", "slow-link", "huge-folder"):
        assert name in out.stderr, out
        assert not os.path.lexists(tmp_path / "restored" / name)
    assert (tmp_path / "restored/srv/data.bin").read_bytes() == data  # the rest of the volume is restored
    assert (tmp_path / "restored/etc/hostname").read_text() == "ext4 guest\n"
    assert not outside(tmp_path, tmp_path / "restored", started)
    restore_into(vbfs, "extbig@latest:/files/extbig/whole/srv", tmp_path / "srv")
    assert (tmp_path / "srv/data.bin").read_bytes() == data


def test_xfs_folder_with_a_huge_size_neither_spins_nor_blocks_the_mount(vbfs: Vbfs, tmp_path: Path) -> None:
    """One folder claims 2^60 bytes (refused at once); another claims nearly the whole volume, which passes the
    size check but keeps the parser busy for many seconds: the time budget (2 s here) must stop it, free the
    volume's lock, and never make the mount's root, another volume or `vbfs umount` wait."""
    files = {"etc/hostname": b"xfs guest\n", "srv/data.bin": random_bytes(200_000, 13)}
    image = tmp_path / "xfsbig.raw"
    part = _xfs_image(tmp_path / "p1.img", 1024 * MiB, files, "spins", 60)
    _xfs_write(part, "/spins", "core.size", 1024 * MiB - 4096)
    other = _xfs_image(tmp_path / "p2.img", 320 * MiB, files, "huge", 60)
    _xfs_write(other, "/huge", "core.size", 1 << 60)
    partition_table(image, 1400 * MiB, "gpt", [(1, 1024, "L"), (1025, 320, "L")])
    place(part, image, 1 * MiB)
    place(other, image, 1025 * MiB)
    part.unlink()
    other.unlink()
    budget = {"VBFS_PARSE_SECONDS": "2"}

    backup = measured(vbfs, "backup", f"image://{image}", "--json", env=budget)
    assert backup.returncode == 0 and backup.peak < MEMORY_BOUND, backup
    assert backup.seconds < 30, backup
    notes = json.loads(backup.stdout).get("notes", [])
    assert any("spins" in n and "gave up after 2 s" in n for n in notes), notes
    assert any("huge" in n and "volume can hold" in n for n in notes), notes
    m = LiveMount(vbfs, tmp_path / "mnt", env=budget)
    try:
        files_dir = m.path / "xfsbig/latest/files/xfsbig"
        spins = files_dir / "p1/spins"
        assert (files_dir / "p1/etc/hostname").read_text() == "xfs guest\n"
        # eight readers of the spinning folder at once: more than the mount has worker threads
        results: list[bool] = []
        readers = [threading.Thread(target=lambda: results.append(eio(spins, "list"))) for _ in range(8)]
        t0 = time.monotonic()
        for r in readers:
            r.start()
        time.sleep(0.3)
        root = subprocess.run(["ls", str(m.path)], capture_output=True, text=True, timeout=5)
        assert root.returncode == 0 and "xfsbig" in root.stdout  # the root never waits for a parser
        assert (files_dir / "p2/etc/hostname").read_text() == "xfs guest\n"  # nor does another volume
        assert time.monotonic() - t0 < 2, "the other volume waited for the spinning parse"
        for r in readers:
            r.join(WATCHDOG)
        assert results == [True] * 8 and time.monotonic() - t0 < 30
        assert log_lines(m, "spins", "gave up after 2 s"), m.log()
        assert eio(files_dir / "p2/huge", "list") and log_lines(m, "huge", "volume can hold")
        errors, seconds = walk(files_dir)
        assert seconds < WATCHDOG and "Input/output error" in errors
        assert (files_dir / "p1/srv/data.bin").read_bytes() == files["srv/data.bin"]  # the lock was freed
        assert m.peak() < MEMORY_BOUND, m.peak()
        assert_clean_log(m)
        # a spinning parse in flight when unmounting
        busy = subprocess.Popen(["ls", str(spins)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)
    finally:
        took = m.close()
    assert took < 15, took
    busy.wait(WATCHDOG)
    out = restore_into(vbfs, "xfsbig@latest:/files/xfsbig/p1/srv", tmp_path / "srv")
    assert out.returncode == 0 and (tmp_path / "srv/data.bin").read_bytes() == files["srv/data.bin"]


def test_hard_linked_folder_cycles_are_cut_and_folders_are_never_aliased(vbfs: Vbfs, tmp_path: Path) -> None:
    tree = write_tree(tmp_path / "tree", {"a/b/c/file.txt": "deep\n", "etc/hostname": "cycles\n"})
    image = ext4_file(tmp_path / "cycles.raw", 16 * MiB, tree)
    for link in ("ln /a /a/b/c/up", "ln / /a/b/root", "ln /etc /a/etc-again"):  # two loops and one alias
        subprocess.run(["debugfs", "-w", "-R", link, str(image)], check=True, capture_output=True)

    backup = measured(vbfs, "backup", f"image://{image}", "--json")
    assert backup.returncode == 0 and backup.peak < MEMORY_BOUND, backup
    notes = json.loads(backup.stdout).get("notes", [])
    assert any("/a/b/c/up" in n and "loop" in n for n in notes), notes
    assert any("/a/b/root" in n and "loop" in n for n in notes), notes
    found = json.loads(vbfs("find", "*", "--json").stdout)
    paths = [f["path"] for f in found]
    assert len(paths) < 30 and not any("/up/" in p or "/root/" in p for p in paths), paths
    m = LiveMount(vbfs, tmp_path / "mnt")
    try:
        vol = m.path / "cycles/latest/files/cycles/whole"
        listing = subprocess.run(["find", str(vol)], capture_output=True, text=True, timeout=WATCHDOG)
        assert listing.returncode == 0 and "loop" not in listing.stderr, listing.stderr
        assert len(listing.stdout.splitlines()) < 30
        assert sorted(os.listdir(vol / "a/b/c")) == ["file.txt"]
        # the same guest folder in two places is two folders to the kernel, shown whole at one of them
        assert os.stat(vol / "etc").st_ino != os.stat(vol / "a/etc-again").st_ino
        assert (vol / "etc/hostname").read_text() == "cycles\n"
        assert os.listdir(vol / "a/etc-again") == []
        assert any("/a/etc-again" in line and "same folder as /etc" in line for line in m.log().splitlines())
        assert m.peak() < MEMORY_BOUND
        assert_clean_log(m)
    finally:
        m.close()
    started = time.time()
    out = restore_into(vbfs, "cycles@latest:/files/cycles/whole", tmp_path / "restored")
    assert out.returncode == 0, out
    made = [p for p in (tmp_path / "restored").rglob("*")]
    assert len(made) < 30, made
    assert (tmp_path / "restored/a/b/c/file.txt").read_text() == "deep\n"
    assert not outside(tmp_path, tmp_path / "restored", started)


def test_hard_linked_folders_that_fan_out_do_not_multiply_the_tree(vbfs: Vbfs, tmp_path: Path) -> None:
    """Each level holds two names of the same next folder: without care the tree doubles at every level
    (2^16 copies of the deepest file from a 16 MiB image)."""
    depth = 16
    parts = [f"l{i}" for i in range(depth)]
    tree = write_tree(tmp_path / "tree", {"/".join([*parts, "leaf.txt"]): "leaf\n", "etc/hostname": "fan\n"})
    image = ext4_file(tmp_path / "fan.raw", 16 * MiB, tree)
    for i in range(depth):
        parent = "/" + "/".join(parts[:i])
        target = "/" + "/".join(parts[: i + 1])
        link = f"{parent.rstrip('/')}/m{i}"
        subprocess.run(["debugfs", "-w", "-R", f"ln {target} {link}", str(image)], check=True, capture_output=True)

    backup = measured(vbfs, "backup", f"image://{image}", "--json")
    assert backup.returncode == 0 and backup.seconds < 30 and backup.peak < MEMORY_BOUND, backup
    notes = json.loads(backup.stdout).get("notes", [])
    assert any("same folder as" in n for n in notes), notes
    leaves = [f for f in json.loads(vbfs("find", "leaf.txt", "--json").stdout)]
    assert len(leaves) == 1, leaves  # shown once, not 2^16 times
    started = time.time()
    out = restore_into(vbfs, "fan@latest:/files/fan/whole", tmp_path / "restored")
    assert out.returncode == 0 and out.seconds < 30, out
    made = list((tmp_path / "restored").rglob("leaf.txt"))
    assert len(made) == 1 and made[0].read_text() == "leaf\n"
    assert (tmp_path / "restored/etc/hostname").read_text() == "fan\n"
    assert not outside(tmp_path, tmp_path / "restored", started)


def test_folders_nested_too_deep_are_left_out_and_the_rest_restores(vbfs: Vbfs, tmp_path: Path) -> None:
    deep = "/".join(["d"] * 300)
    tree = write_tree(tmp_path / "tree", {f"{deep}/f.txt": "bottom\n", "etc/passwd": "root:x:0:0::/root:/bin/sh\n"})
    image = ext4_file(tmp_path / "deep.raw", 16 * MiB, tree)
    assert measured(vbfs, "backup", f"image://{image}").returncode == 0
    out = restore_into(vbfs, "deep@latest:/files/deep/whole", tmp_path / "restored")
    assert out.returncode == 3 and "nested more than" in out.stderr, out
    assert max(len(line) for line in out.stderr.splitlines()) < 400, out  # no path of 600 characters
    assert (tmp_path / "restored/etc/passwd").read_text().startswith("root:")
    assert not list((tmp_path / "restored").rglob("f.txt"))


def test_a_damaged_volume_never_stops_the_other_volumes_and_disks(vbfs: Vbfs, tmp_path: Path) -> None:
    good = write_tree(tmp_path / "good", {"etc/hostname": "still here\n", "srv/readme": "fine\n"})
    image = partition_table(tmp_path / "mixed.raw", 112 * MiB, "gpt", [(1, 32, "L"), (33, 32, "L"), (65, 40, "L")])
    p1 = ext4_file(tmp_path / "p1.img", 32 * MiB, good)
    with open(p1, "r+b") as f:  # a superblock whose geometry cannot be
        f.seek(1024 + 40)
        f.write(b"\0\0\0\0")
    p2 = ext4_file(tmp_path / "p2.img", 32 * MiB, good)
    _sif(p2, "/etc", "size", 1 << 44)
    p3 = fat32_file(tmp_path / "p3.img", 40 * MiB, good)
    for offset, part in ((1, p1), (33, p2), (65, p3)):
        place(part, image, offset * MiB)
    other = ext4_file(tmp_path / "other.raw", 16 * MiB, good)

    backup = measured(vbfs, "backup", f"image://{image}", "--json")
    assert backup.returncode == 0, backup
    notes = json.loads(backup.stdout).get("notes", [])
    assert any(n.startswith("mixed/p1") for n in notes) and any("etc" in n for n in notes), notes
    assert measured(vbfs, "backup", f"image://{other}").returncode == 0
    found = {f["path"] for f in json.loads(vbfs("find", "readme", "--json").stdout)}
    assert {"/files/mixed/p2/srv/readme", "/files/mixed/p3/srv/readme", "/files/other/whole/srv/readme"} <= found
    m = LiveMount(vbfs, tmp_path / "mnt")
    try:
        files = m.path / "mixed/latest/files/mixed"
        errors, _ = walk(m.path)
        assert "Input/output error" in errors
        assert eio(files / "p1", "list") and eio(files / "p2/etc", "list")
        assert (files / "p2/srv/readme").read_text() == "fine\n"
        assert (files / "p3/etc/hostname").read_text() == "still here\n"
        assert (m.path / "other/latest/files/other/whole/etc/hostname").read_text() == "still here\n"
        assert m.peak() < MEMORY_BOUND
        assert_clean_log(m)
    finally:
        m.close()
    for spec, name in (("mixed@latest:/files/mixed/p3", "p3"), ("other@latest:/files/other/whole", "other")):
        out = restore_into(vbfs, spec, tmp_path / name)
        assert out.returncode == 0 and (tmp_path / name / "etc/hostname").read_text() == "still here\n"
