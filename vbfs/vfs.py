"""The repository as a tree of plain objects: guests, snapshots, and what each snapshot holds.

This module defines what a snapshot looks like as a filesystem (DESIGN.md section 5) and nothing about how that
tree is served: the CLI (``ls``, ``restore``) and the FUSE adapter both walk it. Errors are domain errors
(:class:`PathNotFound`, :class:`IntegrityError`); the adapters map them to exit codes or errnos.

Snapshot folder::

    vm.json                 the hypervisor's metadata and how consistent the snapshot is
    config/<file>           original configuration files, when the hypervisor gives them
    disks/<disk>.img        each disk as a raw image, random access
"""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from vbfs.errors import PathNotFound
from vbfs.store.cache import ChunkCache
from vbfs.store.objects import DiskImage, StreamFile
from vbfs.store.repository import ZERO_ID, Repository


@dataclass(frozen=True)
class Attr:
    mode: int  # full st_mode, type bits included
    size: int
    mtime_ns: int
    uid: int = 0
    gid: int = 0
    nlink: int = 1

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


class Node:
    name: str
    attr: Attr


class Dir(Node):
    def children(self) -> list[Node]:
        raise NotImplementedError

    def lookup(self, name: str) -> Node:
        for child in self.children():
            if child.name == name:
                return child
        raise PathNotFound(f"no {name!r} here")


class File(Node):
    def read(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def data_extents(self) -> Iterator[tuple[int, int]] | None:
        """Ranges that may hold non-zero bytes, for sparse copies; ``None`` if unknown."""
        return None


class StaticDir(Dir):
    def __init__(self, name: str, mtime_ns: int, kids: list[Node]):
        self.name = name
        self.attr = Attr(stat.S_IFDIR | 0o555, 0, mtime_ns, nlink=2)
        self._kids = kids

    def children(self) -> list[Node]:
        return list(self._kids)


class BytesFile(File):
    def __init__(self, name: str, data: bytes, mtime_ns: int):
        self.name = name
        self.data = data
        self.attr = Attr(stat.S_IFREG | 0o444, len(data), mtime_ns)

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]


class DiskFile(File):
    def __init__(self, image: DiskImage, mtime_ns: int):
        self.name = f"{image.name}.img"
        self.image = image
        self.attr = Attr(stat.S_IFREG | 0o444, image.size, mtime_ns)

    def read(self, offset: int, length: int) -> bytes:
        return self.image.read(offset, length)

    def data_extents(self) -> Iterator[tuple[int, int]]:
        for i, cid in self.image.entries():
            if cid != ZERO_ID:
                yield i * self.image.chunk_size, self.image.chunk_length(i)


class StreamNode(File):
    def __init__(self, name: str, stream: StreamFile, mtime_ns: int):
        self.name = name
        self.stream = stream
        self.attr = Attr(stat.S_IFREG | 0o444, stream.size, mtime_ns)

    def read(self, offset: int, length: int) -> bytes:
        return self.stream.read(offset, length)


def _time_ns(iso: str) -> int:
    t = datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return int(t.timestamp()) * 1_000_000_000 + t.microsecond * 1000


def vm_json(manifest: dict[str, Any]) -> bytes:
    doc = {
        "guest": manifest["guest"],
        "snapshot": {
            "id": manifest["id"],
            "name": manifest["name"],
            "time": manifest["time"],
            "finished": manifest.get("finished"),
        },
        "source": manifest["source"],
        "consistency": manifest.get("consistency"),
        "disks": [
            {"name": d["name"], "size": d["size"], "mode": d.get("mode"), "details": d.get("details", {})}
            for d in manifest["disks"]
        ],
        "metadata": manifest.get("metadata", {}),
        "notes": manifest.get("notes", []),
    }
    return json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"


class SnapshotDir(Dir):
    """One snapshot's folder; children are built lazily from its manifest."""

    def __init__(self, repo: Repository, manifest: dict[str, Any], cache: ChunkCache):
        self.repo = repo
        self.manifest = manifest
        self.cache = cache
        self.name = manifest["name"]
        mtime = _time_ns(manifest["time"])
        self.attr = Attr(stat.S_IFDIR | 0o555, 0, mtime, nlink=2)
        self._kids: list[Node] | None = None

    def children(self) -> list[Node]:
        if self._kids is None:
            m = self.manifest
            mtime = self.attr.mtime_ns
            disks = [DiskFile(DiskImage(self.repo, d, self.cache), mtime) for d in m["disks"]]
            kids: list[Node] = [
                BytesFile("vm.json", vm_json(m), mtime),
                StaticDir("disks", mtime, list(disks)),
            ]
            if m.get("config"):
                kids.append(
                    StaticDir(
                        "config",
                        mtime,
                        [
                            StreamNode(n, StreamFile(self.repo, ref, self.cache), mtime)
                            for n, ref in sorted(m["config"].items())
                        ],
                    )
                )
            self._kids = kids
        return list(self._kids)


def walk_path(node: Node, path: str) -> Node:
    """Follow a slash-separated path from ``node``; ``PathNotFound`` names the first missing part."""
    done = ""
    for part in [p for p in path.split("/") if p and p != "."]:
        if not isinstance(node, Dir):
            raise PathNotFound(f"{done or '/'} is not a folder")
        try:
            node = node.lookup(part)
        except PathNotFound:
            raise PathNotFound(f"no such path in the snapshot: {done}/{part}") from None
        done += "/" + part
    return node
