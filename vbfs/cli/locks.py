"""``locks`` and ``break-lock``: the repository's lock objects listed, and removed when their process is gone.

A lock of a process on this host is judged by its pid; one of another host only by its age, so a process that
died on another machine holds its lock until it goes stale (``STALE_AFTER``) unless ``break-lock`` removes it.
"""

from __future__ import annotations

import json

import click

from vbfs.cli.main import cli, note, warn, with_repository
from vbfs.store.locks import break_locks, describe_locks
from vbfs.store.repository import Repository

_STATE = {
    "running": "held by a running process of this host",
    "gone": "its process is gone (removed by the next command)",
    "stale": "not refreshed for long: stale (removed by the next command)",
    "elsewhere": "held by a process of another host",
    "damaged": "not a lock record (removed by the next command)",
}


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _line(lock: dict[str, object]) -> str:
    if lock["state"] == "damaged":
        return f"{lock['name']}: {_STATE['damaged']}"
    return (
        f"{lock['kind']} lock of pid {lock['pid']} on {str(lock['host'])[:64]}, refreshed "
        f"{_age(float(lock['age']))} ago ({_STATE[str(lock['state'])]})"  # type: ignore[arg-type]
    )


@cli.command()
@click.option("--json", "json_out", is_flag=True, help="Print JSON.")
@with_repository(lock=None)
def locks(repo: Repository, json_out: bool) -> None:
    """List the repository's locks: which process of which host holds them, and since when."""
    found = describe_locks(repo.backend)
    if json_out:
        click.echo(json.dumps(found, indent=2))
        return
    if not found:
        note("the repository is not locked")
    for lock in found:
        click.echo(_line(lock))


@cli.command("break-lock")
@click.option("--running", is_flag=True, help="Also remove the locks of processes that are running on this host.")
@with_repository(lock=None, writable=True)
def break_lock(repo: Repository, running: bool) -> None:
    """Remove the locks of processes that are gone, for a lock held by a process that died on another machine.

    Only for locks whose process is really gone: a backup, mount or gc whose lock is removed while it runs stops
    (it writes nothing more), and a garbage collection could meanwhile delete chunks it was about to name."""
    kept = [lk for lk in describe_locks(repo.backend) if lk["state"] == "running"]
    removed = break_locks(repo.backend, include_running=running)
    for lock in removed:
        warn(f"removed the {_line(lock)}")
    if removed and any(lk["state"] == "elsewhere" for lk in removed):
        warn("if a process of another host still runs with one of these locks, it stops at its next check")
    for lock in kept if not running else []:
        note(f"kept the {_line(lock)}: end that process instead, or give --running")
    if not removed:
        note("no lock removed")
    else:
        click.echo(f"removed {len(removed)} lock(s)")
