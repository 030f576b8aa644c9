"""Commands about the repository as a whole: ``init``, ``info``, ``check`` and ``catalog rebuild``."""

from __future__ import annotations

import json
import sys

import click

from vbfs.catalog import Catalog
from vbfs.cli.main import Ctx, cli, human, note, passphrase_provider, progress_for, say, warn, with_repository
from vbfs.errors import VbfsError
from vbfs.store.repository import Repository


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
    repo = Repository.init(location, encryption, lambda confirm: passphrase_provider(confirm, location), chunk_size)
    click.echo(f"created repository {location} (id {repo.id}, encryption {encryption})")
    if encryption == "repokey":
        note(
            "keep the passphrase safe: without it the backups cannot be read (vbfs key export keeps a copy of the key)"
        )


@cli.command()
@click.option("--json", "json_out", is_flag=True, help="Print JSON.")
@with_repository(lock=None, catalog=True)
def info(repo: Repository, cat: Catalog, json_out: bool) -> None:
    """Show the repository's settings, where its catalog is, what it holds and how much space that takes.

    Deduplication ratio: the data the backups handed to the store (not counting zeros) per byte of it that was new;
    compression ratio: the new data per byte written for it. Both as each backup measured them when it was written,
    over the snapshots the repository holds now."""
    snaps = cat.snapshots()
    stored = objects = 0
    for name, size in repo.backend.list_sizes(""):
        if not name.startswith("catalog.sqlite"):  # the catalog is a derived index, not backup data
            stored += size
            objects += 1

    def total(key: str) -> int:
        return sum(n for s in snaps if isinstance(n := s.get("stats", {}).get(key), int))

    new, written, handled = total("new_bytes"), total("stored_bytes"), total("new_bytes") + total("dedup_bytes")
    doc = {
        "location": repo.location,
        "id": repo.id,
        "encryption": repo.config["encryption"],
        "chunk_size": repo.chunk_size,
        "compression": repo.config["compression"],
        "catalog": str(repo.catalog_path()),
        "guests": len(cat.guests()),
        "snapshots": len(snaps),
        "snapshots_size": sum(d["size"] for s in snaps for d in s["disks"]),
        "stored_bytes": stored,
        "objects": objects,
        "deduplication_ratio": round(handled / new, 3) if new else None,
        "compression_ratio": round(new / written, 3) if written else None,
    }
    if json_out:
        click.echo(json.dumps(doc, indent=2))
        return

    def ratio(r: float | None) -> str:
        return "-" if r is None else f"{r:.2f} : 1"

    lines = [
        ("location", doc["location"], ""),
        ("id", doc["id"], ""),
        ("encryption", doc["encryption"], ""),
        ("chunk size", human(repo.chunk_size), ""),
        ("compression", doc["compression"], ""),
        ("catalog", doc["catalog"], ""),
        ("guests", doc["guests"], ""),
        ("snapshots", doc["snapshots"], ""),
        ("snapshots' size", human(doc["snapshots_size"]), "all disks of all snapshots, as restores would write them"),
        ("repository size", human(stored), f"bytes stored, in {objects} objects (the catalog not counted)"),
        ("deduplication", ratio(doc["deduplication_ratio"]), "data the backups stored or found stored, per new byte"),
        ("compression ratio", ratio(doc["compression_ratio"]), "new data per byte written for it"),
    ]
    for label, value, meaning in lines:
        click.echo(f"{label:18} {value!s:14}  {meaning}".rstrip())


@cli.command()
@click.option("--verify-data", is_flag=True, help="Also read and verify every chunk.")
@click.option(
    "--acknowledge-missing",
    metavar="ID|all",
    help="Stop reporting a snapshot that disappeared without being forgotten (its id, or all of them).",
)
@click.option("--json", "json_out", is_flag=True, help="Print JSON.")
@with_repository(lock="shared", catalog="unsynced")
def check(repo: Repository, cat: Catalog, verify_data: bool, acknowledge_missing: str | None, json_out: bool) -> None:
    """Check that every snapshot is whole; with --verify-data, that every chunk is intact.

    Also reports snapshots that disappeared from the repository without being forgotten, and removes leftovers
    of processes that are gone (temporary files, locks)."""
    from vbfs.engine.check import check as run_check

    warnings = cat.sync(repo)
    catalog_damage, cat.notes = cat.notes, []  # repaired, and an error of this check
    if acknowledge_missing:
        done = cat.acknowledge_vanished(acknowledge_missing)
        if not done:
            raise VbfsError(f"no unacknowledged vanished snapshot matches {acknowledge_missing!r}")
        for v in done:
            note(f"acknowledged that {v['guest']}@{v['name']} ({v['id']}) is gone")
    for w in warnings:
        if "disappeared from the repository" not in w:  # those are errors of the check below
            warn(w)
    report = run_check(repo, verify_data, progress_for(json_out), cat)
    report.errors += catalog_damage
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
        for text in report.notes:
            note(text)
        for w in report.warnings:
            warn(w)
        for e in report.errors:
            say("damaged", e)
        verified = f", {report.chunks_verified} verified" if verify_data else ""
        click.echo(
            f"{report.snapshots} snapshot(s), {report.chunks_referenced} chunk(s) referenced{verified}: "
            f"{'ok' if report.ok else f'{len(report.errors)} error(s)'}"
        )
    if not report.ok:
        sys.exit(3)


@cli.group()
def catalog() -> None:
    """The catalog (an index that can always be recreated from the repository)."""


@catalog.command("rebuild")
@with_repository(lock=None, catalog="unsynced")
def catalog_rebuild(repo: Repository, cat: Catalog) -> None:
    """Recreate the catalog from the snapshot manifests alone."""
    for w in cat.rebuild(repo) + cat.notes:
        warn(w)
    n = len(cat.snapshots())
    click.echo(f"catalog rebuilt: {n} snapshot(s)")
