"""Commands about sources: ``backup`` (one guest, or the guests of a job), ``guests`` and ``plugins``.

The per-guest work is :class:`vbfs.engine.jobs.JobRunner`'s; these commands choose, print and exit.
"""

from __future__ import annotations

import json
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import click

from vbfs.catalog import Catalog
from vbfs.cli.main import Settings, cli, human, note, progress_for, say, stop_on_sigterm, with_repository
from vbfs.errors import VbfsError
from vbfs.job import Job
from vbfs.plugins import default_manager, registry
from vbfs.sources import SourceURL
from vbfs.store.manifest import Manifest, check_note, check_tags
from vbfs.store.repository import Repository


def _summary_line(m: Manifest, phases: dict[str, float], seconds: float) -> str:
    """What a backup did, and how long it took: ``seconds`` in all, then each phase's share."""
    s = m.stats
    rate = s["read_bytes"] / phases["read"] / 1e6 if phases.get("read") else 0.0
    named = ", ".join(f"{k} {v:.1f} s" for k, v in phases.items() if k != "index" or "index_seconds" in s)
    return (
        f"{m.guest}@{m.name} ({m.id[:8]}): read {human(s['read_bytes'])} at {rate:.0f} MB/s, "
        f"new {human(s['new_bytes'])}, deduplicated {human(s['dedup_bytes'])}, stored {human(s['stored_bytes'])}; "
        f"{seconds:.1f} s ({named})"
    )


def _source_options(insecure: bool, guest: str | None = None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if insecure:
        options["insecure"] = True
    if guest:
        options["guest"] = guest
    return options


def _plan(
    source: str | None,
    guest: str | None,
    job_file: Path | None,
    insecure: bool,
    no_index: bool,
    tags: tuple[str, ...] = (),
    user_note: str | None = None,
    **_: Any,
) -> dict[str, Any]:
    """What to back up, checked before the repository is opened."""
    if (source is None) == (job_file is None):
        raise click.UsageError("give either a SOURCE or --job FILE")
    check_tags(list(dict.fromkeys(tags)))
    if user_note is not None:
        check_note(user_note)
    job: Job | None = None
    if job_file is not None:
        if guest:
            raise click.UsageError("--guest does not go with --job (the job names its guests)")
        job = Job.load(job_file)
        options = {**job.options, **_source_options(insecure)}
        source, index = job.source, job.index and not no_index
    else:
        options, index = _source_options(insecure, guest), not no_index
    assert source is not None
    url = SourceURL.parse(source)
    hv_cls = registry().hypervisor(url.scheme)
    return {"job": job, "url": url, "make_source": lambda: hv_cls(url, options), "index": index}


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
@click.option("--tag", "tags", multiple=True, metavar="TAG", help="Tag the snapshot (repeat for more tags).")
@click.option(
    "--note", "user_note", metavar="TEXT", help="A note kept with the snapshot (one line), shown by vbfs snapshots."
)
@click.option("--json", "json_out", is_flag=True, help="Print the new snapshot as JSON.")
@with_repository(lock="shared", catalog=True, writable=True, before=_plan)
def backup(
    repo: Repository,
    cat: Catalog,
    guest: str | None,
    job_file: Path | None,
    tags: tuple[str, ...],
    user_note: str | None,
    json_out: bool,
    job: Job | None,
    url: SourceURL,
    make_source: Any,
    index: bool,
    **_: Any,
) -> None:
    """Back up SOURCE, e.g. image:///var/lib/images/web01.qcow2, or the guests of a --job."""
    from vbfs.engine.jobs import JobRunner

    stop_on_sigterm()

    guest_started = [Settings.current().started]

    def done(manifest: Manifest, phases: dict[str, float]) -> None:
        with suppress(VbfsError):
            cat.sync(repo)  # the catalog is a cache of the repository: it learns of the new snapshot from there
        now = time.monotonic()
        seconds, guest_started[0] = now - guest_started[0], now  # the first guest's time is the command's so far
        if not json_out:
            for text in manifest.notes:
                note(text)
            click.echo(_summary_line(manifest, phases, seconds))

    def failed(name: str, exc: VbfsError) -> None:
        guest_started[0] = time.monotonic()
        say("error", f"{name}: {exc}")

    runner = JobRunner(
        repo,
        default_manager(),
        registry().filesystems(),
        index_files=index,
        progress=lambda: progress_for(json_out),
        tags=tuple(dict.fromkeys(tags)),
        note=user_note,
        on_done=done,
        on_failed=failed,
    )
    hv = make_source()
    try:
        result = runner.run(hv, url.raw, job, guest, str(job_file))
    finally:
        hv.close()
    if job is not None and not json_out:
        click.echo(
            f"{len(result.manifests)} of {result.total} guest(s) backed up in {Settings.current().elapsed():.1f} s"
        )
    if json_out:
        docs = [m.to_json() for m in result.manifests]
        keys = ("id", "guest", "name", "time", "consistency", "stats", "notes")
        rows = [{**{k: d[k] for k in keys}, "tags": d.get("tags", []), "note": d.get("note")} for d in docs]
        calls = {"backend_calls": repo.backend.calls.snapshot()}  # of the whole command: what storage requests cost
        click.echo(json.dumps(rows if job is not None else {**rows[0], **calls}, indent=2))
    if result.failures:
        raise VbfsError(f"{len(result.failures)} of {result.total} guests failed: " + "; ".join(result.failures))


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
