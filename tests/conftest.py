"""Shared fixtures: a real `vbfs` process runner and small real disk images (GPT + ext4)."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vbfs.testing.images import gpt_ext4, write_tree
from vbfs.testing.vcsim import VCenterSimulator

MiB = 1024 * 1024


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * MiB):
            h.update(block)
    return h.hexdigest()


def random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def copy_sparse(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
    return dst


class Vbfs:
    """Runs the real `vbfs` command in a child process."""

    def __init__(self, repo: Path, env: dict[str, str]):
        self.repo = repo
        self.env = env

    def __call__(
        self, *args: str, check: bool = True, extra_env: dict[str, str] | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        env = dict(self.env, **(extra_env or {}))
        proc = subprocess.run(
            [sys.executable, "-m", "vbfs.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"vbfs {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
        return proc

    def init(self, encryption: str = "none") -> None:
        self("init", "-e", encryption)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Repositories opened by the tests themselves keep their cache (catalogs, security records) in a folder of the
    test run, never in the home folder of whoever runs the tests."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture
def make_vbfs(tmp_path: Path) -> Callable[..., Vbfs]:
    def make(repo: Path | None = None, passphrase: str = "correct horse") -> Vbfs:
        repo = repo or tmp_path / "repo"
        env = {k: v for k, v in os.environ.items() if not k.startswith("VBFS_")}
        env.update(VBFS_REPO=str(repo), VBFS_PASSPHRASE=passphrase, XDG_CACHE_HOME=str(tmp_path / "cache"))
        return Vbfs(repo, env)

    return make


@pytest.fixture
def vbfs(make_vbfs: Callable[..., Vbfs]) -> Vbfs:
    v = make_vbfs()
    v.init()
    return v


def guest_files(seed: int = 1) -> dict[str, bytes | str]:
    return {
        "etc/hostname": "web01\n",
        "etc/nginx/nginx.conf": "worker_processes 2;\n" * 50,
        "srv/data/blob.bin": random_bytes(6 * MiB, seed),
        "srv/data/text.txt": "".join(f"line {i} of seed {seed}\n" for i in range(100000)),
    }


@pytest.fixture(scope="session")
def template_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64 MiB GPT disk with an ext4 partition holding ~8 MiB of files (sparse)."""
    d = tmp_path_factory.mktemp("template")
    tree = write_tree(d / "tree", guest_files())
    return gpt_ext4(d / "template.raw", 64 * MiB, tree)


@pytest.fixture(scope="session")
def guest_disks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A GPT disk with ext4, XFS, FAT32, LVM2/ext4 and an unknown partition, and an MBR disk with NTFS."""
    if os.geteuid() != 0:
        pytest.skip("building XFS, LVM2 and NTFS test images needs root (loop devices, ntfs-3g)")
    from tests.guest_images import build_linux_disk, build_windows_disk

    work = tmp_path_factory.mktemp("guests")
    return {"linux": build_linux_disk(work), "windows": build_windows_disk(work), "work": work}


class Mount:
    def __init__(self, vbfs: Vbfs, path: Path):
        self.vbfs = vbfs
        self.path = path

    def log(self) -> str:
        logs = list(self.vbfs.repo.glob("mount.log")) + list((self.vbfs.repo.parent / "cache").rglob("mount.log"))
        return "\n".join(p.read_text() for p in logs)


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[Callable[[Vbfs], Mount]]:
    """Mount a repository for real (a background `vbfs mount`), unmount in teardown, show the log on failure."""
    mounts: list[Mount] = []

    def mount(v: Vbfs) -> Mount:
        path = tmp_path / f"mnt{len(mounts)}"
        path.mkdir()
        v("mount", str(path))
        assert os.path.ismount(path)
        m = Mount(v, path)
        mounts.append(m)
        return m

    yield mount
    from vbfs.fuse.mount import is_mounted

    for m in mounts:
        if is_mounted(m.path):
            m.vbfs("umount", str(m.path), check=False)
        print(f"--- mount log of {m.path} ---\n{m.log()}")


@pytest.fixture
def vcsim() -> Iterator[VCenterSimulator]:
    """govmomi's vCenter simulator with vbfs's CBT additions (tools/vcsim), on loopback; stopped by its PID."""
    exe = Path(sys.executable).parent / "vbfs-vcsim"
    if not exe.exists():
        pytest.skip("the simulator is built by tools/setup")
    sim = VCenterSimulator(exe)
    try:
        yield sim
    finally:
        sim.stop()
