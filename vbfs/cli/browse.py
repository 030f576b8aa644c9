"""Commands that read snapshots: ``snapshots``, ``ls``, ``find`` and ``diff``; and how they show what they list.

Times are shown in the local time zone with its offset (UTC with the global ``--utc``) through :mod:`vbfs.times`.
``--json`` output uses one form per field in every command (documented in the user guide): times as ISO 8601
UTC strings ending in ``Z`` (``time``, ``mtime``), file times also as ``mtime_ns``, ``mode`` as the number
``st_mode`` (file type and permission bits), ``type`` one of ``f d l o``, sizes in bytes.

A spec that ``find`` prints is one shell word (quoted when it must be) that ``ls`` and ``restore`` take back.
"""

from __future__ import annotations

import json
import shlex
import stat
import sys
from typing import Any

import click

from vbfs import times
from vbfs.catalog import Catalog
from vbfs.cli.main import Ctx, cli, human, note, with_repository
from vbfs.errors import VbfsError
from vbfs.plugins import registry
from vbfs.store.cache import ChunkCache
from vbfs.store.manifest import tag_filter
from vbfs.store.repository import Repository
from vbfs.vfs import Dir, Node, SnapshotTree, Symlink, walk_path

# ---- how times, sizes and names are shown ----------------------------------------------------------------------


def utc_shown() -> bool:
    """Whether the command was given the global ``--utc``."""
    ctx = click.get_current_context(silent=True)
    obj = ctx.find_object(Ctx) if ctx is not None else None
    return bool(getattr(obj, "utc", False))


def shown_ns(ns: int) -> str:
    """A time in nanoseconds since the epoch, for a person (local zone, or UTC with ``--utc``)."""
    return times.show_ns(ns, utc_shown())


def shown_time(stored: str) -> str:
    """A stored time (a snapshot's ``time``), for a person."""
    return times.show_stored(stored, utc_shown())


def shell_word(text: str) -> str:
    """``text`` as one word a POSIX shell reads back as it is: as it is when plain, in '...' otherwise, and as
    $'...' when it holds characters a terminal would act on (a guest's file names are anything)."""
    if text.isprintable():
        return shlex.quote(text)
    out = []
    for c in text:
        if c in "\\'":
            out.append("\\" + c)
        elif c.isprintable():
            out.append(c)
        elif ord(c) < 0x100:
            out.append(f"\\x{ord(c):02x}")
        elif ord(c) < 0x10000:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(f"\\U{ord(c):08x}")
    return "$'" + "".join(out) + "'"


def shown_name(text: str) -> str:
    """A guest's name or path on a line of output: as it is, unless it holds characters a terminal acts on."""
    return text if text.isprintable() else shell_word(text)


def file_type(mode: int) -> str:
    """``f`` (file), ``d`` (folder), ``l`` (symlink) or ``o`` (other), as the guest-file index has it."""
    if stat.S_ISREG(mode):
        return "f"
    if stat.S_ISDIR(mode):
        return "d"
    if stat.S_ISLNK(mode):
        return "l"
    return "o"


def _table(rows: list[list[str]], right: frozenset[int] = frozenset()) -> list[str]:
    """Rows of cells as lines of aligned columns (``right``: the columns aligned right); the last column is not
    padded."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return lines


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# ---- snapshots -------------------------------------------------------------------------------------------------


def snapshot_row(summary: dict[str, Any]) -> dict[str, Any]:
    """A snapshot as ``snapshots --json`` prints it: the catalog's summary, with ``size`` (its disks' bytes) and
    ``added`` (the bytes its backup wrote to the repository: new data after deduplication and compression; null
    when the manifest does not say)."""
    stored = summary.get("stats", {}).get("stored_bytes")
    return {
        **summary,
        "size": sum(d["size"] for d in summary["disks"]),
        "added": stored if isinstance(stored, int) else None,
        "tags": summary.get("tags", []),
        "note": summary.get("note"),
    }


@cli.command()
@click.option("--guest", help="Only this guest's snapshots.")
@click.option(
    "--tag",
    "tags",
    multiple=True,
    metavar="TAG[,TAG...]",
    help="Only snapshots with these tags (all of a comma-separated list; repeated: any of the lists).",
)
@click.option("--json", "json_out", is_flag=True, help="Print JSON.")
@with_repository(lock=None, catalog=True)
def snapshots(repo: Repository, cat: Catalog, guest: str | None, tags: tuple[str, ...], json_out: bool) -> None:
    """List snapshots, oldest first per guest, with their size and what each backup added."""
    rows = [snapshot_row(s) for s in cat.snapshots(guest, tag_filter(tags))]
    if json_out:
        click.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    if not rows:
        note("no snapshots" + (" with these tags" if tags else ""))
        return
    table = [["guest", "snapshot", "time", "id", "size", "added", "consistency", "tags"]]
    notes: dict[int, str] = {}
    for r in rows:
        added = "-" if r["added"] is None else human(r["added"])
        table.append(
            [
                r["guest"],
                r["name"],
                shown_time(r["time"]),
                r["id"][:8],
                human(r["size"]),
                added,
                r["consistency"] or "",
                ",".join(r["tags"]),
            ]
        )
        if r["note"]:
            notes[len(table) - 1] = r["note"]
    for i, line in enumerate(_table(table, right=frozenset({4, 5}))):
        click.echo(line)
        if i in notes:
            click.echo(f"    note: {notes[i]}")
    guests = len({r["guest"] for r in rows})
    click.echo(f"{_plural(len(rows), 'snapshot')} of {_plural(guests, 'guest')}")


# ---- ls ----------------------------------------------------------------------------------------------------------


def split_spec(spec: str) -> tuple[str, str]:
    """``GUEST@SNAP:/path`` → (``GUEST@SNAP``, ``/path``); times in SNAP may contain colons, paths start with /."""
    snap_spec, sep, path = spec.partition(":/")
    return snap_spec, "/" + path if sep else "/"


def resolve_spec(repo: Repository, cat: Catalog, spec: str) -> tuple[Node, str]:
    snap_spec, path = split_spec(spec)
    found = cat.resolve(snap_spec)
    cache = ChunkCache(repo.get_chunk, 64 * 1024 * 1024)
    tree = SnapshotTree(repo, repo.load_manifest(found["id"]), cache, registry().filesystems())
    return tree.root(found["name"]), path or "/"


def _entry(k: Node) -> dict[str, Any]:
    a = k.attr
    row: dict[str, Any] = {
        "name": k.name,
        "type": file_type(a.mode),
        "size": a.size,
        "mode": a.mode,
        "mtime": times.json_ns(a.mtime_ns),
        "mtime_ns": a.mtime_ns,
        "uid": a.uid,
        "gid": a.gid,
    }
    if isinstance(k, Symlink):
        row["target"] = k.target
    return row


@cli.command()
@click.argument("spec")
@click.option("--json", "json_out", is_flag=True, help="Print JSON.")
@with_repository(lock=None, catalog=True)
def ls(repo: Repository, cat: Catalog, spec: str, json_out: bool) -> None:
    """List a folder of a snapshot: GUEST@SNAPSHOT[:/path]."""
    snap, path = resolve_spec(repo, cat, spec)
    node = walk_path(snap, path)
    kids = node.children() if isinstance(node, Dir) else [node]
    if json_out:
        click.echo(json.dumps([_entry(k) for k in kids], indent=2))
        return
    for k in kids:
        suffix = "/" if k.attr.is_dir else f" -> {k.target}" if isinstance(k, Symlink) else ""
        owner = f"{k.attr.uid}:{k.attr.gid}"
        when = shown_ns(k.attr.mtime_ns)
        click.echo(f"{stat.filemode(k.attr.mode)} {owner:>11} {k.attr.size:>14} {when} {shown_name(k.name)}{suffix}")


# ---- find --------------------------------------------------------------------------------------------------------


def _spec(guest: str, snapshot: str, path: str) -> str:
    return shell_word(f"{guest}@{snapshot}:{path}")


@cli.command()
@click.argument("pattern")
@click.option("--guest", help="Only this guest's files.")
@click.option("--all", "every", is_flag=True, help="One line per snapshot that holds a version, not one per version.")
@click.option("--json", "json_out", is_flag=True, help="Print JSON.")
@with_repository(lock=None, catalog=True)
def find(repo: Repository, cat: Catalog, pattern: str, guest: str | None, every: bool, json_out: bool) -> None:
    """Find guest files in every indexed snapshot, by name or by path as find prints it.

    PATTERN without a '/' matches names (*.conf); starting with '/' it matches the whole path
    (/files/web01/p1/etc/*); with a '/' inside, the end of the path (etc/nginx/*.conf). '*' and '?' stay within
    one folder, '**' crosses folders. Each version of a file is one line, with the snapshots that hold it; the
    first word of a line is a spec that ls and restore take. Exits 1 when nothing matches.
    """
    found = cat.find(pattern, guest)
    for f in found:
        newest = f["snapshots"][-1]["name"]
        f["spec"] = f"{f['guest']}@{newest}:{f['path']}"
        f["mtime"] = times.json_ns(f["mtime_ns"])
        f["snapshots"] = [{**s, "spec": f"{f['guest']}@{s['name']}:{f['path']}"} for s in f["snapshots"]]
    if json_out:
        click.echo(json.dumps(found, indent=2))
    elif not found:
        hint = ""
        if pattern.startswith("/") and not pattern.startswith("/files/"):
            hint = (
                f" (a pattern starting with / matches the whole path /files/<disk>/<volume>/...; try {pattern[1:]!r})"
            )
        note(f"no indexed guest file matches {pattern!r}{hint}")
    for f in [] if json_out else found:
        size, when = human(f["size"]), shown_ns(f["mtime_ns"])
        snaps = f["snapshots"]
        if every:
            for s in snaps:
                click.echo(f"{_spec(f['guest'], s['name'], f['path'])}  {size}  {when}")
            continue
        held = "" if len(snaps) == 1 else f"  (in {len(snaps)} snapshots: {snaps[0]['name']} .. {snaps[-1]['name']})"
        click.echo(f"{_spec(f['guest'], snaps[-1]['name'], f['path'])}  {size}  {when}{held}")
    if not found:
        sys.exit(1)


# ---- diff --------------------------------------------------------------------------------------------------------


def _version(v: tuple[str, int, int, int]) -> dict[str, Any]:
    typ, size, mtime, mode = v
    return {"type": typ, "size": size, "mtime": times.json_ns(mtime), "mtime_ns": mtime, "mode": mode}


def _changed(old: tuple[str, int, int, int], new: tuple[str, int, int, int], with_times: bool) -> bool:
    """A folder changes when its type or mode does (its time and size follow what is added or removed inside it,
    which is listed by itself), or its time with ``with_times``; anything else when any field does."""
    if old[0] == "d" and new[0] == "d":
        return old[3] != new[3] or (with_times and old[2] != new[2])
    return old != new


@cli.command()
@click.argument("older")
@click.argument("newer")
@click.option("--times", "with_times", is_flag=True, help="Also list folders whose only change is their time.")
@click.option("--json", "json_out", is_flag=True, help="Print JSON.")
@with_repository(lock=None, catalog=True)
def diff(repo: Repository, cat: Catalog, older: str, newer: str, with_times: bool, json_out: bool) -> None:
    """Guest files added (+), removed (-) and changed (M) between two snapshots, from the catalog, and a summary."""
    a, b = cat.resolve(older), cat.resolve(newer)
    for s_ in (a, b):
        if not s_.get("indexed"):
            raise VbfsError(f"{s_['guest']}@{s_['name']} has no guest-file index (backed up with --no-index)")
    fa, fb = cat.files_of(a["id"]), cat.files_of(b["id"])
    changes: list[dict[str, Any]] = []
    for p in fb.keys() - fa.keys():
        changes.append({"change": "added", "path": "/files/" + p, **_version(fb[p])})
    for p in fa.keys() - fb.keys():
        changes.append({"change": "removed", "path": "/files/" + p, **_version(fa[p])})
    for p in fa.keys() & fb.keys():
        if _changed(fa[p], fb[p], with_times):
            changes.append({"change": "changed", "path": "/files/" + p, **_version(fb[p]), "before": _version(fa[p])})
    changes.sort(key=lambda c: c["path"])
    counts = {k: sum(1 for c in changes if c["change"] == k) for k in ("added", "removed", "changed")}
    size_change = sum(v[1] for v in fb.values() if v[0] == "f") - sum(v[1] for v in fa.values() if v[0] == "f")
    if json_out:

        def side(s: dict[str, Any]) -> dict[str, Any]:
            return {"guest": s["guest"], "name": s["name"], "id": s["id"], "time": s["time"]}

        doc = {
            "older": side(a),
            "newer": side(b),
            "changes": changes,
            "summary": {**counts, "size_change": size_change},
        }
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(f"--- {a['guest']}@{a['name']}  {shown_time(a['time'])}")
    click.echo(f"+++ {b['guest']}@{b['name']}  {shown_time(b['time'])}")
    mark = {"added": "+", "removed": "-", "changed": "M"}
    for c in changes:
        click.echo(f"{mark[c['change']]} {shown_name(c['path'])}")
    sign = "+" if size_change >= 0 else "-"
    click.echo(
        f"{counts['added']} added, {counts['removed']} removed, {counts['changed']} changed; "
        f"files {sign}{human(abs(size_change))}"
    )
