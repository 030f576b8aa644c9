"""The ``vbfs key`` commands: change the passphrase, export the key (as a file or on paper), import it back.

``change-passphrase`` opens the repository itself rather than through :func:`vbfs.cli.main.with_repository`,
because it needs the current passphrase again under the lock (see
:meth:`vbfs.store.repository.Repository.change_passphrase`); ``import`` cannot open it at all: its key is what is
missing.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import click

from vbfs.cli import secrets
from vbfs.cli.main import Ctx, Settings, cli, note, warn, with_repository
from vbfs.errors import VbfsError
from vbfs.store.keys import KEY_FILE, export_key, paper_key, read_export
from vbfs.store.repository import Repository


@cli.group("key")
def key_group() -> None:
    """The repository key: change its passphrase, export it, import it back."""


@key_group.command("change-passphrase")
@click.pass_obj
def change_passphrase(obj: Ctx) -> None:
    """Wrap the repository's key with a new passphrase (backups keep their data and go on meanwhile).

    The new passphrase comes from VBFS_NEW_PASSPHRASE or VBFS_NEW_PASSPHRASE_FILE (mode 0600), or is asked twice
    on the terminal. Exports of the key made before keep the passphrase they were made with."""
    location = obj.location()
    new = secrets.new_passphrase_from_environment()  # a bad variable is refused before anything is asked
    old = secrets.passphrase(location)
    repo = Repository.open(location, lambda confirm: old)
    repo.warn = warn
    if not repo.encrypted:
        raise VbfsError(f"the repository at {location} is not encrypted: it has no passphrase")
    repo.require_writable()
    if new is None:
        new = secrets.new_passphrase(location)
    if not new:
        raise VbfsError("an empty passphrase is not allowed")
    repo.change_passphrase(old, new, _lock_wait())
    note(
        f"changed the passphrase of {location}: the old one no longer opens it (key exports made before still "
        "do, with the old passphrase)"
    )


@key_group.command("export")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--paper", is_flag=True, help="A printable text form, with a checksum on every line.")
@with_repository(lock=None)
def export(repo: Repository, file: str, paper: bool) -> None:
    """Write the repository's key to FILE (- for standard output), still wrapped by the passphrase.

    Keep it apart from the repository: with it and the passphrase, `vbfs key import` brings back a repository
    whose key file was lost or damaged. FILE is created mode 0600 (and replaced if it exists)."""
    keyfile = repo.key_file()
    data = paper_key(keyfile, repo.id).encode() if paper else export_key(keyfile, repo.id)
    if file == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    _write_private(Path(file), data)
    note(f"exported the key of {repo.location} (id {repo.id}) to {file}")


@key_group.command("import")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option(
    "--paper", is_flag=True, help="FILE is the paper form, typed in (found by its header without this option)."
)
@click.pass_obj
def import_(obj: Ctx, file: str, paper: bool) -> None:
    """Put the key exported to FILE (- for standard input) back into the repository as its key file.

    The export must be this repository's (its id), whole (its checksums), and open the repository's config with
    the passphrase it was exported with, which is asked for before anything is written. A key file that is there
    is replaced: the key is proven to be the repository's own, so only the passphrase changes back to the
    export's."""
    location = obj.location()
    name = "standard input" if file == "-" else file
    if file == "-":
        data = sys.stdin.buffer.read(1024 * 1024)
    else:
        try:
            data = Path(file).read_bytes()
        except OSError as exc:
            raise VbfsError(f"cannot read {file}: {exc.strerror or exc}") from None
    exported = read_export(data, name, True if paper else None)
    done = Repository.import_key(
        location,
        exported,
        name,
        lambda: secrets.passphrase(location, label=f"Passphrase of the key in {name} for {location}"),
        _lock_wait(),
    )
    if done == "unchanged":
        note(f"the key in {name} is already the key file of {location}: nothing changed")
    elif done == "replaced":
        note(
            f"replaced {KEY_FILE} of {location} with the key in {name}: the passphrase it was exported with opens "
            "the repository now"
        )
    else:
        note(f"restored {KEY_FILE} of {location} from {name}")


def _lock_wait() -> float:
    """How long to wait for the gc lock: ``--lock-wait``, else 10 s (another change of the key is brief)."""
    wait = Settings.current().lock_wait
    return 10.0 if wait is None else wait


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``, mode 0600, through a temporary file renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise VbfsError(f"cannot write {path}: {exc.strerror or exc}") from None
