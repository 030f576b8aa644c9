"""Shared fixtures: a real `vbfs` process runner and small real disk images (GPT + ext4)."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from vbfs.testing.images import gpt_ext4, write_tree

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
