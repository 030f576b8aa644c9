"""The ``vbfs`` command line (click): :mod:`vbfs.cli.main` holds the group and what commands share; each family
of commands has a module of its own, imported here so that its commands register."""

import vbfs.cli.backup
import vbfs.cli.browse
import vbfs.cli.keys
import vbfs.cli.locks
import vbfs.cli.mount
import vbfs.cli.repository
import vbfs.cli.restore
import vbfs.cli.retention  # noqa: F401
from vbfs.cli.main import cli, main

__all__ = ["cli", "main"]
