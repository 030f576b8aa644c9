"""The snapshot manifest, typed: what a snapshot holds, how it is written as JSON, and every object it needs.

A :class:`Manifest` (with its :class:`DiskRecord`, :class:`StreamRecord` and :class:`Source` records) is what the
write path commits and every reader (tree, catalog, check, restore, garbage collection) uses; nothing else reads
manifest keys. :meth:`Manifest.from_json` checks every field a reader uses, with its type and range, so a
manifest that loaded can be listed, indexed, mounted, checked and restored from without a reader meeting a
missing key, a string where a number belongs or a number SQLite cannot hold; anything else is an
:class:`IntegrityError` naming the snapshot and the field. :meth:`Manifest.to_json` writes the same keys back
(``version`` 1), so a manifest read and written again is the same JSON.

:meth:`Manifest.references` is the one walk over the objects a snapshot needs: chunk-list pieces, disk chunks,
stream chunks and the bases of patch records. Items to come (application items, group membership) are new
optional fields here, read by older code as absent.

The user's labels of a snapshot are such optional fields: ``tags`` (``backup --tag``, a job's ``tags``) and
``note`` (``backup --note``), written only when given. :func:`check_tags` and :func:`check_note` are the rules for
both, applied to what a user types and to what a manifest holds (a manifest that breaks them is refused like any
other bad field), so no listing ever meets a tag that cannot be typed back or a note with control characters.
``notes`` (plural) are vbfs's own remarks on the backup, not the user's.

The snapshot's times and names are formatted here too: ``time`` and ``finished`` are ISO 8601 UTC with
microseconds (they sort as text), ``name`` is the UTC start time without colons.
"""

from __future__ import annotations

import re
import struct
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from vbfs.errors import IntegrityError, RepositoryFormatError, VbfsError
from vbfs.store.codec import ID_SIZE, ChunkId

if TYPE_CHECKING:
    from vbfs.store.repository import Repository

MANIFEST_VERSION = 1
INDEX_PIECE_ENTRIES = 65536
MAX_SIZE = 2**60  # a disk, stream or file index; their sum for a snapshot stays below 2**62 too
MIN_CHUNK_SIZE, MAX_CHUNK_SIZE = 64 * 1024, 16 * 1024 * 1024
MAX_ITEMS = 4096  # disks, config files, notes
DISK_MODES = ("full", "incremental")
_ZERO_ID: ChunkId = bytes(ID_SIZE)
_STREAM_ENTRY = struct.Struct("<32sQ")  # a stream's chunk list entry: chunk id, length
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX32 = re.compile(r"[0-9a-f]{32}")

# ---- times and names -----------------------------------------------------------------------------------------

TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def format_time(t: datetime) -> str:
    """ISO 8601 in UTC with microseconds: sorts as text in time order."""
    return t.astimezone(UTC).strftime(TIME_FORMAT)


def snapshot_name(t: datetime) -> str:
    """The folder name of a snapshot: its UTC time without colons (the tree is also shared over SMB)."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H%M%SZ")


def time_ns(iso: str) -> int:
    """A manifest time as nanoseconds since the epoch."""
    t = datetime.strptime(iso, TIME_FORMAT).replace(tzinfo=UTC)
    return int(t.timestamp()) * 1_000_000_000 + t.microsecond * 1000


# ---- the user's labels: tags and a note -----------------------------------------------------------------------

MAX_TAGS = 32
MAX_TAG_LENGTH = 64
MAX_NOTE_LENGTH = 1000
TAG_RULE = "letters, digits and . _ + - @ : =, not starting with - or ., at most 64 characters"
_TAG = re.compile(r"[A-Za-z0-9_+@:=][A-Za-z0-9._+@:=-]{0,63}")
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


class LabelError(VbfsError):
    """A tag or note that breaks the rules of :func:`check_tags` / :func:`check_note`."""


def check_tags(tags: Sequence[Any]) -> tuple[str, ...]:
    """The tags, each checked (see ``TAG_RULE``), at most ``MAX_TAGS``, duplicates refused."""
    if len(tags) > MAX_TAGS:
        raise LabelError(f"a snapshot has at most {MAX_TAGS} tags, not {len(tags)}")
    for tag in tags:
        if not isinstance(tag, str) or not _TAG.fullmatch(tag):
            raise LabelError(f"tag {str(tag)[:80]!r} is not usable: a tag has {TAG_RULE}")
    if len(set(tags)) != len(tags):
        raise LabelError("a tag is given twice")
    return tuple(tags)


def check_note(note: Any) -> str:
    """A note: one line of at most ``MAX_NOTE_LENGTH`` characters, no control or direction-changing characters."""
    if not isinstance(note, str) or not note.strip():
        raise LabelError("a note is a text that is not empty")
    if len(note) > MAX_NOTE_LENGTH:
        raise LabelError(f"a note has at most {MAX_NOTE_LENGTH} characters, not {len(note)}")
    for c in note:
        if unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") or c in _BIDI:
            raise LabelError(f"a note is one line of printable text: character U+{ord(c):04X} is not allowed")
    return note


def tag_filter(values: Sequence[str]) -> list[frozenset[str]]:
    """``--tag`` options as a filter: each value is a comma-separated set of tags that must all be present; a
    snapshot matches when any value's set is present (as restic's ``--tag a,b --tag c``)."""
    out = []
    for value in values:
        tags = [t for t in value.split(",") if t]
        check_tags(list(dict.fromkeys(tags)))
        if not tags:
            raise LabelError(f"--tag {value!r} names no tag")
        out.append(frozenset(tags))
    return out


def tags_match(tags: Sequence[str], wanted: Sequence[frozenset[str]]) -> bool:
    """Does a snapshot with ``tags`` pass the filter ``wanted`` (from :func:`tag_filter`; empty: every one)?"""
    return not wanted or any(w <= set(tags) for w in wanted)


# ---- checks of one field -------------------------------------------------------------------------------------


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


def _opt_str(v: Any, what: str, limit: int = 4096) -> str | None:
    return None if v is None else _str(v, what, limit)


def _folder_name(v: Any, what: str) -> str:
    name = _str(v, what, 255)
    if not name or "/" in name or name in (".", "..") or len(name.encode("utf-8", "surrogatepass")) > 255:
        raise _Bad(f"{what} is not usable as a folder name")
    return name


def _time(v: Any, what: str) -> str:
    try:
        datetime.strptime(_str(v, what, 64), TIME_FORMAT)
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


def _pieces(v: Any, what: str, count: int | None = None) -> tuple[str, ...]:
    pieces = _list(v, what, 2**24)
    for p in pieces:
        if not isinstance(p, str) or not _HEX64.fullmatch(p):
            raise _Bad(f"{what} holds an entry that is not a chunk id")
    if count is not None and len(pieces) != count:
        raise _Bad(f"{what} has {len(pieces)} pieces, expected {count}")
    return tuple(pieces)


# ---- records ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamRecord:
    """A stream (a config file, the guest-file index): its length and the pieces of its chunk list, whose
    entries are (chunk id, length) pairs of content-defined chunks. ``entries`` counts the rows of a file index."""

    size: int
    index: Sequence[str]
    entries: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", tuple(self.index))

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"size": self.size, "index": list(self.index)}
        if self.entries is not None:
            doc["entries"] = self.entries
        return doc

    @classmethod
    def _parse(cls, v: Any, what: str) -> StreamRecord:
        ref = _dict(v, what)
        size = _int(ref.get("size"), f"{what} size")
        index = _pieces(ref.get("index"), f"{what} chunk list")
        entries = _int(ref["entries"], f"{what} entries") if "entries" in ref else None
        return cls(size, index, entries)


@dataclass(frozen=True)
class DiskRecord:
    """A disk: its size and the pieces of its chunk list (entry ``i`` is the chunk at ``i * chunk_size``, the
    zero id a chunk of zeros); the change token for the next incremental, how it was read (``mode``, ``full`` or
    ``incremental``), the bytes read, the source's facts (``details``) and, when the repository keeps it under
    another name, its name at the source."""

    name: str
    size: int
    chunk_size: int
    index: Sequence[str]
    token: str | None = None
    mode: str | None = None
    read_bytes: int | None = None
    details: Mapping[str, Any] = field(default_factory=dict)
    source_name: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", tuple(self.index))

    @property
    def chunks(self) -> int:
        return -(-self.size // self.chunk_size)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": self.name,
            "size": self.size,
            "chunk_size": self.chunk_size,
            "index": list(self.index),
            "token": self.token,
            "mode": self.mode,
            "details": dict(self.details),
        }
        if self.read_bytes is not None:
            doc["read_bytes"] = self.read_bytes
        if self.source_name is not None:
            doc["source_name"] = self.source_name
        return doc

    @classmethod
    def _parse(cls, v: Any, i: int) -> DiskRecord:
        d = _dict(v, f"disk {i}")
        name = _folder_name(d.get("name"), f"disk {i} name")
        size = _int(d.get("size"), f"disk {name} size")
        cs = _int(d.get("chunk_size"), f"disk {name} chunk size", MIN_CHUNK_SIZE, MAX_CHUNK_SIZE)
        if cs & (cs - 1):
            raise _Bad(f"disk {name} chunk size is not a power of two")
        chunks = -(-size // cs)
        index = _pieces(d.get("index"), f"disk {name} chunk list", -(-chunks // INDEX_PIECE_ENTRIES))
        token = _opt_str(d.get("token"), f"disk {name} change token", 65536)
        mode = d.get("mode")
        if mode is not None and (not isinstance(mode, str) or mode not in DISK_MODES):
            raise _Bad(f"disk {name} mode is unknown")
        read_bytes = _int(d["read_bytes"], f"disk {name} read bytes") if "read_bytes" in d else None
        details = _dict(d.get("details", {}), f"disk {name} details")
        source_name = _opt_str(d.get("source_name"), f"disk {name} source name")
        return cls(name, size, cs, index, token, mode, read_bytes, details, source_name)


@dataclass(frozen=True)
class Source:
    """Where the snapshot came from: the hypervisor plugin's scheme, the URL (no password) and the guest's name
    there (absent in manifests written before it was kept)."""

    hypervisor: str
    url: str
    guest: str | None = None

    def to_json(self) -> dict[str, Any]:
        doc = {"hypervisor": self.hypervisor, "url": self.url}
        if self.guest is not None:
            doc["guest"] = self.guest
        return doc

    @classmethod
    def _parse(cls, v: Any) -> Source:
        source = _dict(v, "source")
        return cls(
            _str(source.get("hypervisor"), "source hypervisor", 64),
            _str(source.get("url"), "source url"),
            _opt_str(source.get("guest"), "source guest"),
        )


@dataclass(frozen=True)
class Reference:
    """One object a snapshot needs, where it needs it: ``item`` (``disk vda``, ``config vm.xml``,
    ``file index``) and the byte ``offset`` in it (-1: a piece of the item's chunk list). ``base_of`` is set when
    the object is the base of the patch record ``base_of``."""

    id: ChunkId
    item: str
    offset: int
    base_of: ChunkId | None = None

    @property
    def where(self) -> str:
        return f"{self.item} chunk list" if self.offset < 0 else f"{self.item} offset {self.offset}"


PatchBase = Callable[[ChunkId], "ChunkId | None"]
"""The base of a patch record (the zero id: a patch of zeros), or None for a chunk that is not one."""

Damaged = Callable[[str, str], None]
"""Told where (an item's chunk list, a patch record) and what is damaged; the walk goes on with the next item."""


@dataclass(frozen=True)
class Manifest:
    """One snapshot: which guest, when, from where, and its disks and streams (see the module docstring)."""

    id: str
    guest: str
    name: str
    time: str
    source: Source
    disks: Sequence[DiskRecord]
    finished: str | None = None
    consistency: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    config: Mapping[str, StreamRecord] = field(default_factory=dict)
    files_index: StreamRecord | None = None
    stats: Mapping[str, int | float] = field(default_factory=dict)
    notes: Sequence[str] = ()
    vbfs_version: str | None = None
    version: int = MANIFEST_VERSION
    tags: Sequence[str] = ()
    note: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "disks", tuple(self.disks))
        object.__setattr__(self, "notes", tuple(self.notes))
        object.__setattr__(self, "tags", tuple(self.tags))
        object.__setattr__(self, "config", dict(sorted(self.config.items())))

    @property
    def label(self) -> str:
        """How messages name the snapshot: ``guest@name (id prefix)``."""
        return f"{self.guest}@{self.name} ({self.id[:8]})"

    def disk(self, name: str) -> DiskRecord | None:
        return next((d for d in self.disks if d.name == name), None)

    def summary(self) -> dict[str, Any]:
        """What a listing shows of the snapshot (JSON): the catalog's row and the ``vbfs_snapshot_committed`` hook's
        argument."""
        return {
            "id": self.id,
            "guest": self.guest,
            "name": self.name,
            "time": self.time,
            "finished": self.finished,
            "hypervisor": self.source.hypervisor,
            "source": self.source.url,
            "consistency": self.consistency,
            "disks": [{"name": d.name, "size": d.size, "mode": d.mode} for d in self.disks],
            "config": sorted(self.config),
            "indexed": self.files_index is not None,
            "stats": dict(self.stats),
            "tags": list(self.tags),
            "note": self.note,
        }

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "version": self.version,
            "id": self.id,
            "guest": self.guest,
            "name": self.name,
            "time": self.time,
            "finished": self.finished,
            "source": self.source.to_json(),
            "consistency": self.consistency,
            "metadata": dict(self.metadata),
            "disks": [d.to_json() for d in self.disks],
            "config": {n: ref.to_json() for n, ref in self.config.items()},
            "stats": dict(self.stats),
            "notes": list(self.notes),
        }
        if self.files_index is not None:
            doc["files_index"] = self.files_index.to_json()
        if self.vbfs_version is not None:
            doc["vbfs_version"] = self.vbfs_version
        if self.tags:
            doc["tags"] = list(self.tags)
        if self.note is not None:
            doc["note"] = self.note
        return doc

    @classmethod
    def from_json(cls, doc: Any, snap_id: str) -> Manifest:
        """The manifest stored as ``snapshots/<snap_id>`` if it is whole and its own; :class:`IntegrityError`
        naming the snapshot and the field otherwise (or a newer-format error)."""
        if not isinstance(snap_id, str) or not _HEX32.fullmatch(snap_id):
            raise IntegrityError(f"snapshots/{str(snap_id)[:80]!r} is not a snapshot manifest name")
        try:
            return cls._parse(doc, snap_id)
        except _Bad as exc:
            raise IntegrityError(f"snapshot manifest {snap_id} is damaged ({exc})") from None

    @classmethod
    def _parse(cls, v: Any, snap_id: str) -> Manifest:
        m = _dict(v, "the manifest")
        if m.get("id") != snap_id:
            raise IntegrityError(f"snapshot manifest {snap_id} names another snapshot")
        version = m.get("version", 0)
        if type(version) is int and version > MANIFEST_VERSION:
            raise RepositoryFormatError(f"snapshot {snap_id} was written by a newer vbfs")
        _int(version, "version", 1, MANIFEST_VERSION)
        guest = _folder_name(m.get("guest"), "guest")
        name = _folder_name(m.get("name"), "name")
        time = _time(m.get("time"), "time")
        finished = None if m.get("finished") is None else _time(m["finished"], "finished")
        source = Source._parse(m.get("source"))
        consistency = _opt_str(m.get("consistency"), "consistency", 64)
        metadata = _dict(m.get("metadata", {}), "metadata")
        disks = []
        names = set()
        for i, d in enumerate(_list(m.get("disks"), "disks")):
            disk = DiskRecord._parse(d, i)
            if disk.name in names:
                raise _Bad(f"two disks are named {disk.name!r}")
            names.add(disk.name)
            disks.append(disk)
        total = sum(d.size for d in disks)
        config_doc = _dict(m.get("config", {}), "config")
        if len(config_doc) > MAX_ITEMS:
            raise _Bad("too many config files")
        config = {}
        for cname, ref in config_doc.items():
            cname = _folder_name(cname, "a config file name")
            config[cname] = StreamRecord._parse(ref, f"config file {cname!r}")
            total += config[cname].size
        if total > 2**62:
            raise _Bad("the disks and files add up to more than 2^62 bytes")
        files_index = None
        if m.get("files_index") is not None:
            files_index = StreamRecord._parse(m["files_index"], "files_index")
        stats = _dict(m.get("stats", {}), "stats")
        for k, n in stats.items():
            if type(n) not in (int, float) or not -(2**62) <= n <= 2**62:
                raise _Bad(f"stats {str(k)[:40]!r} is not a number in range")
        notes = [_str(note, "a note", 65536) for note in _list(m.get("notes", []), "notes", 100000)]
        vbfs_version = _str(m["vbfs_version"], "vbfs_version", 64) if "vbfs_version" in m else None
        try:
            tags = check_tags(_list(m.get("tags", []), "tags", MAX_TAGS))
            note = check_note(m["note"]) if "note" in m else None
        except LabelError as exc:
            raise _Bad(str(exc)) from None
        return cls(
            id=snap_id,
            guest=guest,
            name=name,
            time=time,
            source=source,
            disks=disks,
            finished=finished,
            consistency=consistency,
            metadata=metadata,
            config=config,
            files_index=files_index,
            stats=stats,
            notes=notes,
            vbfs_version=vbfs_version,
            version=version,
            tags=tags,
            note=note,
        )

    # ---- the objects it needs ----------------------------------------------------------------------------------

    def streams(self) -> Iterator[tuple[str, StreamRecord]]:
        """Every stream with the item name references use for it."""
        for cname, ref in self.config.items():
            yield f"config {cname}", ref
        if self.files_index is not None:
            yield "file index", self.files_index

    def references(
        self,
        repo: Repository,
        patch_base: PatchBase | None = None,
        damaged: Damaged | None = None,
        walked: set[bytes] | None = None,
    ) -> Iterator[Reference]:
        """Every object this snapshot needs, each time it is needed: the pieces of every chunk list, every disk
        chunk but the zero id, every stream chunk, and the base of every patch record (other than zeros).

        Chunk-list pieces are read, and so are patch records, to learn their bases: ``patch_base`` says what a
        disk chunk's base is (the default asks the repository, one lookup per distinct chunk; a caller that
        listed the patch records passes one that reads only those, asked at each use). A chunk-list piece that
        cannot be read or does not fit its item, or a patch record that cannot be read, is told to ``damaged``
        and the walk goes on with the next item or chunk; without ``damaged`` it is raised as
        :class:`IntegrityError`. An object that is named but missing is still yielded: the caller decides what a
        missing object means.

        ``walked`` is for a caller that walks many snapshots and needs each object once (garbage collection): a
        piece in it is yielded but not read again, and every piece read is added to it. Snapshots share pieces
        wherever a disk did not change, so such a walk costs what changed, not the sizes of the disks."""
        known: dict[ChunkId, ChunkId | None] = {}

        def default_base(cid: ChunkId) -> ChunkId | None:
            if cid not in known:
                record = repo.chunk_patch(cid)
                known[cid] = None if record is None else record.base
            return known[cid]

        def report(where: str, message: str) -> None:
            if damaged is None:
                raise IntegrityError(f"{self.label} {where}: {message}")
            damaged(where, message)

        def pieces(item: str, ids: Sequence[str], fits: Callable[[int, bytes], bool]) -> Iterator[tuple[int, bytes]]:
            """(number, bytes) of each chunk-list piece of an item that was not walked before; a piece that cannot
            be read or does not fit ends the item's walk (its other pieces are still yielded as references)."""
            for n, piece in enumerate(ids):
                pid = bytes.fromhex(piece)
                if walked is not None and pid in walked:
                    continue
                try:
                    raw = repo.read_index_piece(piece)
                except VbfsError as exc:
                    report(item, f"chunk list unreadable: {exc}")
                    return
                if not fits(n, raw):
                    report(item, "chunk list has the wrong length")
                    return
                if walked is not None:
                    walked.add(pid)
                yield n, raw

        base_of = patch_base or default_base
        span = INDEX_PIECE_ENTRIES * ID_SIZE
        for d in self.disks:
            item = f"disk {d.name}"
            yield from (Reference(bytes.fromhex(piece), item, -1) for piece in d.index)
            total = d.chunks * ID_SIZE

            def disk_fits(n: int, raw: bytes, total: int = total) -> bool:
                return len(raw) == min(span, total - n * span)

            for n, raw in pieces(item, d.index, disk_fits):
                first = n * INDEX_PIECE_ENTRIES
                for i in range(len(raw) // ID_SIZE):
                    cid = raw[i * ID_SIZE : (i + 1) * ID_SIZE]
                    if cid == _ZERO_ID:
                        continue
                    ref = Reference(cid, item, (first + i) * d.chunk_size)
                    yield ref
                    try:
                        base = base_of(cid)
                    except VbfsError as exc:
                        report(ref.where, str(exc))
                        continue
                    if base is not None and base != _ZERO_ID:
                        yield Reference(base, item, ref.offset, base_of=cid)
        entry = _STREAM_ENTRY.size
        for item, stream in self.streams():
            yield from (Reference(bytes.fromhex(piece), item, -1) for piece in stream.index)
            last = len(stream.index) - 1

            def stream_fits(n: int, raw: bytes, last: int = last) -> bool:
                return len(raw) == span // ID_SIZE * entry if n < last else 0 < len(raw) <= span // ID_SIZE * entry

            pos = 0
            whole = True
            seen = 0
            for n, raw in pieces(item, stream.index, stream_fits):
                whole = whole and n == seen
                seen = n + 1
                for off in range(0, len(raw), entry):
                    cid, length = _STREAM_ENTRY.unpack_from(raw, off)
                    yield Reference(cid, item, pos)
                    pos += length
            if whole and seen == len(stream.index) and pos != stream.size:
                report(item, "chunk list does not add up to the size")
