"""Where the CLI gets a repository's passphrase: the environment, a private file, a command, or a prompt.

Sources of the passphrase, of which at most one may be set (an empty variable counts as unset; two set are refused
rather than one of them silently winning, since they may disagree):

- ``VBFS_PASSPHRASE``: the passphrase itself;
- ``VBFS_PASSPHRASE_FILE``: a file whose first line (without its line break) is the passphrase; refused unless
  only its owner may read or write it (mode 0600 or stricter);
- ``VBFS_PASSCOMMAND``: a command, split like a shell would (:func:`shlex.split`) but run without one, whose first
  line of output is the passphrase; it gets ``VBFS_REPO`` set to the repository, and ``VBFS_PASSCOMMAND_TIMEOUT``
  seconds (60) to answer;
- none of them: a prompt on the terminal that names the repository.

A new passphrase (``vbfs key change-passphrase``) comes from ``VBFS_NEW_PASSPHRASE`` or ``VBFS_NEW_PASSPHRASE_FILE``
(the same rule for the file), or from a prompt asked twice. A passphrase is never taken from the command line,
never logged and never put in an error message.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import stat
import subprocess
import sys

import click

from vbfs.errors import VbfsError

PASSPHRASE_VARIABLES = ("VBFS_PASSPHRASE", "VBFS_PASSPHRASE_FILE", "VBFS_PASSCOMMAND")
NEW_PASSPHRASE_VARIABLES = ("VBFS_NEW_PASSPHRASE", "VBFS_NEW_PASSPHRASE_FILE")
PASSCOMMAND_TIMEOUT = 60.0
_FILE_MAX = 64 * 1024


def read_secret_file(path_text: str, variable: str) -> str:
    """The first line of the file ``variable`` names, if nobody but its owner may read or write it."""
    path = os.path.expanduser(path_text)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise VbfsError(f"{variable} {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise VbfsError(f"{variable} {path} is not a regular file")
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise VbfsError(
                f"{variable} {path} is open to other users (mode {stat.S_IMODE(st.st_mode):04o}): chmod 600 it"
            )
        data = f.read(_FILE_MAX)
    return _first_line(data, f"{variable} {path}")


def _first_line(data: bytes, what: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise VbfsError(f"{what}: the passphrase is not UTF-8 text") from None
    lines = text.splitlines()
    if not lines or not lines[0]:
        raise VbfsError(f"{what}: the first line is empty")
    return lines[0]


def run_passcommand(command: str, location: str | None) -> str:
    """The first line that ``command`` prints; a command that fails, hangs or prints nothing is one line naming
    only the command's first word (its arguments may hold a secret)."""
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise VbfsError(f"VBFS_PASSCOMMAND cannot be split into words ({exc})") from None
    if not argv:
        raise VbfsError("VBFS_PASSCOMMAND is empty")
    name = argv[0]
    timeout = _timeout()
    env = dict(os.environ)
    for variable in PASSPHRASE_VARIABLES + NEW_PASSPHRASE_VARIABLES:
        env.pop(variable, None)
    if location:
        env["VBFS_REPO"] = location
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, env=env)
    except FileNotFoundError:
        raise VbfsError(f"the passphrase command {name} was not found") from None
    except OSError as exc:
        raise VbfsError(f"the passphrase command {name} cannot be run: {exc.strerror or exc}") from None
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=5)
        raise VbfsError(
            f"the passphrase command {name} did not answer within {timeout:g} s (VBFS_PASSCOMMAND_TIMEOUT)"
        ) from None
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        how = f"was killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exited {proc.returncode}"
        raise VbfsError(f"the passphrase command {name} failed (it {how})")
    if not out.strip():
        raise VbfsError(f"the passphrase command {name} printed no passphrase")
    return _first_line(out, f"the passphrase command {name}")


def _timeout() -> float:
    text = os.environ.get("VBFS_PASSCOMMAND_TIMEOUT")
    if not text:
        return PASSCOMMAND_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 24 * 3600:
        raise VbfsError(f"VBFS_PASSCOMMAND_TIMEOUT={text[:20]!r} is not a number of seconds")
    return value


def _the_one_set(variables: tuple[str, ...]) -> str | None:
    found = [v for v in variables if os.environ.get(v)]
    if len(found) > 1:
        raise VbfsError(f"{', '.join(found)} are set: set only one of them (they may disagree)")
    return found[0] if found else None


def passphrase(location: str | None, confirm: bool = False, label: str | None = None) -> str:
    """The repository's passphrase from the one source that is set, else from a prompt on the terminal naming
    ``location`` (asked twice when ``confirm``: a new repository's)."""
    source = _the_one_set(PASSPHRASE_VARIABLES)
    if source == "VBFS_PASSPHRASE":
        return os.environ[source]
    if source == "VBFS_PASSPHRASE_FILE":
        return read_secret_file(os.environ[source], source)
    if source == "VBFS_PASSCOMMAND":
        return run_passcommand(os.environ[source], location)
    if not sys.stdin.isatty():
        at = f" at {location}" if location else ""
        raise VbfsError(
            f"the repository{at} is encrypted: set VBFS_PASSPHRASE, VBFS_PASSPHRASE_FILE or VBFS_PASSCOMMAND, or "
            "run on a terminal to be asked"
        )
    where = f" for {location}" if location else ""
    text = label or (f"New passphrase{where}" if confirm else f"Passphrase{where}")
    return _prompt(text, confirm)


def new_passphrase_from_environment() -> str | None:
    """The new passphrase of ``VBFS_NEW_PASSPHRASE`` or ``VBFS_NEW_PASSPHRASE_FILE``, or None when neither is set."""
    source = _the_one_set(NEW_PASSPHRASE_VARIABLES)
    if source == "VBFS_NEW_PASSPHRASE":
        return os.environ[source]
    if source == "VBFS_NEW_PASSPHRASE_FILE":
        return read_secret_file(os.environ[source], source)
    return None


def new_passphrase(location: str) -> str:
    """A new passphrase from the environment, or asked twice on the terminal."""
    found = new_passphrase_from_environment()
    if found is not None:
        return found
    if not sys.stdin.isatty():
        raise VbfsError("no new passphrase: set VBFS_NEW_PASSPHRASE or VBFS_NEW_PASSPHRASE_FILE, or run on a terminal")
    return _prompt(f"New passphrase for {location}", True)


def _prompt(text: str, confirm: bool) -> str:
    pw = click.prompt(text, hide_input=True, confirmation_prompt=confirm, err=True)
    if confirm and not pw:
        raise VbfsError("an empty passphrase is not allowed")
    return str(pw)
