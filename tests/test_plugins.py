"""Plugins: built-ins come through the entry point group `vbfs`, hooks are documented, the kit passes."""

from __future__ import annotations

import contextlib
import inspect
import json
from pathlib import Path

from tests.conftest import Vbfs, copy_sparse
from vbfs import hookspecs
from vbfs.plugins import build_registry, hookimpl, plugin_manager
from vbfs.sources import SourceURL
from vbfs.testing.conformance import check_hypervisor
from vbfs.testing.images import convert


def test_image_plugin_comes_from_the_entry_point(vbfs: Vbfs) -> None:
    rows = json.loads(vbfs("plugins", "--json").stdout)
    image = [r for r in rows if r["kind"] == "hypervisor" and r["name"] == "image"]
    assert image and image[0]["plugin"] == "image" and image[0]["from"].startswith("vbfs ")
    filesystems = {r["name"]: r["plugin"] for r in rows if r["kind"] == "filesystem"}
    assert filesystems == dict.fromkeys(["btrfs", "ext", "fat", "ntfs", "xfs"], "guestfs")


def test_every_hook_is_documented_with_its_parameters() -> None:
    specs = [(n, f) for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("vbfs_")]
    assert len(specs) >= 6
    for name, func in specs:
        doc = inspect.getdoc(func) or ""
        assert doc, f"{name} has no docstring"
        for param in inspect.signature(func).parameters:
            assert f":param {param}:" in doc, f"{name} does not document {param}"


def test_freeze_is_always_followed_by_thaw(vbfs: Vbfs, template_image: Path, tmp_path: Path) -> None:
    from vbfs.engine.backup import BackupRun
    from vbfs.errors import SourceError
    from vbfs.store.repository import Repository

    events: list[str] = []

    class Recorder:
        @hookimpl
        def vbfs_freeze(self, guest: str, ctx: dict) -> None:
            events.append(f"freeze {guest}")

        @hookimpl
        def vbfs_thaw(self, guest: str, ctx: dict) -> None:
            events.append(f"thaw {guest}")

    class FailingHypervisor:
        scheme = "failing"

        def remove_leftovers(self, guest: str) -> list[str]:
            return []

        def snapshot(self, guest: str):  # type: ignore[no-untyped-def]
            raise SourceError("snapshot refused")

    pm = plugin_manager(load_entry_points=False)
    pm.register(Recorder())
    repo = Repository.open(str(vbfs.repo), lambda confirm: "")
    with contextlib.suppress(SourceError):
        BackupRun(repo, pm).run(FailingHypervisor(), "g1", "failing://x")  # type: ignore[arg-type]
    assert events == ["freeze g1", "thaw g1"]


def test_image_plugin_passes_the_conformance_kit(template_image: Path, tmp_path: Path) -> None:
    import vbfs_image

    pm = plugin_manager(load_entry_points=False)
    pm.register(vbfs_image, name="image")
    reg = build_registry(pm)
    for fmt in ("raw", "qcow2", "vhdx"):
        image = tmp_path / f"disk.{fmt}"
        if fmt == "raw":
            copy_sparse(template_image, image)
        else:
            convert(template_image, fmt, image)
        hv = reg.hypervisor("image")(SourceURL.parse(f"image://{image}"), {})
        check_hypervisor(hv, "disk")
