"""``python -m vbfs.cli``: the ``vbfs`` command."""

from vbfs.cli import main

main()
