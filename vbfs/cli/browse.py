"""Commands that read snapshots: ``snapshots``, ``ls``, ``find``, ``diff`` and ``restore``."""

from __future__ import annotations

import json
import stat
import sys
from datetime import UTC, datetime
from pathlib import Path

import click

from vbfs.catalog import Catalog
from vbfs.cli.main import cli, human, progress_for, stop_on_sigterm, with_repository
from vbfs.errors import IntegrityError, VbfsError
from vbfs.plugins import registry
from vbfs.store.cache import ChunkCache
from vbfs.store.repository import Repository
from vbfs.vfs import Dir, Node, SnapshotTree, Symlink, walk_path


@cli.command()
@click.option("--guest", help="Only this guest's snapshots.")
@click.option("--json", "json_out", is_flag=True, help="Print JSON.")
@with_repository(lock=None, catalog=True)
def snapshots(repo: Repository, cat: Catalog, guest: str | None, json_out: bool) -> None:
    """List snapshots, oldest first per guest."""
    rows = cat.snapshots(guest)
    if json_out:
        click.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    if not rows:
        click.echo("no snapshots", err=True)
        return
    click.echo(f"{'guest':16} {'snapshot':22} {'id':8}  {'size':>10}  {'consistency':22} disks")
    for r in rows:
        size = sum(d["size"] for d in r["disks"])
        click.echo(
            f"{r['guest']:16} {r['name']:22} {r['id'][:8]}  {human(size):>10}  "
            f"{r['consistency'] or '':22} {', '.join(d['name'] for d in r['disks'])}"
        )


def split_spec(spec: str) -> tuple[str, str]:
    """``GUEST@SNAP:/path`` → (``GUEST@SNAP``, ``/path``); times in SNAP may contain colons, paths start with /."""
    snap_spec, sep, path = spec.partition(":/")
    return snap_spec, "/" + path if sep else "/"


def _resolve(repo: Repository, cat: Catalog, spec: str) -> tuple[Node, str]:
    snap_spec, path = split_spec(spec)
    found = cat.resolve(snap_spec)
    cache = ChunkCache(repo.get_chunk, 64 * 1024 * 1024)
    tree = SnapshotTree(repo, repo.load_manifest(found["id"]), cache, registry().filesystems())
    return tree.root(found["name"]), path or "/"


@cli.command()
@click.argument("spec")
@click.option("--json", "json_out", is_flag=True, help="Print JSON.")
@with_repository(lock=None, catalog=True)
def ls(repo: Repository, cat: Catalog, spec: str, json_out: bool) -> None:
    """List a folder of a snapshot: GUEST@SNAPSHOT[:/path]."""
    snap, path = _resolve(repo, cat, spec)
    node = walk_path(snap, path)
    kids = node.children() if isinstance(node, Dir) else [node]
    if json_out:
        rows = [
            {"name": k.name, "size": k.attr.size, "mode": stat.filemode(k.attr.mode), "mtime_ns": k.attr.mtime_ns}
            for k in kids
        ]
        click.echo(json.dumps(rows, indent=2))
        return
    for k in kids:
        when = datetime.fromtimestamp(k.attr.mtime_ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M")
        suffix = "/" if k.attr.is_dir else f" -> {k.target}" if isinstance(k, Symlink) else ""
        owner = f"{k.attr.uid}:{k.attr.gid}"
        click.echo(f"{stat.filemode(k.attr.mode)} {owner:>11} {k.attr.size:>14} {when} {k.name}{suffix}")


RESTORE_NOTES = 20  # notes printed one by one; the rest are counted


def _needs_path(spec: str, **_: object) -> None:
    if ":/" not in spec:
        raise VbfsError("restore needs a path: GUEST@SNAPSHOT:/disks/<disk>.img")


@cli.command()
@click.argument("spec")
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--keep-setuid", is_flag=True, help="Keep the setuid and setgid bits of the guest's files.")
@click.option("--devices", is_flag=True, help="Make the guest's device nodes (as root) and fifos.")
@with_repository(lock="shared", catalog=True, before=_needs_path)
def restore(repo: Repository, cat: Catalog, spec: str, target: Path, keep_setuid: bool, devices: bool) -> None:
    """Restore GUEST@SNAPSHOT:/path (a disk image, a file, a folder) to TARGET; disks are written sparse."""
    snap, path = _resolve(repo, cat, spec)
    node = walk_path(snap, path)
    from vbfs.restore import restore as run_restore

    stop_on_sigterm()  # a stopped restore removes its temporary folder, as on Ctrl-C
    import logging

    logging.getLogger("vbfs.guestfs").addHandler(logging.NullHandler())  # its notes are printed below, once
    stats = run_restore(node, target, progress_for(False), keep_setuid=keep_setuid, devices=devices)
    click.echo(f"restored {stats.files} file(s), {human(stats.bytes)} read")
    for note in stats.notes[:RESTORE_NOTES]:
        click.echo(f"vbfs: note: {note}", err=True)
    if len(stats.notes) > RESTORE_NOTES:
        click.echo(f"vbfs: note: and {len(stats.notes) - RESTORE_NOTES} more note(s)", err=True)
    for failure in stats.failed[:RESTORE_NOTES]:
        click.echo(f"vbfs: damaged: {failure}", err=True)
    if stats.failed:
        raise IntegrityError(
            f"{len(stats.failed)} guest file(s) or folder(s) were not restored (damaged or nested too deep; "
            f"the rest was){f', e.g. {stats.failed[0]}' if len(stats.failed) > RESTORE_NOTES else ''}"
        )


def _when(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M")


@cli.command()
@click.argument("pattern")
@click.option("--guest", help="Only this guest's files.")
@click.option("--json", "json_out", is_flag=True, help="Print JSON.")
@with_repository(lock=None, catalog=True)
def find(repo: Repository, cat: Catalog, pattern: str, guest: str | None, json_out: bool) -> None:
    """Find guest files by name (or, with a '/', by path below files/) in every indexed snapshot.

    PATTERN may use the wildcards * ? [..]; each version of a file is listed once with the snapshots that hold it.
    """
    found = cat.find(pattern, guest)
    if json_out:
        click.echo(json.dumps(found, indent=2))
        return
    if not found:
        click.echo(f"no indexed guest file matches {pattern!r}", err=True)
        sys.exit(1)
    for f in found:
        snaps = f["snapshots"]
        where = snaps[0]["name"] if len(snaps) == 1 else f"{snaps[0]['name']} .. {snaps[-1]['name']} ({len(snaps)})"
        click.echo(f"{f['guest']}@{where}:{f['path']}  {human(f['size'])}  {_when(f['mtime_ns'])}")


@cli.command()
@click.argument("older")
@click.argument("newer")
@click.option("--json", "json_out", is_flag=True, help="Print JSON.")
@with_repository(lock=None, catalog=True)
def diff(repo: Repository, cat: Catalog, older: str, newer: str, json_out: bool) -> None:
    """Guest files added (+), removed (-) and changed (M) between two snapshots, from the catalog."""
    a, b = cat.resolve(older), cat.resolve(newer)
    for s_ in (a, b):
        if not s_.get("indexed"):
            raise VbfsError(f"{s_['guest']}@{s_['name']} has no guest-file index (backed up with --no-index)")
    fa, fb = cat.files_of(a["id"]), cat.files_of(b["id"])
    changes = [{"change": "added", "path": "/files/" + p} for p in sorted(fb.keys() - fa.keys())]
    changes += [{"change": "removed", "path": "/files/" + p} for p in sorted(fa.keys() - fb.keys())]
    changes += [{"change": "changed", "path": "/files/" + p} for p in sorted(fa.keys() & fb.keys()) if fa[p] != fb[p]]
    changes.sort(key=lambda c: c["path"])
    if json_out:
        click.echo(json.dumps({"older": a["name"], "newer": b["name"], "changes": changes}, indent=2))
        return
    mark = {"added": "+", "removed": "-", "changed": "M"}
    for c in changes:
        click.echo(f"{mark[c['change']]} {c['path']}")
