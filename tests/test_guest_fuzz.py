"""Seeded random damage to small ext4, XFS, FAT, NTFS and Btrfs images: parsing stays bounded and clean.

For every seed and filesystem, bytes of the image's metadata (the sectors that a walk of the clean image reads,
less those with file contents, which carry a marker) are changed. Each damaged image is opened through the
same path the mount uses (``discover``, the filesystem adapter, the tree, ``iter_tree``) in a child process with
a watchdog, every file read and every symlink followed; the first seed of each filesystem also goes the whole way
with the real CLI: backup (whose guest-file index walks the guestfs layer with the folder rules the tree shares,
vbfs/guestfs/walk.py), mount, ``find``, restore. Asserted: no hang, no internal error, memory
under :data:`MEMORY_BOUND`, and nothing written outside the restore target.

A failure names its filesystem and seed; ``FUZZ_SEEDS=7,8 pytest tests/test_guest_fuzz.py`` replays those seeds.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import MiB, Vbfs
from tests.test_hostile_guests import LiveMount, measured, outside, restore_into
from vbfs.testing.images import blank, fat32_file, ntfs_file

pytestmark = pytest.mark.slow

SEEDS = [int(s) for s in os.environ.get("FUZZ_SEEDS", "1,2,3,4,5,6,7,8,9,10,11,12").split(",") if s]
MEMORY_BOUND = 256 * MiB  # peak resident size of the child that walks every damaged image of one filesystem
PER_IMAGE = 30.0  # seconds one damaged image may take to walk (its parser calls have 3 s each)
BUDGET = {"VBFS_PARSE_SECONDS": "3", "VBFS_INDEX_SECONDS": "20"}
MARK = b"FUZZDATA"  # every 512-byte sector of file contents starts with it: such sectors are left alone
READ_CAP = 16 * MiB  # read at most this much of one file (a damaged size may claim a huge, legal, sparse file)


def _contents(i: int, sectors: int) -> bytes:
    return b"".join(MARK + f"{i:04d}:{k:06d}".encode().ljust(504, b".") for k in range(sectors))


def _guest_tree(root: Path, links: bool) -> Path:
    for i, (rel, sectors) in enumerate(
        [("etc/hostname", 1), ("etc/app/config.ini", 3), ("srv/data.bin", 300), ("srv/logs/a.log", 9)]
        + [(f"many/f{k:02d}.txt", 1 + k % 3) for k in range(40)]
    ):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(_contents(i, sectors))
    if links:
        os.symlink("../etc/hostname", root / "srv/hostname-link")
        os.symlink("/" + "a-long-target/" * 6, root / "srv/slow-link")
        os.link(root / "srv/data.bin", root / "srv/data-hard.bin")
    return root


def _xfs(path: Path, tree: Path) -> Path:
    lines = ["/dev/null", "0 0", "d--755 0 0"]

    def add(folder: Path) -> None:
        for p in sorted(folder.iterdir()):
            if p.is_symlink():
                lines.append(f"{p.name} l--777 0 0 {os.readlink(p)}")
            elif p.is_dir():
                lines.append(f"{p.name} d--755 0 0")
                add(p)
                lines.append("$")
            else:
                lines.append(f"{p.name} ---644 0 0 {p}")

    add(tree)
    lines.append("$")
    proto = path.with_suffix(".proto")
    proto.write_text("\n".join(lines) + "\n")
    blank(path, 300 * MiB)
    subprocess.run(["mkfs.xfs", "-q", "-f", "-p", str(proto), str(path)], check=True, capture_output=True)
    return path


def _build(kind: str, work: Path) -> Path:
    tree = _guest_tree(work / f"tree-{kind}", links=kind in ("ext", "xfs", "btrfs"))
    image = work / f"base-{kind}.raw"
    if kind == "ext":
        blank(image, 8 * MiB)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image)], check=True, capture_output=True)
    elif kind == "xfs":
        _xfs(image, tree)
    elif kind == "fat":
        fat32_file(image, 40 * MiB, tree)
    elif kind == "ntfs":
        ntfs_file(image, 8 * MiB, tree, work, start_sector=0)
    else:
        blank(image, 128 * MiB)
        subprocess.run(["mkfs.btrfs", "-q", "-f", "-r", str(tree), str(image)], check=True, capture_output=True)
    return image


def _metadata_sectors(image: Path) -> list[int]:
    """Offsets of the sectors a clean walk reads that hold no file contents: the metadata the parsers use."""
    read: set[int] = set()
    walk_image(str(image), read)
    out = []
    with open(image, "rb") as f:
        for n in sorted(read):
            f.seek(n * 512)
            if not f.read(512).startswith(MARK):
                out.append(n * 512)
    return out


def mutate(base: Path, out: Path, seed: int, sectors: list[int]) -> Path:
    """A copy of ``base`` with bytes of 1 to 24 metadata sectors changed, the same for the same seed."""
    rng = random.Random(seed)
    subprocess.run(["cp", "--sparse=always", str(base), str(out)], check=True)
    with open(out, "r+b") as f:
        for sector in rng.sample(sectors, min(len(sectors), rng.randint(1, 24))):
            for _ in range(rng.randint(1, 8)):
                f.seek(sector + rng.randrange(512))
                if rng.random() < 0.25:  # a large number where a size, a count or a pointer may be
                    f.write(rng.choice([b"\xff\xff\xff\x7f", b"\x00\x00\x00\x80", rng.randbytes(4)]))
                else:
                    f.write(bytes([rng.randrange(1, 256)]))
    return out


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[int]]]:
    if os.geteuid() != 0:
        pytest.skip("building the NTFS image needs root (ntfs-3g)")
    work = tmp_path_factory.mktemp("fuzz")
    out = {}
    for kind in ("ext", "xfs", "fat", "ntfs", "btrfs"):
        image = _build(kind, work)
        sectors = _metadata_sectors(image)
        assert len(sectors) > 8, kind
        out[kind] = (image, sectors)
    return out


# ---- the walker, run in a child process --------------------------------------------------------------------------

_WALKER = """
import sys
from tests.test_guest_fuzz import walk_images
walk_images(sys.argv[1:])
"""


def walk_image(path: str, read: set[int] | None = None) -> tuple[int, int]:
    """Walk an image as the mount and the index do: (entries seen, errors). ``read`` collects the sectors read."""
    from vbfs.errors import VbfsError
    from vbfs.guestfs.bounds import parse_seconds
    from vbfs.guestfs.filesystems import BUILTIN
    from vbfs.guestfs.stream import RangeReader
    from vbfs.guestfs.volumes import discover
    from vbfs.vfs import File, Symlink, VolumeRoot, iter_tree

    seen = errors = 0

    def count(_where: str, _exc: VbfsError) -> None:
        nonlocal errors
        errors += 1

    with open(path, "rb") as f:
        fd = f.fileno()

        def read_at(off: int, n: int) -> bytes:
            if read is not None:
                read.update(range(off // 512, (off + n + 511) // 512))
            return os.pread(fd, n, off)

        disk = RangeReader(read_at, os.fstat(fd).st_size)
        try:
            volumes = discover(disk)
        except VbfsError:
            return 0, 1
        for vol in volumes:
            if vol.fstype is None:
                continue
            try:
                fs = BUILTIN[vol.fstype](vol.reader.sub(0, vol.size), vol.name)
                root = VolumeRoot(fs, vol, ("fuzz",))
                for _path, node in iter_tree(root, "", seconds=PER_IMAGE - 2 * parse_seconds(), on_error=count):
                    seen += 1
                    try:
                        if isinstance(node, Symlink):
                            _ = node.target
                        elif isinstance(node, File):
                            off, end = 0, min(node.attr.size, READ_CAP)
                            while off < end:
                                data = node.read(off, 1 << 20)
                                if not data:
                                    break
                                off += len(data)
                    except VbfsError:
                        errors += 1
            except VbfsError:
                errors += 1
    return seen, errors


def walk_images(paths: list[str]) -> None:
    """Walk each image; one JSON line per image on stdout, then the peak memory of the process."""
    import resource

    for path in paths:
        t0 = time.monotonic()
        print(json.dumps({"start": path}), flush=True)
        seen, errors = walk_image(path)
        line = {"image": path, "entries": seen, "errors": errors, "seconds": round(time.monotonic() - t0, 2)}
        print(json.dumps(line), flush=True)
    print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}), flush=True)


def _limit() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (4096 * MiB, 4096 * MiB))


def _run_walker(images: dict[int, Path]) -> Iterator[tuple[int, dict[str, float]]]:
    order = list(images)
    proc = subprocess.Popen(
        [sys.executable, "-c", _WALKER, *[str(images[s]) for s in order]],
        cwd=Path(__file__).parent.parent,
        env=dict(os.environ, **BUDGET),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_limit,
    )
    try:
        out, err = proc.communicate(timeout=PER_IMAGE * len(order) + 15)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        started = [json.loads(x)["start"] for x in out.splitlines() if '"start"' in x]
        seed = order[[str(images[s]) for s in order].index(started[-1])] if started else order[0]
        pytest.fail(f"seed {seed}: the walk of {started[-1] if started else '?'} hung (FUZZ_SEEDS={seed} replays)")
    lines = [json.loads(x) for x in out.splitlines()]
    done = {x["image"]: x for x in lines if "image" in x}
    assert proc.returncode == 0 and "Traceback" not in err, f"seeds {order}: exit {proc.returncode}\n{err[-3000:]}"
    peak = next(x["peak"] for x in lines if "peak" in x)
    for seed in order:
        yield seed, {**done[str(images[seed])], "peak": peak}


@pytest.mark.parametrize("kind", ["ext", "xfs", "fat", "ntfs", "btrfs"])
def test_damaged_metadata_is_parsed_within_bounds(
    kind: str, bases: dict[str, tuple[Path, list[int]]], tmp_path: Path
) -> None:
    base, sectors = bases[kind]
    images = {seed: mutate(base, tmp_path / f"fz-{kind}-{seed}.raw", seed * 100 + len(kind), sectors) for seed in SEEDS}
    clean = {0: base}
    (_, baseline), *_ = _run_walker(clean)
    assert baseline["errors"] == 0 and baseline["entries"] >= 44, (kind, baseline)
    results = dict(_run_walker(images))
    damaged = 0
    for seed, r in results.items():
        assert r["seconds"] < PER_IMAGE, f"{kind} seed {seed}: {r} (FUZZ_SEEDS={seed} replays)"
        damaged += r["errors"] > 0 or r["entries"] != baseline["entries"]
    peak = max(r["peak"] for r in results.values())
    slowest = max(r["seconds"] for r in results.values())
    print(
        f"figures: fuzz {kind}: {len(results)} seeds, {damaged} changed what was read, peak {peak / MiB:.0f} MiB, "
        f"slowest {slowest:.1f} s"
    )
    assert peak < MEMORY_BOUND, f"{kind} seeds {list(results)}: peak {peak / MiB:.0f} MiB"
    assert damaged > 0, f"{kind}: no seed changed anything: the mutation misses the metadata"


@pytest.mark.parametrize("seed", SEEDS[:2])
@pytest.mark.parametrize("kind", ["ext", "xfs", "fat", "ntfs", "btrfs"])
def test_damaged_image_backs_up_mounts_and_restores(
    kind: str, seed: int, bases: dict[str, tuple[Path, list[int]]], vbfs: Vbfs, tmp_path: Path
) -> None:
    base, sectors = bases[kind]
    image = mutate(base, tmp_path / f"fz{kind}.raw", seed * 100 + len(kind), sectors)
    backup = measured(vbfs, "backup", f"image://{image}", env=BUDGET)
    assert backup.returncode == 0, f"{kind} seed {seed}: {backup}"
    assert backup.peak < MEMORY_BOUND, f"{kind} seed {seed}: {backup}"
    m = LiveMount(vbfs, tmp_path / "mnt", env=BUDGET)
    try:
        top = m.path / f"fz{kind}/latest/files"
        try:  # head, not cat: a damaged size may be a legal sparse file of terabytes
            subprocess.run(
                ["find", str(top), "-type", "f", "-exec", "head", "-c", str(READ_CAP), "{}", "+"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=120,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"{kind} seed {seed}: the walk of the mount hung")
        assert m.peak() < MEMORY_BOUND, f"{kind} seed {seed}"
        log = m.log()
        assert "Traceback" not in log and "internal error" not in log, f"{kind} seed {seed}:\n{log[-3000:]}"
    finally:
        m.close()
    started = time.time()
    target = tmp_path / "restored"
    out = restore_into(vbfs, f"fz{kind}@latest:/files/fz{kind}/whole", target)
    assert out.peak < MEMORY_BOUND, f"{kind} seed {seed}: {out}"
    assert not outside(tmp_path, target, started), f"{kind} seed {seed}"
