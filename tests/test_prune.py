"""Retention through the real CLI: prune, forget, gc, protect and unprotect as a user sees them (what stays, what
goes, what still restores and mounts, and how much space comes back)."""

from __future__ import annotations

import dataclasses
import json
import secrets
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from tests.conftest import MiB, Mount, Vbfs, copy_sparse, random_bytes, sha256
from vbfs.store.manifest import format_time, snapshot_name
from vbfs.store.repository import Repository

BLOB = "srv/data/blob.bin"
HEAD = 3 * MiB


def du(path: Path) -> int:
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


def snapshots(vbfs: Vbfs, guest: str | None = None) -> list[dict[str, str]]:
    args = ["snapshots", "--json"] + (["--guest", guest] if guest else [])
    return list(json.loads(vbfs(*args).stdout))


def blob_offset(image: Path) -> int:
    """Where the template's blob.bin starts on the disk (its first HEAD bytes are one run of blocks)."""
    data = image.read_bytes()
    blob = random_bytes(6 * MiB, 1)
    offset = data.find(blob[:4096])
    assert offset > 0 and data[offset : offset + HEAD] == blob[:HEAD], "blob.bin starts with one run of blocks"
    return offset


def rewrite_blob(image: Path, offset: int, seed: int) -> bytes:
    """Overwrite the first HEAD bytes of blob.bin in place with new content; the file's new content."""
    head = random_bytes(HEAD, seed)
    with open(image, "r+b") as f:
        f.seek(offset)
        f.write(head)
    return head + random_bytes(6 * MiB, 1)[HEAD:]


def guest_file(root: Path, rel: str) -> Path:
    hits = list((root / "files").glob(f"*/*/{rel}"))
    assert len(hits) == 1, f"{rel} under {root / 'files'}: {hits}"
    return hits[0]


def test_prune_keep_last_frees_space_and_keeps_snapshots_whole(
    vbfs: Vbfs, template_image: Path, tmp_path: Path, mounted: Callable[[Vbfs], Mount]
) -> None:
    image = copy_sparse(template_image, tmp_path / "web01.raw")
    offset = blob_offset(image)
    versions: dict[str, tuple[str, bytes]] = {}  # snapshot id -> (disk sha256, blob.bin content)
    for seed in range(10, 20):
        blob = rewrite_blob(image, offset, seed)
        out = json.loads(vbfs("backup", f"image://{image}", "--json").stdout)
        versions[out["id"]] = (sha256(image), blob)
    before = snapshots(vbfs)
    assert len(before) == 10
    size_before = du(vbfs.repo)

    dry = vbfs("prune", "--keep-last", "3", "--dry-run")
    assert dry.stdout.count("would remove ") >= 7, dry.stdout
    assert "3 kept, 7 would remove" in dry.stdout
    assert snapshots(vbfs) == before
    assert du(vbfs.repo) == size_before

    out = json.loads(vbfs("prune", "--keep-last", "3", "--json").stdout)
    assert [r["reasons"] for r in out["kept"]] == [["last 1"], ["last 2"], ["last 3"]]
    assert len(out["removed"]) == 7
    assert out["gc"]["bytes_freed"] > 0
    left = snapshots(vbfs)
    assert [s["id"] for s in left] == [s["id"] for s in before[-3:]]
    size_after = du(vbfs.repo)
    assert size_after < size_before - 7 * 2 * MiB, (size_before, size_after)  # each version had 3 MiB of its own
    assert vbfs("check", "--verify-data").returncode == 0

    for s in left:
        target = tmp_path / f"restored-{s['id'][:8]}.img"
        vbfs("restore", f"web01@{s['id']}:/disks/web01.img", str(target))
        assert sha256(target) == versions[s["id"]][0]
        target.unlink()
    m = mounted(vbfs)
    for s in left:
        assert guest_file(m.path / "web01" / s["name"], BLOB).read_bytes() == versions[s["id"]][1]

    gc = vbfs("gc")  # nothing is left to collect after prune
    assert "freed" in gc.stdout


# ---- every keep rule on two years of snapshots --------------------------------------------------------------------

# Newest first, UTC. 2026-03-10 is a Tuesday of ISO week 11 (2026-03-09 its Monday), 2026-03-03 is in week 10 and
# 2026-03-01 (a Sunday) in week 9; 2024-12-30 belongs to ISO week 1 of 2025 but to the year 2024.
TIMES = [
    "2026-03-10 12:30",
    "2026-03-10 12:10",
    "2026-03-10 11:00",
    "2026-03-10 08:00",
    "2026-03-09 22:00",
    "2026-03-09 12:30",  # exactly one day before the newest: within 1d
    "2026-03-03 10:00",
    "2026-03-01 10:00",
    "2026-02-20 10:00",
    "2026-02-02 10:00",
    "2026-01-15 10:00",
    "2025-12-31 23:00",
    "2025-12-01 10:00",
    "2025-11-11 10:00",
    "2025-07-04 10:00",
    "2025-07-01 10:00",
    "2025-03-15 10:00",
    "2025-01-02 10:00",
    "2024-12-30 10:00",
    "2024-12-25 10:00",
    "2024-10-10 10:00",
    "2024-06-06 10:00",
    "2024-03-03 10:00",
    "2024-03-02 10:00",
    "2024-03-01 10:00",
]

# --keep-last 3 --keep-hourly 3 --keep-daily 3 --keep-weekly 3 --keep-monthly 4 --keep-yearly 3 --keep-within 1d,
# worked out by hand: each rule on its own, newest first, the first snapshot of each new period counts.
EXPECTED_KEPT = {
    "2026-03-10 12:30": ["last 1", "within 1d", "hourly 1", "daily 1", "weekly 1", "monthly 1", "yearly 1"],
    "2026-03-10 12:10": ["last 2", "within 1d"],
    "2026-03-10 11:00": ["last 3", "within 1d", "hourly 2"],
    "2026-03-10 08:00": ["within 1d", "hourly 3"],
    "2026-03-09 22:00": ["within 1d", "daily 2"],
    "2026-03-09 12:30": ["within 1d"],
    "2026-03-03 10:00": ["daily 3", "weekly 2"],
    "2026-03-01 10:00": ["weekly 3"],
    "2026-02-20 10:00": ["monthly 2"],
    "2026-01-15 10:00": ["monthly 3"],
    "2025-12-31 23:00": ["monthly 4", "yearly 2"],
    "2024-12-30 10:00": ["yearly 3"],
}


def _at(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%d %H:%M").replace(tzinfo=UTC)


def test_prune_with_every_rule_on_two_years(vbfs: Vbfs, template_image: Path, tmp_path: Path) -> None:
    image = copy_sparse(template_image, tmp_path / "web01.raw")
    base_id = json.loads(vbfs("backup", f"image://{image}", "--json").stdout)["id"]
    repo = Repository.open(str(vbfs.repo), lambda confirm: "")
    base = repo.load_manifest(base_id)
    name_of = {}
    for text in TIMES:
        t = _at(text)
        m = dataclasses.replace(base, id=secrets.token_hex(16), time=format_time(t), name=snapshot_name(t))
        with repo.write_session() as session:
            session.commit(m)
        name_of[text] = m.name
    vbfs("forget", f"web01@{base_id}")
    assert len(snapshots(vbfs)) == 25

    policy = ["--keep-last", "3", "--keep-hourly", "3", "--keep-daily", "3", "--keep-weekly", "3"]
    policy += ["--keep-monthly", "4", "--keep-yearly", "3", "--keep-within", "1d"]
    out = json.loads(vbfs("prune", *policy, "--json", extra_env={"TZ": "UTC"}).stdout)
    expected = {name_of[t]: reasons for t, reasons in EXPECTED_KEPT.items()}
    assert {r["name"]: r["reasons"] for r in out["kept"]} == expected
    assert sorted(r["name"] for r in out["removed"]) == sorted(set(name_of.values()) - set(expected))
    left = snapshots(vbfs)
    assert sorted(s["name"] for s in left) == sorted(expected)
    for name in (name_of["2026-03-10 12:30"], name_of["2024-12-30 10:00"]):
        target = tmp_path / f"{name}.img"
        vbfs("restore", f"web01@{name}:/disks/web01.img", str(target))
        assert sha256(target) == sha256(image)
        target.unlink()


# ---- protection and forget ------------------------------------------------------------------------------------


def test_protect_forget_and_unprotect(vbfs: Vbfs, template_image: Path, tmp_path: Path) -> None:
    image = copy_sparse(template_image, tmp_path / "web01.raw")
    offset = blob_offset(image)
    ids = [json.loads(vbfs("backup", f"image://{image}", "--json").stdout)["id"] for _ in range(2)]
    rewrite_blob(image, offset, 77)
    ids.append(json.loads(vbfs("backup", f"image://{image}", "--json").stdout)["id"])
    first, second, newest = ids

    assert "protected web01@" in vbfs("protect", f"web01@{first}").stdout
    out = json.loads(vbfs("prune", "--keep-last", "1", "--json").stdout)
    assert {r["id"]: r["reasons"] for r in out["kept"]} == {newest: ["last 1"], first: ["protected"]}
    assert [r["id"] for r in out["removed"]] == [second]
    assert [s["id"] for s in snapshots(vbfs)] == [first, newest]

    for specs in ([f"web01@{first}"], [f"web01@{newest}", f"web01@{first}"]):
        refused = vbfs("forget", *specs, check=False)
        assert refused.returncode != 0
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and "protected" in lines[0] and "nothing was forgotten" in lines[0], refused.stderr
        assert [s["id"] for s in snapshots(vbfs)] == [first, newest]

    day = snapshots(vbfs)[0]["time"][:10]
    for when in ("2026-01-01", day):
        by_time = vbfs("forget", f"web01@{when}", check=False)
        assert by_time.returncode != 0
        assert len(by_time.stderr.strip().splitlines()) == 1, by_time.stderr
    assert [s["id"] for s in snapshots(vbfs)] == [first, newest]

    vbfs("unprotect", f"web01@{first}")
    assert "forgot web01@" in vbfs("forget", f"web01@{first}").stdout
    listed = vbfs("snapshots", "--json")
    assert [s["id"] for s in json.loads(listed.stdout)] == [newest]
    assert "disappeared" not in listed.stderr
    for suffix in ("", "-wal", "-shm"):  # a catalog built afresh must not report it as vanished either
        (vbfs.repo / f"catalog.sqlite{suffix}").unlink(missing_ok=True)
    listed = vbfs("snapshots", "--json")
    assert [s["id"] for s in json.loads(listed.stdout)] == [newest]
    assert "disappeared" not in listed.stderr, listed.stderr
    assert vbfs("check").returncode == 0

    size = du(vbfs.repo)
    out = json.loads(vbfs("forget", "--gc", f"web01@{newest}", "--json").stdout)
    assert out["gc"]["bytes_freed"] > 2 * MiB
    assert du(vbfs.repo) < size - 2 * MiB
    assert snapshots(vbfs) == []


def test_forgotten_snapshot_is_not_vanished_for_another_catalog(
    make_vbfs: Callable[..., Vbfs], template_image: Path, tmp_path: Path
) -> None:
    v = make_vbfs()
    v.init("repokey")
    image = copy_sparse(template_image, tmp_path / "web01.raw")
    ids = [json.loads(v("backup", f"image://{image}", "--json").stdout)["id"] for _ in range(2)]
    other = Vbfs(v.repo, dict(v.env, XDG_CACHE_HOME=str(tmp_path / "other-cache")))
    assert len(snapshots(other)) == 2  # the other catalog knows both
    v("forget", f"web01@{ids[0]}")
    listed = other("snapshots", "--json")
    assert [s["id"] for s in json.loads(listed.stdout)] == [ids[1]]
    assert "disappeared" not in listed.stderr, listed.stderr


# ---- a job's retention table ----------------------------------------------------------------------------------


def test_prune_job_applies_to_the_guests_it_names(vbfs: Vbfs, template_image: Path, tmp_path: Path) -> None:
    images = [copy_sparse(template_image, tmp_path / f"{g}.raw") for g in ("web01", "db01")]
    for _ in range(3):
        for img in images:
            vbfs("backup", f"image://{img}")
    job = tmp_path / "web.toml"
    job.write_text(f'source = "image://{images[0]}"\nguests = ["web01"]\n\n[retention]\nkeep-last = 2\n')
    out = json.loads(vbfs("prune", "--job", str(job), "--json").stdout)
    assert {r["guest"] for r in out["kept"] + out["removed"]} == {"web01"}
    assert len(out["removed"]) == 1
    assert len(snapshots(vbfs, "web01")) == 2
    assert len(snapshots(vbfs, "db01")) == 3, "a guest the job does not name keeps all its snapshots"
