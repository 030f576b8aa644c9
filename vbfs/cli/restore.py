"""``restore``: a disk image, a guest file or a guest folder of a snapshot copied out to a local path, or a disk
image written onto a block device (the work is :mod:`vbfs.restore`'s; this command chooses, asks, prints and
exits)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import click

from vbfs.catalog import Catalog
from vbfs.cli.browse import resolve_spec
from vbfs.cli.main import cli, human, progress_for, say, stop_on_sigterm, with_repository
from vbfs.errors import IntegrityError, VbfsError
from vbfs.restore import OVERWRITE, RestoreConflict, RestoreStats, conflict_message
from vbfs.store.repository import Repository
from vbfs.vfs import Node, walk_path

RESTORE_NOTES = 20  # notes printed one by one; the rest are counted


def _check_options(spec: str, **_: object) -> None:
    if ":/" not in spec:
        raise VbfsError("restore needs a path: GUEST@SNAPSHOT:/disks/<disk>.img")


def _confirm(node: Node, device: Path, force: bool) -> Callable[[int], None]:
    def ask(size: int) -> None:
        if force:
            return
        if not (sys.stdin.isatty() and sys.stderr.isatty()):
            raise VbfsError(f"restoring onto {device} replaces everything on it: pass --force (no terminal to ask)")
        click.echo(
            f"This replaces everything on {device} ({human(size)}) with {node.name} ({human(node.attr.size)}).",
            err=True,
        )
        answer = click.prompt("Type the device name to go on", default="", show_default=False, err=True)
        if answer.strip() not in (str(device), device.name):
            raise VbfsError(f"not confirmed: nothing was written to {device}")

    return ask


def _summary(stats: RestoreStats, node: Node) -> str:
    took = "" if stats.dry_run else f", {stats.seconds:.1f} s"
    if stats.device:
        wrote = "would write" if stats.dry_run else "wrote"
        data, zeroed = human(stats.bytes), human(stats.zeroed)
        return f"{wrote} {node.name} onto {stats.device}: {data} of data, {zeroed} zeroed{took}"
    would = "would restore" if stats.dry_run else "restored"
    replaced = f" ({stats.overwritten} replaced)" if stats.overwritten else ""
    size = f"{human(stats.bytes)} to read" if stats.dry_run else f"{human(stats.bytes)} read"
    return f"{would} {stats.files} file(s){replaced}, {stats.unchanged} unchanged (skipped), {size}{took}"


def _as_json(stats: RestoreStats, target: Path) -> str:
    out: dict[str, object] = {
        "target": str(target),
        "dry_run": stats.dry_run,
        "device": bool(stats.device),
        "files": stats.files,
        "bytes": stats.bytes,
        "skipped": stats.unchanged,
        "overwritten": stats.overwritten,
        "seconds": round(stats.seconds, 3),
        "not_made": stats.not_made,
        "notes": stats.notes,
        "warnings": stats.warnings,
        "failed": stats.failed,
    }
    if stats.dry_run:
        out["conflicts"] = stats.conflicts
        out["entries"] = [{"action": action, "path": path} for action, path in stats.planned]
    return json.dumps(out, indent=2)


@cli.command()
@click.argument("spec")
@click.argument("target", type=click.Path(path_type=Path))
@click.option(
    "--overwrite",
    type=click.Choice(OVERWRITE),
    default="never",
    show_default=True,
    help="What to do with an existing file that differs from the snapshot's (size or time): refuse the restore "
    "(never), replace it (if-changed); or replace every existing file (always). Unchanged files are skipped.",
)
@click.option("--dry-run", is_flag=True, help="Say what would be restored, replaced and skipped; write nothing.")
@click.option(
    "--include",
    multiple=True,
    metavar="PATTERN",
    help="Restore only the entries of the folder that match (repeatable; * does not cross /, ** does).",
)
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Leave out the entries that match (repeatable).")
@click.option("--force", is_flag=True, help="Write a disk onto a block device without asking.")
@click.option("--keep-setuid", is_flag=True, help="Keep the setuid and setgid bits of the guest's files.")
@click.option("--devices", is_flag=True, help="Make the guest's device nodes (as root) and fifos.")
@click.option("--json", "json_out", is_flag=True, help="Print the summary as JSON.")
@with_repository(lock="shared", catalog=True, before=_check_options)
def restore(
    repo: Repository,
    cat: Catalog,
    spec: str,
    target: Path,
    overwrite: str,
    dry_run: bool,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    force: bool,
    keep_setuid: bool,
    devices: bool,
    json_out: bool,
) -> None:
    """Restore GUEST@SNAPSHOT:/path (a disk image, a file, a folder) to TARGET.

    A folder becomes TARGET (made, or merged into an existing folder, so a second run changes nothing); a file
    goes into TARGET when it is a folder, else becomes TARGET. A disk image restores onto a block device too.
    """
    snap, path = resolve_spec(repo, cat, spec)
    node = walk_path(snap, path)
    from vbfs.restore import is_block_device, restore_to_device
    from vbfs.restore import restore as run_restore

    stop_on_sigterm()  # a stopped restore removes its temporary folder, as on Ctrl-C
    logging.getLogger("vbfs.guestfs").propagate = False  # its notes are printed below, once
    progress = progress_for(json_out or dry_run)
    if is_block_device(target):
        if include or exclude:
            raise VbfsError("--include and --exclude choose entries of a folder, not parts of a disk")
        ask = _confirm(node, target, force)
        stats = restore_to_device(node, target, progress, dry_run=dry_run, confirm=ask)
    else:
        stats = run_restore(
            node,
            target,
            progress,
            keep_setuid=keep_setuid,
            devices=devices,
            overwrite=overwrite,
            dry_run=dry_run,
            include=include,
            exclude=exclude,
        )
    if json_out:
        click.echo(_as_json(stats, target))
    else:
        for action, where in stats.planned:
            click.echo(f"{action} {where}")
        click.echo(_summary(stats, node))
    for warning in stats.warnings:
        say("warning", warning)
    if not json_out:
        for note in stats.notes[:RESTORE_NOTES]:
            say("note", note)
        if len(stats.notes) > RESTORE_NOTES:
            say("note", f"and {len(stats.notes) - RESTORE_NOTES} more note(s)")
        for failure in stats.failed[:RESTORE_NOTES]:
            say("damaged", failure)
    if stats.conflicted:  # a dry run: the restore itself would refuse
        raise RestoreConflict(conflict_message(stats))
    if stats.failed:
        raise IntegrityError(
            f"{len(stats.failed)} guest file(s) or folder(s) were not restored (damaged or nested too deep; "
            f"the rest was){f', e.g. {stats.failed[0]}' if len(stats.failed) > RESTORE_NOTES else ''}"
        )
