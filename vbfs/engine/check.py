"""Check: is every snapshot in the repository whole, and (with ``verify_data``) is every chunk intact?

Without ``verify_data`` the check reads every manifest and chunk list and makes sure every chunk they name exists,
and that the base of every patch record they name exists too (patch records are small: they are read).
With it, every chunk is also read, decrypted, decompressed and hashed; a bad chunk is reported with each snapshot,
disk and offset that uses it.

Damage is reported, never raised: a manifest or chunk list that cannot be read is an error line for its snapshot
and the others are checked as before. Given the catalog, the check also reports snapshots that vanished without
being forgotten, and compares the catalog with the manifests (a catalog that differs is set aside and rebuilt).
The only things it changes are leftovers that are provably dead: temporaries of writers that are gone (and,
through the lock, locks of processes that are gone), each removal reported in a note.
"""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vbfs.engine.progress import NoProgress, Progress
from vbfs.errors import VbfsError

if TYPE_CHECKING:
    from vbfs.catalog import Catalog
from vbfs.store.backend import LocalBackend
from vbfs.store.codec import ID_SIZE, ChunkId
from vbfs.store.repository import PATCH_SUFFIX, STREAM_ENTRY, ZERO_ID, Repository, chunk_name_to_id


@dataclass
class CheckReport:
    snapshots: int = 0
    chunks_referenced: int = 0
    chunks_verified: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


Where = tuple[str, str, str, int]  # snapshot label, kind, item name, offset


def _failure(exc: BaseException) -> str:
    """An error that is not a VbfsError, as one line (damage the validation did not foresee, never a traceback)."""
    return str(exc) if isinstance(exc, VbfsError) else f"cannot be read ({type(exc).__name__}: {exc})"


def check(
    repo: Repository, verify_data: bool = False, progress: Progress | None = None, catalog: Catalog | None = None
) -> CheckReport:
    progress = progress or NoProgress()
    report = CheckReport()
    report.notes += repo.remove_leftovers()
    stored: set[ChunkId] = set()
    patches: set[ChunkId] = set()
    for name in repo.backend.list("chunks/"):
        cid = chunk_name_to_id(name)
        if cid is None:
            report.warnings.append(f"unexpected object {name}")
        else:
            stored.add(cid)
            if name.endswith(PATCH_SUFFIX):
                patches.add(cid)
    if isinstance(repo.backend, LocalBackend):
        tmp = repo.backend.leftover_temporaries()
        if tmp:
            report.warnings.append(f"{len(tmp)} temporary file(s) of writes in progress or of another host (harmless)")
    uses: dict[ChunkId, list[Where]] = defaultdict(list)

    def need(cid: ChunkId, where: Where) -> bool:
        if cid not in stored:
            report.errors.append(f"{_where(where)}: chunk {cid.hex()[:16]} is missing")
            return False
        if cid in patches and cid not in uses:  # each patch record once: its base must exist as well
            try:
                record = repo.chunk_patch(cid)
            except Exception as exc:
                report.errors.append(f"{_where(where)}: {_failure(exc)}")
                return False
            if record is not None and record.base != ZERO_ID and record.base not in stored:
                report.errors.append(
                    f"{_where(where)}: chunk {cid.hex()[:16]} is a patch of {record.base.hex()[:16]}, which is missing"
                )
                return False
        uses[cid].append(where)
        return True

    manifests: dict[str, dict[str, Any]] = {}
    for snap_id in repo.snapshot_ids():
        try:
            m = repo.load_manifest(snap_id)
        except Exception as exc:
            report.errors.append(f"snapshot {snap_id[:64]}: {_failure(exc)}")
            continue
        report.snapshots += 1
        manifests[snap_id] = m
        label = f"{m['guest']}@{m['name']} ({snap_id[:8]})"
        try:
            for d in m["disks"]:
                _check_disk(repo, label, d, need, report)
            for cname, ref in m.get("config", {}).items():
                _check_stream(repo, label, "config", cname, ref, need, report)
            if m.get("files_index"):
                _check_stream(repo, label, "file index", "", m["files_index"], need, report)
        except Exception as exc:
            report.errors.append(f"{label}: {_failure(exc)}")
    if catalog is not None:
        for v in catalog.vanished():
            report.errors.append(
                f"snapshot {v['guest']}@{v['name']} ({v['id']}) disappeared from the repository without being "
                f"forgotten (noticed {v['noticed'][:19]}Z); acknowledge with --acknowledge-missing {v['id'][:8]}"
            )
        report.errors += catalog.audit(repo, manifests)

    report.chunks_referenced = len(uses)
    if verify_data:
        progress.begin("verify", len(uses))

        def verify(cid: ChunkId) -> str | None:
            try:
                repo.get_chunk(cid)
            except Exception as exc:
                return _failure(exc)
            return None

        with ThreadPoolExecutor(max_workers=4, thread_name_prefix="vbfs-check") as pool:
            for cid, err in zip(uses, pool.map(verify, list(uses)), strict=True):
                progress.advance(1)
                report.chunks_verified += 1
                if err:
                    for where in uses[cid]:
                        report.errors.append(f"{_where(where)}: chunk {cid.hex()[:16]} is damaged")
        progress.end()
    return report


def _where(w: Where) -> str:
    label, kind, name, off = w
    return f"{label} {kind} {name} " + ("chunk list" if off < 0 else f"offset {off}")


def _check_disk(repo: Repository, label: str, d: dict[str, Any], need: Any, report: CheckReport) -> None:
    count = -(-int(d["size"]) // int(d["chunk_size"]))
    for piece in d["index"]:
        need(bytes.fromhex(piece), (label, "disk", d["name"], -1))
    try:
        raw = repo.read_index(d["index"])
    except Exception as exc:
        report.errors.append(f"{label} disk {d['name']}: chunk list unreadable: {_failure(exc)}")
        return
    if len(raw) != count * ID_SIZE:
        report.errors.append(f"{label} disk {d['name']}: chunk list has the wrong length")
        return
    for i in range(count):
        cid = raw[i * ID_SIZE : (i + 1) * ID_SIZE]
        if cid != ZERO_ID:
            need(cid, (label, "disk", d["name"], i * int(d["chunk_size"])))


def _check_stream(
    repo: Repository, label: str, kind: str, name: str, ref: dict[str, Any], need: Any, report: CheckReport
) -> None:
    for piece in ref["index"]:
        need(bytes.fromhex(piece), (label, kind, name, -1))
    try:
        raw = repo.read_index(ref["index"])
    except Exception as exc:
        report.errors.append(f"{label} {kind} {name}: chunk list unreadable: {_failure(exc)}")
        return
    if len(raw) % STREAM_ENTRY.size:
        report.errors.append(f"{label} {kind} {name}: chunk list has the wrong length")
        return
    pos = 0
    for off in range(0, len(raw), STREAM_ENTRY.size):
        cid, length = STREAM_ENTRY.unpack_from(raw, off)
        need(cid, (label, kind, name, pos))
        pos += length
    if pos != int(ref["size"]):
        report.errors.append(f"{label} {kind} {name}: chunk list does not add up to the size")
