"""The store's parts on their own: codec, locks, chunk-index arithmetic, the chunk cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vbfs.engine.backup import chunk_indices, chunk_jobs, repository_name
from vbfs.errors import IntegrityError, LockError
from vbfs.sources import Extent
from vbfs.store.backend import LocalBackend
from vbfs.store.cache import ChunkCache
from vbfs.store.codec import Codec
from vbfs.store.locks import EXCLUSIVE, SHARED, RepositoryLock, locked
from vbfs.store.patch import PatchRecord
from vbfs.store.repository import Repository


@pytest.mark.parametrize("encrypted", [False, True])
def test_codec_roundtrip_and_tamper_detection(encrypted: bool) -> None:
    codec = Codec(id_key=os.urandom(32) if encrypted else None, enc_key=os.urandom(32) if encrypted else None)
    for data in (b"x" * 100000, os.urandom(5000)):
        cid = codec.chunk_id(data)
        blob = codec.encode(data, "chunks/aa/name")
        assert codec.open_chunk(blob, cid, "chunks/aa/name") == (False, data)
        for pos in (2, len(blob) // 2, len(blob) - 1):
            bad = bytearray(blob)
            bad[pos] ^= 0x80
            with pytest.raises(IntegrityError):
                codec.open_chunk(bytes(bad), cid, "chunks/aa/name")
    if encrypted:  # an object moved to another name does not authenticate
        blob = codec.encode(b"abc", "chunks/aa/one")
        with pytest.raises(IntegrityError):
            codec.decode(blob, "chunks/aa/two")


def test_chunk_indices() -> None:
    cs = 100
    assert list(chunk_indices([Extent(0, 1)], 1000, cs)) == [0]
    assert list(chunk_indices([Extent(50, 100)], 1000, cs)) == [0, 1]
    assert list(chunk_indices([Extent(0, 100), Extent(100, 1)], 1000, cs)) == [0, 1]
    assert list(chunk_indices([Extent(150, 10), Extent(120, 5)], 1000, cs)) == [1]
    assert list(chunk_indices([Extent(950, 500)], 1000, cs)) == [9]
    assert list(chunk_indices([Extent(0, 1050)], 1050, cs)) == list(range(11))


def test_chunk_jobs_read_only_the_parts_that_changed() -> None:
    cs = 100
    jobs = list(chunk_jobs([Extent(120, 10), Extent(125, 20), Extent(190, 30), Extent(300, 100)], 1000, cs, True))
    assert jobs == [
        (1, (Extent(120, 25), Extent(190, 10))),  # overlapping parts merged, clipped to the chunk
        (2, (Extent(200, 20),)),
        (3, None),  # covered whole: read whole
    ]
    assert list(chunk_jobs([Extent(1020, 10)], 1025, cs, True)) == [(10, (Extent(1020, 5),))]
    assert list(chunk_jobs([Extent(1000, 25)], 1025, cs, True)) == [(10, None)]  # the short last chunk, whole
    assert list(chunk_jobs([Extent(120, 10)], 1000, cs, False)) == [(1, None)]


def test_exclusive_lock_waits_for_shared_and_vice_versa(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path)
    # shared locks coexist; an exclusive one gives way to them
    with locked(backend, SHARED), locked(backend, SHARED), pytest.raises(LockError, match="locked"):
        RepositoryLock(backend, EXCLUSIVE).acquire(timeout=0)
    with locked(backend, EXCLUSIVE), pytest.raises(LockError):
        RepositoryLock(backend, SHARED).acquire(timeout=0.2)
    assert list(backend.list("locks/")) == []


def test_lock_of_a_dead_process_is_stale(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path)
    code = (
        f"import sys, os; sys.path.insert(0, {str(Path.cwd())!r}); from vbfs.store.backend import LocalBackend; "
        "from vbfs.store.locks import RepositoryLock; RepositoryLock(LocalBackend(__import__('pathlib')"
        f".Path({str(tmp_path)!r})), 'exclusive').acquire(); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    names = list(backend.list("locks/"))
    assert len(names) == 1 and json.loads(backend.get(names[0]))["kind"] == "exclusive"
    with locked(backend, SHARED):  # the dead holder's lock is removed, not waited for
        pass
    assert list(backend.list("locks/")) == []


def test_chunk_cache_fetches_once_and_stays_bounded() -> None:
    calls: dict[bytes, int] = {}
    gate = threading.Event()

    def fetch(cid: bytes) -> bytes:
        gate.wait()
        calls[cid] = calls.get(cid, 0) + 1
        time.sleep(0.01)
        return cid * 1000

    cache = ChunkCache(fetch, max_bytes=3500)
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda: results.append(cache.get(b"a"))) for _ in range(8)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join()
    assert calls == {b"a": 1} and results == [b"a" * 1000] * 8
    for c in (b"b", b"c", b"d"):
        cache.get(c)
    cache.get(b"a")  # evicted by b, c, d (3000 bytes + a > 3500): fetched again
    assert calls[b"a"] == 2


def test_fast_ext4_inode_reader_agrees_with_dissect(tmp_path: Path) -> None:
    from tests.conftest import random_bytes
    from vbfs.guestfs.filesystems import ExtGuestFS, _inode_entry
    from vbfs.testing.images import ext4_file, write_tree

    tree = write_tree(tmp_path / "t", {f"d{i}/f{j}": random_bytes(j * 100, i) for i in range(5) for j in range(20)})
    os.symlink("d1/f1", tree / "link")
    os.utime(tree / "d1/f1", ns=(1_600_000_000_123_456_789, 1_700_000_000_987_654_321))
    image = ext4_file(tmp_path / "fs.img", 32 * 1024 * 1024, tree)
    with open(image, "rb") as fh:
        fs = ExtGuestFS(fh, "test")
        compared = 0
        for node in fs.fs.root.iterdir():
            todo = [node]
            while todo:
                n = todo.pop()
                if n.filename in (".", ".."):
                    continue
                fast = fs._fast_entry(int(n.inum), n.filename)
                ino = n.inode
                slow = _inode_entry(
                    fs,
                    n,
                    n.filename,
                    mode=int(ino.i_mode),
                    uid=int(ino.i_uid) | int(ino.i_uid_high) << 16,
                    gid=int(ino.i_gid) | int(ino.i_gid_high) << 16,
                    nlink=int(ino.i_links_count),
                )
                assert fast is not None
                fast.target = slow.target
                assert fast == slow, n.filename
                compared += 1
                if n.filetype == 0o040000:
                    todo.extend(n.iterdir())
        assert compared > 100


def test_ext_listing_matches_dissect_walk(tmp_path: Path) -> None:
    """Our checked directory parser lists exactly what dissect's walk lists, hash-tree folders included."""
    from vbfs.guestfs.filesystems import ExtGuestFS
    from vbfs.testing.images import ext4_file, write_tree

    files = {f"big/entry-{i:05d}-{'x' * (i % 40)}": b"" for i in range(3000)}
    files.update({"small/a": b"1", "small/b": b"2", "sub/dir/deep/file": b"3"})
    tree = write_tree(tmp_path / "t", files)
    os.symlink("../small/a", tree / "sub/link")
    image = ext4_file(tmp_path / "fs.img", 64 * 1024 * 1024, tree)
    with open(image, "rb") as fh:
        fs = ExtGuestFS(fh, "test")
        todo = [fs.root()]
        folders = 0
        while todo:
            entry = todo.pop()
            ours = sorted((e.name, e.ino) for e in fs.listdir(entry))
            theirs = sorted(
                (n.filename, n.inum) for n in fs.fs.get_inode(entry.ino).iterdir() if n.filename not in (".", "..")
            )
            assert ours == theirs
            todo += [e for e in fs.listdir(entry) if e.is_dir]
            folders += 1
        assert folders >= 6
        big = next(e for e in fs.listdir(fs.root()) if e.name == "big")
        assert len(fs.listdir(big)) == 3000


def test_streams_read_back_at_any_offset(tmp_path: Path) -> None:
    """Content-defined chunks of a stream: random reads across chunk boundaries give the original bytes."""
    import random as rnd

    from vbfs.store.objects import StreamFile
    from vbfs.store.repository import Repository

    repo = Repository.init(str(tmp_path / "repo"), "none", lambda confirm: "")
    data = rnd.Random(3).randbytes(9 * 1024 * 1024) + b"tail" * 1000
    with repo.write_session() as session:
        ref, stored = session.put_bytes(data)
        assert ref.size == len(data) and stored > 0
        again, stored_again = session.put_bytes(data)
        assert again == ref and stored_again == 0, "the same stream is stored once"
        session.flush()
    stream = StreamFile(repo, ref, ChunkCache(repo.get_chunk))
    assert len(stream.ids) > 3, "a 9 MiB stream is cut into several content-defined chunks"
    r = rnd.Random(4)
    for _ in range(200):
        off = r.randrange(len(data))
        n = r.randrange(1, 3 * 1024 * 1024)
        assert stream.read(off, n) == data[off : off + n]
    assert b"".join(repo.read_stream(ref)) == data


def test_patch_records_roundtrip_merge_and_refuse_damage() -> None:
    base = bytes(range(256)) * 16  # 4 KiB
    rec = PatchRecord(b"b" * 32, len(base), ((10, b"abc"), (100, b"xyz")))
    assert PatchRecord.from_bytes(rec.to_bytes(), "t") == rec
    assert rec.apply(base)[:13] == base[:10] + b"abc"
    merged = rec.overlay([(12, b"QQQQ"), (200, b"z")])  # overlaps the first piece, adds one
    assert merged.pieces == ((10, b"abQQQQ"), (100, b"xyz"), (200, b"z"))
    assert merged.apply(base) == rec.apply(base)[:12] + b"QQQQ" + rec.apply(base)[16:200] + b"z" + base[201:]
    raw = bytearray(rec.to_bytes())
    with pytest.raises(IntegrityError):
        PatchRecord.from_bytes(bytes(raw[:-1]), "t")  # a piece cut short
    with pytest.raises(IntegrityError):
        rec.apply(base[:-1])


@pytest.mark.parametrize("encryption", ["none", "repokey"])
def test_patched_chunks_read_back_and_cannot_pass_for_full_ones(tmp_path: Path, encryption: str) -> None:
    repo = Repository.init(str(tmp_path / "r"), encryption, lambda confirm: "pw")
    base = os.urandom(64 * 1024)
    session = repo.write_session()
    base_id = session.store_chunk(base).id
    patched = session.put_patch(PatchRecord(base_id, len(base), ((4096, b"\xff" * 100),)))
    cid = patched.id
    assert patched.written > 0 and cid != session.store_chunk(base[:4096] + b"\xff" * 100 + base[4196:]).id
    assert repo.get_chunk(cid) == base[:4096] + b"\xff" * 100 + base[4196:]
    assert repo.chunk_patch(base_id) is None and repo.chunk_patch(cid) is not None
    assert session.chunk_patch(base_id) is None and session.chunk_patch(cid) == repo.chunk_patch(cid)
    again = session.put_patch(PatchRecord(base_id, len(base), ((4096, b"\xff" * 100),)))
    assert again.outcome == "dedup" and again.written == 0, "deduplicated"
    # a patch whose base is a patch is refused, and a missing base is an error, not zeros
    chained = session.put_patch(PatchRecord(cid, len(base), ((0, b"x"),))).id
    with pytest.raises(IntegrityError, match="patch as its base"):
        repo.get_chunk(chained)
    orphan = session.put_patch(PatchRecord(b"\x01" * 32, len(base), ((0, b"x"),))).id
    with pytest.raises(IntegrityError):
        repo.get_chunk(orphan)
    session.close()


def test_guest_names_that_cannot_be_folders_are_kept_under_a_safe_name() -> None:
    assert repository_name("web01") == "web01"
    assert repository_name("web _old_") == "web _old_"
    for name, readable in (("web (old)", "web _old_"), ("db/primary", "db_primary"), ("..", ".."), ("@home", "_@home")):
        kept = repository_name(name)
        assert kept.startswith(readable + "~") and len(kept) == len(readable) + 17, kept
    assert repository_name("").startswith("guest~")
    assert repository_name("db/primary") != repository_name("db\nprimary")


def test_the_write_path_stands_on_sources_and_store_alone() -> None:
    """A backup (the job runner, the engine, the guest-file index) loads neither the tree, nor the catalog, nor
    restore: what it needs of a snapshot comes from the repository."""
    code = (
        "import sys, vbfs.engine.jobs\n"
        "print(sorted(m for m in sys.modules if m in ('vbfs.vfs', 'vbfs.catalog', 'vbfs.restore', 'vbfs.fuse')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
