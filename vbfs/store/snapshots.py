"""The snapshots of a guest as the repository has them: what the write path asks before a backup.

A backup starts from the guest's latest snapshot (its change tokens and chunk lists) and names the new one so
that no snapshot of the guest has that name; both answers come from ``snapshots/`` in the repository, never from
the catalog, which is only a cache of it. A manifest that cannot be read is left out (``check`` reports it).

Manifests are immutable, so the header of each (guest, name, time) is decoded once and kept: in memory for the
process, and in a local cache beside the catalog, sealed in the object envelope like the chunk index's cache
(:mod:`vbfs.store.chunkindex`), so that a cache that is damaged, altered or another repository's is ignored and
costs only time. The listing of ``snapshots/`` decides which snapshots exist; the cache only saves decoding.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from vbfs.errors import VbfsError
from vbfs.store.manifest import Manifest
from vbfs.store.repository import Repository

CACHE_NAME = "snapshot-headers"
_CACHE_OBJECT = "cache/snapshot-headers"  # the name the cache file is sealed under


@dataclass(frozen=True)
class SnapshotHeader:
    id: str
    guest: str
    name: str
    time: str


_known: dict[tuple[str, str], SnapshotHeader] = {}  # (repository id, snapshot id) → its header
_loaded: set[str] = set()  # repositories whose local cache was read by this process
_lock = threading.Lock()


def cache_path(repo: Repository) -> Path:
    return repo.catalog_path().parent / CACHE_NAME


def _read_cache(repo: Repository) -> dict[str, SnapshotHeader]:
    try:
        doc = json.loads(repo.codec.decode(cache_path(repo).read_bytes(), _CACHE_OBJECT))
        if doc.get("repository") != repo.id:
            return {}
        return {str(sid): SnapshotHeader(str(sid), str(g), str(n), str(t)) for sid, (g, n, t) in doc["headers"].items()}
    except (OSError, VbfsError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def _write_cache(repo: Repository, headers: list[SnapshotHeader]) -> None:
    """Save the headers beside the catalog (atomically); a cache that cannot be written costs only time."""
    path = cache_path(repo)
    doc = {"repository": repo.id, "headers": {h.id: [h.guest, h.name, h.time] for h in headers}}
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(repo.codec.encode(json.dumps(doc, sort_keys=True).encode(), _CACHE_OBJECT))
        os.replace(tmp, path)
    except (OSError, VbfsError):
        with contextlib.suppress(OSError):
            tmp.unlink()


def headers(repo: Repository, guest: str | None = None) -> list[SnapshotHeader]:
    """The readable snapshots of the repository (of ``guest`` only, when given), oldest first."""
    with _lock:
        if repo.id not in _loaded:
            _loaded.add(repo.id)
            for sid, h in _read_cache(repo).items():
                _known.setdefault((repo.id, sid), h)
    listed = repo.snapshot_ids()
    every: list[SnapshotHeader] = []
    new = False
    for snap_id in listed:
        key = (repo.id, snap_id)
        with _lock:
            header = _known.get(key)
        if header is None:
            try:
                m = repo.load_manifest(snap_id)
            except VbfsError:
                continue  # perhaps a passing failure: asked again next time
            header = SnapshotHeader(m.id, m.guest, m.name, m.time)
            with _lock:
                _known[key] = header
            new = True
        every.append(header)
    if new and not repo.read_only:
        _write_cache(repo, every)
    found = [h for h in every if guest is None or h.guest == guest]
    found.sort(key=lambda h: (h.time, h.id))
    return found


def latest_manifest(repo: Repository, guest: str) -> Manifest | None:
    """The guest's newest snapshot that can be read, or ``None``."""
    for header in reversed(headers(repo, guest)):
        try:
            return repo.load_manifest(header.id)
        except VbfsError:
            continue
    return None


def names_of(repo: Repository, guest: str) -> set[str]:
    """The names of the guest's snapshots (one listing of ``snapshots/``)."""
    return {h.name for h in headers(repo, guest)}
