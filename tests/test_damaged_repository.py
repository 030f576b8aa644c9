"""Damaged and tampered repositories: every kind of object flipped or cut short, in both modes.

One repository per mode is built once (two guests whose snapshots share no object) and copied for each case. For
each damage: `check --verify-data` reports it (exit 3, no internal error), a restore returns the right bytes or
one line of error, and the other snapshot stays listed and restores byte for byte. Config, key, lock and catalog
damage, tampered configs, vanished manifests and manifests that cannot be indexed have their own tests below.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import MiB, Mount, Vbfs, copy_sparse, random_bytes, sha256
from vbfs.catalog import Catalog
from vbfs.engine.check import check
from vbfs.errors import IntegrityError, LockError, VbfsError
from vbfs.store.codec import Codec
from vbfs.store.config import validate_config
from vbfs.store.keys import canonical_json, unlock_key
from vbfs.store.locks import SHARED, RepositoryLock
from vbfs.store.repository import Repository, chunk_name_to_id, chunk_object_name, patch_object_name

PASSPHRASE = "correct horse"
GUESTS = ("web01", "other01")


def _env(root: Path, repo: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VBFS_")}
    env.update(VBFS_REPO=str(repo), VBFS_PASSPHRASE=PASSPHRASE, XDG_CACHE_HOME=str(root / "cache"))
    return env


def _small_image(path: Path, seed: int = 1) -> Path:
    """A disk of random bytes without a filesystem: quick to back up, restore and mount."""
    with open(path, "wb") as f:
        f.write(random_bytes(2 * MiB, seed))
        f.truncate(4 * MiB)
    return path


def _no_internal_error(proc: subprocess.CompletedProcess[str]) -> None:
    assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> None:
    _no_internal_error(proc)
    assert proc.returncode not in (0, 1), proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("vbfs: error:")]
    assert len(errors) == 1, proc.stderr


@dataclass
class Built:
    mode: str
    root: Path
    images: dict[str, Path]
    snaps: dict[str, str]  # guest -> snapshot id
    owned: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # guest -> kind -> object names

    def copy(self, dest: Path) -> Vbfs:
        subprocess.run(["cp", "-a", str(self.root / "repo"), str(dest / "repo")], check=True)
        if (self.root / "cache").exists():
            subprocess.run(["cp", "-a", str(self.root / "cache"), str(dest / "cache")], check=True)
        return Vbfs(dest / "repo", _env(dest, dest / "repo"))


def _objects_of(repo: Repository, snap_id: str) -> dict[str, list[str]]:
    m = repo.load_manifest(snap_id)
    out: dict[str, set[str]] = {"manifest": {f"snapshots/{snap_id}"}, "piece": set(), "chunk": set(), "patch": set()}

    def chunk(cid: bytes) -> None:
        if repo.backend.exists(chunk_object_name(cid)):
            out["chunk"].add(chunk_object_name(cid))
        elif repo.backend.exists(patch_object_name(cid)):
            out["patch"].add(patch_object_name(cid))
            record = repo.chunk_patch(cid)
            assert record is not None
            if any(record.base):
                out["chunk"].add(chunk_object_name(record.base))

    for d in m.disks:
        out["piece"].update(chunk_object_name(bytes.fromhex(p)) for p in d.index)
        raw = repo.read_index(d.index)
        for i in range(0, len(raw), 32):
            if any(raw[i : i + 32]):
                chunk(raw[i : i + 32])
    for _item, ref in m.streams():
        out["piece"].update(chunk_object_name(bytes.fromhex(p)) for p in ref.index)
        for cid, _ in repo.stream_chunks(ref):
            chunk(cid)
    return {k: sorted(v) for k, v in out.items()}


@pytest.fixture(scope="module", params=["none", "repokey"])
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, template_image: Path) -> Built:
    mode = request.param
    root = tmp_path_factory.mktemp(f"damaged-{mode}")
    v = Vbfs(root / "repo", _env(root, root / "repo"))
    v.init(mode)
    images = {"web01": copy_sparse(template_image, root / "web01.raw")}
    other = root / "other01.raw"
    with open(other, "wb") as f:  # random data, and a chunk written in part: stored as a patch record
        f.write(random_bytes(3 * MiB + 5000, 99))
        f.truncate(8 * MiB)
    images["other01"] = other
    snaps = {}
    for guest, image in images.items():
        snaps[guest] = json.loads(v("backup", f"image://{image}", "--json").stdout)["id"]
    repo = Repository.open(str(root / "repo"), lambda confirm: PASSPHRASE)
    b = Built(mode, root, images, snaps)
    for guest, sid in snaps.items():
        b.owned[guest] = _objects_of(repo, sid)
    a, o = ({n for names in b.owned[g].values() for n in names} for g in GUESTS)
    assert not a & o, "the two snapshots share no object, so damage to one leaves the other whole"
    assert b.owned["other01"]["patch"], "the partly written chunk is a patch record"
    return b


def _flip(path: Path, seed: str) -> None:
    data = bytearray(path.read_bytes())
    rng = random.Random(seed)
    pos = rng.randrange(len(data))
    data[pos] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


def _truncate(path: Path, seed: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: random.Random(seed).randrange(len(data))])


def _run_all(v: Vbfs, commands: list[tuple[str, ...]]) -> list[subprocess.CompletedProcess[str]]:
    """Read-only commands at once (each takes a shared lock), to keep the suite near a minute."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "vbfs.cli", *c], env=v.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for c in commands
    ]
    out = []
    for c, p in zip(commands, procs, strict=True):
        stdout, stderr = p.communicate(timeout=120)
        out.append(subprocess.CompletedProcess(list(c), p.returncode, stdout, stderr))
    return out


# (kind of object, damage, guest that owns it)
OBJECT_CASES = [
    ("chunk", "flip", "web01"),
    ("chunk", "truncate", "other01"),
    ("patch", "flip", "other01"),
    ("patch", "truncate", "other01"),
    ("piece", "flip", "other01"),
    ("piece", "truncate", "web01"),
    ("manifest", "flip", "web01"),
    ("manifest", "truncate", "other01"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "damage", "owner"), OBJECT_CASES, ids=["-".join(c) for c in OBJECT_CASES])
def test_damaged_object(built: Built, tmp_path: Path, kind: str, damage: str, owner: str) -> None:
    v = built.copy(tmp_path)
    other = next(g for g in GUESTS if g != owner)
    names = built.owned[owner][kind]
    seed = f"{built.mode}-{kind}-{damage}"
    if kind == "chunk":  # one the disk needs, so that restoring the disk must notice
        victim = max((v.repo / n for n in names), key=lambda p: p.stat().st_size)
    else:
        victim = v.repo / random.Random(seed).choice(names)
    (_flip if damage == "flip" else _truncate)(victim, seed)

    checked, listed, mine, theirs = _run_all(
        v,
        [
            ("check", "--verify-data"),
            ("snapshots", "--json"),
            ("restore", f"{owner}@{built.snaps[owner]}:/disks/{owner}.img", str(tmp_path / "mine.img")),
            ("restore", f"{other}@{built.snaps[other]}:/disks/{other}.img", str(tmp_path / "theirs.img")),
        ],
    )
    _no_internal_error(checked)
    assert checked.returncode == 3, checked.stderr
    assert any(
        line.startswith("vbfs: damaged:") and built.snaps[owner][:8] in line for line in checked.stderr.splitlines()
    )
    _no_internal_error(listed)
    assert listed.returncode == 0, listed.stderr
    ids = {s["id"] for s in json.loads(listed.stdout)}
    assert built.snaps[other] in ids
    if kind != "manifest":
        assert built.snaps[owner] in ids, "damaged data does not hide its snapshot"
    if mine.returncode == 0:
        assert sha256(tmp_path / "mine.img") == sha256(built.images[owner]), "a restore never returns wrong data"
    else:
        _one_line_error(mine)
        assert not (tmp_path / "mine.img").exists()
    assert theirs.returncode == 0, theirs.stderr
    assert sha256(tmp_path / "theirs.img") == sha256(built.images[other])


def test_every_bit_flip_of_an_object_is_caught(built: Built, tmp_path: Path) -> None:
    """Seeded single-bit flips of manifests, patch records, chunk-list pieces and chunks: each is an
    IntegrityError on read (the checksum or tag), never an object that loads with changed contents."""
    repo = Repository.open(str(built.root / "repo"), lambda confirm: PASSPHRASE)

    def cid_of(name: str) -> bytes:
        cid = chunk_name_to_id(name)
        assert cid is not None and repo.codec.open_chunk(repo.backend.get(name), cid, name), "intact, it reads"
        return cid

    rng = random.Random(f"sweep-{built.mode}")
    tried = 0
    for guest in GUESTS:
        for kind in ("manifest", "patch", "piece", "chunk"):
            for name in built.owned[guest][kind][:3]:
                blob = repo.backend.get(name)
                for _ in range(40):
                    bad = bytearray(blob)
                    bad[rng.randrange(len(bad))] ^= 1 << rng.randrange(8)
                    with pytest.raises(IntegrityError):
                        if kind == "manifest":
                            repo.codec.decode(bytes(bad), name)
                        else:
                            repo.codec.open_chunk(bytes(bad), cid_of(name), name)
                    tried += 1
    assert tried > 400
    # and an object moved under another name is refused in both modes
    manifest = built.owned["web01"]["manifest"][0]
    other = built.owned["other01"]["manifest"][0]
    with pytest.raises(IntegrityError):
        repo.codec.decode(repo.backend.get(manifest), other)


def test_check_survives_damaged_manifests(built: Built, tmp_path: Path) -> None:
    """`check` (in the process, many flips) reports each damaged manifest as an error line and checks the other."""
    v = built.copy(tmp_path)
    repo = Repository.open(str(v.repo), lambda confirm: PASSPHRASE)
    path = v.repo / built.owned["web01"]["manifest"][0]
    original = path.read_bytes()
    rng = random.Random(f"check-{built.mode}")
    for _ in range(25):
        bad = bytearray(original)
        for _ in range(rng.randrange(1, 4)):
            bad[rng.randrange(len(bad))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(bad))
        report = check(repo, verify_data=False)
        assert report.snapshots == 1 and len(report.errors) == 1, report.errors
        assert built.snaps["web01"] in report.errors[0]
    path.write_bytes(original)
    assert check(repo).ok


def _config(v: Vbfs) -> dict[str, object]:
    return dict(json.loads((v.repo / "config").read_text()))


def _write_config(v: Vbfs, config: dict[str, object], reseal: bool = False) -> None:
    if reseal:  # what an attacker without the key can do: a fresh plaintext checksum
        import blake3

        config = {k: val for k, val in config.items() if k not in ("mac", "checksum")}
        config["checksum"] = blake3.blake3(canonical_json(config)).hexdigest()
    (v.repo / "config").write_text(json.dumps(config))


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_config_and_key(built: Built, tmp_path: Path, damage: str) -> None:
    """Without its config (or key) nothing can be read: every command says so in one line and writes nothing."""
    victims = ["config"] + (["keys/repokey"] if built.mode == "repokey" else [])
    for victim in victims:
        v = built.copy(tmp_path)
        for seed in range(3):
            (_flip if damage == "flip" else _truncate)(v.repo / victim, f"{built.mode}-{victim}-{seed}")
            for proc in _run_all(
                v, [("check",), ("snapshots",), ("restore", "web01@latest:/disks/web01.img", str(tmp_path / "x"))]
            ):
                _one_line_error(proc)
                assert proc.returncode == 3, proc.stderr
                assert "damaged" in proc.stderr or "does not match" in proc.stderr, proc.stderr
            assert not (tmp_path / "x").exists()
            shutil.copy(built.root / "repo" / victim, v.repo / victim)
        shutil.rmtree(v.repo)
        if (tmp_path / "cache").exists():
            shutil.rmtree(tmp_path / "cache")


BAD_FIELDS = [
    ("id", "../../x"),
    ("id", "/tmp/elsewhere"),
    ("id", "ABCDEF0123456789ABCDEF0123456789"),
    ("chunk_size", 1000),
    ("chunk_size", "1048576"),
    ("chunk_size", 2**40),
    ("hash", "md5"),
    ("compression", "lz4"),
    ("encryption", "rot13"),
    ("zstd_level", 99),
    ("zstd_level", 3.5),
    ("cdc", {"algorithm": "fastcdc2020", "min": 4 * MiB, "avg": 1 * MiB, "max": 8 * MiB}),
    ("cdc", [1, 2]),
    ("version", "2"),
    ("extra", 1),
]


def test_config_fields_are_validated(make_vbfs: Callable[..., Vbfs], tmp_path: Path) -> None:
    """Each bad field, with a valid checksum (so only the validation can refuse it): one line naming the field;
    an id that is a path never makes vbfs write there."""
    v = make_vbfs()
    v.init("none")
    good = _config(v)
    cached = sorted(p for p in (tmp_path / "cache").rglob("*") if p.is_file())  # what init remembered
    for field_name, value in BAD_FIELDS:
        with pytest.raises(IntegrityError, match=field_name):
            validate_config({**good, field_name: value}, "repo")
    for value in ("../../x", "/tmp/elsewhere-vbfs-test"):
        _write_config(v, {**good, "id": value}, reseal=True)
        for proc in _run_all(v, [("snapshots",), ("check",), ("mount", str(tmp_path))]):
            _one_line_error(proc)
            assert "id is not 32 lowercase hex digits" in proc.stderr, proc.stderr
        assert not (tmp_path / "x").exists() and not Path("/tmp/elsewhere-vbfs-test").exists()
        assert sorted(p for p in (tmp_path / "cache").rglob("*") if p.is_file()) == cached


def test_encrypted_config_cannot_be_turned_into_plaintext(make_vbfs: Callable[..., Vbfs], tmp_path: Path) -> None:
    image = _small_image(tmp_path / "secret.raw")
    v = make_vbfs()
    v.init("repokey")
    v("backup", f"image://{image}")
    original = _config(v)
    # any changed field breaks the MAC
    for field_name, value in (("zstd_level", 4), ("chunk_size", 2 * MiB), ("id", "0" * 32)):
        _write_config(v, {**original, field_name: value})
        proc = v("snapshots", check=False)
        _one_line_error(proc)
        assert "does not match the repository's key" in proc.stderr
    # "encryption": "none" with a fresh checksum, beside the key file
    plain = {**original, "encryption": "none", "hash": "blake3"}
    _write_config(v, plain, reseal=True)
    for args in (("backup", f"image://{image}"), ("snapshots",)):
        proc = v(*args, check=False)
        _one_line_error(proc)
        assert "holds a key" in proc.stderr
    # ... with the key file gone too: this user's cache remembers that the repository was encrypted
    shutil.move(v.repo / "keys", tmp_path / "keys-aside")
    proc = v("backup", f"image://{image}", check=False)
    _one_line_error(proc)
    assert "was encrypted when this user last used it" in proc.stderr
    # ... and a user without that memory: the objects themselves say they are encrypted
    fresh = dict(v.env, XDG_CACHE_HOME=str(tmp_path / "other-cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "vbfs.cli", "backup", f"image://{image}"], env=fresh, capture_output=True, text=True
    )
    _one_line_error(proc)
    assert "its objects are" in proc.stderr
    assert len(list((v.repo / "snapshots").iterdir())) == 1, "no backup landed"
    shutil.move(tmp_path / "keys-aside", v.repo / "keys")
    _write_config(v, original)
    assert len(json.loads(v("snapshots", "--json").stdout)) == 1


@pytest.mark.parametrize("junk", [b"[1,2]", b'{"kind": "shared", "pid": "12", "host": 3, "time": "x"}', b"\xff\xfe"])
def test_malformed_lock_is_set_aside(vbfs: Vbfs, tmp_path: Path, junk: bytes, mounted: Callable[[Vbfs], Mount]) -> None:
    image = _small_image(tmp_path / "web01.raw")
    vbfs("backup", f"image://{image}")
    lock = vbfs.repo / "locks" / "shared-0123456789abcdef"
    for args in (("check",), ("restore", "web01@latest:/disks/web01.img", str(tmp_path / "out.img"))):
        lock.write_bytes(junk)
        proc = vbfs(*args, check=False)
        assert proc.returncode == 0, proc.stderr
        warnings = [line for line in proc.stderr.splitlines() if "not a lock record" in line]
        assert len(warnings) == 1 and warnings[0].startswith("vbfs: warning: removed locks/shared-"), proc.stderr
        assert list((vbfs.repo / "locks").iterdir()) == [], "the junk is gone and no lock was left behind"
    assert sha256(tmp_path / "out.img") == sha256(image)
    if junk != b"[1,2]":
        return
    lock.write_bytes(junk)  # and a mount, which holds its lock while it is mounted
    m = mounted(vbfs)
    assert (m.path / "web01" / "latest" / "vm.json").read_bytes()


def test_failed_lock_acquisition_leaves_no_lock(tmp_path: Path) -> None:
    from vbfs.store.backend import LocalBackend

    class FailingList(LocalBackend):
        def list(self, prefix: str) -> Iterator[str]:
            raise VbfsError("the storage went away")

    backend = FailingList(tmp_path)
    for _ in range(3):
        with pytest.raises(VbfsError):
            RepositoryLock(backend, SHARED).acquire()
    assert not any((tmp_path / "locks").iterdir())
    with pytest.raises(LockError):  # a conflicting lock: given back before waiting, none left at the end
        good = LocalBackend(tmp_path)
        RepositoryLock(good, "exclusive").acquire()
        RepositoryLock(good, SHARED).acquire(timeout=0.1)
    assert len(list((tmp_path / "locks").iterdir())) == 1


def _wipe_catalog(path: Path, data: bytes) -> None:
    for extra in ("-wal", "-shm"):
        Path(f"{path}{extra}").unlink(missing_ok=True)
    path.write_bytes(data)


@pytest.mark.parametrize("mode", ["none", "repokey"])
def test_catalog_that_is_not_a_database(make_vbfs: Callable[..., Vbfs], tmp_path: Path, mode: str) -> None:
    image = _small_image(tmp_path / "web01.raw")
    v = make_vbfs()
    v.init(mode)
    v("backup", f"image://{image}")
    before = json.loads(v("snapshots", "--json").stdout)
    path = v.repo / "catalog.sqlite" if mode == "none" else next((tmp_path / "cache").rglob("catalog.sqlite"))
    for args in (("snapshots", "--json"), ("catalog", "rebuild"), ("backup", f"image://{image}")):
        _wipe_catalog(path, b"this is not an SQLite database\n" * 200)
        proc = v(*args, check=False)
        _no_internal_error(proc)
        assert proc.returncode == 0, proc.stderr
        aside = [line for line in proc.stderr.splitlines() if "moved it aside" in line]
        assert len(aside) == 1 and "catalog.sqlite.damaged-" in aside[0], proc.stderr
    assert list(path.parent.glob("catalog.sqlite.damaged-*"))
    after = json.loads(v("snapshots", "--json").stdout)
    assert [s["id"] for s in after][: len(before)] == [s["id"] for s in before] and len(after) == 2


@pytest.mark.slow
def test_catalog_bit_flips(built: Built, tmp_path: Path) -> None:
    """Flipped bits in the catalog: no command fails oddly, `check` repairs what differs from the manifests,
    and every snapshot is then listed and restorable."""
    if built.mode != "none":
        pytest.skip("the plaintext repository keeps its catalog inside; one mode is enough")
    v = built.copy(tmp_path)
    path = v.repo / "catalog.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    original = path.read_bytes()
    rng = random.Random("catalog")
    for round_ in range(3):
        bad = bytearray(original)
        for _ in range(20):
            bad[rng.randrange(len(bad))] ^= 1 << rng.randrange(8)
        _wipe_catalog(path, bytes(bad))
        listed, checked = v("snapshots", "--json", check=False), v("check", check=False)
        for proc in (listed, checked):
            _no_internal_error(proc)
            assert proc.returncode in (0, 2, 3), proc.stderr
        ids = {s["id"] for s in json.loads(v("snapshots", "--json").stdout)}
        assert set(built.snaps.values()) <= ids, round_
        guest = GUESTS[round_ % 2]
        out = tmp_path / f"r{round_}.img"
        v("restore", f"{guest}@{built.snaps[guest]}:/disks/{guest}.img", str(out))
        assert sha256(out) == sha256(built.images[guest])


def test_vanished_snapshot_is_reported_until_acknowledged(vbfs: Vbfs, tmp_path: Path) -> None:
    image = _small_image(tmp_path / "web01.raw")
    ids = [json.loads(vbfs("backup", f"image://{image}", "--json").stdout)["id"] for _ in range(3)]
    assert vbfs("check").returncode == 0
    (vbfs.repo / "snapshots" / ids[1]).unlink()  # deleted behind vbfs's back: no forget command did it
    for args in (("snapshots",), ("snapshots", "--json"), ("ls", "web01@latest")):
        proc = vbfs(*args)
        assert "web01@" in proc.stderr and ids[1] in proc.stderr and "disappeared" in proc.stderr, proc.stderr
    assert [s["id"] for s in json.loads(vbfs("snapshots", "--json").stdout)] == [ids[0], ids[2]]
    assert "rebuilt: 2 snapshot(s)" in vbfs("catalog", "rebuild").stdout  # a rebuild does not forget it
    for _ in range(2):
        proc = vbfs("check", "--json", check=False)
        assert proc.returncode == 3
        assert any(ids[1] in e and "disappeared" in e for e in json.loads(proc.stdout)["errors"])
    _one_line_error(vbfs("check", "--acknowledge-missing", "ffff", check=False))
    ack = vbfs("check", "--acknowledge-missing", ids[1][:8])
    assert "acknowledged" in ack.stderr and ids[1] in ack.stderr
    assert vbfs("check").returncode == 0
    assert "disappeared" not in vbfs("snapshots").stderr


def test_a_manifest_deleted_with_the_catalog_is_still_reported(vbfs: Vbfs, tmp_path: Path) -> None:
    """A plaintext repository keeps its catalog inside: whoever deletes a manifest can delete or garble the
    catalog too. The user's cache still knows the snapshot, so its disappearance is reported."""
    image = _small_image(tmp_path / "web01.raw")
    ids = [json.loads(vbfs("backup", f"image://{image}", "--json").stdout)["id"] for _ in range(2)]
    (vbfs.repo / "snapshots" / ids[0]).unlink()
    for suffix in ("", "-wal", "-shm"):
        (vbfs.repo / f"catalog.sqlite{suffix}").unlink(missing_ok=True)
    proc = vbfs("snapshots")
    assert ids[0] in proc.stderr and "disappeared" in proc.stderr, proc.stderr
    assert vbfs("check", check=False).returncode == 3
    (vbfs.repo / "catalog.sqlite").write_bytes(b"garbage" * 100)  # damaged instead of deleted: the same
    proc = vbfs("check", "--json", check=False)
    assert proc.returncode == 3 and any(ids[0] in e for e in json.loads(proc.stdout)["errors"]), proc.stdout
    vbfs("check", "--acknowledge-missing", ids[0][:8])
    assert vbfs("check").returncode == 0
    for suffix in ("", "-wal", "-shm"):
        (vbfs.repo / f"catalog.sqlite{suffix}").unlink(missing_ok=True)
    assert vbfs("check").returncode == 0  # acknowledged is acknowledged, whatever happens to the catalog


def _second_manifest(repo: Repository, snap_id: str, rows: list[object]) -> str:
    """A manifest like ``snap_id``'s with another id and name and a guest-file index holding ``rows``."""
    import secrets

    m = repo.load_manifest(snap_id)
    with repo.write_session() as session:
        ref, _ = session.put_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows))
        m = dataclasses.replace(m, id=secrets.token_hex(16), name=m.name + "-9", files_index=ref)
        session.commit(m)
    return m.id


def test_manifest_that_cannot_be_indexed_stops_nothing(
    vbfs: Vbfs, tmp_path: Path, template_image: Path, mounted: Callable[[Vbfs], Mount]
) -> None:
    image = copy_sparse(template_image, tmp_path / "web01.raw")
    first = json.loads(vbfs("backup", f"image://{image}", "--json").stdout)
    repo = Repository.open(str(vbfs.repo), lambda confirm: "")
    rows = [
        ["web01/p1/huge", "f", 2**63, 0, 0o100644],
        ["web01/p1/negative", "f", -1, 0, 0o100644],
        ["web01/p1/mode", "f", 1, 0, 2**40],
        ["web01/p1/ok", "f", 10, 1_700_000_000_000_000_000, 0o100644],
        "not a row",
    ]
    bad = _second_manifest(repo, first["id"], rows)
    listed = vbfs("snapshots", "--json")
    assert "left out" in listed.stderr, listed.stderr
    assert {s["id"] for s in json.loads(listed.stdout)} == {first["id"], bad}
    found = json.loads(vbfs("find", "ok", "--json").stdout)
    assert any(f["path"] == "/files/web01/p1/ok" for f in found), "the good rows of the bad index are kept"
    for sid in (first["id"], bad):
        vbfs("ls", f"web01@{sid}:/disks")
        vbfs("restore", f"web01@{sid}:/disks/web01.img", str(tmp_path / f"{sid}.img"))
        assert sha256(tmp_path / f"{sid}.img") == sha256(image)
    assert "2 snapshot(s)" in vbfs("catalog", "rebuild").stdout
    m = mounted(vbfs)
    assert len([p for p in (m.path / "web01").iterdir() if p.name != "latest"]) == 2
    other = _small_image(tmp_path / "db01.raw", 2)
    vbfs("backup", f"image://{other}")
    assert len(json.loads(vbfs("snapshots", "--json").stdout)) == 3
    # the backup's own path: rows out of range never make Catalog.add fail after the manifest landed
    cat = Catalog(tmp_path / "c.sqlite")
    warnings = cat.add(repo.load_manifest(bad), [("a", "f", 2**63, 0, 0), ("b", "f", 1, 2**64, 0), ("c", "f", 1, 0, 0)])
    assert len(warnings) == 1 and "2 guest-file index row(s)" in warnings[0]
    assert [s["id"] for s in cat.snapshots()] == [bad] and list(cat.files_of(bad)) == ["c"]


def _to_format_1(repo_dir: Path) -> None:
    """Rewrite a repository as vbfs wrote it before objects had checksums (format version 1)."""
    repo = Repository.open(str(repo_dir), lambda confirm: PASSPHRASE)
    key = unlock_key((repo_dir / "keys/repokey").read_bytes(), PASSPHRASE) if repo.encrypted else None
    old = Codec(id_key=key and key.id_key, enc_key=key and key.enc_key, object_format=1)
    for name in [*repo.backend.list("chunks/"), *repo.backend.list("snapshots/")]:
        is_patch, data = repo.codec._open(repo.backend.get(name), name)
        (repo_dir / name).write_bytes(old.encode(data, name, patch=is_patch))
    config = {k: v for k, v in repo.config.items() if k not in ("mac", "checksum")}
    (repo_dir / "config").write_text(json.dumps({**config, "version": 1}))
    if key is not None:
        doc = json.loads((repo_dir / "keys/repokey").read_text())
        del doc["checksum"]
        (repo_dir / "keys/repokey").write_text(json.dumps(doc))


def test_format_1_repositories_are_read_not_written(built: Built, tmp_path: Path) -> None:
    """Repositories written before objects had checksums: listed, checked and restored; never backed up to."""
    v = built.copy(tmp_path)
    (v.repo / "catalog.sqlite").unlink(missing_ok=True)
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
    _to_format_1(v.repo)
    assert json.loads(v("check", "--verify-data", "--json").stdout)["ok"]
    assert {s["id"] for s in json.loads(v("snapshots", "--json").stdout)} == set(built.snaps.values())
    v("restore", "other01@latest:/disks/other01.img", str(tmp_path / "o.img"))
    assert sha256(tmp_path / "o.img") == sha256(built.images["other01"])
    proc = v("backup", f"image://{built.images['other01']}", check=False)
    _one_line_error(proc)
    assert "format version 1" in proc.stderr
    assert len(list((v.repo / "snapshots").iterdir())) == 2
    chunk = max((v.repo / n for n in built.owned["other01"]["chunk"]), key=lambda p: p.stat().st_size)
    _flip(chunk, "format-1")
    assert v("check", "--verify-data", check=False).returncode == 3, "chunks are still checked against their ids"


def test_a_config_downgraded_to_format_1_is_refused(built: Built, tmp_path: Path) -> None:
    """Format 1 configs carry no seal: setting "version": 1 (and dropping the seal) must not make an edited config
    acceptable. This user has seen the repository as format 2, so the config is refused; a user who has not
    (no cache) is told the config was downgraded when the first object is read, never that snapshots are damaged."""
    v = built.copy(tmp_path)
    config = json.loads((v.repo / "config").read_text())
    config = {k: val for k, val in config.items() if k not in ("mac", "checksum")}
    (v.repo / "config").write_text(json.dumps({**config, "version": 1, "zstd_level": 19}))
    for args in (("snapshots",), ("check",), ("restore", "other01@latest:/disks/other01.img", str(tmp_path / "o"))):
        proc = v(*args, check=False)
        _one_line_error(proc)
        assert proc.returncode == 3 and "downgraded or replaced" in proc.stderr, proc.stderr
    shutil.rmtree(tmp_path / "cache")
    (v.repo / "catalog.sqlite").unlink(missing_ok=True)
    proc = v("check", check=False)
    assert proc.returncode == 3 and "downgraded or replaced" in proc.stderr, proc.stderr
    _no_internal_error(proc)
