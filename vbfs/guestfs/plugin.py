"""The built-in guest filesystem readers, registered through the ``vbfs`` entry-point group like any plugin."""

from __future__ import annotations

from vbfs.guestfs.filesystems import BUILTIN
from vbfs.plugins import Registry, hookimpl


@hookimpl
def vbfs_register_filesystems(registry: Registry) -> None:
    for name, cls in BUILTIN.items():
        registry.add_filesystem(name, cls)
