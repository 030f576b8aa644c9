"""Check: is every snapshot in the repository whole, and (with ``verify_data``) is every chunk intact?

Without ``verify_data`` the check reads every manifest and chunk list and makes sure every chunk they name exists,
and that the base of every patch record they name exists too (patch records are small: they are read). What a
snapshot needs is what :meth:`vbfs.store.manifest.Manifest.references` yields, patch bases included (one walk for
check and garbage collection); ``chunks_referenced`` counts those objects.
With it, every chunk is also read, decrypted, decompressed and hashed; a bad chunk is reported with each snapshot,
disk and offset that uses it.

Damage is reported, never raised: a manifest or chunk list that cannot be read is an error line for its snapshot
and the others are checked as before. Given the catalog, the check also reports snapshots that vanished without
being forgotten, and compares the catalog with the manifests (a catalog that differs is set aside and rebuilt).
The chunk index (:mod:`vbfs.store.chunkindex`) is compared with the listing of the chunks: an id it names that the
repository does not hold is an error (backups would deduplicate against it). The only things it changes are
leftovers that are provably dead: temporaries of writers that are gone (and,
through the lock, locks of processes that are gone), each removal reported in a note.
"""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vbfs.engine.progress import NoProgress, Progress
from vbfs.errors import IntegrityError, VbfsError

if TYPE_CHECKING:
    from vbfs.catalog import Catalog
from vbfs.store import marks
from vbfs.store.backend import LocalBackend
from vbfs.store.chunkindex import compare_with_listing, load_for_check
from vbfs.store.codec import ChunkId
from vbfs.store.manifest import Manifest
from vbfs.store.repository import PATCH_SUFFIX, Repository, chunk_name_to_id


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


Where = tuple[str, str]  # snapshot label, where in it (an item's chunk list or offset)


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
    index = load_for_check(repo)  # before the listing: what an index object names landed before it
    for name in repo.backend.list("chunks/"):
        cid = chunk_name_to_id(name)
        if cid is None:
            report.warnings.append(f"unexpected object {name}")
        else:
            stored.add(cid)
            if name.endswith(PATCH_SUFFIX):
                patches.add(cid)
    index_errors, index_notes = compare_with_listing(index, stored, patches)
    report.errors += index_errors
    report.notes += index_notes
    if isinstance(repo.backend, LocalBackend):
        tmp = repo.backend.leftover_temporaries()
        if tmp:
            report.warnings.append(f"{len(tmp)} temporary file(s) of writes in progress or of another host (harmless)")
    uses: dict[ChunkId, list[Where]] = defaultdict(list)
    broken: set[ChunkId] = set()  # patch records whose base is missing: reported once, not verified again
    bases: dict[ChunkId, ChunkId | None] = {}

    def patch_base(cid: ChunkId) -> ChunkId | None:
        """The base of a patch record the listing showed; each record is read once for all snapshots."""
        if cid not in patches:
            return None
        if cid not in bases:
            try:
                record = repo.chunk_patch(cid)
            except VbfsError:
                raise
            except Exception as exc:
                raise IntegrityError(_failure(exc)) from None
            bases[cid] = None if record is None else record.base
        return bases[cid]

    manifests: dict[str, Manifest] = {}
    for snap_id in repo.snapshot_ids():
        try:
            m = repo.load_manifest(snap_id)
        except Exception as exc:
            report.errors.append(f"snapshot {snap_id[:64]}: {_failure(exc)}")
            continue
        report.snapshots += 1
        manifests[snap_id] = m
        label = m.label

        def damaged(where: str, message: str, label: str = label) -> None:
            report.errors.append(f"{label} {where}: {message}")

        try:
            for ref in m.references(repo, patch_base, damaged):
                if ref.id in stored:
                    uses[ref.id].append((label, ref.where))
                elif ref.base_of is None:
                    report.errors.append(f"{label} {ref.where}: chunk {ref.id.hex()[:16]} is missing")
                else:
                    broken.add(ref.base_of)
                    report.errors.append(
                        f"{label} {ref.where}: chunk {ref.base_of.hex()[:16]} is a patch of {ref.id.hex()[:16]}, "
                        "which is missing"
                    )
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
    unused = len(stored) - sum(1 for cid in uses if cid in stored)
    if unused:
        report.notes.append(f"{unused} object(s) under chunks/ are needed by no snapshot: vbfs gc removes them")
    pending = marks.forgotten_ids(repo) & set(manifests)
    if pending:
        report.notes.append(
            f"the forget of {len(pending)} snapshot(s) was interrupted (e.g. {min(pending)[:8]}): the next vbfs gc or "
            "prune finishes it"
        )
    if verify_data:
        progress.begin("verifying chunks", len(uses), "chunks")

        def verify(cid: ChunkId) -> str | None:
            if cid in broken:  # its base is missing: reported above
                return None
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
    label, where = w
    return f"{label} {where}"
