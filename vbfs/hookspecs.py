"""The pluggy hook specifications of vbfs. Every hook is prefixed ``vbfs_``.

A plugin is a module or object with functions named like these hooks and marked with ``vbfs.plugins.hookimpl``,
made known through an entry point in group ``vbfs`` (see docs/plugins.md). Hooks are synchronous: vbfs calls them
from worker threads, never from the FUSE event loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from vbfs.plugins import Registry

hookspec = pluggy.HookspecMarker("vbfs")


@hookspec
def vbfs_register_hypervisors(registry: Registry) -> None:
    """Register hypervisor classes with ``registry.add_hypervisor(scheme, cls)``.

    :param registry: the registry; ``cls(url, options)`` must give an object following
        :class:`vbfs.sources.Hypervisor`, and ``scheme`` is the URL scheme it answers (``image``, ``vmware``, ...).
    """


@hookspec
def vbfs_register_agents(registry: Registry) -> None:
    """Register application agents (database hot backups, ...) with ``registry.add_agent(name, cls)``.

    :param registry: the registry.
    """


@hookspec
def vbfs_register_filesystems(registry: Registry) -> None:
    """Register guest filesystem readers with ``registry.add_filesystem(name, cls)``.

    :param registry: the registry.
    """


@hookspec
def vbfs_freeze(guest: str, ctx: dict[str, Any]) -> None:
    """Called right before a guest's snapshot is taken. Freeze what must be consistent.

    Whatever happens afterwards, :func:`vbfs_thaw` is called with the same ``ctx``.

    :param guest: the guest's name.
    :param ctx: a dict shared by the freeze and thaw of this one snapshot; record what was frozen in it.
    """


@hookspec
def vbfs_thaw(guest: str, ctx: dict[str, Any]) -> None:
    """Called right after the snapshot was taken, or failed. Thaw what :func:`vbfs_freeze` froze.

    :param guest: the guest's name.
    :param ctx: the dict that was passed to :func:`vbfs_freeze`.
    """


@hookspec
def vbfs_snapshot_committed(snapshot: dict[str, Any]) -> None:
    """Called after a snapshot's manifest has landed in the repository.

    :param snapshot: a summary (id, guest, name, time, disks) of the snapshot; read-only.
    """
