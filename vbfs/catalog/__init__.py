"""The catalog: an SQLite index of the repository's snapshots (through sqlite-utils).

The manifests are the truth; the catalog is derived from them and :meth:`Catalog.rebuild` recreates it from the
manifests alone. :meth:`Catalog.sync` runs whenever a repository is opened for reading and brings the catalog up
to date with what is on the backend (a manifest that landed but whose catalog write was cut short by a crash is
added; a snapshot whose manifest is gone is dropped), so a stale catalog is never the reason for a wrong answer.

One connection per thread; SQLite's own locking (WAL, busy timeout) lets two backups write at once.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vbfs.errors import SnapshotNotFound, VbfsError

if TYPE_CHECKING:
    import sqlite_utils
from vbfs.store.repository import Repository

SCHEMA_VERSION = 1


def create_tables(db: sqlite_utils.Database) -> None:
    """The whole schema, in one place."""
    # One row per snapshot manifest in the repository. `time` is the UTC start of the backup in ISO 8601;
    # `name` is the snapshot's folder name in the tree (time without colons, unique per guest); `summary` is the
    # JSON that `vbfs snapshots --json` prints, derived from the manifest only.
    db.table("snapshots").create(
        {
            "id": str,
            "guest": str,
            "name": str,
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
    # A guest is a name that has at least one snapshot; the view keeps no state of its own.
    db.execute(
        "CREATE VIEW IF NOT EXISTS guests AS SELECT guest AS name, count(*) AS snapshots, "
        "min(time) AS first, max(time) AS latest FROM snapshots GROUP BY guest"
    )
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def read_file_index(repo: Repository, manifest: dict[str, Any]) -> Iterable[tuple[str, str, int, int, int]]:
    """The guest-file index stored with a snapshot: (path, type, size, mtime_ns, mode) rows."""
    ref = manifest.get("files_index")
    if not ref:
        return
    buf = b""
    for data in repo.read_stream(ref):
        buf += data
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if line:
                path, typ, size, mtime, mode = json.loads(line)
                yield path, typ, size, mtime, mode
    if buf.strip():
        path, typ, size, mtime, mode = json.loads(buf)
        yield path, typ, size, mtime, mode


def summary_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a listing shows of a snapshot; a function of the manifest alone."""
    return {
        "id": manifest["id"],
        "guest": manifest["guest"],
        "name": manifest["name"],
        "time": manifest["time"],
        "finished": manifest.get("finished"),
        "hypervisor": manifest["source"]["hypervisor"],
        "source": manifest["source"]["url"],
        "consistency": manifest.get("consistency"),
        "disks": [{"name": d["name"], "size": d["size"], "mode": d.get("mode")} for d in manifest["disks"]],
        "config": sorted(manifest.get("config", {})),
        "indexed": bool(manifest.get("files_index")),
        "stats": manifest.get("stats", {}),
    }


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


class Catalog:
    def __init__(self, path: Path):
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, timeout=60, isolation_level=None)
            _enable_wal(conn)
        except sqlite3.Error as exc:
            raise VbfsError(f"cannot open the catalog {path}: {exc}") from None
        self.conn = conn
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL: safe; the catalog is derived anyway
        conn.execute("PRAGMA cache_size=-65536")
        if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
            import sqlite_utils

            with self._transaction():
                create_tables(sqlite_utils.Database(conn))

    def close(self) -> None:
        self.conn.close()

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

    def add(self, manifest: dict[str, Any], files: Iterable[tuple[str, str, int, int, int]] = ()) -> None:
        """Index a snapshot, with its guest files as (path, type, size, mtime_ns, mode) rows; all or nothing."""
        s = summary_of(manifest)
        items = [(s["id"], "disk", d["name"], d["size"], d.get("mode") or "") for d in manifest["disks"]]
        items += [(s["id"], "config", n, ref["size"], "") for n, ref in manifest.get("config", {}).items()]
        with self._transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO snapshots (id, guest, name, time, hypervisor, source, consistency, size,"
                " summary) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    s["id"],
                    s["guest"],
                    s["name"],
                    s["time"],
                    s["hypervisor"],
                    s["source"],
                    s["consistency"] or "",
                    sum(d["size"] for d in s["disks"]),
                    json.dumps(s, sort_keys=True),
                ),
            )
            conn.executemany(
                "INSERT OR REPLACE INTO items (snapshot_id, kind, name, size, mode) VALUES (?, ?, ?, ?, ?)", items
            )
            self._add_files(s["id"], s["guest"], files)

    def _add_files(self, snap_id: str, guest: str, files: Iterable[tuple[str, str, int, int, int]]) -> None:
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
        with self._transaction() as conn:
            row = conn.execute("SELECT rowid FROM snapshots WHERE id = ?", [snap_id]).fetchone()
            if row:
                conn.execute("DELETE FROM snapshot_files WHERE snap = ?", [row[0]])
                conn.execute(
                    "DELETE FROM file_versions WHERE NOT EXISTS"
                    " (SELECT 1 FROM snapshot_files sf WHERE sf.version = file_versions.id)"
                )
            conn.execute("DELETE FROM items WHERE snapshot_id = ?", [snap_id])
            conn.execute("DELETE FROM snapshots WHERE id = ?", [snap_id])

    def sync(self, repo: Repository) -> list[str]:
        """Bring the catalog in line with the manifests; return warnings about manifests that cannot be read."""
        on_repo = set(repo.snapshot_ids())
        known = {r[0] for r in self.conn.execute("SELECT id FROM snapshots").fetchall()}
        warnings = []
        for snap_id in sorted(known - on_repo):
            self.remove(snap_id)
        for snap_id in sorted(on_repo - known):
            try:
                manifest = repo.load_manifest(snap_id)
            except VbfsError as exc:
                warnings.append(f"snapshot {snap_id} is not listed: {exc}")
                continue
            try:
                files = list(read_file_index(repo, manifest))
            except VbfsError as exc:
                warnings.append(f"snapshot {snap_id}: its guest-file index cannot be read ({exc})")
                files = []
            self.add(manifest, files)
        return warnings

    def rebuild(self, repo: Repository) -> list[str]:
        with self._transaction() as conn:
            for table in ("snapshot_files", "file_versions", "items", "snapshots"):
                conn.execute(f"DELETE FROM {table}")
        return self.sync(repo)

    # ---- reading ----------------------------------------------------------------------------------------------

    def snapshots(self, guest: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT summary FROM snapshots"
        args: list[Any] = []
        if guest is not None:
            sql += " WHERE guest = ?"
            args.append(guest)
        sql += " ORDER BY guest, time, id"
        return [json.loads(r[0]) for r in self.conn.execute(sql, args).fetchall()]

    def guests(self) -> list[dict[str, Any]]:
        cur = self.conn.execute("SELECT name, snapshots, first, latest FROM guests ORDER BY name")
        return [dict(zip(("name", "snapshots", "first", "latest"), row, strict=True)) for row in cur.fetchall()]

    def latest(self, guest: str) -> dict[str, Any] | None:
        row = self.conn.execute(
            "SELECT summary FROM snapshots WHERE guest = ? ORDER BY time DESC, id DESC LIMIT 1", [guest]
        ).fetchone()
        return json.loads(row[0]) if row else None

    def by_name(self, guest: str, name: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT summary FROM snapshots WHERE guest = ? AND name = ?", [guest, name]).fetchone()
        return json.loads(row[0]) if row else None

    def find(self, pattern: str, guest: str | None = None) -> list[dict[str, Any]]:
        """Every version of every guest file whose name (or, with a '/', whole path) matches ``pattern``."""
        column = "v.path" if "/" in pattern else "v.name"
        if any(c in pattern for c in "*?["):
            where, args = f"{column} GLOB ?", [pattern.lstrip("/")]
        else:
            where, args = f"{column} = ?", [pattern.lstrip("/")]
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

    def files_of(self, snap_id: str) -> dict[str, tuple[str, int, int, int]]:
        """path → (type, size, mtime_ns, mode) of every indexed guest file of a snapshot."""
        rows = self.conn.execute(
            "SELECT v.path, v.type, v.size, v.mtime_ns, v.mode FROM snapshots s"
            " JOIN snapshot_files sf ON sf.snap = s.rowid JOIN file_versions v ON v.id = sf.version WHERE s.id = ?",
            [snap_id],
        ).fetchall()
        return {r[0]: (r[1], r[2], r[3], r[4]) for r in rows}

    def name_taken(self, guest: str, name: str) -> bool:
        return bool(self.conn.execute("SELECT 1 FROM snapshots WHERE guest = ? AND name = ?", [guest, name]).fetchone())

    def resolve(self, spec: str) -> dict[str, Any]:
        """``GUEST@latest``, ``GUEST@<id prefix>``, ``GUEST@<snapshot name>`` or ``GUEST@<time>``."""
        guest, sep, which = spec.partition("@")
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
        when = parse_time(which)
        if when is None:
            raise SnapshotNotFound(f"no snapshot {which!r} of guest {guest!r}")
        row = self.conn.execute(
            "SELECT summary FROM snapshots WHERE guest = ? AND time <= ? ORDER BY time DESC LIMIT 1",
            [guest, format_time(when)],
        ).fetchone()
        if not row:
            raise SnapshotNotFound(f"guest {guest!r} has no snapshot at or before {which}")
        return dict(json.loads(row[0]))


_TIME_FORMATS = (
    "%Y-%m-%dT%H:%M:%S.%fZ",
    "%Y-%m-%dT%H%M%SZ",
    "%Y-%m-%dT%H%MZ",
    "%Y-%m-%dT%H:%M:%SZ",
    "%Y-%m-%dT%H:%M:%S",
    "%Y-%m-%dT%H:%MZ",
    "%Y-%m-%dT%H:%M",
    "%Y-%m-%d %H:%M:%S",
    "%Y-%m-%d %H:%M",
    "%Y-%m-%d",
)


def parse_time(text: str) -> datetime | None:
    """A point in time as users type it (UTC); a bare date means the end of that day."""
    for fmt in _TIME_FORMATS:
        try:
            t = datetime.strptime(text, fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
        if fmt == "%Y-%m-%d":
            t = t.replace(hour=23, minute=59, second=59)
        elif "%S" not in fmt:
            t = t.replace(second=59)
        return t.replace(microsecond=999999)
    return None


def format_time(t: datetime) -> str:
    """ISO 8601 in UTC with microseconds: sorts as text in time order."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def snapshot_name(t: datetime) -> str:
    """The folder name of a snapshot: its UTC time without colons (the tree is also shared over SMB)."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H%M%SZ")
