"""The typed manifest: the JSON on disk round-trips exactly, every field is checked on load, and references()
names every object a snapshot needs (patch bases included), the same set check counts."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MiB, Vbfs, copy_sparse
from tests.test_patches import TrackedDisk
from vbfs.engine.backup import BackupRun
from vbfs.engine.check import check
from vbfs.errors import IntegrityError
from vbfs.plugins import plugin_manager
from vbfs.store.codec import ID_SIZE
from vbfs.store.manifest import Manifest
from vbfs.store.repository import ZERO_ID, Repository, chunk_name_to_id

PASSPHRASE = "correct horse"


@pytest.fixture(scope="module")
def backed_up(tmp_path_factory: pytest.TempPathFactory, template_image: Path) -> tuple[Repository, str]:
    """A real backup (GPT + ext4, so with a guest-file index) into an encrypted repository."""
    root = tmp_path_factory.mktemp("manifest")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VBFS_")}
    env.update(VBFS_REPO=str(root / "repo"), VBFS_PASSPHRASE=PASSPHRASE, XDG_CACHE_HOME=str(root / "cache"))
    v = Vbfs(root / "repo", env)
    v.init("repokey")
    snap_id = json.loads(v("backup", f"image://{copy_sparse(template_image, root / 'web01.raw')}", "--json").stdout)[
        "id"
    ]
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(root / "cache")
    try:
        repo = Repository.open(str(root / "repo"), lambda confirm: PASSPHRASE)
    finally:
        if old is not None:
            os.environ["XDG_CACHE_HOME"] = old
    return repo, str(snap_id)


def _stored(repo: Repository, snap_id: str) -> bytes:
    name = f"snapshots/{snap_id}"
    return repo.codec.decode(repo.backend.get(name), name)


def test_a_backed_up_manifest_round_trips_to_the_same_bytes(backed_up: tuple[Repository, str]) -> None:
    repo, snap_id = backed_up
    raw = _stored(repo, snap_id)
    m = Manifest.from_json(json.loads(raw), snap_id)
    assert json.dumps(m.to_json(), sort_keys=True).encode() == raw
    assert m == repo.load_manifest(snap_id)
    assert m.files_index is not None and m.files_index.entries, "the guest-file index is named, with its rows"
    assert m.source.guest == "web01" and m.disks[0].read_bytes and m.disks[0].mode == "full"
    # a manifest written before source.guest, read_bytes, vbfs_version and the file index existed: the same JSON
    old = json.loads(raw)
    del old["source"]["guest"], old["disks"][0]["read_bytes"], old["vbfs_version"], old["files_index"]
    again = Manifest.from_json(old, snap_id)
    assert again.to_json() == old and again.source.guest is None and again.files_index is None


# (path into the manifest JSON, a value of the wrong type or range, what the message names)
BAD_FIELDS: list[tuple[str, Any, str]] = [
    ("version", "1", "version"),
    ("version", 2.0, "version"),
    ("guest", 5, "guest"),
    ("guest", "a/b", "guest"),
    ("name", None, "name"),
    ("time", 1, "time"),
    ("time", "2026-01-01", "time"),
    ("finished", 3, "finished"),
    ("source", "image://x", "source"),
    ("source.hypervisor", 1, "source hypervisor"),
    ("source.url", [], "source url"),
    ("source.guest", 1, "source guest"),
    ("consistency", 1, "consistency"),
    ("metadata", [], "metadata"),
    ("disks", {}, "disks"),
    ("disks.0", "web01", "disk 0"),
    ("disks.0.name", 1, "disk 0 name"),
    ("disks.0.size", "1", "disk web01 size"),
    ("disks.0.size", True, "disk web01 size"),
    ("disks.0.chunk_size", 1.5, "disk web01 chunk size"),
    ("disks.0.index", "ab", "disk web01 chunk list"),
    ("disks.0.index", [], "disk web01 chunk list"),
    ("disks.0.token", 1, "disk web01 change token"),
    ("disks.0.mode", ["full"], "disk web01 mode"),
    ("disks.0.read_bytes", "1", "disk web01 read bytes"),
    ("disks.0.details", [], "disk web01 details"),
    ("disks.0.source_name", 1, "disk web01 source name"),
    ("config", [], "config"),
    ("config.vm.xml", 1, "config file 'vm.xml'"),
    ("config.vm.xml.size", -1, "config file 'vm.xml' size"),
    ("config.vm.xml.index", [7], "config file 'vm.xml' chunk list"),
    ("files_index", 1, "files_index"),
    ("files_index.size", "0", "files_index size"),
    ("files_index.index", None, "files_index chunk list"),
    ("files_index.entries", "3", "files_index entries"),
    ("stats", [], "stats"),
    ("stats.seconds", "1", "stats 'seconds'"),
    ("notes", "a note", "notes"),
    ("notes.0", 1, "a note"),
    ("vbfs_version", 1, "vbfs_version"),
]


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    head, _, rest = path.partition(".")
    if head == "config" and rest:  # config file names hold dots
        name = "vm.xml"
        field = rest[len(name) + 1 :]
        if not field:
            doc["config"][name] = value
        else:
            doc["config"][name][field] = value
        return
    parts = path.split(".")
    target: Any = doc
    for p in parts[:-1]:
        target = target[int(p)] if isinstance(target, list) else target[p]
    if isinstance(target, list):
        target[int(parts[-1])] = value
    else:
        target[parts[-1]] = value


def test_a_wrong_type_in_any_field_is_refused_naming_the_field(backed_up: tuple[Repository, str]) -> None:
    repo, snap_id = backed_up
    good = json.loads(_stored(repo, snap_id))
    good["config"] = {"vm.xml": dict(good["files_index"])}  # a config file, so its fields can be spoiled too
    good["notes"] = ["a note"]
    del good["config"]["vm.xml"]["entries"]
    Manifest.from_json(good, snap_id)  # the base of every case loads
    for path, value, named in BAD_FIELDS:
        bad = copy.deepcopy(good)
        _set(bad, path, value)
        with pytest.raises(IntegrityError) as caught:
            Manifest.from_json(bad, snap_id)
        message = str(caught.value)
        assert snap_id in message and named in message, (path, message)
    with pytest.raises(IntegrityError, match="names another snapshot"):
        Manifest.from_json(good, "0" * 32)
    with pytest.raises(IntegrityError, match="is damaged"):
        Manifest.from_json([good], snap_id)


def test_references_name_patch_bases_and_are_what_check_counts(vbfs: Vbfs) -> None:
    repo = Repository.open(str(vbfs.repo), lambda confirm: "")
    hv = TrackedDisk()

    def backup() -> Manifest:
        return BackupRun(repo, plugin_manager(False), index_files=False).run(hv, "g", "tracked://g")  # type: ignore[arg-type]

    full = backup()
    hv.write(1 * MiB + 100, b"A" * 4096)  # a patch of the full backup's chunk 1
    hv.write(6 * MiB, b"B" * 8192)  # a patch of zeros: no base to keep
    inc = backup()
    entries = repo.read_index(inc.disks[0].index)
    own = {entries[i : i + ID_SIZE] for i in range(0, len(entries), ID_SIZE)} - {ZERO_ID}
    base = repo.read_index(full.disks[0].index)[1 * ID_SIZE : 2 * ID_SIZE]
    patches = {cid for cid in own if repo.chunk_patch(cid) is not None}
    assert len(patches) == 2 and base not in own, "the incremental names its base only through a patch record"

    refs = list(inc.references(repo))
    ids = {r.id for r in refs}
    pieces = {bytes.fromhex(p) for p in inc.disks[0].index}
    assert ids == own | pieces | {base}
    assert [r.base_of for r in refs if r.id == base] == [entries[1 * ID_SIZE : 2 * ID_SIZE]]
    assert {r.offset for r in refs if r.id in pieces} == {-1}

    # a caller that listed the patch records gets the same walk without asking about every chunk
    listed = {chunk_name_to_id(n) for n in repo.backend.list("chunks/") if n.endswith(".patch")}

    def from_listing(cid: bytes) -> bytes | None:
        record = repo.chunk_patch(cid) if cid in listed else None
        return None if record is None else record.base

    assert list(inc.references(repo, from_listing)) == refs
    every = ids | {r.id for r in full.references(repo)}
    report = check(repo)
    assert report.ok, report.errors
    assert report.chunks_referenced == len(every)

    # the base lost: still a reference (a collector must keep it), and check names it
    (vbfs.repo / f"chunks/{base.hex()[:2]}/{base.hex()}").unlink()
    assert base in {r.id for r in inc.references(repo)}
    report = check(repo)
    assert any("which is missing" in e and "g@" in e for e in report.errors), report.errors


def test_damaged_chunk_lists_are_told_and_the_walk_goes_on(vbfs: Vbfs) -> None:
    repo = Repository.open(str(vbfs.repo), lambda confirm: "")
    m = BackupRun(repo, plugin_manager(False), index_files=False).run(TrackedDisk(), "g", "tracked://g")  # type: ignore[arg-type]
    piece = m.disks[0].index[0]
    (vbfs.repo / f"chunks/{piece[:2]}/{piece}").unlink()
    told: list[tuple[str, str]] = []
    refs = list(m.references(repo, damaged=lambda where, message: told.append((where, message))))
    assert [r.id.hex() for r in refs] == [piece], "the piece itself is still named"
    assert len(told) == 1 and told[0][0] == "disk d" and "chunk list unreadable" in told[0][1]
    with pytest.raises(IntegrityError, match="g@"):
        list(m.references(repo))
