"""The plugin manager and the registry that plugins fill.

:func:`plugin_manager` loads every entry point of group ``vbfs`` — the built-in plugins are registered there too,
exactly like third-party ones — and :func:`registry` asks them to register their classes. Tests build their own
manager with :func:`plugin_manager` ``(load_entry_points=False)`` and register plugins by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import pluggy

from vbfs import hookspecs
from vbfs.errors import UnknownScheme

hookimpl = pluggy.HookimplMarker("vbfs")


@dataclass(frozen=True)
class Registration:
    kind: str  # hypervisor | agent | filesystem
    name: str
    cls: Any
    plugin: str
    origin: str


class Registry:
    """Classes registered by plugins, keyed by kind and name."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, str], Registration] = {}
        self._current_plugin = "?"
        self._current_origin = "?"

    def _add(self, kind: str, name: str, cls: Any) -> None:
        key = (kind, name)
        if key in self.entries:
            other = self.entries[key]
            raise ValueError(f"{kind} {name!r} is registered twice (by {other.plugin} and {self._current_plugin})")
        self.entries[key] = Registration(kind, name, cls, self._current_plugin, self._current_origin)

    def add_hypervisor(self, scheme: str, cls: Any) -> None:
        self._add("hypervisor", scheme, cls)

    def add_agent(self, name: str, cls: Any) -> None:
        self._add("agent", name, cls)

    def add_filesystem(self, name: str, cls: Any) -> None:
        self._add("filesystem", name, cls)

    def hypervisor(self, scheme: str) -> Any:
        try:
            return self.entries[("hypervisor", scheme)].cls
        except KeyError:
            known = ", ".join(sorted(n for k, n in self.entries if k == "hypervisor")) or "none"
            raise UnknownScheme(f"unknown source scheme {scheme!r} (known: {known})") from None

    def filesystems(self) -> dict[str, Any]:
        """Guest filesystem readers by the name that volume detection gives (ext, xfs, fat, ntfs, btrfs)."""
        return {name: r.cls for (kind, name), r in self.entries.items() if kind == "filesystem"}

    def of_kind(self, kind: str) -> list[Registration]:
        return sorted((r for r in self.entries.values() if r.kind == kind), key=lambda r: r.name)


def plugin_manager(load_entry_points: bool = True) -> pluggy.PluginManager:
    pm = pluggy.PluginManager("vbfs")
    pm.add_hookspecs(hookspecs)
    if load_entry_points:
        pm.load_setuptools_entrypoints("vbfs")
    return pm


def build_registry(pm: pluggy.PluginManager) -> Registry:
    reg = Registry()
    origins = {id(plugin): f"{dist.project_name} {dist.version}" for plugin, dist in pm.list_plugin_distinfo()}
    for plugin in pm.get_plugins():
        name = pm.get_name(plugin) or repr(plugin)
        reg._current_plugin = name
        reg._current_origin = origins.get(id(plugin), getattr(plugin, "__name__", "registered in code"))
        for hook in ("vbfs_register_hypervisors", "vbfs_register_agents", "vbfs_register_filesystems"):
            impl = getattr(plugin, hook, None)
            if impl is not None:
                impl(registry=reg)
    return reg


@lru_cache(maxsize=1)
def default_manager() -> pluggy.PluginManager:
    return plugin_manager()


@lru_cache(maxsize=1)
def registry() -> Registry:
    return build_registry(default_manager())
