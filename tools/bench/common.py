"""Helpers shared by the benchmarks: timing a command with its peak RSS, sizes on disk, cold caches, images."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

MiB = 1024 * 1024
GiB = 1024 * MiB


@dataclass
class Run:
    tool: str
    step: str
    seconds: float
    peak_rss_mib: float
    repo_bytes: int
    read_bytes: int | None = None


def drop_caches() -> bool:
    """Drop the page cache so every tool starts cold (needs root; returns False when not allowed)."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Run a command; return (wall seconds, peak RSS in MiB measured by /usr/bin/time, stdout)."""
    fmt = "VBFS_BENCH_RSS_KIB=%M"
    start = time.monotonic()
    proc = subprocess.run(["/usr/bin/time", "-f", fmt, *argv], env=env, capture_output=True, text=True)
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    rss = [line for line in proc.stderr.splitlines() if line.startswith("VBFS_BENCH_RSS_KIB=")]
    return seconds, int(rss[-1].split("=")[1]) / 1024, proc.stdout


def du(path: Path) -> int:
    """Bytes allocated on disk below ``path``."""
    total = 0
    for p in path.rglob("*"):
        if p.is_file() and not p.is_symlink():
            total += p.stat().st_blocks * 512
    return total


def copy_usr_tree(dest: Path, limit: int) -> int:
    """Copy real files from /usr (sorted, deterministic) until ``limit`` bytes; return the bytes copied."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    copied = 0
    for root, dirs, files in os.walk("/usr"):
        dirs.sort()
        for name in sorted(files):
            src = Path(root) / name
            if src.is_symlink() or not src.is_file():
                continue
            size = src.stat().st_size
            if copied + size > limit:
                return copied
            target = dest / src.relative_to("/usr")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copy2(src, target)
            except OSError:
                continue
            copied += size
    return copied


def scatter_changes(image: Path, start: int, end: int, total: int, block: int = 64 * 1024, seed: int = 1) -> int:
    """Overwrite ``total`` bytes of ``image`` in ``block``-sized random blocks between ``start`` and ``end``."""
    rng = random.Random(seed)
    n = total // block
    offsets = sorted(rng.sample(range(start // block, end // block), n))
    with open(image, "r+b") as f:
        for o in offsets:
            f.seek(o * block)
            f.write(rng.randbytes(block))
    return n * block


def run_borg(repo: Path, image: Path, step: str, init: bool, passphrase: str) -> Run:
    """borg's backup of ``image`` as these benchmarks run it (fixed 4 MiB chunks, zstd 3, repokey-blake2), cold;
    ``read_bytes`` is the archive's original size: borg reads the whole file every time."""
    env = dict(os.environ, BORG_PASSPHRASE=passphrase, BORG_BASE_DIR=f"{repo}-base")
    if init:
        subprocess.run(["borg", "init", "-e", "repokey-blake2", str(repo)], env=env, check=True, capture_output=True)
    drop_caches()
    argv = ["borg", "create", "--json", "--chunker-params", "fixed,4194304", "-C", "zstd,3", f"{repo}::{step}"]
    secs, rss, out = timed([*argv, str(image)], env)
    return Run("borg", step, secs, rss, du(repo), int(json.loads(out)["archive"]["stats"]["original_size"]))


def write_json(path: Path, runs: list[Run], extra: dict[str, object]) -> None:
    path.write_text(json.dumps({"runs": [r.__dict__ for r in runs], **extra}, indent=2) + "\n")
