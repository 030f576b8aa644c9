"""Build test disk images with real partition tables and filesystems, without mounting anything.

Uses sfdisk (fdisk), mkfs.ext4 -d (e2fsprogs) and qemu-img (qemu-utils). Every function returns the path it made.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

MiB = 1024 * 1024


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def write_tree(root: Path, files: dict[str, bytes | str]) -> Path:
    """Create ``files`` (relative path → content) below ``root``."""
    for rel, content in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content.encode() if isinstance(content, str) else content)
    return root


def gpt_ext4(path: Path, size: int, tree: Path, fs_size: int | None = None) -> Path:
    """A GPT disk of ``size`` bytes with one Linux partition from 1 MiB holding ext4 made from ``tree``.

    The file is sparse: only what mkfs writes is allocated.
    """
    if path.exists():
        path.unlink()
    with open(path, "wb") as f:
        f.truncate(size)
    part_size = (fs_size or (size - 2 * MiB)) // 512
    _run("sh", "-c", f"printf 'label: gpt\\nstart=2048, size={part_size}, type=L\\n' | sfdisk -q '{path}'")
    _run(
        "mkfs.ext4",
        "-q",
        "-F",
        "-E",
        f"offset={MiB}",
        "-d",
        str(tree),
        "-L",
        "vbfs-test",
        str(path),
        f"{part_size // 2}k",
    )
    return path


def convert(raw: Path, fmt: str, out: Path, options: str = "") -> Path:
    """Convert a raw image to qcow2, vmdk, vhd or vhdx with qemu-img (``options`` as for ``qemu-img -o``)."""
    qfmt = {"vhd": "vpc"}.get(fmt, fmt)
    _run(
        "qemu-img",
        "convert",
        "-f",
        "raw",
        "-O",
        qfmt,
        *(["-o", options] if options else []),
        str(raw),
        str(out),
    )
    return out


def have(*tools: str) -> bool:
    return all(shutil.which(t) or os.path.exists(f"/usr/sbin/{t}") or os.path.exists(f"/sbin/{t}") for t in tools)
