"""The catalog: an SQLite index of the repository's snapshots (through sqlite-utils).

The manifests are the truth; the catalog is derived from them and :meth:`Catalog.rebuild` recreates it from the
manifests alone. :meth:`Catalog.sync` runs whenever a repository is opened for reading and brings the catalog up
to date with what is on the backend (a manifest that landed but whose catalog write was cut short by a crash is
added), so a stale catalog is never the reason for a wrong answer.

What one manifest holds never stops the others from being listed: each is added on its own, a guest-file index
that cannot be read or holds rows out of range is left out (with a warning) while the snapshot is still listed,
and rows are checked before they reach SQLite. A catalog file that SQLite cannot read is moved aside
(``catalog.sqlite.damaged-<time>``) and rebuilt.

Names: a snapshot's ``name`` in the catalog (its folder in the tree) is unique per guest. Two manifests of one
guest with the same name (two backups in the same second) are both listed: the one with the smallest id keeps the
name, each other one is shown as ``<name>-<first 8 digits of its id>``, whatever order the catalog learns them in.

Vanished snapshots: a snapshot the catalog knew whose manifest is gone, without having been forgotten, is kept in
``vanished`` and reported by every listing and by ``check`` until it is acknowledged
(``vbfs check --acknowledge-missing``): a deleted or rolled-back manifest is never silent.

One connection per thread; SQLite's own locking (WAL, busy timeout) lets two backups write at once.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from vbfs import times
from vbfs.errors import SnapshotNotFound, VbfsError
from vbfs.globs import name_regex, path_regex

if TYPE_CHECKING:
    import sqlite_utils
from vbfs.store import marks
from vbfs.store.manifest import Manifest, format_time, tags_match
from vbfs.store.repository import Repository

SCHEMA_VERSION = 3  # 3: summaries carry tags and note
FileRow = tuple[str, str, int, int, int]  # path below files/, type, size, mtime_ns, mode
INT64_MAX = 2**63 - 1
T = TypeVar("T")


def create_tables(db: sqlite_utils.Database) -> None:
    """The whole schema, in one place."""
    # One row per snapshot manifest in the repository. `time` is the UTC start of the backup in ISO 8601;
    # `base_name` is the name the manifest gives itself (time without colons); `name` is the snapshot's folder
    # name in the tree: `base_name`, or `<base_name>-<id prefix>` for all but the smallest id when two manifests
    # of a guest share a base name; unique per guest. `summary` is the JSON that `vbfs snapshots --json` prints,
    # derived from the manifest only (with `name` as shown).
    db.table("snapshots").create(
        {
            "id": str,
            "guest": str,
            "name": str,
            "base_name": str,
            "time": str,
            "hypervisor": str,
            "source": str,
            "consistency": str,
            "size": int,
            "summary": str,
        },
        pk="id",
        if_not_exists=True,
    )
    db.table("snapshots").create_index(["guest", "time"], if_not_exists=True)
    db.table("snapshots").create_index(["guest", "name"], unique=True, if_not_exists=True)
    db.table("snapshots").create_index(["guest", "base_name"], if_not_exists=True)
    # One row per disk or stream (config file, agent dump) of a snapshot. `kind` is 'disk', 'config' or an agent
    # name; `name` is the item's file name in the tree; `size` its length in bytes; `mode` is 'full' or
    # 'incremental' for disks (how it was read), '' for streams.
    db.table("items").create(
        {"snapshot_id": str, "kind": str, "name": str, "size": int, "mode": str},
        pk=("snapshot_id", "kind", "name"),
        foreign_keys=[("snapshot_id", "snapshots", "id")],
        if_not_exists=True,
    )
    # The guest-file index. One row per distinct version of a guest's file: the same path with the same type,
    # size, mtime and mode in many snapshots is one row. `path` is the path below the snapshot's files/ folder
    # (<disk>/<volume>/<path in the guest>), `name` its last part (what `find` matches), `type` is 'f' (file),
    # 'd' (folder), 'l' (symlink) or 'o' (other), `mtime_ns` nanoseconds since the epoch.
    db.execute(
        "CREATE TABLE IF NOT EXISTS file_versions (id INTEGER PRIMARY KEY, guest TEXT NOT NULL, path TEXT NOT NULL,"
        " name TEXT NOT NULL, type TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,"
        " mode INTEGER NOT NULL, UNIQUE (guest, path, type, size, mtime_ns, mode))"
    )
    db.execute("CREATE INDEX IF NOT EXISTS file_versions_name ON file_versions (name)")
    # Which snapshot holds which file version: `snap` is the rowid of the snapshot's row in `snapshots`.
    db.execute(
        "CREATE TABLE IF NOT EXISTS snapshot_files (snap INTEGER NOT NULL, version INTEGER NOT NULL,"
        " PRIMARY KEY (snap, version)) WITHOUT ROWID"
    )
    db.execute("CREATE INDEX IF NOT EXISTS snapshot_files_version ON snapshot_files (version, snap)")
    # Snapshots the catalog listed whose manifest then disappeared without being forgotten (deleted, or the
    # repository rolled back). `noticed` is when the catalog found it gone (ISO 8601, UTC); `acknowledged` is
    # NULL until a user acknowledged it with `vbfs check --acknowledge-missing`, then when they did.
    db.execute(
        "CREATE TABLE IF NOT EXISTS vanished (id TEXT PRIMARY KEY, guest TEXT NOT NULL, name TEXT NOT NULL,"
        " time TEXT NOT NULL, noticed TEXT NOT NULL, acknowledged TEXT)"
    )
    # A guest is a name that has at least one snapshot; the view keeps no state of its own.
    db.execute(
        "CREATE VIEW IF NOT EXISTS guests AS SELECT guest AS name, count(*) AS snapshots, "
        "min(time) AS first, max(time) AS latest FROM snapshots GROUP BY guest"
    )
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _drop_tables(conn: sqlite3.Connection) -> None:
    """Before a schema change: the derived tables go (the vanished records stay), :func:`create_tables` follows."""
    conn.execute("DROP VIEW IF EXISTS guests")
    for table in ("snapshot_files", "file_versions", "items", "snapshots"):
        conn.execute(f"DROP TABLE IF EXISTS {table}")


def valid_file_row(row: Any) -> FileRow | None:
    """A guest-file index row if every field has its type and fits SQLite's signed 64-bit integers, else None."""
    if not isinstance(row, list | tuple) or len(row) != 5:
        return None
    path, typ, size, mtime, mode = row
    if not isinstance(path, str) or not path or len(path) > 65536 or "\0" in path or typ not in ("f", "d", "l", "o"):
        return None
    if type(size) is not int or not 0 <= size <= INT64_MAX:
        return None
    if type(mtime) is not int or not -INT64_MAX <= mtime <= INT64_MAX:
        return None
    if type(mode) is not int or not 0 <= mode < 2**32:
        return None
    return path, typ, size, mtime, mode


def read_file_index(repo: Repository, manifest: Manifest, skipped: list[int] | None = None) -> Iterable[FileRow]:
    """The guest-file index stored with a snapshot: (path, type, size, mtime_ns, mode) rows.

    Lines that are not such a row are skipped and counted in ``skipped[0]`` when it is given."""
    ref = manifest.files_index
    if ref is None:
        return

    def parse(line: bytes) -> FileRow | None:
        try:
            return valid_file_row(json.loads(line))
        except (ValueError, RecursionError):
            return None

    buf = b""
    for data in repo.read_stream(ref):
        buf += data
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if line:
                row = parse(line)
                if row is not None:
                    yield row
                elif skipped is not None:
                    skipped[0] += 1
    if buf.strip():
        row = parse(buf)
        if row is not None:
            yield row
        elif skipped is not None:
            skipped[0] += 1


def summary_of(manifest: Manifest) -> dict[str, Any]:
    """What a listing shows of a snapshot (JSON); a function of the manifest alone."""
    return manifest.summary()


def _enable_wal(conn: sqlite3.Connection, timeout: float = 60.0) -> None:
    """Switch a catalog to WAL. Switching a new database needs it to itself, and SQLite answers "locked" at once
    (without waiting) while another process is creating the same catalog, so wait here."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if ("locked" not in str(exc) and "busy" not in str(exc)) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def is_damage(exc: BaseException) -> bool:
    """Does this error mean the catalog file is damaged (rather than busy, locked or unwritable)?"""
    if isinstance(exc, ValueError | TypeError | KeyError):  # a row whose JSON summary does not parse
        return True
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    text = str(exc).lower()
    if isinstance(exc, sqlite3.OperationalError):
        return any(w in text for w in ("malformed", "no such table", "no such column", "corrupt", "not a database"))
    return True


class CatalogDamaged(VbfsError):
    pass


def _guarded(method: Callable[..., T]) -> Callable[..., T]:
    """A reading method whose catalog turns out to be damaged says so in one line instead of failing oddly."""

    @functools.wraps(method)
    def wrapper(self: Catalog, *args: Any, **kwargs: Any) -> T:
        try:
            return method(self, *args, **kwargs)
        except (sqlite3.DatabaseError, ValueError, TypeError, KeyError) as exc:
            if not is_damage(exc):
                raise
            raise CatalogDamaged(
                f"the catalog {self.path} is damaged ({type(exc).__name__}: {exc}): run vbfs catalog rebuild"
            ) from None

    return wrapper


def _now() -> str:
    return format_time(datetime.now(UTC))


class Catalog:
    def __init__(self, path: Path):
        self.path = path
        self.notes: list[str] = []
        """One-line warnings about the catalog itself (set aside as damaged); the CLI prints them."""
        self._witness: Path | None = None  # see _read_witness
        self._witnessed: list[list[str]] | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise VbfsError(f"cannot create the catalog's folder {path.parent}: {exc.strerror}") from None
        try:
            self.conn = self._connect()
        except (sqlite3.DatabaseError, ValueError, TypeError, KeyError) as exc:
            if not is_damage(exc):
                raise VbfsError(f"cannot open the catalog {path}: {exc}") from None
            self.set_aside(exc, keep_vanished=False)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            _enable_wal(conn)
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL: safe; the catalog is derived anyway
            conn.execute("PRAGMA cache_size=-65536")
            if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                import sqlite_utils

                conn.execute("BEGIN IMMEDIATE")
                try:
                    if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                        _drop_tables(conn)
                        create_tables(sqlite_utils.Database(conn))
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            # A probe of every table: a file that is not a catalog fails here, not in the middle of a command.
            for table in ("snapshots", "items", "file_versions", "snapshot_files", "vanished"):
                conn.execute(f"SELECT count(*) FROM (SELECT 1 FROM {table} LIMIT 1)").fetchone()
            for (summary,) in conn.execute("SELECT summary FROM snapshots").fetchall():
                json.loads(summary)
        except BaseException:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        self.conn.close()

    def set_aside(self, exc: BaseException, keep_vanished: bool = True) -> None:
        """Move a damaged catalog file aside and start an empty one (``sync`` fills it from the manifests)."""
        vanished: list[tuple[Any, ...]] = []
        if keep_vanished:
            with contextlib.suppress(Exception):
                vanished = self.conn.execute("SELECT * FROM vanished").fetchall()
        with contextlib.suppress(Exception):
            self.conn.close()
        when = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        aside = self.path.with_name(f"{self.path.name}.damaged-{when}-{secrets.token_hex(3)}")
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                Path(f"{self.path}{suffix}").replace(f"{aside}{suffix}")
        self.notes.append(
            f"the catalog {self.path} is damaged ({str(exc)[:120]}): moved it aside to {aside.name} and rebuilt it "
            "from the manifests"
        )
        try:
            self.conn = self._connect()
        except sqlite3.Error as again:
            raise VbfsError(f"cannot create a new catalog {self.path}: {again}") from None
        if vanished:
            with contextlib.suppress(sqlite3.Error), self._transaction() as conn:
                conn.executemany("INSERT OR IGNORE INTO vanished VALUES (?, ?, ?, ?, ?, ?)", vanished)

    # ---- writing ----------------------------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (the connection is in autocommit mode otherwise)."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def add(self, manifest: Manifest, files: Iterable[FileRow] = ()) -> list[str]:
        """Index a snapshot with its guest files as (path, type, size, mtime_ns, mode) rows; never another one's row.

        A snapshot already indexed is left as it is. Rows out of range are left out; if the file index cannot be
        stored at all, the snapshot is indexed without it. Returns a warning for whatever was left out."""
        snap_id = manifest.id
        if self.conn.execute("SELECT 1 FROM snapshots WHERE id = ?", [snap_id]).fetchone():
            return []
        rows: list[FileRow] = []
        bad = 0
        for row in files:
            ok = valid_file_row(row)
            if ok is None:
                bad += 1
            else:
                rows.append(ok)
        warnings = []
        if bad:
            warnings.append(f"snapshot {snap_id}: {bad} guest-file index row(s) out of range were left out")
        try:
            self._insert(manifest, rows)
        except (sqlite3.DatabaseError, OverflowError, ValueError, TypeError) as exc:
            if not rows or (isinstance(exc, sqlite3.OperationalError) and not is_damage(exc)):
                raise
            warnings.append(f"snapshot {snap_id}: its guest-file index was left out of the catalog ({exc})")
            self._insert(manifest, [])
        return warnings

    def _insert(self, manifest: Manifest, files: list[FileRow]) -> None:
        s = summary_of(manifest)
        items = [(s["id"], "disk", d.name, d.size, d.mode or "") for d in manifest.disks]
        items += [(s["id"], "config", n, ref.size, "") for n, ref in manifest.config.items()]
        with self._transaction() as conn:
            if conn.execute("SELECT 1 FROM snapshots WHERE id = ?", [s["id"]]).fetchone():
                return  # another process indexed it meanwhile
            conn.execute(
                "INSERT INTO snapshots (id, guest, name, base_name, time, hypervisor, source, consistency, size,"
                " summary) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    s["id"],
                    s["guest"],
                    "\0" + s["id"],  # a placeholder no name can equal; _settle_names gives the real one
                    s["name"],
                    s["time"],
                    s["hypervisor"],
                    s["source"],
                    s["consistency"] or "",
                    sum(d.size for d in manifest.disks),
                    json.dumps(s, sort_keys=True),
                ),
            )
            self._settle_names(s["guest"], s["name"])
            conn.executemany(
                "INSERT OR IGNORE INTO items (snapshot_id, kind, name, size, mode) VALUES (?, ?, ?, ?, ?)", items
            )
            conn.execute("DELETE FROM vanished WHERE id = ?", [s["id"]])  # it is back
            self._add_files(s["id"], s["guest"], files)

    def _settle_names(self, guest: str, base: str) -> None:
        """Give every snapshot of ``guest`` whose manifest is named ``base`` its unique shown name: the smallest
        id keeps ``base``, the others get ``<base>-<id prefix>`` (inside the caller's transaction)."""
        conn = self.conn
        rows = conn.execute(
            "SELECT id, name FROM snapshots WHERE guest = ? AND base_name = ? ORDER BY id", [guest, base]
        ).fetchall()
        wanted = {sid: base if i == 0 else f"{base[:200]}-{sid[:8]}" for i, (sid, _) in enumerate(rows)}
        moving = [sid for sid, name in rows if name != wanted[sid]]
        for sid in moving:
            conn.execute("UPDATE snapshots SET name = ? WHERE id = ?", ["\0" + sid, sid])
        for sid in moving:
            name, n = wanted[sid], 1
            while conn.execute("SELECT 1 FROM snapshots WHERE guest = ? AND name = ?", [guest, name]).fetchone():
                n += 1  # taken by a manifest that gave itself this very name: fall back to the whole id
                name = f"{base[:200]}-{sid}" + (f"-{n}" if n > 2 else "")
            summary = json.loads(conn.execute("SELECT summary FROM snapshots WHERE id = ?", [sid]).fetchone()[0])
            summary["name"] = name
            conn.execute(
                "UPDATE snapshots SET name = ?, summary = ? WHERE id = ?",
                [name, json.dumps(summary, sort_keys=True), sid],
            )

    def _add_files(self, snap_id: str, guest: str, files: Iterable[FileRow]) -> None:
        conn = self.conn
        snap = conn.execute("SELECT rowid FROM snapshots WHERE id = ?", [snap_id]).fetchone()[0]
        conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS new_files (path TEXT, name TEXT, type TEXT, size INTEGER,"
            " mtime_ns INTEGER, mode INTEGER)"
        )
        conn.execute("DELETE FROM new_files")
        conn.executemany(
            "INSERT INTO new_files VALUES (?, ?, ?, ?, ?, ?)",
            ((p, p.rsplit("/", 1)[-1], t, size, mtime, mode) for p, t, size, mtime, mode in files),
        )
        conn.execute(
            "INSERT OR IGNORE INTO file_versions (guest, path, name, type, size, mtime_ns, mode)"
            " SELECT ?, path, name, type, size, mtime_ns, mode FROM new_files",
            [guest],
        )
        conn.execute(
            "INSERT OR IGNORE INTO snapshot_files (snap, version) SELECT ?, v.id FROM new_files n"
            " JOIN file_versions v ON v.guest = ? AND v.path = n.path AND v.type = n.type AND v.size = n.size"
            " AND v.mtime_ns = n.mtime_ns AND v.mode = n.mode",
            [snap, guest],
        )
        conn.execute("DELETE FROM new_files")

    def remove(self, snap_id: str) -> None:
        """Drop a snapshot from the catalog (forgetting it: no vanished record)."""
        with self._transaction() as conn:
            row = conn.execute("SELECT rowid, guest, base_name FROM snapshots WHERE id = ?", [snap_id]).fetchone()
            if row:
                conn.execute("DELETE FROM snapshot_files WHERE snap = ?", [row[0]])
                conn.execute(
                    "DELETE FROM file_versions WHERE NOT EXISTS"
                    " (SELECT 1 FROM snapshot_files sf WHERE sf.version = file_versions.id)"
                )
            conn.execute("DELETE FROM items WHERE snapshot_id = ?", [snap_id])
            conn.execute("DELETE FROM snapshots WHERE id = ?", [snap_id])
            if row:
                self._settle_names(row[1], row[2])

    def _record_vanished(self, repo: Repository) -> set[str]:
        """Every snapshot the catalog lists whose manifest is no longer on the backend: recorded, then dropped,
        unless the repository holds its forget record (it was forgotten, here or on another host). Returns the
        manifests on the backend.

        The catalog is read before the backend is listed: a snapshot is indexed only after its manifest landed,
        so one that the catalog knew and a later listing misses is really gone (not one landing meanwhile)."""
        known = self.conn.execute("SELECT id, guest, name, time FROM snapshots").fetchall()
        recorded = {r[0] for r in self.conn.execute("SELECT id FROM vanished").fetchall()}
        listed = {r[0] for r in known}
        known += [tuple(r) for r in self._read_witness(repo) if r[0] not in listed and r[0] not in recorded]
        on_repo = set(repo.snapshot_ids())
        gone = [r for r in known if r[0] not in on_repo]
        forgotten = [r for r in gone if marks.forgotten(repo, r[0]) is not None]  # on purpose, maybe elsewhere
        for r in forgotten:
            self.remove(r[0])
        gone = [r for r in gone if r not in forgotten]
        if gone:
            with self._transaction() as conn:
                conn.executemany(
                    "INSERT OR IGNORE INTO vanished (id, guest, name, time, noticed) VALUES (?, ?, ?, ?, ?)",
                    [(*r, _now()) for r in gone],
                )
            for r in gone:
                self.remove(r[0])
        return on_repo

    # The witness: the snapshots this user's catalog knew, kept in the user's cache folder. A catalog that is lost,
    # damaged or deleted together with a manifest (a plaintext repository keeps its catalog inside) is rebuilt
    # from the manifests that are left; the witness still names the snapshot that went, so its disappearance is
    # reported instead of forgotten.

    def _read_witness(self, repo: Repository) -> list[list[str]]:
        from vbfs.store.config import SecurityRecords

        self._witness = SecurityRecords().folder / f"{repo.id}-snapshots.json"
        try:
            doc = json.loads(self._witness.read_bytes())
        except (OSError, ValueError):
            doc = []
        rows = doc if isinstance(doc, list) else []
        self._witnessed = [
            r for r in rows if isinstance(r, list) and len(r) == 4 and all(isinstance(x, str) for x in r)
        ]
        return self._witnessed

    def _write_witness(self) -> None:
        if self._witness is None:
            return
        rows = [list(r) for r in self.conn.execute("SELECT id, guest, name, time FROM snapshots ORDER BY id")]
        rows += [
            list(r)
            for r in self.conn.execute(
                "SELECT id, guest, name, time FROM vanished WHERE acknowledged IS NULL ORDER BY id"
            )
        ]
        if rows == self._witnessed:
            return
        tmp = self._witness.with_name(f".tmp-{os.getpid()}-{secrets.token_hex(4)}")
        with contextlib.suppress(OSError):  # a cache that cannot be written only loses this safeguard
            self._witness.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(rows, f, separators=(",", ":"))
            os.replace(tmp, self._witness)
            self._witnessed = rows

    def sync(self, repo: Repository) -> list[str]:
        """Bring the catalog in line with the manifests; return warnings: manifests that cannot be read or indexed
        whole, and snapshots that vanished without being forgotten (until acknowledged)."""
        try:
            return self._sync(repo)
        except (sqlite3.DatabaseError, ValueError, TypeError, KeyError) as exc:
            if not is_damage(exc):
                raise
            self.set_aside(exc)
            return self._sync(repo)

    def _sync(self, repo: Repository) -> list[str]:
        on_repo = self._record_vanished(repo)
        known = {r[0] for r in self.conn.execute("SELECT id FROM snapshots").fetchall()}
        warnings = []
        for snap_id in sorted(on_repo - known):
            try:
                manifest = repo.load_manifest(snap_id)
            except VbfsError as exc:
                warnings.append(f"snapshot {snap_id[:40]} is not listed: {exc}")
                continue
            skipped = [0]
            try:
                files = list(read_file_index(repo, manifest, skipped))
            except VbfsError as exc:
                warnings.append(f"snapshot {snap_id}: its guest-file index cannot be read ({exc})")
                files = []
            if skipped[0]:
                warnings.append(f"snapshot {snap_id}: {skipped[0]} guest-file index line(s) out of range were left out")
            try:
                warnings += self.add(manifest, files)
            except (sqlite3.DatabaseError, OverflowError, ValueError, TypeError, KeyError) as exc:
                if is_damage(exc) and isinstance(exc, sqlite3.DatabaseError):
                    raise
                warnings.append(f"snapshot {snap_id} is not listed: the catalog cannot hold it ({exc})")
        self._write_witness()
        for v in self.vanished():
            warnings.append(
                f"snapshot {v['guest']}@{v['name']} ({v['id']}) disappeared from the repository without being "
                f"forgotten (noticed {times.show_stored(v['noticed'])}); once you know why: "
                f"vbfs check --acknowledge-missing {v['id'][:8]}"
            )
        return warnings

    def rebuild(self, repo: Repository) -> list[str]:
        try:
            self._record_vanished(repo)
            with self._transaction() as conn:
                for table in ("snapshot_files", "file_versions", "items", "snapshots"):
                    conn.execute(f"DELETE FROM {table}")
        except (sqlite3.DatabaseError, ValueError, TypeError, KeyError) as exc:
            if not is_damage(exc):
                raise
            self.set_aside(exc)
        return self.sync(repo)

    def vanished(self) -> list[dict[str, Any]]:
        """Snapshots that disappeared without being forgotten and are not acknowledged yet, oldest first."""
        rows = self.conn.execute(
            "SELECT id, guest, name, time, noticed FROM vanished WHERE acknowledged IS NULL ORDER BY noticed, id"
        ).fetchall()
        return [dict(zip(("id", "guest", "name", "time", "noticed"), r, strict=True)) for r in rows]

    def acknowledge_vanished(self, which: str) -> list[dict[str, Any]]:
        """Acknowledge ``all`` vanished snapshots or those whose id starts with ``which``; returns them."""
        if which == "all":
            found = self.vanished()
        elif re.fullmatch(r"[0-9a-f]{4,32}", which):
            found = [v for v in self.vanished() if v["id"].startswith(which)]
        else:
            raise VbfsError(f"--acknowledge-missing takes a snapshot id (4 or more hex digits) or 'all', not {which!r}")
        with self._transaction() as conn:
            conn.executemany("UPDATE vanished SET acknowledged = ? WHERE id = ?", [(_now(), v["id"]) for v in found])
        self._write_witness()
        return found

    def audit(self, repo: Repository, manifests: dict[str, Manifest]) -> list[str]:
        """Compare the catalog with the manifests (and SQLite's own check); if they differ, rebuild it.

        ``manifests`` are those that could be read. Returns one error line when the catalog had to be rebuilt."""
        problems: list[str] = []
        unlisted = False
        try:
            result = self.conn.execute("PRAGMA quick_check").fetchall()
            if [r[0] for r in result] != ["ok"]:
                problems.append(f"SQLite finds it damaged ({str(result[0][0])[:100]})")
            rows = self.conn.execute("SELECT id, guest, name, base_name, summary FROM snapshots").fetchall()
            listed = set()
            for sid, guest, name, base, summary in rows:
                listed.add(sid)
                m = manifests.get(sid)
                if m is None:
                    continue
                want = summary_of(m)
                got = json.loads(summary)
                shown = got.get("name") if isinstance(got, dict) else None
                want["name"] = shown
                if got != want or guest != m.guest or base != m.name or name != shown:
                    problems.append(f"the row of snapshot {sid} differs from its manifest")
            # A readable snapshot that is not listed yet is no damage: a backup may have landed its manifest a
            # moment ago and not written its row yet. Sync adds it (below, or that backup does).
            unlisted = bool(set(manifests) - listed)
        except (sqlite3.DatabaseError, ValueError, TypeError, KeyError) as exc:
            if not is_damage(exc):
                raise
            problems.append(f"{type(exc).__name__}: {exc}")
        if not problems:
            if unlisted:
                self.sync(repo)
            return []
        self.set_aside(VbfsError(problems[0]))
        self.notes.clear()
        self.sync(repo)
        return [f"the catalog was damaged ({problems[0]}; {len(problems)} problem(s)): set aside and rebuilt"]

    # ---- reading ----------------------------------------------------------------------------------------------

    @_guarded
    def snapshots(self, guest: str | None = None, tags: list[frozenset[str]] | None = None) -> list[dict[str, Any]]:
        """Summaries, oldest first per guest; of ``guest`` only, and passing the tag filter ``tags``
        (:func:`vbfs.store.manifest.tag_filter`), when given."""
        sql = "SELECT summary FROM snapshots"
        args: list[Any] = []
        if guest is not None:
            sql += " WHERE guest = ?"
            args.append(guest)
        sql += " ORDER BY guest, time, id"
        rows = [json.loads(r[0]) for r in self.conn.execute(sql, args).fetchall()]
        return [r for r in rows if tags_match(r.get("tags", []), tags or [])]

    @_guarded
    def guests(self) -> list[dict[str, Any]]:
        cur = self.conn.execute("SELECT name, snapshots, first, latest FROM guests ORDER BY name")
        return [dict(zip(("name", "snapshots", "first", "latest"), row, strict=True)) for row in cur.fetchall()]

    @_guarded
    def latest(self, guest: str) -> dict[str, Any] | None:
        row = self.conn.execute(
            "SELECT summary FROM snapshots WHERE guest = ? ORDER BY time DESC, id DESC LIMIT 1", [guest]
        ).fetchone()
        return json.loads(row[0]) if row else None

    @_guarded
    def by_name(self, guest: str, name: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT summary FROM snapshots WHERE guest = ? AND name = ?", [guest, name]).fetchone()
        return json.loads(row[0]) if row else None

    @_guarded
    def find(self, pattern: str, guest: str | None = None) -> list[dict[str, Any]]:
        """Every version of every guest file that ``pattern`` matches (see :class:`PathPattern`)."""
        pat = PathPattern(pattern)
        where, args = pat.sql()
        if guest is not None:
            where += " AND v.guest = ?"
            args.append(guest)
        snaps = {
            rowid: {"name": name, "id": sid, "time": stime}
            for rowid, name, sid, stime in self.conn.execute("SELECT rowid, name, id, time FROM snapshots")
        }
        # The matching versions first (by the name index), then their snapshots: a plain join with GROUP BY
        # would let SQLite walk every version in id order instead.
        rows = self.conn.execute(
            f"WITH m AS MATERIALIZED (SELECT * FROM file_versions v WHERE {where})"
            " SELECT m.guest, m.path, m.type, m.size, m.mtime_ns, m.mode, group_concat(sf.snap)"
            " FROM m JOIN snapshot_files sf ON sf.version = m.id GROUP BY m.id",
            args,
        ).fetchall()
        out = []
        for g, path, typ, size, mtime, mode, snap_list in rows:
            if not pat.matches(path):
                continue
            held = sorted((snaps[int(r)] for r in snap_list.split(",")), key=lambda x: x["time"])
            out.append(
                {
                    "guest": g,
                    "path": "/files/" + path,
                    "type": typ,
                    "size": size,
                    "mtime_ns": mtime,
                    "mode": mode,
                    "snapshots": held,
                }
            )
        return sorted(out, key=lambda e: (e["guest"], e["path"], e["snapshots"][0]["time"]))

    @_guarded
    def files_of(self, snap_id: str) -> dict[str, tuple[str, int, int, int]]:
        """path → (type, size, mtime_ns, mode) of every indexed guest file of a snapshot."""
        rows = self.conn.execute(
            "SELECT v.path, v.type, v.size, v.mtime_ns, v.mode FROM snapshots s"
            " JOIN snapshot_files sf ON sf.snap = s.rowid JOIN file_versions v ON v.id = sf.version WHERE s.id = ?",
            [snap_id],
        ).fetchall()
        return {r[0]: (r[1], r[2], r[3], r[4]) for r in rows}

    @_guarded
    def name_taken(self, guest: str, name: str) -> bool:
        return bool(self.conn.execute("SELECT 1 FROM snapshots WHERE guest = ? AND name = ?", [guest, name]).fetchone())

    @_guarded
    def resolve(self, spec: str) -> dict[str, Any]:
        """``GUEST@latest``, ``GUEST@<id prefix>``, ``GUEST@<snapshot name>`` or ``GUEST@<time>``."""
        guest, sep, which = spec.rpartition("@")
        if not sep or not guest or not which:
            raise SnapshotNotFound(f"bad snapshot spec {spec!r} (expected GUEST@latest, GUEST@<id> or GUEST@<time>)")
        if not self.conn.execute("SELECT 1 FROM snapshots WHERE guest = ?", [guest]).fetchone():
            raise SnapshotNotFound(f"no snapshots of guest {guest!r} in this repository")
        if which == "latest":
            found = self.latest(guest)
            assert found is not None
            return found
        row = self.conn.execute("SELECT summary FROM snapshots WHERE guest = ? AND name = ?", [guest, which]).fetchone()
        if row:
            return dict(json.loads(row[0]))
        if re.fullmatch(r"[0-9a-f]{4,64}", which):
            rows = self.conn.execute(
                "SELECT summary FROM snapshots WHERE guest = ? AND id LIKE ? ORDER BY time",
                [guest, which + "%"],
            ).fetchall()
            if len(rows) == 1:
                return dict(json.loads(rows[0][0]))
            if len(rows) > 1:
                raise SnapshotNotFound(f"snapshot id prefix {which!r} of {guest} is ambiguous ({len(rows)} match)")
        when = times.parse(which)
        if when is None:
            raise SnapshotNotFound(f"no snapshot {which!r} of guest {guest!r}")
        row = self.conn.execute(
            "SELECT summary FROM snapshots WHERE guest = ? AND time <= ? ORDER BY time DESC LIMIT 1",
            [guest, format_time(when)],
        ).fetchone()
        if not row:
            raise SnapshotNotFound(f"guest {guest!r} has no snapshot at or before {which}")
        return dict(json.loads(row[0]))


class PathPattern:
    """What ``vbfs find`` matches, against the paths it prints (``/files/<disk>/<volume>/<path in the guest>``).

    - Without a ``/``: the file's name, e.g. ``*.conf``.
    - Starting with ``/``: the whole printed path, e.g. ``/files/web01/p1/etc/*``.
    - Any other with a ``/``: the end of the path, whole parts only: ``etc/*.conf`` is ``/files/**/etc/*.conf``.

    The wildcards are those of :mod:`vbfs.globs` (``*`` within one part of a path, ``**`` across parts:
    ``/files/**/passwd``). SQLite's GLOB, whose ``*`` crosses ``/``, picks the candidates; the pattern's own
    expression decides."""

    def __init__(self, pattern: str):
        self.pattern = pattern
        self.by_name = "/" not in pattern
        if self.by_name or pattern.startswith("/"):
            self.full = pattern
        else:
            self.full = "/files/**/" + pattern
        self.regex = name_regex(pattern) if self.by_name else path_regex(self.full)

    def sql(self) -> tuple[str, list[Any]]:
        """A WHERE clause over ``file_versions v`` that holds for every match (and maybe more)."""
        if self.by_name:
            if not any(c in self.pattern for c in "*?["):
                return "v.name = ?", [self.pattern]
            return "v.name GLOB ?", [_sqlite_glob(self.pattern)]
        # `path` is stored below files/: the printed path without its "/files/"
        if not self.full.startswith("/files/"):
            return "0", []
        rest = self.full[len("/files/") :]
        if not any(c in rest for c in "*?["):
            return "v.path = ?", [rest]
        return "v.path GLOB ?", [_sqlite_glob(rest)]

    def matches(self, path: str) -> bool:
        """Does the pattern match ``path`` (as stored: below files/)?"""
        subject = path.rsplit("/", 1)[-1] if self.by_name else "files/" + path
        return self.regex.fullmatch(subject) is not None


def _glob_parts(pattern: str) -> Iterator[tuple[str, str]]:
    """The pattern as (kind, text): ``**``, ``*``, ``?``, ``set`` (``[...]`` without its brackets) or ``char``."""
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            yield "**", "**"
            i += 2
            continue
        if c in "*?":
            yield c, c
        elif c == "[":
            first = i + 2 if pattern.startswith(("[!", "[^"), i) else i + 1
            end = pattern.find("]", first + 1)  # a "]" right after "[" or "[!" is one of the set
            if end < 0:
                yield "char", c
            else:
                yield "set", pattern[i + 1 : end]
                i = end + 1
                continue
        else:
            yield "char", c
        i += 1


def _sqlite_glob(pattern: str) -> str:
    """A GLOB for SQLite that matches at least what ``pattern`` does (its ``*`` crosses ``/``)."""
    out = []
    parts = list(_glob_parts(pattern))
    for n, (kind, text) in enumerate(parts):
        if kind == "char" and text == "/" and n and parts[n - 1][0] == "**":
            continue  # "**/" may match nothing at all
        if kind in ("**", "*", "?"):
            out.append(kind[0])
        elif kind == "set":
            negate = text[:1] in ("!", "^")
            out.append(f"[^{text[1:]}]" if negate else f"[{text}]")
        elif text in "*?[":
            out.append(f"[{text}]")
        else:
            out.append(text)
    return "".join(out)
