"""The ``vbfs`` command line (click).

Every command that prints a table also takes ``--json``. Errors reach the user here and only here: a
:class:`VbfsError` is one line on stderr and its exit code; an unexpected exception is one line too, with the
traceback only when ``VBFS_DEBUG=1``.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import click

from vbfs import __version__
from vbfs.catalog import Catalog
from vbfs.engine.progress import NoProgress, Progress
from vbfs.errors import IntegrityError, SourceError, VbfsError
from vbfs.plugins import default_manager, registry
from vbfs.sources import SourceURL
from vbfs.store.cache import ChunkCache
from vbfs.store.manifest import Manifest
from vbfs.store.repository import Repository
from vbfs.vfs import Dir, Node, RepositoryTree, SnapshotTree, Symlink, walk_path


def fail(message: str, code: int = 2) -> NoReturn:
    click.echo(f"vbfs: error: {message}", err=True)
    sys.exit(code)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class RichProgress:
    """A progress bar on stderr when it is a terminal."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as RP

        self._p = RP(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            transient=True,
            console=Console(stderr=True),
        )
        self._task: Any = None

    def begin(self, label: str, total: int) -> None:
        self._p.start()
        self._task = self._p.add_task(label, total=total)

    def advance(self, n: int) -> None:
        self._p.advance(self._task, n)

    def end(self) -> None:
        self._p.stop()


def progress_for(json_out: bool) -> Progress:
    if json_out or not sys.stderr.isatty():
        return NoProgress()
    return RichProgress()


def passphrase_provider(confirm: bool) -> str:
    env = os.environ.get("VBFS_PASSPHRASE")
    if env is not None:
        return env
    if not sys.stdin.isatty():
        raise VbfsError("the repository is encrypted: set VBFS_PASSPHRASE or run on a terminal to be asked")
    pw = click.prompt("Passphrase", hide_input=True, confirmation_prompt=confirm, err=True)
    if confirm and not pw:
        raise VbfsError("an empty passphrase is not allowed")
    return str(pw)


class Ctx:
    def __init__(self, repo: str | None):
        self.repo_location = repo

    def location(self) -> str:
        if not self.repo_location:
            raise VbfsError("no repository given: use -r PATH or set VBFS_REPO")
        return self.repo_location

    def open_repo(self) -> Repository:
        repo = Repository.open(self.location(), passphrase_provider)
        repo.warn = lambda message: click.echo(f"vbfs: warning: {message}", err=True)
        if repo.read_only:
            click.echo(
                f"vbfs: note: {repo.location} is on read-only storage: reading without a lock, "
                f"catalog in {repo.catalog_path().parent}",
                err=True,
            )
        return repo

    @contextmanager
    def catalog(self, repo: Repository) -> Iterator[Catalog]:
        cat = Catalog(repo.catalog_path())
        try:
            for w in cat.sync(repo):
                click.echo(f"vbfs: warning: {w}", err=True)
            for note in cat.notes:
                click.echo(f"vbfs: warning: {note}", err=True)
            cat.notes.clear()
            yield cat
        finally:
            cat.close()


class VbfsGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except VbfsError as exc:
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            click.echo("vbfs: interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError:
            sys.exit(1)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except Exception as exc:
            if os.environ.get("VBFS_DEBUG"):
                traceback.print_exc()
            fail(f"internal error: {type(exc).__name__}: {exc} (set VBFS_DEBUG=1 for a traceback)", 1)


DEFAULT_UMASK = "0077"


def apply_umask(text: str) -> None:
    """Set the process umask from octal text: what vbfs creates (repository, catalog, cache, mount log) is private
    unless the user asks otherwise: 0077 makes files 0600 and folders 0700."""
    try:
        mask = int(text, 8)
    except ValueError:
        mask = -1
    if not 0 <= mask <= 0o777:
        raise VbfsError(f"--umask {text!r} is not an octal umask from 0000 to 0777 (e.g. 0077 or 0027)")
    os.umask(mask)


@click.group(cls=VbfsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-r", "--repo", envvar="VBFS_REPO", metavar="PATH", help="The repository (or set VBFS_REPO).")
@click.option(
    "--umask",
    envvar="VBFS_UMASK",
    default=DEFAULT_UMASK,
    show_default=True,
    metavar="OCTAL",
    help="The umask of the files and folders vbfs creates (or set VBFS_UMASK); 0027: the group may read folders, "
    "catalog and logs.",
)
@click.version_option(__version__, prog_name="vbfs")
@click.pass_context
def cli(ctx: click.Context, repo: str | None, umask: str) -> None:
    """vbfs: agentless backups of virtual machines into a deduplicated, mountable repository."""
    apply_umask(umask)
    ctx.obj = Ctx(repo)


# ---- repository --------------------------------------------------------------------------------------------------


@cli.command()
@click.argument("path", required=False)
@click.option(
    "-e",
    "--encryption",
    type=click.Choice(["repokey", "none"]),
    required=True,
    help="repokey: a random key wrapped by your passphrase, stored in the repository; none: plaintext.",
)
@click.option(
    "--chunk-size",
    type=int,
    default=1024 * 1024,
    show_default=True,
    help="Disk chunk size in bytes (a power of two).",
)
@click.pass_obj
def init(obj: Ctx, path: str | None, encryption: str, chunk_size: int) -> None:
    """Create a new repository at PATH (or -r / VBFS_REPO)."""
    location = path or obj.location()
    repo = Repository.init(location, encryption, passphrase_provider, chunk_size)
    click.echo(f"created repository {location} (id {repo.id}, encryption {encryption})")
    if encryption == "repokey":
        click.echo("keep the passphrase safe: without it the backups cannot be read", err=True)


@cli.command()
@click.option("--json", "json_out", is_flag=True, help="Print JSON.")
@click.pass_obj
def info(obj: Ctx, json_out: bool) -> None:
    """Show the repository's settings, where its catalog is, and what it holds."""
    repo = obj.open_repo()
    with obj.catalog(repo) as cat:
        snaps = cat.snapshots()
        doc = {
            "location": repo.location,
            "id": repo.id,
            "encryption": repo.config["encryption"],
            "chunk_size": repo.chunk_size,
            "compression": repo.config["compression"],
            "catalog": str(repo.catalog_path()),
            "guests": len(cat.guests()),
            "snapshots": len(snaps),
        }
    if json_out:
        click.echo(json.dumps(doc, indent=2))
    else:
        for k, v in doc.items():
            click.echo(f"{k:12} {v}")


# ---- backup ------------------------------------------------------------------------------------------------------


def _summary_line(m: Manifest) -> str:
    s = m.stats
    rate = s["read_bytes"] / s["seconds"] / 1e6 if s["seconds"] else 0.0
    return (
        f"{m.guest}@{m.name} ({m.id[:8]}): read {human(s['read_bytes'])}, new {human(s['new_bytes'])}, "
        f"deduplicated {human(s['dedup_bytes'])}, stored {human(s['stored_bytes'])}, "
        f"{s['seconds']:.1f} s, {rate:.0f} MB/s"
    )


def _stop_on_sigterm() -> None:
    """SIGTERM (systemd stopping a unit, a kill) ends a backup like Ctrl-C: snapshots removed, guests thawed."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def _source_options(insecure: bool, guest: str | None = None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if insecure:
        options["insecure"] = True
    if guest:
        options["guest"] = guest
    return options


@cli.command()
@click.argument("source", required=False)
@click.option("--guest", help="Guest name (default: the one the source URL names).")
@click.option(
    "--job",
    "job_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A TOML job file: one source, many guests by name, path or pattern.",
)
@click.option("--insecure", is_flag=True, help="Do not verify the hypervisor's TLS certificate (prints a warning).")
@click.option("--no-index", is_flag=True, help="Do not index the guest's files (find and diff will not see them).")
@click.option("--json", "json_out", is_flag=True, help="Print the new snapshot as JSON.")
@click.pass_obj
def backup(
    obj: Ctx,
    source: str | None,
    guest: str | None,
    job_file: Path | None,
    insecure: bool,
    no_index: bool,
    json_out: bool,
) -> None:
    """Back up SOURCE, e.g. image:///var/lib/images/web01.qcow2, or the guests of a --job."""
    from vbfs.job import Job

    if (source is None) == (job_file is None):
        raise click.UsageError("give either a SOURCE or --job FILE")
    if job_file is not None:
        if guest:
            raise click.UsageError("--guest does not go with --job (the job names its guests)")
        job = Job.load(job_file)
        options = {**job.options, **_source_options(insecure)}
        source, index = job.source, job.index and not no_index
    else:
        job, options, index = None, _source_options(insecure, guest), not no_index
    assert source is not None
    url = SourceURL.parse(source)
    hv_cls = registry().hypervisor(url.scheme)
    repo = obj.open_repo()
    repo.require_writable()
    _stop_on_sigterm()
    hv = hv_cls(url, options)
    results: list[Manifest] = []
    failures: list[str] = []
    try:
        if job is not None:
            names, missing = job.select(hv.guests())
            failures += [f"{m}: no such guest at {url.raw}" for m in missing]
            if not names and not missing:
                raise SourceError(f"job {job_file}: no guest of {url.raw} matches")
        else:
            name = guest or hv.default_guest()
            if not name:
                raise SourceError(f"{source} names no guest: give --guest")
            names = [name]
        with repo.lock_shared(), obj.catalog(repo) as cat:
            from vbfs.engine.backup import BackupRun

            for name in names:
                run = BackupRun(
                    repo,
                    cat,
                    default_manager(),
                    progress_for(json_out),
                    index_files=index,
                    filesystems=registry().filesystems(),
                )
                try:
                    manifest = run.run(hv, name, source)
                except VbfsError as exc:
                    if job is None:
                        raise
                    failures.append(f"{name}: {exc}")
                    click.echo(f"vbfs: {name}: {exc}", err=True)
                    continue
                results.append(manifest)
                if not json_out:
                    for note in manifest.notes:
                        click.echo(f"vbfs: note: {note}", err=True)
                    click.echo(_summary_line(manifest))
    finally:
        hv.close()
    if json_out:
        docs = [m.to_json() for m in results]
        rows = [{k: d[k] for k in ("id", "guest", "name", "time", "consistency", "stats", "notes")} for d in docs]
        calls = {"backend_calls": repo.backend.calls.snapshot()}  # of the whole command: what storage requests cost
        click.echo(json.dumps(rows if job is not None else {**rows[0], **calls}, indent=2))
    if failures:
        total = len(results) + len(failures)
        raise VbfsError(f"{len(failures)} of {total} guests failed: " + "; ".join(failures))


@cli.command()
@click.argument("source")
@click.option("--insecure", is_flag=True, help="Do not verify the hypervisor's TLS certificate (prints a warning).")
@click.option("--json", "json_out", is_flag=True, help="Print JSON.")
def guests(source: str, insecure: bool, json_out: bool) -> None:
    """List the guests that SOURCE offers for backup."""
    url = SourceURL.parse(source)
    hv = registry().hypervisor(url.scheme)(url, _source_options(insecure))
    try:
        found = hv.guests()
    finally:
        hv.close()
    rows = [
        {
            "name": g.name,
            "state": g.state,
            "disks": [{"name": d.name, "size": d.size} for d in g.disks],
            **dict(g.details),
        }
        for g in found
    ]
    if json_out:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        disks = ", ".join(f"{d['name']} ({human(d['size'])})" for d in r["disks"]) or "no disks"
        extra = "  ".join(
            f"{k}={'on' if v is True else 'off' if v is False else v}"
            for k, v in r.items()
            if k not in ("name", "state", "disks", "path") and isinstance(v, str | bool | int)
        )
        click.echo(f"{r['name']:24} {r['state']:10} {disks}" + (f"  {extra}" if extra else ""))


# ---- reading -----------------------------------------------------------------------------------------------------


@cli.command()
@click.option("--guest", help="Only this guest's snapshots.")
@click.option("--json", "json_out", is_flag=True, help="Print JSON.")
@click.pass_obj
def snapshots(obj: Ctx, guest: str | None, json_out: bool) -> None:
    """List snapshots, oldest first per guest."""
    repo = obj.open_repo()
    with obj.catalog(repo) as cat:
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


def _resolve(obj: Ctx, repo: Repository, spec: str) -> tuple[Node, str]:
    snap_spec, path = split_spec(spec)
    with obj.catalog(repo) as cat:
        found = cat.resolve(snap_spec)
    cache = ChunkCache(repo.get_chunk, 64 * 1024 * 1024)
    tree = SnapshotTree(repo, repo.load_manifest(found["id"]), cache, registry().filesystems())
    return tree.root(found["name"]), path or "/"


@cli.command()
@click.argument("spec")
@click.option("--json", "json_out", is_flag=True, help="Print JSON.")
@click.pass_obj
def ls(obj: Ctx, spec: str, json_out: bool) -> None:
    """List a folder of a snapshot: GUEST@SNAPSHOT[:/path]."""
    repo = obj.open_repo()
    snap, path = _resolve(obj, repo, spec)
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


@cli.command()
@click.argument("spec")
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--keep-setuid", is_flag=True, help="Keep the setuid and setgid bits of the guest's files.")
@click.option("--devices", is_flag=True, help="Make the guest's device nodes (as root) and fifos.")
@click.pass_obj
def restore(obj: Ctx, spec: str, target: Path, keep_setuid: bool, devices: bool) -> None:
    """Restore GUEST@SNAPSHOT:/path (a disk image, a file, a folder) to TARGET; disks are written sparse."""
    if ":/" not in spec:
        raise VbfsError("restore needs a path: GUEST@SNAPSHOT:/disks/<disk>.img")
    repo = obj.open_repo()
    snap, path = _resolve(obj, repo, spec)
    node = walk_path(snap, path)
    from vbfs.engine.restore import restore as run_restore

    _stop_on_sigterm()  # a stopped restore removes its temporary folder, as on Ctrl-C
    import logging

    logging.getLogger("vbfs.guestfs").addHandler(logging.NullHandler())  # its notes are printed below, once
    with repo.lock_shared():
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


@cli.command()
@click.option("--verify-data", is_flag=True, help="Also read and verify every chunk.")
@click.option(
    "--acknowledge-missing",
    metavar="ID|all",
    help="Stop reporting a snapshot that disappeared without being forgotten (its id, or all of them).",
)
@click.option("--json", "json_out", is_flag=True, help="Print JSON.")
@click.pass_obj
def check(obj: Ctx, verify_data: bool, acknowledge_missing: str | None, json_out: bool) -> None:
    """Check that every snapshot is whole; with --verify-data, that every chunk is intact.

    Also reports snapshots that disappeared from the repository without being forgotten, and removes leftovers
    of processes that are gone (temporary files, locks)."""
    from vbfs.engine.check import check as run_check

    repo = obj.open_repo()
    with repo.lock_shared():
        cat = Catalog(repo.catalog_path())
        try:
            warnings = cat.sync(repo)
            catalog_damage, cat.notes = cat.notes, []  # repaired, and an error of this check
            if acknowledge_missing:
                done = cat.acknowledge_vanished(acknowledge_missing)
                if not done:
                    raise VbfsError(f"no unacknowledged vanished snapshot matches {acknowledge_missing!r}")
                for v in done:
                    click.echo(f"vbfs: note: acknowledged that {v['guest']}@{v['name']} ({v['id']}) is gone", err=True)
            for w in warnings:
                if "disappeared from the repository" not in w:  # those are errors of the check below
                    click.echo(f"vbfs: warning: {w}", err=True)
            report = run_check(repo, verify_data, progress_for(json_out), cat)
            report.errors += catalog_damage
        finally:
            cat.close()
    if json_out:
        click.echo(
            json.dumps(
                {
                    "ok": report.ok,
                    "snapshots": report.snapshots,
                    "chunks_referenced": report.chunks_referenced,
                    "chunks_verified": report.chunks_verified,
                    "errors": report.errors,
                    "warnings": report.warnings,
                    "notes": report.notes,
                },
                indent=2,
            )
        )
    else:
        for note in report.notes:
            click.echo(f"vbfs: note: {note}", err=True)
        for w in report.warnings:
            click.echo(f"vbfs: warning: {w}", err=True)
        for e in report.errors:
            click.echo(f"vbfs: damaged: {e}", err=True)
        verified = f", {report.chunks_verified} verified" if verify_data else ""
        click.echo(
            f"{report.snapshots} snapshot(s), {report.chunks_referenced} chunk(s) referenced{verified}: "
            f"{'ok' if report.ok else f'{len(report.errors)} error(s)'}"
        )
    if not report.ok:
        sys.exit(3)


def _when(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M")


@cli.command()
@click.argument("pattern")
@click.option("--guest", help="Only this guest's files.")
@click.option("--json", "json_out", is_flag=True, help="Print JSON.")
@click.pass_obj
def find(obj: Ctx, pattern: str, guest: str | None, json_out: bool) -> None:
    """Find guest files by name (or, with a '/', by path below files/) in every indexed snapshot.

    PATTERN may use the wildcards * ? [..]; each version of a file is listed once with the snapshots that hold it.
    """
    repo = obj.open_repo()
    with obj.catalog(repo) as cat:
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
@click.pass_obj
def diff(obj: Ctx, older: str, newer: str, json_out: bool) -> None:
    """Guest files added (+), removed (-) and changed (M) between two snapshots, from the catalog."""
    repo = obj.open_repo()
    with obj.catalog(repo) as cat:
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


def _preload_mount_modules() -> None:
    """What every mount needs, and the parsers of the commonest guests (ext4, MBR/GPT); others load on use."""
    import importlib

    for name in ("pyfuse3", "trio", "vbfs.fuse.mount", "dissect.volume.disk", "dissect.extfs"):
        with suppress(ImportError):
            importlib.import_module(name)


@cli.command()
@click.argument("mountpoint", type=click.Path(path_type=Path))
@click.option("--foreground", is_flag=True, help="Stay in the foreground (logs to stderr).")
@click.option("--cache-size", type=int, default=32, show_default=True, help="Chunk cache in MiB.")
@click.option("--debug", is_flag=True, help="Log every FUSE request (with --foreground).")
@click.pass_obj
def mount(obj: Ctx, mountpoint: Path, foreground: bool, cache_size: int, debug: bool) -> None:
    """Mount the repository read-only at MOUNTPOINT: guests, snapshots, disks and the guests' own files."""
    import logging

    from vbfs.fuse.mount import check_mountpoint, serve, serve_in_background

    check_mountpoint(mountpoint)
    # The FUSE libraries and the guest filesystem parsers load while the passphrase's key is derived (scrypt
    # releases the GIL): the first `cp` from a fresh mount then waits for neither. Done before the fork.
    preload = threading.Thread(target=_preload_mount_modules, daemon=True)
    preload.start()
    repo = obj.open_repo()
    preload.join()
    with obj.catalog(repo):
        pass  # brings the catalog up to date before the tree is served

    def make_root() -> Node:
        local = threading.local()

        def catalog() -> Catalog:
            cat = getattr(local, "cat", None)
            if cat is None:
                cat = local.cat = Catalog(repo.catalog_path())
            return cat

        cache = ChunkCache(repo.get_chunk, cache_size * 1024 * 1024)
        return RepositoryTree(repo, catalog, cache, registry().filesystems()).root

    def run(on_ready: Callable[[], None] | None = None) -> None:
        # A mount holds a shared lock, like a backup: pruning cannot delete chunks under it.
        with repo.lock_shared():
            serve(make_root(), mountpoint, on_ready, debug=debug)

    if foreground:
        logging.basicConfig(
            level=logging.DEBUG if debug else logging.INFO,
            stream=sys.stderr,
            format="%(asctime)s %(levelname)s %(message)s",
        )
        run()
        return
    log_file = repo.catalog_path().parent / "mount.log"
    pid = serve_in_background(run, log_file)
    click.echo(f"mounted {repo.location} at {mountpoint} (process {pid}, log {log_file})")


@cli.command()
@click.argument("mountpoint", type=click.Path(path_type=Path))
def umount(mountpoint: Path) -> None:
    """Unmount a vbfs mount, also one whose process was killed."""
    from vbfs.fuse.mount import unmount, wait_unmounted

    unmount(mountpoint)
    if not wait_unmounted(mountpoint):
        raise VbfsError(f"{mountpoint} is still mounted (busy?)")


@cli.group()
def catalog() -> None:
    """The catalog (an index that can always be recreated from the repository)."""


@catalog.command("rebuild")
@click.pass_obj
def catalog_rebuild(obj: Ctx) -> None:
    """Recreate the catalog from the snapshot manifests alone."""
    repo = obj.open_repo()
    cat = Catalog(repo.catalog_path())
    try:
        for w in cat.rebuild(repo) + cat.notes:
            click.echo(f"vbfs: warning: {w}", err=True)
        n = len(cat.snapshots())
    finally:
        cat.close()
    click.echo(f"catalog rebuilt: {n} snapshot(s)")


@cli.command()
@click.option("--json", "json_out", is_flag=True, help="Print JSON.")
def plugins(json_out: bool) -> None:
    """List the registered hypervisor, agent and filesystem plugins and where they come from."""
    reg = registry()
    rows = [
        {
            "kind": r.kind,
            "name": r.name,
            "plugin": r.plugin,
            "from": r.origin,
            "class": f"{r.cls.__module__}.{r.cls.__qualname__}",
        }
        for r in reg.of_kind("hypervisor") + reg.of_kind("agent") + reg.of_kind("filesystem")
    ]
    if json_out:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        click.echo(f"{r['kind']:11} {r['name']:12} {r['from']:24} {r['class']}")


def main() -> None:
    cli(prog_name="vbfs")


if __name__ == "__main__":
    main()
