"""What a snapshot manifest may hold: every field a reader uses, with its type and range, checked on load.

A manifest that passed :func:`validate_manifest` can be listed, indexed, mounted, checked and restored from
without a reader meeting a missing key, a string where a number belongs or a number SQLite cannot hold; anything
else is an :class:`IntegrityError` naming the snapshot and the field.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from vbfs.errors import IntegrityError, RepositoryFormatError

MANIFEST_VERSION = 1
INDEX_PIECE_ENTRIES = 65536
MAX_SIZE = 2**60  # a disk, stream or file index; their sum for a snapshot stays below 2**62 too
MIN_CHUNK_SIZE, MAX_CHUNK_SIZE = 64 * 1024, 16 * 1024 * 1024
MAX_ITEMS = 4096  # disks, config files, notes
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


class _Bad(Exception):
    pass


def _int(v: Any, what: str, lo: int = 0, hi: int = MAX_SIZE) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise _Bad(f"{what} is not a whole number from {lo} to {hi}")
    return v


def _str(v: Any, what: str, limit: int = 4096) -> str:
    if not isinstance(v, str) or len(v) > limit or "\0" in v:
        raise _Bad(f"{what} is not a text of at most {limit} characters")
    return v


def _folder_name(v: Any, what: str) -> str:
    name = _str(v, what, 255)
    if not name or "/" in name or name in (".", "..") or len(name.encode("utf-8", "surrogatepass")) > 255:
        raise _Bad(f"{what} is not usable as a folder name")
    return name


def _time(v: Any, what: str) -> str:
    try:
        datetime.strptime(_str(v, what, 64), _TIME_FORMAT)
    except ValueError:
        raise _Bad(f"{what} is not a time") from None
    return str(v)


def _dict(v: Any, what: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _Bad(f"{what} is not an object")
    return v


def _list(v: Any, what: str, limit: int = MAX_ITEMS) -> list[Any]:
    if not isinstance(v, list) or len(v) > limit:
        raise _Bad(f"{what} is not a list of at most {limit} entries")
    return v


def _pieces(v: Any, what: str, count: int | None = None) -> None:
    pieces = _list(v, what, 2**24)
    for p in pieces:
        if not isinstance(p, str) or not _HEX64.fullmatch(p):
            raise _Bad(f"{what} holds an entry that is not a chunk id")
    if count is not None and len(pieces) != count:
        raise _Bad(f"{what} has {len(pieces)} pieces, expected {count}")


def _stream(v: Any, what: str) -> int:
    ref = _dict(v, what)
    size = _int(ref.get("size"), f"{what} size")
    _pieces(ref.get("index"), f"{what} chunk list")
    if "entries" in ref:
        _int(ref["entries"], f"{what} entries")
    return size


def _check(m: Any, snap_id: str) -> None:
    m = _dict(m, "the manifest")
    if m.get("id") != snap_id:
        raise IntegrityError(f"snapshot manifest {snap_id} names another snapshot")
    version = m.get("version", 0)
    if type(version) is int and version > MANIFEST_VERSION:
        raise RepositoryFormatError(f"snapshot {snap_id} was written by a newer vbfs")
    _int(version, "version", 1, MANIFEST_VERSION)
    _folder_name(m.get("guest"), "guest")
    _folder_name(m.get("name"), "name")
    _time(m.get("time"), "time")
    if m.get("finished") is not None:
        _time(m["finished"], "finished")
    source = _dict(m.get("source"), "source")
    _str(source.get("hypervisor"), "source hypervisor", 64)
    _str(source.get("url"), "source url")
    if m.get("consistency") is not None:
        _str(m["consistency"], "consistency", 64)
    _dict(m.get("metadata", {}), "metadata")
    total = 0
    names = set()
    for i, d in enumerate(_list(m.get("disks"), "disks")):
        d = _dict(d, f"disk {i}")
        name = _folder_name(d.get("name"), f"disk {i} name")
        if name in names:
            raise _Bad(f"two disks are named {name!r}")
        names.add(name)
        size = _int(d.get("size"), f"disk {name} size")
        cs = _int(d.get("chunk_size"), f"disk {name} chunk size", MIN_CHUNK_SIZE, MAX_CHUNK_SIZE)
        if cs & (cs - 1):
            raise _Bad(f"disk {name} chunk size is not a power of two")
        chunks = -(-size // cs)
        _pieces(d.get("index"), f"disk {name} chunk list", -(-chunks // INDEX_PIECE_ENTRIES))
        if d.get("token") is not None:
            _str(d["token"], f"disk {name} change token", 65536)
        if d.get("mode") is not None and d["mode"] not in ("full", "incremental"):
            raise _Bad(f"disk {name} mode is unknown")
        if "read_bytes" in d:
            _int(d["read_bytes"], f"disk {name} read bytes")
        _dict(d.get("details", {}), f"disk {name} details")
        total += size
    config = _dict(m.get("config", {}), "config")
    if len(config) > MAX_ITEMS:
        raise _Bad("too many config files")
    for cname, ref in config.items():
        total += _stream(ref, f"config file {_folder_name(cname, 'a config file name')!r}")
    if total > 2**62:
        raise _Bad("the disks and files add up to more than 2^62 bytes")
    if m.get("files_index") is not None:
        _stream(m["files_index"], "files_index")
    for k, v in _dict(m.get("stats", {}), "stats").items():
        if type(v) not in (int, float) or not -(2**62) <= v <= 2**62:
            raise _Bad(f"stats {str(k)[:40]!r} is not a number in range")
    for note in _list(m.get("notes", []), "notes", 100000):
        _str(note, "a note", 65536)
    if "vbfs_version" in m:
        _str(m["vbfs_version"], "vbfs_version", 64)


def validate_manifest(manifest: Any, snap_id: str) -> dict[str, Any]:
    """The manifest if it is whole and its own; :class:`IntegrityError` (or a newer-format error) otherwise."""
    if not _HEX32.fullmatch(snap_id):
        raise IntegrityError(f"snapshots/{snap_id[:80]!r} is not a snapshot manifest name")
    try:
        _check(manifest, snap_id)
    except _Bad as exc:
        raise IntegrityError(f"snapshot manifest {snap_id} is damaged ({exc})") from None
    return dict(manifest)
