"""Marks on snapshots kept beside their manifests: protection (no retention removes the snapshot) and the records
of snapshots that were forgotten on purpose.

Manifests are immutable, so a mark is an object of its own, in the object envelope under its own name (so
checksummed, or encrypted and authenticated, like every object)::

    protected/<snapshot id>     {"snapshot": id, "guest", "name", "time": when it was protected, "host": who}
    forgotten/<snapshot id>     {"snapshot": id, "guest", "name", "snapshot_time", "time": when, "host", "why"}

A forget record is written before the manifest is deleted. It is how every catalog, on any host, tells a snapshot
that was forgotten from one that disappeared (which it reports until acknowledged): in an encrypted repository a
record cannot be made without the key. A record whose manifest still exists is a forget that was interrupted;
the next ``gc`` (or ``prune``) finishes it. Records stay: they cost a few hundred bytes per snapshot ever removed.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from vbfs.errors import IntegrityError, ObjectMissing, VbfsError
from vbfs.failpoints import failpoint
from vbfs.store.manifest import format_time

if TYPE_CHECKING:
    from vbfs.store.manifest import Manifest
    from vbfs.store.repository import Repository

PROTECTED = "protected/"
FORGOTTEN = "forgotten/"


class SnapshotProtected(VbfsError):
    pass


@dataclass(frozen=True)
class Mark:
    snapshot: str
    guest: str
    name: str
    time: str
    host: str
    why: str = ""


def _put(repo: Repository, name: str, doc: dict[str, Any]) -> None:
    repo.backend.put(name, repo.codec.encode(json.dumps(doc, sort_keys=True).encode(), name))


def _get(repo: Repository, prefix: str, snap_id: str) -> Mark | None:
    name = f"{prefix}{snap_id}"
    try:
        raw = repo.codec.decode(repo.backend.get(name), name)
        doc = json.loads(raw)
    except ObjectMissing:
        return None
    except (ValueError, RecursionError):
        raise IntegrityError(f"{name} is damaged (not JSON)") from None
    keys = ("snapshot", "guest", "name", "time", "host")
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), str) for k in keys) or doc["snapshot"] != snap_id:
        raise IntegrityError(f"{name} is damaged (not a mark of snapshot {snap_id})")
    why = doc.get("why", "")
    return Mark(
        doc["snapshot"], doc["guest"], doc["name"], doc["time"], doc["host"], why if isinstance(why, str) else ""
    )


def _ids(repo: Repository, prefix: str) -> set[str]:
    return {name[len(prefix) :] for name in repo.backend.list(prefix)}


def _now() -> str:
    return format_time(datetime.now(UTC))


# ---- protection -----------------------------------------------------------------------------------------------


def protected_ids(repo: Repository) -> set[str]:
    """The snapshots marked protected (one listing)."""
    return _ids(repo, PROTECTED)


def protect(repo: Repository, manifest: Manifest) -> bool:
    """Mark a snapshot protected; False when it already was."""
    if is_protected(repo, manifest.id):
        return False
    doc = {"snapshot": manifest.id, "guest": manifest.guest, "name": manifest.name, "time": _now()}
    _put(repo, f"{PROTECTED}{manifest.id}", {**doc, "host": socket.gethostname()})
    repo.backend.flush()
    return True


def unprotect(repo: Repository, snap_id: str) -> bool:
    """Remove a snapshot's protection; False when it had none."""
    if not is_protected(repo, snap_id):
        return False
    repo.backend.delete(f"{PROTECTED}{snap_id}")
    repo.backend.flush()
    return True


def is_protected(repo: Repository, snap_id: str) -> bool:
    return repo.backend.exists(f"{PROTECTED}{snap_id}")


# ---- forgetting -------------------------------------------------------------------------------------------------


def forgotten(repo: Repository, snap_id: str) -> Mark | None:
    """The forget record of a snapshot, or None; a damaged record counts as none (the snapshot is then reported as
    having disappeared, which is the safe side)."""
    try:
        return _get(repo, FORGOTTEN, snap_id)
    except IntegrityError:
        return None


def forgotten_ids(repo: Repository) -> set[str]:
    return _ids(repo, FORGOTTEN)


def forget(repo: Repository, manifest: Manifest, why: str) -> None:
    """Remove a snapshot: its forget record first, then its manifest. Its chunks stay until a garbage collection.

    Refused for a protected snapshot. The caller holds the gc lock (no other forget or gc runs)."""
    if is_protected(repo, manifest.id):
        raise SnapshotProtected(
            f"snapshot {manifest.guest}@{manifest.name} ({manifest.id[:8]}) is protected: "
            f"run vbfs unprotect {manifest.id[:8]} first if it really should go"
        )
    doc = {
        "snapshot": manifest.id,
        "guest": manifest.guest,
        "name": manifest.name,
        "snapshot_time": manifest.time,
        "time": _now(),
        "host": socket.gethostname(),
        "why": why,
    }
    _put(repo, f"{FORGOTTEN}{manifest.id}", doc)
    repo.backend.flush()
    failpoint("forget-recorded")
    repo.delete_manifest(manifest.id)
    failpoint("forget-done")


def finish_forgets(repo: Repository, snapshot_ids: set[str]) -> list[str]:
    """Delete the manifests whose forget was recorded but not finished (a forget that was interrupted); their ids.
    A protected snapshot's manifest is never deleted this way (it was protected after the record)."""
    done = []
    pending = sorted(forgotten_ids(repo) & snapshot_ids)
    if pending:
        prot = protected_ids(repo)
        for snap_id in pending:
            if snap_id in prot or forgotten(repo, snap_id) is None:
                continue
            repo.delete_manifest(snap_id)
            done.append(snap_id)
    return done
