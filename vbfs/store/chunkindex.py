"""The chunk index: which chunks and patch records the repository holds, known without one backend call per chunk.

Every write session that commits a snapshot first writes an index object ``index/<session id>`` naming the chunks
and patch records it stored and the snapshot it precedes; its chunks are durable before it is written, so an
index object never names a chunk that did not land. The union of all index objects is what the repository holds
(garbage collection, which deletes chunks, must rewrite the index objects that name them).

A session starts from that union: the snapshots are listed, then ``index/``; a local cache (beside the catalog)
holds the merged ids and the names of the index objects it covers, so only index objects that are new since the
last backup are read. When an index object is damaged, or a snapshot is covered by no index object (a repository
written before the index existed, or an index object that was lost), the index is rebuilt from one listing of
``chunks/`` and written as an index object covering every snapshot listed before, with one note saying so.

Index object and cache, inside the object envelope (so checksummed or encrypted like every object)::

    b"vbfs chunk index 1\\n"
    one JSON line: {"snapshots": [snapshot ids], "chunks": n, "patches": m}     (the cache: {"covers": {name:
                                                                               [snapshot ids]}, "chunks", "patches"})
    n sorted 32-byte chunk ids, then m sorted 32-byte patch record ids

In memory an id set is one sorted ``bytes`` of 32-byte ids searched by bisection: 32 bytes per id.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vbfs.errors import IntegrityError, ObjectMissing, VbfsError
from vbfs.store.codec import ID_SIZE, ChunkId

if TYPE_CHECKING:
    from vbfs.store.repository import Repository

INDEX_PREFIX = "index/"
MAGIC = b"vbfs chunk index 1\n"
CACHE_NAME = "chunk-index"
_CACHE_OBJECT = "cache/chunk-index"  # the name the cache file is sealed under


class IdSet:
    """A set of 32-byte ids kept as one sorted ``bytes``; membership by bisection."""

    __slots__ = ("_n", "blob")

    def __init__(self, blob: bytes = b""):
        if len(blob) % ID_SIZE:
            raise ValueError("an id set is a whole number of ids")
        self.blob = blob
        self._n = len(blob) // ID_SIZE

    @classmethod
    def of(cls, ids: Iterable[ChunkId]) -> IdSet:
        return cls(b"".join(sorted(set(ids))))

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> bytes:
        return self.blob[i * ID_SIZE : (i + 1) * ID_SIZE]

    def __iter__(self) -> Iterator[bytes]:
        for off in range(0, len(self.blob), ID_SIZE):
            yield self.blob[off : off + ID_SIZE]

    def __contains__(self, cid: object) -> bool:
        if not isinstance(cid, bytes) or len(cid) != ID_SIZE:
            return False
        i = bisect_left(self, cid)
        return i < self._n and self[i] == cid

    def union(self, other: IdSet) -> IdSet:
        """Both sets merged: a bisection per id of the smaller set when it is much smaller, else one merge."""
        big, small = (self, other) if len(self) >= len(other) else (other, self)
        if not len(small):
            return big
        if len(small) * 24 > len(big):
            return IdSet(_merge(big.blob, small.blob, keep_b_only=False))
        view = memoryview(big.blob)
        out = bytearray()
        prev = 0
        for cid in small:
            i = bisect_left(big, cid, prev)
            if i < big._n and big[i] == cid:
                continue
            out += view[prev * ID_SIZE : i * ID_SIZE]
            out += cid
            prev = i
        out += view[prev * ID_SIZE :]
        return IdSet(bytes(out))

    def difference(self, other: IdSet) -> IdSet:
        """The ids of this set that are not in ``other``."""
        if not len(other) or not len(self):
            return self
        if len(other) * 24 > len(self) and len(self) * 24 > len(other):
            return IdSet(_merge(self.blob, other.blob, keep_b_only=True))
        out = bytearray()
        if len(other) < len(self):
            view = memoryview(self.blob)
            prev = 0
            for cid in other:
                i = bisect_left(self, cid, prev)
                if i < self._n and self[i] == cid:
                    out += view[prev * ID_SIZE : i * ID_SIZE]
                    prev = i + 1
            out += view[prev * ID_SIZE :]
        else:
            for cid in self:
                if cid not in other:
                    out += cid
        return IdSet(bytes(out))

    def sorted_strictly(self) -> bool:
        return all(self[i] < self[i + 1] for i in range(self._n - 1))


class IdSetBuilder:
    """Collects ids in any order, with repeats, into an :class:`IdSet` in bounded memory: ids are buffered, sorted
    in runs of ``run`` ids, and runs of like size are merged (as a binary counter carries), so each id is merged
    O(log n) times and the memory beyond the final set is one run and the runs themselves."""

    def __init__(self, run: int = 1 << 16):
        self._runs: list[IdSet] = []
        self._buf: list[bytes] = []
        self._run = run

    def add(self, cid: bytes) -> None:
        self._buf.append(cid)
        if len(self._buf) >= self._run:
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        run = IdSet(b"".join(sorted(set(self._buf))))
        self._buf = []
        while self._runs and len(self._runs[-1]) <= 2 * len(run):
            run = self._runs.pop().union(run)
        self._runs.append(run)

    def build(self) -> IdSet:
        self._flush()
        out = IdSet()
        while self._runs:
            out = out.union(self._runs.pop())
        return out


def _merge(a: bytes, b: bytes, keep_b_only: bool) -> bytes:
    """One pass over two sorted id strings: their union, or (``keep_b_only``) the ids of ``a`` not in ``b``."""
    out = bytearray()
    i = j = 0
    na, nb = len(a), len(b)
    x = a[0:ID_SIZE]
    y = b[0:ID_SIZE]
    while i < na and j < nb:
        if x < y:
            out += x
            i += ID_SIZE
            x = a[i : i + ID_SIZE]
        elif y < x:
            if not keep_b_only:
                out += y
            j += ID_SIZE
            y = b[j : j + ID_SIZE]
        else:
            if not keep_b_only:
                out += x
            i += ID_SIZE
            j += ID_SIZE
            x = a[i : i + ID_SIZE]
            y = b[j : j + ID_SIZE]
    out += a[i:]
    if not keep_b_only:
        out += b[j:]
    return bytes(out)


def encode_ids(header: dict[str, Any], chunks: IdSet, patches: IdSet) -> bytes:
    head = {**header, "chunks": len(chunks), "patches": len(patches)}
    return MAGIC + json.dumps(head, sort_keys=True).encode() + b"\n" + chunks.blob + patches.blob


def decode_ids(raw: bytes, what: str, check_order: bool = True) -> tuple[dict[str, Any], IdSet, IdSet]:
    """The header, chunk ids and patch ids of an index object or cache; IntegrityError when it is not one."""
    if not raw.startswith(MAGIC):
        raise IntegrityError(f"{what} is damaged (not a chunk index)")
    end = raw.find(b"\n", len(MAGIC))
    try:
        head = json.loads(raw[len(MAGIC) : end]) if end > 0 else None
    except (ValueError, RecursionError):
        head = None
    if not isinstance(head, dict):
        raise IntegrityError(f"{what} is damaged (bad header)")
    n, m = head.get("chunks"), head.get("patches")
    body = raw[end + 1 :]
    if type(n) is not int or type(m) is not int or n < 0 or m < 0 or len(body) != (n + m) * ID_SIZE:
        raise IntegrityError(f"{what} is damaged (its length does not match its header)")
    chunks, patches = IdSet(body[: n * ID_SIZE]), IdSet(body[n * ID_SIZE :])
    if check_order and not (chunks.sorted_strictly() and patches.sorted_strictly()):
        raise IntegrityError(f"{what} is damaged (ids out of order)")
    return head, chunks, patches


def _snapshot_list(v: Any, what: str) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise IntegrityError(f"{what} is damaged (bad snapshot list)")
    return v


@dataclass
class ChunkIndex:
    """What the repository holds: chunk ids, patch record ids, and the index objects (with their snapshots) known."""

    chunks: IdSet = field(default_factory=IdSet)
    patches: IdSet = field(default_factory=IdSet)
    covers: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    damaged: dict[str, str] = field(default_factory=dict)  # index object name -> what is wrong with it
    uncovered: list[str] = field(default_factory=list)

    @property
    def covered_snapshots(self) -> set[str]:
        return {s for snaps in self.covers.values() for s in snaps}

    @classmethod
    def load(
        cls, repo: Repository, previous: ChunkIndex | None = None, *, use_cache: bool = True, rebuild: bool = True
    ) -> ChunkIndex:
        """The index as the repository has it now: ``previous`` (or the local cache) plus the new index objects.

        With ``rebuild``, an index that does not cover every snapshot, or has a damaged object, is rebuilt from a
        listing of the chunks and written back as an index object (one note says so). Without it (``check``),
        what is missing is only reported in ``damaged`` and ``uncovered``.
        """
        backend = repo.backend
        snapshots = repo.snapshot_ids()  # before index/: a snapshot listed has its index object listed too
        names = sorted(backend.list(INDEX_PREFIX))
        start = previous if previous is not None else (_read_cache(repo) if use_cache else None)
        if start is None or not set(start.covers) <= set(names):
            start = cls()  # the index was rewritten (garbage collection): read every index object
        index = cls(start.chunks, start.patches, dict(start.covers))
        changed = False
        for name in names:
            if name in index.covers:
                continue
            changed = True
            try:
                raw = repo.codec.decode(backend.get(name), name)
                head, chunks, patches = decode_ids(raw, f"index object {name}")
                snaps = _snapshot_list(head.get("snapshots"), f"index object {name}")
            except ObjectMissing:
                continue  # removed since it was listed: the index was rewritten meanwhile; the coverage below tells
            except IntegrityError as exc:
                index.damaged[name] = str(exc)
                index.covers[name] = []  # read once; what it covered is rebuilt below
                continue
            index.chunks = index.chunks.union(chunks)
            index.patches = index.patches.union(patches)
            index.covers[name] = snaps
        covered = index.covered_snapshots
        index.uncovered = [s for s in snapshots if s not in covered]
        if rebuild and (index.uncovered or index.damaged):
            index._rebuild(repo, snapshots)
            changed = True
        if changed and use_cache:
            _write_cache(repo, index)
        return index

    def _rebuild(self, repo: Repository, snapshots: list[str]) -> None:
        listing = list_objects(repo)
        self.chunks, self.patches = listing.chunks, listing.patches
        why = []
        if self.uncovered:
            why.append(f"{len(self.uncovered)} snapshot(s) were not in it")
        if self.damaged:
            why.append("removed the damaged " + ", ".join(self.damaged))
        name = f"{INDEX_PREFIX}{secrets.token_hex(16)}"
        written = ""
        try:
            raw = encode_ids({"snapshots": snapshots}, self.chunks, self.patches)
            repo.backend.put(name, repo.codec.encode(raw, name))
            self.covers[name] = list(snapshots)
            for damaged in self.damaged:  # what it named is in the new object: it only costs a note each time
                repo.backend.delete(damaged)
                self.covers.pop(damaged, None)
        except VbfsError as exc:
            written = f" (not saved: {exc})"
        self.notes.append(
            f"chunk index rebuilt from a listing of the chunks ({len(self.chunks)} chunks, {len(self.patches)} "
            f"patch records; {'; '.join(why)}){written}"
        )
        self.uncovered = []


@dataclass
class Listing:
    """The ids of the chunk objects of one listing of ``chunks/``, sorted, with their stored sizes (when asked)."""

    chunks: IdSet
    chunk_sizes: array[int]
    patches: IdSet
    patch_sizes: array[int]

    @property
    def count(self) -> int:
        return len(self.chunks) + len(self.patches)


def list_objects(repo: Repository, sizes: bool = False) -> Listing:
    """One listing of ``chunks/`` as id sets (full chunks and patch records apart); ``sizes`` adds each object's
    stored size, in the order of its set."""
    from vbfs.store.repository import PATCH_SUFFIX, chunk_name_to_id

    ids = {False: bytearray(), True: bytearray()}
    size_of = {False: array("Q"), True: array("Q")}
    last = {False: b"", True: b""}
    ordered = True
    listed = repo.backend.list_sizes("chunks/") if sizes else ((n, 0) for n in repo.backend.list("chunks/"))
    for name, size in listed:
        cid = chunk_name_to_id(name)
        if cid is None:
            continue
        patch = name.endswith(PATCH_SUFFIX)
        ordered = ordered and cid > last[patch]
        last[patch] = cid
        ids[patch] += cid
        if sizes:
            size_of[patch].append(size)
    sets = {}
    for patch in (False, True):
        if ordered:  # a listing in name order (local folders, S3) needs no sort
            sets[patch] = IdSet(bytes(ids[patch]))
        elif sizes:
            pairs = sorted(zip(IdSet(bytes(ids[patch])), size_of[patch], strict=True))
            sets[patch] = IdSet(b"".join(p[0] for p in pairs))
            size_of[patch] = array("Q", (p[1] for p in pairs))
        else:
            sets[patch] = IdSet.of(IdSet(bytes(ids[patch])))
        ids[patch] = bytearray()
    return Listing(sets[False], size_of[False], sets[True], size_of[True])


def cache_path(repo: Repository) -> Path:
    return repo.catalog_path().parent / CACHE_NAME


def _read_cache(repo: Repository) -> ChunkIndex | None:
    """The locally cached index, or None when there is none or it is not this repository's, whole and sealed."""
    try:
        blob = cache_path(repo).read_bytes()
        head, chunks, patches = decode_ids(repo.codec.decode(blob, _CACHE_OBJECT), "cache", check_order=False)
    except (OSError, VbfsError):
        return None
    covers = head.get("covers")
    if head.get("repository") != repo.id or not isinstance(covers, dict):
        return None
    try:
        return ChunkIndex(chunks, patches, {str(k): _snapshot_list(v, "cache") for k, v in covers.items()})
    except IntegrityError:
        return None


def _write_cache(repo: Repository, index: ChunkIndex) -> None:
    """Save the merged index beside the catalog (atomically); a cache that cannot be written costs only time."""
    path = cache_path(repo)
    raw = encode_ids({"repository": repo.id, "covers": index.covers}, index.chunks, index.patches)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(repo.codec.encode(raw, _CACHE_OBJECT))
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def index_object(snapshot_id: str, chunks: Iterable[ChunkId], patches: Iterable[ChunkId]) -> bytes:
    """The payload of a session's index object: what it stored before the manifest of ``snapshot_id``."""
    return encode_ids({"snapshots": [snapshot_id]}, IdSet.of(chunks), IdSet.of(patches))


def load_for_check(repo: Repository) -> ChunkIndex | None:
    """The index as its objects say, without the local cache and without rebuilding or writing anything; None for
    a format 1 repository, which is never written to and so has no index."""
    if repo.old_format:
        return None
    return ChunkIndex.load(repo, use_cache=False, rebuild=False)


def compare_with_listing(
    index: ChunkIndex | None, chunks: set[ChunkId], patches: set[ChunkId]
) -> tuple[list[str], list[str]]:
    """(errors, notes) of an index (loaded before the listing) against the listing: ``chunks`` holds every id
    listed, ``patches`` those of patch records."""
    if index is None:
        return [], []
    errors = [
        f"chunk index object {n} is damaged: {why} (the next backup rebuilds the index)"
        for n, why in index.damaged.items()
    ]
    missing = [c for c in index.chunks if c not in chunks] + [p for p in index.patches if p not in patches]
    if missing:
        errors.append(
            f"the chunk index names {len(missing)} chunk(s) the repository does not hold (e.g. "
            f"{missing[0].hex()[:16]}): backups deduplicate against them, so their snapshots would name missing chunks"
        )
    notes = []
    if index.uncovered:
        notes.append(f"{len(index.uncovered)} snapshot(s) are not in the chunk index: the next backup rebuilds it")
    unindexed = sum(c not in (index.patches if c in patches else index.chunks) for c in chunks)
    if unindexed and not index.uncovered:
        notes.append(
            f"{unindexed} chunk(s) are not in the chunk index (left by interrupted backups): a backup that meets them "
            "stores them again"
        )
    return errors, notes
