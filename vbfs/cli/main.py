"""The ``vbfs`` command group and what every command shares: errors, umask, progress, passphrase, and
:func:`with_repository`, the one way a command opens the repository, its lock and its catalog.

Every command that prints a table also takes ``--json``. Errors reach the user here and only here: a
:class:`VbfsError` is one line on stderr and its exit code; an unexpected exception is one line too, with the
traceback only when ``VBFS_DEBUG=1``.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, closing, contextmanager
from typing import Any, Literal, NoReturn

import click

from vbfs import __version__
from vbfs.catalog import Catalog
from vbfs.engine.progress import NoProgress, Progress
from vbfs.errors import VbfsError
from vbfs.store.repository import Repository


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


def stop_on_sigterm() -> None:
    """SIGTERM (systemd stopping a unit, a kill) ends a backup or a restore like Ctrl-C: snapshots removed, guests
    thawed, temporary folders removed."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


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
        """The catalog, brought up to date with the repository; its warnings are printed."""
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


LockKind = Literal["shared", "gc", "exclusive"]


def repository_lock(repo: Repository, kind: LockKind) -> AbstractContextManager[Any]:
    """The lock a command holds while it works, by name."""
    if kind == "shared":
        return repo.lock_shared()
    if kind == "gc":
        return repo.lock_gc()
    if kind == "exclusive":
        return repo.lock_exclusive()
    raise ValueError(f"unknown lock kind {kind!r}")


def with_repository(
    lock: LockKind | None = "shared",
    catalog: bool | Literal["unsynced"] = False,
    writable: bool = False,
    before: Callable[..., dict[str, Any] | None] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Open the repository of ``-r``/``VBFS_REPO`` for a command and pass it as ``repo``.

    ``lock``: the lock held for the whole command (``None``: none, for commands that only read manifests);
    ``catalog``: also pass ``cat``, the catalog synced with the repository (its warnings printed), or
    ``"unsynced"`` for commands that sync or rebuild it themselves; ``writable``: refuse read-only storage.
    ``before`` runs first with the command's parameters (checks that need no repository, so a usage error comes
    before a passphrase prompt); the mapping it returns is passed to the command as more keyword arguments.
    """

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def run(**kwargs: Any) -> Any:
            if before is not None:
                kwargs.update(before(**kwargs) or {})
            obj = click.get_current_context().find_object(Ctx)
            assert obj is not None
            repo = obj.open_repo()
            if writable:
                repo.require_writable()
            with ExitStack() as stack:
                if lock is not None:
                    stack.enter_context(repository_lock(repo, lock))
                if catalog == "unsynced":
                    kwargs["cat"] = stack.enter_context(closing(Catalog(repo.catalog_path())))
                elif catalog:
                    kwargs["cat"] = stack.enter_context(obj.catalog(repo))
                return command(repo=repo, **kwargs)

        return run

    return decorate


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


def main() -> None:
    cli(prog_name="vbfs")
