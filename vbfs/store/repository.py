"""The repository: config, key, chunks, chunk lists (indexes), streams and snapshot manifests.

Layout on the backend (documented for users in docs/repository-format.md)::

    config                  JSON, plaintext: format version, id, chunk size, hash, compression, encryption, and
                            a MAC (encrypted) or checksum (plaintext) over them; checked by store/config.py
    keys/repokey            the wrapped master key (encrypted repositories only)
    chunks/<ab>/<id hex>    one immutable object per chunk, named by its (keyed) BLAKE3 id
    snapshots/<id>          one immutable manifest per snapshot, encoded like a chunk, validated on load
                            (store/manifest.py)
    index/<session id>      the chunks and patch records one write session stored (store/chunkindex.py)
    locks/                  see locks.py

A disk is a list of fixed-size chunks aligned to the disk: entry ``i`` covers bytes ``[i*chunk_size,
(i+1)*chunk_size)``; the all-zero id stands for a chunk of zeros, which is never stored. A stream (a config file,
a database dump) is a list of content-defined chunks with their lengths. Both lists are cut into pieces of
``INDEX_PIECE_ENTRIES`` entries and each piece is stored as an ordinary chunk, so unchanged parts of a 1 TiB disk's
list are shared between snapshots and a manifest stays a few KiB however large the disk is.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vbfs.errors import (
    IntegrityError,
    ObjectMissing,
    RepositoryExists,
    RepositoryNotFound,
    VbfsError,
    WrongPassphrase,
)
from vbfs.failpoints import failpoint
from vbfs.store.backend import Backend, LocalBackend
from vbfs.store.codec import ENC_AESGCM, FORMAT_VERSION, ID_SIZE, OLD_FORMAT_VERSION, ChunkId, Codec
from vbfs.store.config import (
    OLD_REPO_VERSION,
    REPO_FORMAT,
    REPO_VERSION,
    SecurityRecords,
    seal,
    validate_config,
    verify_seal,
)
from vbfs.store.keys import KEY_FILE, KeyExport, create_key, unlock_key, wrap_key
from vbfs.store.locks import EXCLUSIVE, GC, SHARED, RepositoryLock, locked
from vbfs.store.manifest import INDEX_PIECE_ENTRIES, MANIFEST_VERSION, Manifest, StreamRecord
from vbfs.store.patch import PatchRecord

if TYPE_CHECKING:
    from vbfs.store.chunkindex import ChunkIndex
    from vbfs.store.session import WriteSession

DEFAULT_CHUNK_SIZE = 1024 * 1024
CDC_MIN, CDC_AVG, CDC_MAX = 256 * 1024, 1024 * 1024, 4 * 1024 * 1024
ZERO_ID: ChunkId = bytes(ID_SIZE)
STREAM_ENTRY = struct.Struct("<32sQ")

log = logging.getLogger(__name__)

PassphraseProvider = Callable[[bool], str]
"""Called with ``confirm`` (True when a new passphrase is being chosen); returns the passphrase."""


def chunk_object_name(cid: ChunkId) -> str:
    h = cid.hex()
    return f"chunks/{h[:2]}/{h}"


PATCH_SUFFIX = ".patch"


def patch_object_name(cid: ChunkId) -> str:
    """Patch records are named apart, so a writer learns whether a chunk is one with a stat, not a read."""
    return chunk_object_name(cid) + PATCH_SUFFIX


StreamRef = StreamRecord
"""What storing a stream gives: its size and chunk-list pieces (:class:`vbfs.store.manifest.StreamRecord`)."""


class Repository:
    def __init__(self, backend: Backend, config: dict[str, Any], codec: Codec, location: str):
        self.backend = backend
        self.config = config
        self.codec = codec
        self.location = location
        self.warn: Callable[[str], None] = lambda message: log.warning("%s", message)
        """Where one-line warnings go (damaged lock objects set aside, leftovers removed); the CLI prints them."""
        self._leftovers_done = False
        self._index: ChunkIndex | None = None  # the chunk index the last write session started from
        self._index_lock = threading.Lock()
        self._held: list[RepositoryLock] = []  # the locks this process holds on this repository
        self._held_lock = threading.Lock()

    # ---- creation and opening -------------------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        location: str,
        encryption: str,
        passphrase: PassphraseProvider,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> Repository:
        if encryption not in ("none", "repokey"):
            raise VbfsError(f"unknown encryption mode {encryption!r} (use 'repokey' or 'none')")
        if chunk_size < 64 * 1024 or chunk_size > 16 * 1024 * 1024 or chunk_size & (chunk_size - 1):
            raise VbfsError("chunk size must be a power of two between 64 KiB and 16 MiB")
        root = local_path(location)
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise RepositoryExists(f"{location} exists and is not an empty directory")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise VbfsError(f"cannot create {location}: {exc.strerror}") from None
        backend = LocalBackend(root)
        repo_id = uuid.uuid4().hex
        config: dict[str, Any] = {
            "format": REPO_FORMAT,
            "version": REPO_VERSION,
            "id": repo_id,
            "chunk_size": chunk_size,
            "hash": "blake3-keyed" if encryption == "repokey" else "blake3",
            "compression": "zstd",
            "zstd_level": 3,
            "cdc": {"algorithm": "fastcdc2020", "min": CDC_MIN, "avg": CDC_AVG, "max": CDC_MAX},
            "encryption": encryption,
        }
        codec = Codec(id_key=None, enc_key=None)
        records = SecurityRecords()
        key = None
        if encryption == "repokey":
            keyfile, key = create_key(passphrase(True))
            backend.put("keys/repokey", keyfile)
            codec = Codec(id_key=key.id_key, enc_key=key.enc_key)
        for d in ("chunks", "snapshots", "locks"):
            (root / d).mkdir(exist_ok=True)
        config = seal(config, key)
        # The config is written last: a directory without it is not a repository yet.
        backend.put("config", json.dumps(config, indent=2).encode() + b"\n")
        backend.flush()
        if key is not None:
            records.remember_encrypted(location, repo_id)
        else:
            records.forget_location(location)
        records.remember_format(location, repo_id, REPO_VERSION)
        return cls(backend, config, codec, location)

    @classmethod
    def open(cls, location: str, passphrase: PassphraseProvider) -> Repository:
        backend, config = _open_config(location)
        has_key = backend.exists("keys/repokey")
        key = None
        # The seal first: a flipped bit is "damaged", whichever field it hit.
        if "checksum" in config:
            verify_seal(config, None, location)
        elif "mac" in config:
            if not has_key:
                raise IntegrityError(_missing_key(location))
            key = unlock_key(backend.get("keys/repokey"), passphrase(False))
            verify_seal(config, key, location)
        config = validate_config(config, location)
        old = config["version"] == OLD_REPO_VERSION
        fmt = OLD_FORMAT_VERSION if old else FORMAT_VERSION
        records = SecurityRecords()
        records.refuse_older_format(location, config["id"], config["version"])
        if not old:
            records.remember_format(location, config["id"], config["version"])
        if config["encryption"] == "repokey":
            if key is None:  # a format 1 config: no MAC
                if not has_key:
                    raise IntegrityError(_missing_key(location))
                key = unlock_key(backend.get("keys/repokey"), passphrase(False), require_checksum=False)
            records.remember_encrypted(location, config["id"])
            codec = Codec(id_key=key.id_key, enc_key=key.enc_key, zstd_level=config["zstd_level"], object_format=fmt)
        else:
            if has_key:
                raise IntegrityError(
                    f"the config of {location} says it is not encrypted, but the repository holds a key "
                    "(keys/repokey): refusing to use a changed config"
                )
            records.refuse_plaintext(location, config["id"])
            _refuse_encrypted_objects(backend, location)
            codec = Codec(id_key=None, enc_key=None, zstd_level=config["zstd_level"], object_format=fmt)
        return cls(backend, config, codec, location)

    # ---- properties ---------------------------------------------------------------------------------------------

    @property
    def id(self) -> str:
        return str(self.config["id"])

    @property
    def chunk_size(self) -> int:
        return int(self.config["chunk_size"])

    @property
    def encrypted(self) -> bool:
        return self.codec.encrypted

    @property
    def read_only(self) -> bool:
        """The repository's storage cannot be written: it can be read, restored from and mounted, not backed up to."""
        return not self.backend.writable()

    @property
    def old_format(self) -> bool:
        """A version 1 repository (unencrypted objects without checksums): read, restored from, never written."""
        return int(self.config["version"]) == OLD_REPO_VERSION

    def why_read_only(self) -> str:
        """Why the repository cannot be written, as the end of a sentence naming it: read-only storage, or no
        write permission for this user."""
        if isinstance(self.backend, LocalBackend):
            try:
                if not os.statvfs(self.backend.root).f_flag & os.ST_RDONLY:
                    return f"is not writable by user id {os.geteuid()} (no write permission on {self.backend.root})"
            except OSError as exc:
                return f"cannot be reached ({exc.strerror})"
        return "is on read-only storage"

    def require_writable(self) -> None:
        if self.read_only:
            raise VbfsError(f"the repository at {self.location} {self.why_read_only()}: it can be read, not written")
        if self.old_format:
            raise VbfsError(
                f"the repository at {self.location} has format version 1, which this vbfs reads but does not write "
                "(its objects have no checksums): back up into a new repository"
            )

    def remove_leftovers(self) -> list[str]:
        """Remove temporaries of writers that are provably gone; once per process. One line per kind removed."""
        if self._leftovers_done or self.read_only or not isinstance(self.backend, LocalBackend):
            return []
        self._leftovers_done = True
        count, size = self.backend.remove_dead_temporaries()
        if not count:
            return []
        return [f"removed {count} temporary file(s) ({_human(size)}) left by interrupted writes"]

    def catalog_path(self) -> Path:
        """Beside the data for a plaintext repository; in the user's cache for an encrypted or read-only one."""
        if not self.encrypted and not self.read_only:
            return Path(self.location) / "catalog.sqlite"
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return cache / "vbfs" / self.id / "catalog.sqlite"

    def lock_shared(self, timeout: float = 60.0) -> AbstractContextManager[RepositoryLock | None]:
        """A shared lock; on read-only storage none can be written, and nothing can delete data there either."""
        if self.read_only:
            return nullcontext()
        return self.lock(SHARED, timeout)

    def lock_exclusive(self, timeout: float = 0.0) -> AbstractContextManager[RepositoryLock]:
        return self.lock(EXCLUSIVE, timeout)

    def lock_gc(self, timeout: float = 0.0) -> AbstractContextManager[RepositoryLock]:
        """The lock of forget, prune and gc: shared with backups, not with another gc (see store/locks.py)."""
        return self.lock(GC, timeout)

    @contextmanager
    def lock(self, kind: str, timeout: float = 0.0) -> Iterator[RepositoryLock]:
        """A lock of ``kind``; this process's other locks on this repository do not count against it."""
        with self._held_lock:
            mine = frozenset(lock.name for lock in self._held)
        with locked(self.backend, kind, timeout, warn=self.warn, mine=mine) as lock:
            with self._held_lock:
                self._held.append(lock)
            try:
                yield lock
            finally:
                with self._held_lock:
                    self._held.remove(lock)

    def holds(self, kind: str) -> bool:
        """Whether this process holds a lock of ``kind`` on this repository."""
        with self._held_lock:
            return any(lock.kind == kind for lock in self._held)

    def check_locks(self, ask: bool = False) -> None:
        """Raise :class:`vbfs.store.locks.LockLost` when a lock this process holds here is lost (see locks.py)."""
        with self._held_lock:
            held = list(self._held)
        for lock in held:
            lock.check(ask)

    # ---- the key (encrypted repositories) -------------------------------------------------------------------------

    def key_file(self) -> bytes:
        """The bytes of ``keys/repokey`` as stored: the master key, still wrapped by the passphrase."""
        if not self.encrypted:
            raise VbfsError(f"the repository at {self.location} is not encrypted: it has no key")
        return self.backend.get(KEY_FILE)

    def change_passphrase(self, old: str, new: str, lock_wait: float = 10.0) -> None:
        """Wrap the same master key with ``new`` (a fresh salt and nonce) and replace ``keys/repokey`` atomically.

        Holds the gc lock: two changes never run at once, and one that finds the key file no longer opened by
        ``old`` (another change landed since this one opened the repository) stops without writing. Backups and
        mounts read the key only when they open the repository and go on meanwhile. The new file is written
        beside the old one and renamed over it, so a crash leaves either of them, whole; it is read back with
        ``new`` before this returns. ``lock_wait``: how long to wait for the gc lock.
        """
        if not self.encrypted:
            raise VbfsError(f"the repository at {self.location} is not encrypted: it has no passphrase")
        self.require_writable()
        with self.lock(GC, timeout=lock_wait):
            try:
                key = unlock_key(self.backend.get(KEY_FILE), old)
            except WrongPassphrase:
                raise VbfsError(
                    "the repository's passphrase was changed by another process meanwhile: nothing was changed"
                ) from None
            verify_seal(self.config, key, self.location)
            self.backend.put(KEY_FILE, wrap_key(key, new))
            failpoint("after-key-put")
            self.backend.flush()
            unlock_key(self.backend.get(KEY_FILE), new)

    @classmethod
    def import_key(
        cls, location: str, export: KeyExport, source: str, passphrase: Callable[[], str], lock_wait: float = 10.0
    ) -> str:
        """Put the key of ``export`` (read from ``source``) in place as ``keys/repokey``, whatever is there now.

        Refused, in this order and before anything is written: a repository that is not encrypted or has format
        1 (no config MAC to check a key against), storage that cannot be written, an export of another
        repository (its id; asked before the passphrase), a damaged export, a wrong passphrase, and a key that
        does not verify the config's MAC. A key that verifies it is this repository's master key, so replacing a
        key file that is there only changes which passphrase opens the repository. Written like
        :meth:`change_passphrase`, under the gc lock. Returns ``"restored"`` (there was no key file),
        ``"replaced"`` or ``"unchanged"`` (the same bytes were there).
        """
        backend, config = _open_config(location)
        if "checksum" in config or config.get("encryption") == "none":
            raise VbfsError(f"the repository at {location} is not encrypted: it has no key to import")
        if "mac" not in config:
            raise VbfsError(
                f"the repository at {location} has format version 1 (its config has no MAC to check a key "
                "against): vbfs does not import keys into it"
            )
        if not backend.writable():
            raise VbfsError(f"the repository at {location} is on read-only storage: it can be read, not written")
        if export.repository_id != config.get("id"):
            raise VbfsError(
                f"{source} holds the key of repository {export.repository_id}, not of the repository at {location} "
                f"({str(config.get('id'))[:32]}): refusing to import it"
            )
        key = unlock_key(export.keyfile, passphrase(), what=f"the key in {source}", hint="")
        try:
            verify_seal(config, key, location)
        except IntegrityError:
            raise VbfsError(
                f"the key in {source} does not verify the config of {location} (its MAC does not match): it is "
                "not this repository's key, or the config was changed; refusing to import it"
            ) from None
        config = validate_config(config, location)
        codec = Codec(id_key=key.id_key, enc_key=key.enc_key, zstd_level=config["zstd_level"])
        repo = cls(backend, config, codec, location)
        with repo.lock(GC, timeout=lock_wait):
            try:
                before: bytes | None = backend.get(KEY_FILE)
            except ObjectMissing:
                before = None
            if before == export.keyfile:
                return "unchanged"
            backend.put(KEY_FILE, export.keyfile)
            backend.flush()
        return "restored" if before is None else "replaced"

    # ---- chunks -------------------------------------------------------------------------------------------------

    def write_session(self) -> WriteSession:
        """A session that stores chunks, chunk lists and streams and commits one manifest (a context manager).

        It starts from the chunk index (loaded once per repository object, then brought up to date from the new
        index objects), so its dedup decisions cost no backend call per chunk.
        """
        from vbfs.store.chunkindex import ChunkIndex
        from vbfs.store.session import WriteSession

        self.require_writable()
        with self._index_lock:
            self._index = ChunkIndex.load(self, self._index)
            index = self._index
        return WriteSession(self, index)

    def drop_chunk_index(self) -> None:
        """Forget the chunk index held in memory (garbage collection rewrote it); the next session loads it."""
        with self._index_lock:
            self._index = None

    def get_chunk(self, cid: ChunkId) -> bytes:
        """A chunk's bytes, verified; a chunk stored as a patch record is read from its base and its pieces."""
        record = self._load(cid)
        if not isinstance(record, PatchRecord):
            return record
        if record.base == ZERO_ID:
            return record.apply(bytes(record.length))
        base = self._load(record.base)
        if isinstance(base, PatchRecord):
            raise IntegrityError(f"patch {cid.hex()[:16]} has a patch as its base")
        return record.apply(base)

    def _load(self, cid: ChunkId) -> bytes | PatchRecord:
        name = chunk_object_name(cid)
        try:
            blob = self.backend.get(name)
        except ObjectMissing:
            name = patch_object_name(cid)
            blob = self.backend.get(name)
        is_patch, data = self.codec.open_chunk(blob, cid, name)
        if is_patch != name.endswith(PATCH_SUFFIX):
            raise IntegrityError(f"object {name} is damaged (its kind does not match its name)")
        return PatchRecord.from_bytes(data, f"chunk {cid.hex()[:16]}") if is_patch else data

    def chunk_patch(self, cid: ChunkId) -> PatchRecord | None:
        """The patch record ``cid`` is stored as, or None for a full chunk (which is not read)."""
        if not self.backend.exists(patch_object_name(cid)):
            return None
        record = self._load(cid)
        return record if isinstance(record, PatchRecord) else None

    # ---- indexes (chunk lists) ----------------------------------------------------------------------------------

    def read_index_piece(self, piece_id: str) -> bytes:
        try:
            return self.get_chunk(bytes.fromhex(piece_id))
        except ValueError:
            raise IntegrityError(f"bad chunk-list id {piece_id!r} in a manifest") from None

    def read_index(self, piece_ids: Sequence[str]) -> bytes:
        return b"".join(self.read_index_piece(p) for p in piece_ids)

    # ---- streams --------------------------------------------------------------------------------------------------

    def stream_chunks(self, ref: StreamRecord) -> Iterator[tuple[ChunkId, int]]:
        for piece in ref.index:
            raw = self.read_index_piece(piece)
            if len(raw) % STREAM_ENTRY.size:
                raise IntegrityError("a stream's chunk list piece has the wrong length")
            for off in range(0, len(raw), STREAM_ENTRY.size):
                yield STREAM_ENTRY.unpack_from(raw, off)

    def read_stream(self, ref: StreamRecord) -> Iterator[bytes]:
        for cid, length in self.stream_chunks(ref):
            data = self.get_chunk(cid)
            if len(data) != length:
                raise IntegrityError(f"chunk {cid.hex()} has the wrong length")
            yield data

    # ---- manifests ------------------------------------------------------------------------------------------------

    def snapshot_ids(self) -> list[str]:
        return sorted(name.split("/", 1)[1] for name in self.backend.list("snapshots/"))

    def load_manifest(self, snap_id: str) -> Manifest:
        name = f"snapshots/{snap_id}"
        raw = self.codec.decode(self.backend.get(name), name)
        try:
            manifest = json.loads(raw)
        except (ValueError, RecursionError):
            raise IntegrityError(f"snapshot manifest {snap_id} is damaged (not JSON)") from None
        return Manifest.from_json(manifest, snap_id)

    def commit_manifest(self, manifest: Manifest) -> None:
        """Make every object written so far durable, then land the manifest atomically."""
        failpoint("before-manifest")
        self.backend.flush()
        name = f"snapshots/{manifest.id}"
        self.backend.put(name, self.codec.encode(json.dumps(manifest.to_json(), sort_keys=True).encode(), name))
        self.backend.flush()
        failpoint("after-manifest")

    def delete_manifest(self, snap_id: str) -> None:
        self.backend.delete(f"snapshots/{snap_id}")
        self.backend.flush()


def _open_config(location: str) -> tuple[LocalBackend, dict[str, Any]]:
    """The backend of the repository at ``location`` and its config as JSON, if it is a vbfs repository's (its
    fields are checked by the caller, after its seal)."""
    root = local_path(location)
    if not (root / "config").is_file():
        if not root.exists():
            raise RepositoryNotFound(f"no repository at {location} (the path does not exist)")
        raise RepositoryNotFound(f"no repository at {location} (no config file; create one with vbfs init)")
    backend = LocalBackend(root)
    try:
        config = json.loads(backend.get("config"))
    except (ValueError, UnicodeDecodeError):
        raise IntegrityError(f"the repository config at {location} is damaged (not JSON)") from None
    if not isinstance(config, dict):
        raise IntegrityError(f"the repository config at {location} is damaged (not a JSON object)")
    if config.get("format") != REPO_FORMAT:
        raise IntegrityError(f"{location} is not a vbfs repository (its config is damaged or another program's)")
    return backend, config


def local_path(location: str) -> Path:
    """The folder of a repository location; an address with a scheme (``ssh://``, ``s3://``) is refused in one
    line rather than taken for a local folder named ``ssh:``."""
    m = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", location)
    if m:
        raise VbfsError(
            f"{location}: repositories at {m.group(1)}:// addresses are not supported; give a local folder (or a "
            "mounted network filesystem) as a path"
        )
    return Path(location)


def _missing_key(location: str) -> str:
    return (
        f"the repository at {location} is encrypted but its key {KEY_FILE} is missing: restore it from an export "
        "with vbfs key import"
    )


def _refuse_encrypted_objects(backend: Backend, location: str) -> None:
    """A config that says "none" over encrypted objects was changed (and its key file removed): refuse it."""
    for prefix in ("snapshots/", "chunks/"):
        for name in backend.list(prefix):
            try:
                blob = backend.get(name)
            except ObjectMissing:
                continue
            if len(blob) > 1 and blob[1] == ENC_AESGCM:
                raise IntegrityError(
                    f"the config of {location} says it is not encrypted, but its objects are: refusing to use a "
                    "changed config"
                )
            break


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def chunk_name_to_id(name: str) -> ChunkId | None:
    base = name.rsplit("/", 1)[-1].removesuffix(PATCH_SUFFIX)
    try:
        cid = bytes.fromhex(base)
    except ValueError:
        return None
    return cid if len(cid) == ID_SIZE else None


__all__ = [
    "INDEX_PIECE_ENTRIES",
    "MANIFEST_VERSION",
    "ZERO_ID",
    "ObjectMissing",
    "Repository",
    "StreamRef",
    "chunk_name_to_id",
    "chunk_object_name",
]
