"""Commands that remove snapshots and reclaim space: ``forget``, ``prune``, ``gc``, ``protect`` and ``unprotect``."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import click

from vbfs import times
from vbfs.catalog import Catalog
from vbfs.cli.browse import shown_ns
from vbfs.cli.main import cli, note, progress_for, warn, with_repository
from vbfs.engine.gc import GcResult, collect, describe
from vbfs.engine.retention import Decision, Policy, PolicyError, parse_within, prune
from vbfs.errors import SnapshotNotFound, VbfsError
from vbfs.store import marks
from vbfs.store.manifest import Manifest, tag_filter
from vbfs.store.repository import Repository

WAIT_HELP = (
    "Seconds to wait for running backups, mounts and restores to end before deleting (default 0: what they may "
    "still use is held back for the next gc)."
)


def _resolve_exact(repo: Repository, cat: Catalog, spec: str) -> Manifest:
    """``GUEST@<name>``, ``GUEST@<id prefix>`` or ``GUEST@latest``; never a time (that picks the nearest one)."""
    which = spec.rpartition("@")[2]
    found = cat.resolve(spec)
    by_id = re.fullmatch(r"[0-9a-f]{4,64}", which) is not None and found["id"].startswith(which)
    if which not in ("latest", found["name"]) and not by_id:
        raise SnapshotNotFound(
            f"{spec}: name a snapshot exactly (GUEST@<snapshot name>, GUEST@<id> or GUEST@latest), not by a time"
        )
    return repo.load_manifest(found["id"])


def _label(m: Manifest) -> str:
    return f"{m.guest}@{m.name} ({m.id[:8]})"


def _print_gc(result: GcResult) -> None:
    for text in result.notes:
        note(text)
    for line in describe(result):
        click.echo(line)


@cli.command()
@click.argument("specs", nargs=-1, required=True, metavar="GUEST@SNAPSHOT...")
@click.option("--gc", "run_gc", is_flag=True, help="Collect garbage afterwards (frees the space at once).")
@click.option("--wait", type=float, default=0.0, help=WAIT_HELP)
@click.option("--json", "json_out", is_flag=True, help="Print JSON.")
@with_repository(lock="gc", catalog=True, writable=True)
def forget(repo: Repository, cat: Catalog, specs: tuple[str, ...], run_gc: bool, wait: float, json_out: bool) -> None:
    """Remove snapshots (their space is freed by the next gc or prune). Protected snapshots are refused."""
    chosen: dict[str, Manifest] = {}
    for spec in specs:
        m = _resolve_exact(repo, cat, spec)
        chosen[m.id] = m
    for m in chosen.values():  # all refused before any goes
        if marks.is_protected(repo, m.id):
            raise marks.SnapshotProtected(
                f"snapshot {_label(m)} is protected: nothing was forgotten (vbfs unprotect {m.guest}@{m.id[:8]} "
                "first if it really should go)"
            )
    for m in chosen.values():
        marks.forget(repo, m, "forget")
        cat.remove(m.id)
        if not json_out:
            click.echo(f"forgot {_label(m)}")
    result = collect(repo, progress_for(json_out), wait=wait) if run_gc else None
    if json_out:
        doc: dict[str, Any] = {"removed": [_row(m) for m in chosen.values()]}
        if result is not None:
            doc["gc"] = result.to_json()
        click.echo(json.dumps(doc, indent=2))
    elif result is not None:
        _print_gc(result)
    else:
        note("their space is freed by the next vbfs gc (or prune)")


def _row(m: Manifest) -> dict[str, Any]:
    return {"id": m.id, "guest": m.guest, "name": m.name, "time": m.time}


def _decision_row(d: Decision) -> dict[str, Any]:
    s = d.snapshot
    return {
        "id": s.id,
        "guest": s.guest,
        "name": s.name,
        "time": times.json_ns(s.time_ns),
        "reasons": list(d.reasons),
        "protected": s.protected,
    }


def _policy_from_options(options: dict[str, Any]) -> Policy:
    within = options.pop("within")
    return Policy(**options, within=parse_within(within) if within else 0)


@cli.command(name="prune")
@click.option("--guest", help="Only this guest's snapshots.")
@click.option(
    "--tag",
    "tags",
    multiple=True,
    metavar="TAG[,TAG...]",
    help="Judge only snapshots with these tags (all of a comma-separated list; repeated: any); others stay.",
)
@click.option(
    "--job",
    "job_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Apply the [retention] table of this job file to the guests the job names.",
)
@click.option("--keep-last", "last", type=click.IntRange(0), default=0, help="Keep the N newest snapshots.")
@click.option("--keep-hourly", "hourly", type=click.IntRange(0), default=0, help="Keep the newest of each of N hours.")
@click.option("--keep-daily", "daily", type=click.IntRange(0), default=0, help="Keep the newest of each of N days.")
@click.option("--keep-weekly", "weekly", type=click.IntRange(0), default=0, help="... of each of N ISO weeks.")
@click.option("--keep-monthly", "monthly", type=click.IntRange(0), default=0, help="... of each of N months.")
@click.option("--keep-yearly", "yearly", type=click.IntRange(0), default=0, help="... of each of N years.")
@click.option(
    "--keep-within", "within", metavar="DURATION", help="Keep all taken within DURATION (7d, 12h, 1y6M) of the newest."
)
@click.option("--dry-run", is_flag=True, help="Say what would be kept and removed; change nothing.")
@click.option("--wait", type=float, default=0.0, help=WAIT_HELP)
@click.option("--json", "json_out", is_flag=True, help="Print JSON.")
@with_repository(lock="gc", catalog=True, writable=True)
def prune_command(
    repo: Repository,
    cat: Catalog,
    guest: str | None,
    tags: tuple[str, ...],
    job_file: Path | None,
    dry_run: bool,
    wait: float,
    json_out: bool,
    **keep: Any,
) -> None:
    """Apply a retention policy to each guest: forget what it does not keep, then collect garbage.

    Each rule is applied on its own to the guest's snapshots; a snapshot is kept when any rule keeps it, and the
    output names every rule that does. Periods are counted in the local time zone (TZ). Protected snapshots are
    always kept."""
    policy = _policy_from_options(keep)
    policies: dict[str, Policy] | None = None
    if job_file is not None:
        policies, policy = _job_policies(repo, job_file, guest, policy)
    if policies is not None and not policies:
        raise VbfsError(f"job {job_file}: it names no guest that has snapshots here")
    result = prune(
        repo,
        policy,
        guest=guest,
        tags=tag_filter(tags),
        policies=policies,
        dry_run=dry_run,
        progress=progress_for(json_out),
        wait=wait,
    )
    for snap_id in result.removed:
        cat.remove(snap_id)
    kept = [d for d in result.decisions if d.keep]
    removed = [d for d in result.decisions if not d.keep]
    if policies is not None:
        kept = [d for d in kept if d.snapshot.guest in policies]
        removed = [d for d in removed if d.snapshot.guest in policies]
    if json_out:
        doc = {
            "dry_run": dry_run,
            "kept": [_decision_row(d) for d in kept],
            "removed": [_decision_row(d) for d in removed],
            "notes": result.unreadable,
            "gc": result.gc.to_json() if result.gc else None,
        }
        click.echo(json.dumps(doc, indent=2))
        return
    for line in result.unreadable:
        warn(line)
    verb = "would remove" if dry_run else "removed"
    for d in result.decisions:
        if policies is not None and d.snapshot.guest not in policies:
            continue
        s = d.snapshot
        label = f"{s.guest}@{s.name} ({s.id[:8]})  {shown_ns(s.time_ns)}"
        click.echo(f"keep    {label}  {', '.join(d.reasons)}" if d.keep else f"{verb:7} {label}")
    click.echo(f"{len(kept)} kept, {len(removed)} {verb}")
    if result.gc is not None:
        _print_gc(result.gc)


def _job_policies(
    repo: Repository, job_file: Path, guest: str | None, fallback: Policy
) -> tuple[dict[str, Policy], Policy]:
    from vbfs.engine.retention import candidates
    from vbfs.job import Job
    from vbfs.sources import GuestInfo

    job = Job.load(job_file)
    policy = job.retention if job.retention is not None else fallback
    if policy.empty:
        raise PolicyError(f"job {job_file}: it has no [retention] table and no --keep-* option was given")
    snaps, _ = candidates(repo, guest)
    names = sorted({s.guest for s in snaps})
    chosen, _missing = job.select([GuestInfo(n, "", ()) for n in names])
    return {n: policy for n in chosen}, policy


@cli.command()
@click.option("--dry-run", is_flag=True, help="Say how much would be freed; delete nothing.")
@click.option("--wait", type=float, default=0.0, help=WAIT_HELP)
@click.option("--json", "json_out", is_flag=True, help="Print JSON.")
@with_repository(lock="gc", catalog=True, writable=True)
def gc(repo: Repository, cat: Catalog, dry_run: bool, wait: float, json_out: bool) -> None:
    """Delete the chunks no snapshot needs. Safe while backups run: what they may use is held back."""
    result = collect(repo, progress_for(json_out), wait=wait, dry_run=dry_run)
    for snap_id in result.forgets_finished:
        cat.remove(snap_id)
    if json_out:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        _print_gc(result)


@cli.command()
@click.argument("specs", nargs=-1, required=True, metavar="GUEST@SNAPSHOT...")
@with_repository(lock="gc", catalog=True, writable=True)
def protect(repo: Repository, cat: Catalog, specs: tuple[str, ...]) -> None:
    """Mark snapshots so that no prune removes them and forget refuses them."""
    for spec in specs:
        m = _resolve_exact(repo, cat, spec)
        done = marks.protect(repo, m)
        click.echo(f"{'protected' if done else 'already protected:'} {_label(m)}")


@cli.command()
@click.argument("specs", nargs=-1, required=True, metavar="GUEST@SNAPSHOT...")
@with_repository(lock="gc", catalog=True, writable=True)
def unprotect(repo: Repository, cat: Catalog, specs: tuple[str, ...]) -> None:
    """Remove the protection of snapshots (prune may then remove them)."""
    for spec in specs:
        m = _resolve_exact(repo, cat, spec)
        done = marks.unprotect(repo, m.id)
        click.echo(f"{'unprotected' if done else 'was not protected:'} {_label(m)}")
