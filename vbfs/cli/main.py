"""The ``vbfs`` command group and what every command shares: the common options, messages and logging, errors,
umask, progress, passphrase, and :func:`with_repository`, the one way a command opens the repository, its lock
and its catalog.

The common options (``-r``, ``-v``, ``-q``, ``--log-file``, ``--log-json``, ``--utc``, ``--lock-wait``) are taken
before the command's name and after it alike (``vbfs snapshots -r /repo``); every command gets them from
:class:`VbfsCommand`. Every command that prints a table also takes ``--json``.

What vbfs tells the user besides a command's output goes through :func:`say` (``note``, ``warning``,
``damaged``, ``error``): one line ``vbfs: <kind>: <text>`` on stderr, or one JSON object per line with
``--log-json``, and the same records, with times, in the ``--log-file``. Errors reach the user here and only
here: a :class:`VbfsError` is one line on stderr and its exit code; a permission the user lacks is one line naming
the path (exit 2); an unexpected exception is one line too, with the traceback only when ``VBFS_DEBUG=1``.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, closing, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, NoReturn

import click

from vbfs import __version__
from vbfs.catalog import Catalog
from vbfs.engine.progress import NoProgress, Progress
from vbfs.errors import VbfsError
from vbfs.store.repository import Repository

log = logging.getLogger("vbfs")
NOTE = 25  # between INFO and WARNING: what a user sees by default but -q hides
logging.addLevelName(NOTE, "NOTE")
_LEVELS = {
    "info": logging.INFO,
    "note": NOTE,
    "warning": logging.WARNING,
    "damaged": logging.ERROR,
    "error": logging.ERROR,
}


def say(kind: str, message: str) -> None:
    """Tell the user something besides the command's output: ``kind`` is note, warning, damaged or error. A
    password in a URL (``scheme://user:password@host``) never reaches the terminal or a log."""
    Settings.current().start_logging()
    log.log(_LEVELS[kind], "%s", _REDACT.sub(r"\1@", message), extra={"kind": kind})


def note(message: str) -> None:
    say("note", message)


def warn(message: str) -> None:
    say("warning", message)


def fail(message: str, code: int = 2) -> NoReturn:
    say("error", message)
    sys.exit(code)


class _Human(logging.Formatter):
    """``vbfs: <kind>: <text>``, as a user reads it on a terminal; with times and the process id in a file."""

    def __init__(self, timed: bool):
        super().__init__()
        self.timed = timed

    def format(self, record: logging.LogRecord) -> str:
        kind = getattr(record, "kind", None) or record.levelname.lower()
        line = f"vbfs: {kind}: {record.getMessage()}"
        if record.exc_info and self.timed:
            line += "\n" + self.formatException(record.exc_info)
        if not self.timed:
            return line
        when = datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds")
        return f"{when} [{record.process}] {line}"


class _Json(logging.Formatter):
    """One JSON object per line: time (ISO 8601 with the offset), level, kind, message, logger, pid, command."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "kind": getattr(record, "kind", None) or record.levelname.lower(),
            "message": record.getMessage(),
            "logger": record.name,
            "pid": record.process,
            "command": Settings.current().command,
        }
        return json.dumps(doc, ensure_ascii=False)


_REDACT = re.compile(r"(://[^/@:\s]+):[^/@\s]*@")


def redacted_argv(argv: list[str]) -> str:
    """The command line as a log may show it: passwords in URLs removed (passphrases are never on argv)."""
    return " ".join(_REDACT.sub(r"\1@", a) for a in argv)


class Settings:
    """The common options of one vbfs process, from before and after the command's name; the last one given
    wins. Commands read them with :meth:`current`."""

    _current: Settings | None = None

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.repo: str | None = None
        self.verbose = 0
        self.quiet = False
        self.log_file: Path | None = None
        self.log_json = False
        self.utc = False
        self.lock_wait: float | None = None
        self.command = ""
        self._handlers: list[logging.Handler] = []

    @classmethod
    def current(cls) -> Settings:
        if cls._current is None:
            cls._current = Settings()
        return cls._current

    @classmethod
    def reset(cls) -> None:
        """A new command in this process (tests calling the group more than once): fresh options and logging."""
        if cls._current is not None:
            cls._current.stop_logging()
        cls._current = None

    def elapsed(self) -> float:
        """Seconds since the command started (passphrase, key derivation and all)."""
        return time.monotonic() - self.started

    def start_logging(self) -> None:
        """Handlers as the options ask, once: stderr at the level -v/-q choose, the log file at INFO or finer."""
        if self._handlers:
            return
        level = logging.WARNING if self.quiet else NOTE
        if self.verbose:
            level = logging.INFO if self.verbose == 1 else logging.DEBUG
        stderr = logging.StreamHandler(sys.stderr)
        stderr.setLevel(level)
        stderr.setFormatter(_Json() if self.log_json else _Human(timed=False))
        self._handlers.append(stderr)
        if self.log_file is not None:
            try:
                fd = os.open(self.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                self._handlers.clear()
                raise VbfsError(f"cannot open the log file {self.log_file}: {exc.strerror}") from None
            to_file = logging.StreamHandler(os.fdopen(fd, "a", encoding="utf-8", errors="replace"))
            to_file.setLevel(min(level, logging.INFO))
            to_file.setFormatter(_Json() if self.log_json else _Human(timed=True))
            self._handlers.append(to_file)
        for h in self._handlers:
            log.addHandler(h)
        log.setLevel(min(h.level for h in self._handlers))
        log.propagate = False

    def show_at_least(self, level: int) -> None:
        """Show records from ``level`` on, on stderr and in the log file (a foreground mount's log)."""
        self.start_logging()
        for h in self._handlers:
            h.setLevel(min(h.level, level))
        log.setLevel(min(log.level, level))

    def stop_logging(self) -> None:
        for h in self._handlers:
            log.removeHandler(h)
            h.flush()
            if isinstance(h, logging.StreamHandler) and h.stream is not sys.stderr:
                h.stream.close()
        self._handlers.clear()


def _store(attr: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if value is None or value is False or (attr == "verbose" and not value):
            return
        settings = Settings.current()
        if attr == "verbose":
            value = max(settings.verbose, value)
        setattr(settings, attr, value)

    return callback


def common_options(repo_envvar: str | None = None) -> list[click.Option]:
    """The options every command takes, before or after its name."""
    return [
        click.Option(
            ["-r", "--repo"],
            envvar=repo_envvar,
            metavar="PATH",
            expose_value=False,
            callback=_store("repo"),
            help="The repository (or set VBFS_REPO).",
        ),
        click.Option(
            ["-v", "--verbose"],
            count=True,
            expose_value=False,
            callback=_store("verbose"),
            help="Say more: -v what vbfs does, -vv debugging detail.",
        ),
        click.Option(
            ["-q", "--quiet"],
            is_flag=True,
            default=None,
            expose_value=False,
            callback=_store("quiet"),
            help="Only warnings and errors on stderr: no notes, no progress.",
        ),
        click.Option(
            ["--log-file"],
            type=click.Path(dir_okay=False, path_type=Path),
            expose_value=False,
            callback=_store("log_file"),
            help="Also append every message, with its time, to FILE (and the command's start and end).",
        ),
        click.Option(
            ["--log-json"],
            is_flag=True,
            default=None,
            expose_value=False,
            callback=_store("log_json"),
            help="Messages as one JSON object per line (time, level, kind, message), on stderr and in the log file.",
        ),
        click.Option(
            ["--utc"],
            is_flag=True,
            default=None,
            expose_value=False,
            callback=_store("utc"),
            help="Show times in UTC instead of the local time zone.",
        ),
        click.Option(
            ["--lock-wait"],
            type=click.FloatRange(min=0),
            metavar="SECONDS",
            expose_value=False,
            callback=_store("lock_wait"),
            help="Wait up to SECONDS for a conflicting lock of the repository to go (default: 60 for backups, "
            "mounts and restores, none for prune, gc and forget).",
        ),
    ]


class VbfsCommand(click.Command):
    """A command with the common options; its messages and logging are set up before it runs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.extend(common_options())

    def invoke(self, ctx: click.Context) -> Any:
        settings = Settings.current()
        settings.command = ctx.command_path.removeprefix(f"{ctx.find_root().info_name} ").strip()
        settings.start_logging()
        log.info("started: %s", redacted_argv(["vbfs", *sys.argv[1:]]))
        return super().invoke(ctx)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class RichProgress:
    """A progress bar on stderr when it is a terminal: sizes and a rate for bytes, counts for other units."""

    def __init__(self) -> None:
        self._p: Any = None
        self._task: Any = None

    def begin(self, label: str, total: int, unit: str = "bytes") -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as RP

        self.end()
        if unit == "bytes":
            columns: list[Any] = [DownloadColumn(binary_units=True), TransferSpeedColumn(), TimeRemainingColumn()]
        else:
            columns = [MofNCompleteColumn(), TextColumn(unit), TimeElapsedColumn()]
            if total:
                columns.append(TimeRemainingColumn())
        self._p = RP(
            TextColumn("{task.description}"),
            BarColumn(),
            *columns,
            transient=True,
            console=Console(stderr=True),
        )
        self._p.start()
        self._task = self._p.add_task(label, total=total or None)

    def advance(self, n: int) -> None:
        if self._p is not None:
            self._p.advance(self._task, n)

    def end(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None


def progress_for(json_out: bool) -> Progress:
    """A bar on a terminal; nothing for --json, -q, --log-json or when stderr is not a terminal."""
    settings = Settings.current()
    if json_out or settings.quiet or settings.log_json or not sys.stderr.isatty():
        return NoProgress()
    return RichProgress()


def passphrase_provider(confirm: bool, location: str | None = None) -> str:
    """The passphrase of the repository at ``location`` (see :mod:`vbfs.cli.secrets` for where it comes from)."""
    from vbfs.cli.secrets import passphrase

    return passphrase(location, confirm)


def stop_on_sigterm() -> None:
    """SIGTERM (systemd stopping a unit, a kill) ends a backup or a restore like Ctrl-C: snapshots removed, guests
    thawed, temporary folders removed."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


class Ctx:
    """What a command is given as ``ctx.obj``: the common options (:class:`Settings`) and the repository."""

    @property
    def settings(self) -> Settings:
        return Settings.current()

    @property
    def utc(self) -> bool:
        return self.settings.utc

    @property
    def repo_location(self) -> str | None:
        return self.settings.repo

    def location(self) -> str:
        if not self.repo_location:
            raise VbfsError("no repository given: use -r PATH or set VBFS_REPO")
        return self.repo_location

    def open_repo(self) -> Repository:
        repo = Repository.open(self.location(), lambda confirm: passphrase_provider(confirm, self.location()))
        repo.warn = warn
        if repo.read_only:
            note(
                f"{repo.location} {repo.why_read_only()}: reading without a lock, catalog in "
                f"{repo.catalog_path().parent}"
            )
        return repo

    @contextmanager
    def catalog(self, repo: Repository) -> Iterator[Catalog]:
        """The catalog, brought up to date with the repository; its warnings are printed."""
        cat = Catalog(repo.catalog_path())
        try:
            for w in cat.sync(repo):
                warn(w)
            for n in cat.notes:
                warn(n)
            cat.notes.clear()
            yield cat
        finally:
            cat.close()


LockKind = Literal["shared", "gc", "exclusive"]


def repository_lock(repo: Repository, kind: LockKind) -> AbstractContextManager[Any]:
    """The lock a command holds while it works, by name, waiting as long as ``--lock-wait`` says."""
    wait = Settings.current().lock_wait
    if kind == "shared":
        return repo.lock_shared() if wait is None else repo.lock_shared(wait)
    if kind == "gc":
        return repo.lock_gc(wait or 0.0)
    if kind == "exclusive":
        return repo.lock_exclusive(wait or 0.0)
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
            obj = click.get_current_context().ensure_object(Ctx)
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


def permission_message(exc: PermissionError) -> str:
    """One line for a permission the user lacks: the path, and what was refused (read, write, enter)."""
    path = exc.filename
    if not path:
        return f"permission denied: {exc.strerror or exc}"
    path = os.fsdecode(path)
    parent = os.path.dirname(os.path.abspath(path))
    user = _user()
    if not os.path.lexists(path):
        if not os.access(parent, os.W_OK | os.X_OK):
            return f"{path}: permission denied ({user} may not create files in {parent})"
        return f"{path}: permission denied ({user} may not reach it)"
    if os.path.isdir(path):
        if not os.access(path, os.R_OK | os.X_OK):
            return f"{path}: permission denied ({user} may not read this folder)"
        return f"{path}: permission denied ({user} may not write in this folder)"
    if not os.access(path, os.R_OK):
        return f"{path}: permission denied ({user} may not read it)"
    if exc.errno == errno.EPERM:
        return f"{path}: operation not permitted ({user})"
    return f"{path}: permission denied ({user} may not write it)"


def _user() -> str:
    try:
        import pwd

        return f"user {pwd.getpwuid(os.geteuid()).pw_name}"
    except (ImportError, KeyError):
        return f"user id {os.geteuid()}"


def _quiet_stdout() -> None:
    """stdout is a closed pipe (``vbfs ... | head``): point it at /dev/null so the flush at exit is silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


class VbfsGroup(click.Group):
    """The vbfs group and its subgroups: their commands take the common options; errors become one line."""

    command_class = VbfsCommand

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except VbfsError as exc:
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            say("error", "interrupted")
            sys.exit(130)
        except BrokenPipeError:
            _quiet_stdout()
            sys.exit(141)  # as a program ended by SIGPIPE in a shell
        except PermissionError as exc:
            fail(permission_message(exc), 2)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except Exception as exc:
            if os.environ.get("VBFS_DEBUG"):
                traceback.print_exc()
            fail(f"internal error: {type(exc).__name__}: {exc} (set VBFS_DEBUG=1 for a traceback)", 1)


VbfsGroup.group_class = VbfsGroup


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
def cli(ctx: click.Context, umask: str) -> None:
    """vbfs: agentless backups of virtual machines into a deduplicated, mountable repository.

    The options -r, -v, -q, --log-file, --log-json, --utc and --lock-wait may also follow the command's name."""
    apply_umask(umask)
    ctx.ensure_object(Ctx)


cli.params[:0] = common_options(repo_envvar="VBFS_REPO")


def main() -> None:
    """The ``vbfs`` command: the group run, the command's end written to the log file, stdout kept quiet when it
    is a closed pipe."""
    Settings.reset()
    code: int | str | None = 0
    try:
        cli.main(prog_name="vbfs", standalone_mode=True)
    except SystemExit as exc:
        code = exc.code
        raise
    except BrokenPipeError:
        _quiet_stdout()
        code = 141
        raise SystemExit(141) from None
    finally:
        settings = Settings.current()
        if settings._handlers:
            log.info("finished in %.1f s, exit code %s", settings.elapsed(), code if code is not None else 0)
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _quiet_stdout()
        settings.stop_logging()
