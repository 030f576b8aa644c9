"""Garbage collection: remove the chunks, patch records and chunk-list pieces that no snapshot needs, while
backups keep running into the same repository.

It runs in two phases (docs/repository-format.md, "Garbage collection", argues why this is safe):

1. **Mark**, under the *gc* lock (backups go on): finish forgets that were interrupted, list ``chunks/``, walk
   every snapshot's references (:meth:`Manifest.references`, each shared chunk-list piece read once, each patch
   record's base added), and take as candidates what was listed and is not referenced.
2. **Sweep**, under the *exclusive* lock, taken only if no other process holds a lock (waiting at most ``wait``
   seconds): a running backup may deduplicate against any chunk its chunk index named when it started, garbage
   included, or store such a chunk again at any moment, so while one runs nothing is deleted and the candidates
   are reported as held back, with who holds them, for the next ``gc``. Under the exclusive lock the snapshots
   committed since the mark are walked and what they use is taken off the candidates; the chunk index is
   rewritten without the candidates (new index object first, then the old ones go), and only then are the
   candidates deleted. A crash at any point leaves a valid repository: an index object never names a deleted
   chunk, and what was not deleted is found again by the next run.

Memory: the referenced ids, the listed ids and the candidates are sorted byte strings of 32-byte ids
(:class:`vbfs.store.chunkindex.IdSet`) plus 8 bytes of size per listed object, whatever the number of snapshots;
with the copies made while they are built, about 160 bytes per object at the peak (tools/bench/gc_scale.py).
"""

from __future__ import annotations

import secrets
import time
from array import array
from contextlib import ExitStack, suppress
from dataclasses import asdict, dataclass, field
from typing import Any

from vbfs.engine.progress import NoProgress, Progress
from vbfs.errors import LockError, VbfsError
from vbfs.failpoints import failpoint
from vbfs.store import marks
from vbfs.store.chunkindex import INDEX_PREFIX, IdSet, IdSetBuilder, Listing, cache_path, encode_ids, list_objects
from vbfs.store.codec import ID_SIZE
from vbfs.store.locks import EXCLUSIVE, GC
from vbfs.store.repository import (
    ZERO_ID,
    Repository,
    chunk_object_name,
    patch_object_name,
)


class GcRefused(VbfsError):
    """Collecting garbage now could delete what a snapshot needs (a snapshot or patch record cannot be read)."""

    exit_code = 3


@dataclass
class GcResult:
    objects: int = 0
    """Chunk objects (chunks, patch records, chunk-list pieces) listed."""
    referenced: int = 0
    objects_removed: int = 0
    bytes_freed: int = 0
    held_back_objects: int = 0
    held_back_bytes: int = 0
    held_back_by: str = ""
    """Why the candidates were not deleted (who holds the repository), when they were not."""
    forgets_finished: list[str] = field(default_factory=list)
    index_objects_replaced: int = 0
    dry_run: bool = False
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _Marker:
    """What a set of snapshots references, bases of patch records included, each shared piece read once."""

    def __init__(self, repo: Repository, listed: Listing):
        self.repo = repo
        self.listed = listed
        self.walked: set[bytes] = set()

    def mark(self, snap_ids: list[str], progress: Progress, label: str) -> IdSet:
        builder = IdSetBuilder()
        progress.begin(label, len(snap_ids), "snapshots")
        for snap_id in snap_ids:
            try:
                manifest = self.repo.load_manifest(snap_id)
            except VbfsError as exc:
                raise GcRefused(
                    f"snapshot {snap_id} cannot be read ({exc}): garbage collection would not know what it needs, "
                    "so nothing was deleted (vbfs check tells more)"
                ) from None
            try:
                for ref in manifest.references(self.repo, patch_base=lambda cid: None, walked=self.walked):
                    builder.add(ref.id)
            except VbfsError as exc:
                raise GcRefused(f"{exc}: nothing was deleted (vbfs check tells more)") from None
            progress.advance(1)
        progress.end()
        direct = builder.build()
        return direct.union(self._bases(direct))

    def _bases(self, ids: IdSet) -> IdSet:
        """The bases of the patch records among ``ids`` (never patch records themselves)."""
        bases = IdSetBuilder()
        for cid in ids:
            if cid in self.listed.chunks:
                continue
            if cid not in self.listed.patches and not self.repo.backend.exists(patch_object_name(cid)):
                continue  # a full chunk that landed after the listing, or a missing object
            try:
                record = self.repo.chunk_patch(cid)
            except VbfsError as exc:
                raise GcRefused(
                    f"patch record {cid.hex()[:16]} cannot be read ({exc}): its base is unknown, so nothing was "
                    "deleted (vbfs check tells more)"
                ) from None
            if record is not None and record.base != ZERO_ID:  # a patch of zeros has no base object
                bases.add(record.base)
        return bases.build()


def _unreferenced(ids: IdSet, sizes: array[int], used: IdSet) -> tuple[IdSet, array[int]]:
    """The ids of ``ids`` (with their sizes) that are not in ``used``: one pass over both sorted sets."""
    out, out_sizes = bytearray(), array("Q")
    blob, end = used.blob, len(used.blob)
    j = 0
    for i, cid in enumerate(ids):
        while j < end and blob[j : j + ID_SIZE] < cid:
            j += ID_SIZE
        if j < end and blob[j : j + ID_SIZE] == cid:
            continue
        out += cid
        out_sizes.append(sizes[i])
    return IdSet(bytes(out)), out_sizes


def collect(
    repo: Repository,
    progress: Progress | None = None,
    *,
    wait: float = 0.0,
    dry_run: bool = False,
    without: frozenset[str] = frozenset(),
) -> GcResult:
    """Collect garbage; the caller holds the repository's gc lock (``repo.lock_gc()``). A dry run deletes nothing
    and counts the candidates as if the snapshots ``without`` were forgotten too (what a prune would free)."""
    progress = progress or NoProgress()
    started = time.monotonic()
    result = GcResult(dry_run=dry_run)
    if not repo.holds(GC):
        raise VbfsError("garbage collection needs the gc lock (repo.lock_gc())")
    repo.require_writable()
    if not dry_run:
        result.notes += repo.remove_leftovers()
    snapshots = [s for s in repo.snapshot_ids() if s not in without]
    if dry_run:  # counted as the real run will find them: interrupted forgets finished
        pending = marks.forgotten_ids(repo) & set(snapshots)
        if pending:
            pending -= marks.protected_ids(repo)
            snapshots = [s for s in snapshots if s not in pending]
    else:
        result.forgets_finished = marks.finish_forgets(repo, set(snapshots))
        if result.forgets_finished:
            snapshots = [s for s in snapshots if s not in set(result.forgets_finished)]
    listed = list_objects(repo, sizes=True)
    result.objects = listed.count
    marker = _Marker(repo, listed)
    referenced = marker.mark(snapshots, progress, "marking")
    result.referenced = len(referenced)
    cands, csizes = _unreferenced(listed.chunks, listed.chunk_sizes, referenced)
    pcands, psizes = _unreferenced(listed.patches, listed.patch_sizes, referenced)
    del referenced, listed
    marker.listed = Listing(IdSet(), array("Q"), IdSet(), array("Q"))
    failpoint("gc-marked")
    count = len(cands) + len(pcands)
    size = sum(csizes) + sum(psizes)
    if dry_run or not count:
        result.held_back_objects, result.held_back_bytes = (count, size) if dry_run else (0, 0)
        result.seconds = time.monotonic() - started
        return result
    with ExitStack() as stack:
        try:
            stack.enter_context(repo.lock(EXCLUSIVE, wait))
        except LockError as exc:  # a backup (or a mount, a restore) runs: it may use any candidate
            result.held_back_objects, result.held_back_bytes = count, size
            result.held_back_by = str(exc).split(";")[0]
        else:
            _sweep(repo, marker, set(snapshots), cands, csizes, pcands, psizes, progress, result)
    result.seconds = time.monotonic() - started
    return result


def _sweep(
    repo: Repository,
    marker: _Marker,
    marked: set[str],
    cands: IdSet,
    csizes: array[int],
    pcands: IdSet,
    psizes: array[int],
    progress: Progress,
    result: GcResult,
) -> None:
    from vbfs.store.chunkindex import ChunkIndex

    # Snapshots committed since the mark (by backups that ran meanwhile) keep what they use.
    now = repo.snapshot_ids()
    newer = [s for s in now if s not in marked]
    if newer:
        used = marker.mark(newer, progress, "marking new snapshots")
        cands, csizes = _unreferenced(cands, csizes, used)
        pcands, psizes = _unreferenced(pcands, psizes, used)
    # The chunk index without the candidates: the new index object lands before the old ones go, and both before
    # any chunk goes, so no index object ever names a deleted chunk.
    index = ChunkIndex.load(repo, use_cache=False, rebuild=True)
    old = sorted(index.covers)
    name = f"{INDEX_PREFIX}{secrets.token_hex(16)}"
    raw = encode_ids({"snapshots": now}, index.chunks.difference(cands), index.patches.difference(pcands))
    repo.check_locks(ask=True)
    repo.backend.put(name, repo.codec.encode(raw, name))
    repo.backend.flush()
    failpoint("gc-index-written")
    for n in old:
        repo.backend.delete(n)
    repo.backend.flush()
    result.index_objects_replaced = len(old)
    repo.drop_chunk_index()
    with suppress(OSError):
        cache_path(repo).unlink()
    failpoint("gc-index-replaced")
    progress.begin("deleting unreferenced objects", len(cands) + len(pcands), "objects")
    for ids, sizes, to_name in ((cands, csizes, chunk_object_name), (pcands, psizes, patch_object_name)):
        for i, cid in enumerate(ids):
            if i % 4096 == 0:
                repo.check_locks()
            repo.backend.delete(to_name(cid))
            result.objects_removed += 1
            result.bytes_freed += sizes[i]
            progress.advance(1)
            failpoint("gc-deleting")
    repo.backend.flush()
    progress.end()


def describe(result: GcResult) -> list[str]:
    """The summary lines of a collection, for people."""
    from vbfs.store.repository import _human

    lines = []
    if result.forgets_finished:
        lines.append(f"finished {len(result.forgets_finished)} forget(s) that were interrupted")
    if result.dry_run:
        lines.append(
            f"would remove {result.held_back_objects} of {result.objects} objects ({_human(result.held_back_bytes)})"
        )
    else:
        lines.append(
            f"removed {result.objects_removed} of {result.objects} objects, freed {_human(result.bytes_freed)} "
            f"in {result.seconds:.1f} s"
        )
    if result.held_back_objects and not result.dry_run:
        lines.append(
            f"held back {result.held_back_objects} unreferenced objects ({_human(result.held_back_bytes)}): "
            f"{result.held_back_by}; a backup running now may still use them, the next gc removes them"
        )
    return lines


__all__ = ["GcRefused", "GcResult", "collect", "describe"]
