"""Mount benchmark: getting one file back, reading a whole disk, memory, and `find` — vbfs against borg and restic.

    sudo .venv/bin/python tools/bench/mount.py [--workdir bench-work]

Needs borgbackup, restic and python3-pyfuse3 (borg mount's FUSE binding) from Debian, and root.

Uses the 4 GiB image of tools/bench/backup.py (built if missing). Each tool gets a fresh repository with one
backup of the image. Then, with the page cache dropped before each step:

1. one ~2 MB file back: `vbfs mount` + `cp` from files/, against `borg mount` + a read-only loop mount of the
   image (root) + `cp`; bytes read from storage by the FUSE server process (/proc/PID/io read_bytes);
2. reading the whole disk image sequentially through `vbfs mount`, `borg mount` and `restic mount`;
3. the vbfs mount's peak RSS with 200 snapshots in the repository, after listing them all and reading 1 GB;
4. `find` over a catalog of 200 snapshots of a 100,000-file guest (1 % of the files change per snapshot).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backup import PASS, build_image
from common import GiB, MiB, drop_caches

from vbfs.catalog import Catalog
from vbfs.engine.backup import BackupRun
from vbfs.plugins import plugin_manager, registry
from vbfs.sources import SourceURL
from vbfs.store.manifest import DiskRecord, Manifest, Source, StreamRecord
from vbfs.store.repository import Repository
from vbfs.testing.images import LoopDevice, gpt_ext4, write_tree


def proc_read_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def proc_peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_for(cond, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


def pid_of(pattern: str) -> int:
    out = subprocess.run(["pgrep", "-n", "-f", pattern], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def fusermount_u(path: Path) -> None:
    subprocess.run(["fusermount3", "-u", str(path)], capture_output=True)
    if os.path.ismount(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)


class Tools:
    def __init__(self, work: Path, vbfs: str):
        self.work = work
        self.vbfs = vbfs
        self.env = dict(
            os.environ,
            VBFS_PASSPHRASE=PASS,
            XDG_CACHE_HOME=str(work / "m-cache"),
            BORG_PASSPHRASE=PASS,
            BORG_BASE_DIR=str(work / "m-borg-base"),
            RESTIC_PASSWORD=PASS,
            RESTIC_CACHE_DIR=str(work / "m-restic-cache"),
        )
        self.vrepo, self.brepo, self.rrepo = work / "m-vbfs", work / "m-borg", work / "m-restic"

    def run(self, *args: str) -> str:
        return subprocess.run(args, env=self.env, check=True, capture_output=True, text=True).stdout

    def prepare(self, image: Path) -> None:
        for d in (
            self.vrepo,
            self.brepo,
            self.rrepo,
            self.work / "m-cache",
            self.work / "m-borg-base",
            self.work / "m-restic-cache",
        ):
            shutil.rmtree(d, ignore_errors=True)
        self.run(self.vbfs, "init", "-e", "repokey", str(self.vrepo))
        self.run(self.vbfs, "-r", str(self.vrepo), "backup", f"image://{image}", "--guest", "bench")
        self.run("borg", "init", "-e", "repokey-blake2", str(self.brepo))
        self.run("borg", "create", "--chunker-params", "fixed,4194304", "-C", "zstd,3", f"{self.brepo}::a", str(image))
        self.run("restic", "init", "-r", str(self.rrepo))
        self.run("restic", "-r", str(self.rrepo), "backup", "--quiet", str(image))

    # -- mounts ----------------------------------------------------------------------------------------------------

    def mount_vbfs(self, mnt: Path) -> int:
        self.run(self.vbfs, "-r", str(self.vrepo), "mount", str(mnt))
        return pid_of(f"mount {mnt}")

    def mount_borg(self, mnt: Path) -> int:
        self.run("borg", "mount", f"{self.brepo}::a", str(mnt))
        return pid_of(f"borg mount {self.brepo}")

    def mount_restic(self, mnt: Path) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            ["restic", "-r", str(self.rrepo), "mount", str(mnt)],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: (mnt / "snapshots").is_dir() and any((mnt / "snapshots").iterdir()))
        return proc


def bench_one_file(t: Tools, image: Path, tree: Path, mnt: Path) -> dict[str, object]:
    target = min(
        (p for p in tree.rglob("*") if p.is_file() and not p.is_symlink()),
        key=lambda p: abs(p.stat().st_size - 2_000_000),
    )
    rel = target.relative_to(tree)
    size = target.stat().st_size
    out: dict[str, object] = {"file": str(rel), "size": size}
    # vbfs
    drop_caches()
    t0 = time.monotonic()
    pid = t.mount_vbfs(mnt)
    shutil.copyfile(mnt / "bench/latest/files/disk4g/p1" / rel, t.work / "one-vbfs")
    out["vbfs_seconds"] = time.monotonic() - t0
    out["vbfs_read_bytes"] = proc_read_bytes(pid)
    t.run(t.vbfs, "umount", str(mnt))
    assert (t.work / "one-vbfs").read_bytes() == target.read_bytes()
    # borg: mount the archive, loop-mount the image inside it read-only, copy
    drop_caches()
    t0 = time.monotonic()
    pid = t.mount_borg(mnt)
    inner = mnt / str(image).lstrip("/")
    lmnt = t.work / "loopmnt"
    lmnt.mkdir(exist_ok=True)
    with LoopDevice(inner, offset=MiB) as dev:
        subprocess.run(["mount", "-o", "ro,noload", dev, str(lmnt)], check=True)
        shutil.copyfile(lmnt / rel, t.work / "one-borg")
        out["borg_seconds"] = time.monotonic() - t0
        out["borg_read_bytes"] = proc_read_bytes(pid)
        subprocess.run(["umount", str(lmnt)], check=True)
    fusermount_u(mnt)
    assert (t.work / "one-borg").read_bytes() == target.read_bytes()
    return out


def bench_sequential(t: Tools, image: Path, mnt: Path) -> dict[str, float]:
    out: dict[str, float] = {}

    def read_all(path: Path) -> float:
        t0 = time.monotonic()
        with open(path, "rb", buffering=0) as f:
            while f.read(1024 * 1024):
                pass
        return time.monotonic() - t0

    drop_caches()
    t.mount_vbfs(mnt)
    out["vbfs"] = read_all(mnt / "bench/latest/disks/disk4g.img")
    t.run(t.vbfs, "umount", str(mnt))
    drop_caches()
    t.mount_borg(mnt)
    out["borg"] = read_all(mnt / str(image).lstrip("/"))
    fusermount_u(mnt)
    drop_caches()
    proc = t.mount_restic(mnt)
    out["restic"] = read_all(mnt / "snapshots/latest" / str(image).lstrip("/"))
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    fusermount_u(mnt)
    return out


def bench_memory(t: Tools, mnt: Path) -> dict[str, float]:
    """199 more snapshots (of a small disk, made in this process), then list everything and read 1 GB."""
    small = gpt_ext4(t.work / "small.raw", 64 * MiB, write_tree(t.work / "small-tree", {"etc/hostname": "s\n"}))
    os.environ["XDG_CACHE_HOME"] = t.env["XDG_CACHE_HOME"]
    repo = Repository.open(str(t.vrepo), lambda confirm: PASS)
    hv = registry().hypervisor("image")(SourceURL.parse(f"image://{small}"), {})
    for _ in range(199):
        BackupRun(repo, plugin_manager(load_entry_points=False), index_files=False).run(hv, "small", f"image://{small}")
    cat = Catalog(repo.catalog_path())
    cat.sync(repo)  # as the command does after a backup
    cat.close()
    drop_caches()
    pid = t.mount_vbfs(mnt)
    for guest in os.listdir(mnt):
        for snap in os.listdir(mnt / guest):
            os.stat(mnt / guest / snap)
    after_listing = proc_peak_rss_mib(pid)
    with open(mnt / "bench/latest/disks/disk4g.img", "rb", buffering=0) as f:
        for _ in range(1024):
            f.read(MiB)
    for p in list((mnt / "bench/latest/files/disk4g/p1").rglob("*"))[:3000]:
        if p.is_file() and not p.is_symlink():
            p.read_bytes()
    out = {"snapshots": 200, "after_listing_mib": after_listing, "after_reading_mib": proc_peak_rss_mib(pid)}
    t.run(t.vbfs, "umount", str(mnt))
    return out


def bench_find(work: Path, files: int = 100_000, snapshots: int = 200) -> dict[str, float]:
    """`find` over a catalog of 200 snapshots of a 100,000-file guest (synthetic rows, the real catalog code)."""
    path = work / "find-catalog.sqlite"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    cat = Catalog(path)
    rng = random.Random(7)
    rows = [
        (
            f"sda/p1/srv/d{i // 1000:03d}/file-{i:06d}.{'conf' if i % 100 == 0 else 'dat'}",
            "f",
            1000 + i,
            1_700_000_000_000_000_000,
            0o100644,
        )
        for i in range(files)
    ]
    t0 = time.monotonic()
    for n in range(snapshots):
        for i in rng.sample(range(files), files // 100):
            p, typ, size, mtime, mode = rows[i]
            rows[i] = (p, typ, size + 1, mtime + 1_000_000_000, mode)
        stamp = f"2026-01-01T00:00:00.{n:06d}Z"
        manifest = Manifest(
            id=f"{n:032x}",
            guest="big",
            name=f"s{n:03d}",
            time=stamp,
            finished=stamp,
            source=Source("image", "image:///x"),
            consistency="crash-consistent",
            disks=[DiskRecord("sda", 1, MiB, [])],
            files_index=StreamRecord(0, []),
        )
        cat.add(manifest, rows)
    build = time.monotonic() - t0
    out = {"build_seconds": build, "db_mib": path.stat().st_size / MiB}
    for label, pattern in (("exact", "file-054321.dat"), ("glob", "file-0543*"), ("glob_all_conf", "*.conf")):
        t0 = time.monotonic()
        found = cat.find(pattern)
        out[f"{label}_seconds"] = time.monotonic() - t0
        out[f"{label}_versions"] = len(found)
    cat.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("bench-work"))
    ap.add_argument("--data-gib", type=float, default=2.0)
    ap.add_argument("--only", default="one,seq,mem,find")
    args = ap.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    image = build_image(work, 4 * GiB, int(args.data_gib * 1e9), "disk4g.raw")
    vbfs = str(Path(sys.executable).parent / "vbfs")
    t = Tools(work, vbfs)
    mnt = Path(tempfile.mkdtemp(prefix="vbfs-bench-mnt-"))
    steps = args.only.split(",")
    results: dict[str, object] = {"cold_cache": drop_caches()}
    try:
        if {"one", "seq", "mem"} & set(steps):
            t.prepare(image)
        if "one" in steps:
            results["one_file"] = bench_one_file(t, image, work / "tree", mnt)
            print(json.dumps(results["one_file"]), file=sys.stderr)
        if "seq" in steps:
            results["sequential"] = bench_sequential(t, image, mnt)
            print(json.dumps(results["sequential"]), file=sys.stderr)
        if "mem" in steps:
            results["memory"] = bench_memory(t, mnt)
            print(json.dumps(results["memory"]), file=sys.stderr)
        if "find" in steps:
            results["find"] = bench_find(work)
            print(json.dumps(results["find"]), file=sys.stderr)
    finally:
        fusermount_u(mnt)
        with contextlib.suppress(OSError):
            mnt.rmdir()
    (work / "mount.json").write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))


def render(r: dict[str, Any]) -> str:
    out = []
    if "one_file" in r:
        o = r["one_file"]
        out += [
            f"One file back ({o['size'] / 1e6:.2f} MB, `{Path(o['file']).name}`), cold, mount + copy:",
            "",
            "| tool | wall time | ratio to borg | read from the repository | read / file size |",
            "|---|---:|---:|---:|---:|",
            f"| vbfs mount + cp | {o['vbfs_seconds']:.2f} s | {o['vbfs_seconds'] / o['borg_seconds']:.2f} | "
            f"{o['vbfs_read_bytes'] / 1e6:.1f} MB | {o['vbfs_read_bytes'] / o['size']:.1f}x |",
            f"| borg mount + loop mount + cp | {o['borg_seconds']:.2f} s | 1.00 | "
            f"{o['borg_read_bytes'] / 1e6:.1f} MB | {o['borg_read_bytes'] / o['size']:.1f}x |",
            "",
        ]
    if "sequential" in r:
        q = r["sequential"]
        out += [
            "Reading the whole 4 GiB disk image through the mount, cold:",
            "",
            "| tool | wall time | MB/s | speed against borg |",
            "|---|---:|---:|---:|",
        ]
        for tool in ("vbfs", "borg", "restic"):
            out.append(
                f"| {tool} mount | {q[tool]:.1f} s | {4 * GiB / q[tool] / 1e6:.0f} | {q['borg'] / q[tool]:.2f}x |"
            )
        out.append("")
    if "memory" in r:
        m = r["memory"]
        out += [
            f"vbfs mount with {m['snapshots']} snapshots: peak RSS {m['after_listing_mib']:.0f} MiB after "
            f"listing every snapshot, {m['after_reading_mib']:.0f} MiB after reading 1 GB of a disk image and "
            "3,000 guest files.",
            "",
        ]
    if "find" in r:
        f = r["find"]
        out += [
            f"`find` over 200 snapshots of a 100,000-file guest (catalog {f['db_mib']:.0f} MiB, built in "
            f"{f['build_seconds']:.0f} s): exact name {f['exact_seconds'] * 1000:.1f} ms "
            f"({f['exact_versions']} versions), prefix pattern {f['glob_seconds'] * 1000:.0f} ms "
            f"({f['glob_versions']}), `*.conf` {f['glob_all_conf_seconds'] * 1000:.0f} ms "
            f"({f['glob_all_conf_versions']} versions, each with the snapshots that hold it)."
        ]
    return "\n".join(out)


if __name__ == "__main__":
    main()
