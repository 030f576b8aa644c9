"""``mount`` and ``umount``: the repository served read-only through FUSE (:mod:`vbfs.fuse`)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import click

from vbfs.catalog import Catalog
from vbfs.cli.main import Settings, cli, note, repository_lock, warn, with_repository
from vbfs.errors import VbfsError
from vbfs.plugins import registry
from vbfs.store.cache import ChunkCache
from vbfs.store.repository import Repository
from vbfs.vfs import Node, RepositoryTree


def _preload_mount_modules() -> None:
    """What every mount needs, and the parsers of the commonest guests (ext4, MBR/GPT); others load on use."""
    import importlib

    for name in ("pyfuse3", "trio", "vbfs.fuse.mount", "dissect.volume.disk", "dissect.extfs"):
        with suppress(ImportError):
            importlib.import_module(name)


def _prepare(mountpoint: Path, **_: Any) -> dict[str, Any]:
    from vbfs.fuse.mount import check_mountpoint

    check_mountpoint(mountpoint)
    # The FUSE libraries and the guest filesystem parsers load while the passphrase's key is derived (scrypt
    # releases the GIL): the first `cp` from a fresh mount then waits for neither. Done before the fork.
    preload = threading.Thread(target=_preload_mount_modules, daemon=True)
    preload.start()
    return {"preload": preload}


@cli.command()
@click.argument("mountpoint", type=click.Path(path_type=Path))
@click.option("--foreground", is_flag=True, help="Stay in the foreground (logs to stderr).")
@click.option("--cache-size", type=int, default=32, show_default=True, help="Chunk cache in MiB.")
@click.option("--debug", is_flag=True, help="Log every FUSE request (with --foreground).")
@with_repository(lock=None, catalog=True, before=_prepare)
def mount(
    repo: Repository,
    cat: Catalog,
    mountpoint: Path,
    foreground: bool,
    cache_size: int,
    debug: bool,
    preload: threading.Thread,
) -> None:
    """Mount the repository read-only at MOUNTPOINT: guests, snapshots, disks and the guests' own files."""
    from vbfs.fuse.mount import mountpoint_is_empty, serve, serve_in_background

    preload.join()
    if not mountpoint_is_empty(mountpoint):
        warn(f"{mountpoint} is not empty: what it holds is hidden while the repository is mounted there")
    cat.close()  # brought up to date before the tree is served; each serving thread opens its own

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
        with repository_lock(repo, "shared"):
            serve(make_root(), mountpoint, on_ready, debug=debug)

    if foreground:
        Settings.current().show_at_least(logging.DEBUG if debug else logging.INFO)  # its log, on stderr
        run()
        return
    log_file = repo.catalog_path().parent / "mount.log"
    pid = serve_in_background(run, log_file)
    click.echo(f"mounted {repo.location} at {mountpoint} (process {pid}, log {log_file})")


@cli.command()
@click.argument("mountpoint", type=click.Path(path_type=Path))
@click.option(
    "--lazy",
    is_flag=True,
    help="If the mount is busy, detach it now anyway: it ends when the last process using it lets go.",
)
def umount(mountpoint: Path, lazy: bool) -> None:
    """Unmount a vbfs mount, also one whose process was killed.

    A mount that a process still uses (its working folder or an open file is inside) is refused with the names of
    those processes, unless --lazy."""
    from vbfs.fuse.mount import unmount, users_of, wait_unmounted

    users = users_of(mountpoint) if lazy else []
    if unmount(mountpoint, lazy=lazy):
        who = f" ({', '.join(users[:5])})" if users else ""
        note(f"{mountpoint} is busy: detached; the mount ends when the last process using it{who} lets go")
        return
    if not wait_unmounted(mountpoint):
        raise VbfsError(f"{mountpoint} is still mounted")
