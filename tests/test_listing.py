"""Listing and searching through the real `vbfs` process: find patterns that match what find prints and lines that
paste back into restore, times in the local zone (and typed in it), sizes and ratios, tags and notes, diff's
summary."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import shlex
import stat
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MiB, Vbfs
from vbfs.store.repository import Repository
from vbfs.testing.images import gpt_ext4, write_tree

KOLKATA = {"TZ": "Asia/Kolkata"}  # +05:30 all year
MTIME = 1_700_000_000


def _image(tmp_path: Path, files: dict[str, str], name: str = "web01", mtimes: dict[str, int] | None = None) -> Path:
    """A GPT + ext4 image of ``files``, every entry's time MTIME unless ``mtimes`` says otherwise."""
    tree = write_tree(tmp_path / f"tree-{secrets.token_hex(3)}", files)
    for p in [*tree.rglob("*"), tree]:
        t = (mtimes or {}).get(p.relative_to(tree).as_posix(), MTIME)
        os.utime(p, (t, t), follow_symlinks=False)
    return gpt_ext4(tmp_path / f"{name}.raw", 16 * MiB, tree)


def _backup(v: Vbfs, image: Path, *args: str) -> dict[str, Any]:
    return dict(json.loads(v("backup", f"image://{image}", *args, "--json").stdout))


def _stamp(stored: str) -> datetime:
    return datetime.strptime(stored, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


FILES = {
    "etc/hostname": "web01\n",
    "etc/nginx/nginx.conf": "worker_processes 2;\n" * 50,
    "srv/my report.txt": "quarterly numbers\n" * 200,
}


def test_find_lines_paste_back_into_restore_and_ls(vbfs: Vbfs, tmp_path: Path) -> None:
    image = _image(tmp_path, FILES)
    first = _backup(vbfs, image)
    changed = {**FILES, "etc/hostname": "web01.example\n"}
    _backup(vbfs, _image(tmp_path, changed))

    lines = vbfs("find", "/files/web01/p1/etc/*").stdout.splitlines()
    paths = {shlex.split(line)[0].split(":", 1)[1] for line in lines}
    # '*' stays within etc/: its files and folders, not what is inside etc/nginx/
    assert paths == {"/files/web01/p1/etc/hostname", "/files/web01/p1/etc/nginx"}, lines
    deep = vbfs("find", "/files/web01/p1/etc/**").stdout
    assert "/files/web01/p1/etc/nginx/nginx.conf" in deep
    assert vbfs("find", "nginx/*.conf").stdout.splitlines() == [
        line for line in deep.splitlines() if "nginx.conf" in line
    ]

    # Every printed line's first word is a spec that restore takes: the bytes are those of the version it names.
    wanted = {"hostname", "nginx.conf", "my report.txt"}
    found = [line for p in ("hostname", "nginx.conf", "my report.txt") for line in vbfs("find", p).stdout.splitlines()]
    assert len(found) == 4, found  # two versions of hostname, one of each other file
    contents = set()
    for n, line in enumerate(found):
        spec = shlex.split(line)[0]
        name = spec.rsplit("/", 1)[1]
        assert name in wanted
        out = tmp_path / f"restored{n}"
        out.mkdir()
        vbfs("restore", spec, str(out))
        data = (out / name).read_text()
        rel = next(k for k in FILES if k.endswith(name))
        assert data in (FILES[rel], changed[rel]), (spec, data)
        contents.add((name, data))
        listed = json.loads(vbfs("ls", spec, "--json").stdout)
        assert [e["name"] for e in listed] == [name] and listed[0]["size"] == len(data.encode())
    assert ("hostname", "web01\n") in contents and ("hostname", "web01.example\n") in contents
    assert "'web01@" in next(line for line in found if "report" in line), "a path with a space is quoted"

    # A version held by two snapshots is one line, or one line per snapshot with --all.
    report = vbfs("find", "my report.txt").stdout.splitlines()
    assert len(report) == 1 and "(in 2 snapshots:" in report[0], report
    every = vbfs("find", "my report.txt", "--all").stdout.splitlines()
    assert len(every) == 2 and {shlex.split(x)[0].split(":")[0] for x in every} == {
        f"web01@{s['name']}" for s in json.loads(vbfs("snapshots", "--json").stdout)
    }
    assert any(first["name"] in x for x in every)

    for args in (("find", "no-such-file"), ("find", "no-such-file", "--json")):
        proc = vbfs(*args, check=False)
        assert proc.returncode == 1, args
    assert json.loads(vbfs("find", "no-such-file", "--json", check=False).stdout) == []
    hint = vbfs("find", "/etc/hostname", check=False)
    assert hint.returncode == 1 and "try 'etc/hostname'" in hint.stderr
    assert vbfs("find", "etc/hostname").stdout.count("\n") == 2


def test_find_wildcards_stay_within_a_folder_and_a_bad_pattern_is_one_line(vbfs: Vbfs, tmp_path: Path) -> None:
    _backup(vbfs, _image(tmp_path, FILES))

    def found(pattern: str) -> set[str]:
        proc = vbfs("find", pattern, "--json", check=False)
        return {f["path"] for f in json.loads(proc.stdout)} if proc.returncode == 0 else set()

    assert found("/files/web01/p1/etc/*") == {"/files/web01/p1/etc/hostname", "/files/web01/p1/etc/nginx"}
    assert "/files/web01/p1/etc/nginx/nginx.conf" in found("/files/web01/p1/**/*.conf")
    assert found("etc/*.conf") == set(), "a * does not cross a folder"
    assert found("/files/web01/p1/etc[.-0]hostname") == set(), "nor does a range that holds /"
    bad = vbfs("find", "[z-a]", check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "is not a glob" in bad.stderr, bad.stderr


def test_times_are_shown_and_read_in_the_local_zone(vbfs: Vbfs, tmp_path: Path) -> None:
    image = _image(tmp_path, FILES)
    a = _backup(vbfs, image)
    while int(time.time()) <= int(_stamp(a["time"]).timestamp()):  # the next snapshot is in a later second
        time.sleep(0.05)
    b = _backup(vbfs, image)
    ist = timezone(timedelta(hours=5, minutes=30))
    a_local = _stamp(a["time"]).astimezone(ist)
    shown = a_local.strftime("%Y-%m-%d %H:%M:%S+05:30")

    listing = vbfs("snapshots", extra_env=KOLKATA).stdout
    assert shown in listing, listing
    utc = vbfs("--utc", "snapshots", extra_env=KOLKATA).stdout
    assert _stamp(a["time"]).strftime("%Y-%m-%d %H:%M:%S+00:00") in utc and "+05:30" not in utc
    assert "+00:00" in vbfs("snapshots", "--utc", extra_env=KOLKATA).stdout  # the option after the command too

    file_time = datetime.fromtimestamp(MTIME, ist).strftime("%Y-%m-%d %H:%M:%S+05:30")
    assert file_time in vbfs("ls", "web01@latest:/files/web01/p1/etc", extra_env=KOLKATA).stdout
    assert file_time in vbfs("find", "hostname", extra_env=KOLKATA).stdout
    assert shown in vbfs("diff", f"web01@{a['name']}", "web01@latest", extra_env=KOLKATA).stdout
    pruned = vbfs("prune", "--keep-last", "1", "--dry-run", extra_env=KOLKATA).stdout
    assert shown in pruned, pruned

    # A typed time without a zone is local: A's local second names A (B came a second or more later) ...
    typed = a_local.strftime("%Y-%m-%dT%H:%M:%S")
    older = json.loads(vbfs("diff", f"web01@{typed}", "web01@latest", "--json", extra_env=KOLKATA).stdout)["older"]
    assert older["id"] == a["id"]
    # ... the same digits read as UTC are five and a half hours later: the newest snapshot then
    later = json.loads(vbfs("diff", f"web01@{typed}", "web01@latest", "--json", extra_env={"TZ": "UTC"}).stdout)
    assert later["older"]["id"] == b["id"]
    # ... and a time with a zone means that zone, whatever TZ says
    zoned = _stamp(a["time"]).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert (
        json.loads(vbfs("diff", f"web01@{zoned}", "web01@latest", "--json", extra_env=KOLKATA).stdout)["older"]["id"]
        == (a["id"])
    )
    restored = tmp_path / "restored"
    vbfs("restore", f"web01@{typed}:/files/web01/p1/etc/hostname", str(restored), extra_env=KOLKATA)
    assert restored.read_text() == "web01\n"

    # JSON keeps one form whatever the zone: UTC with Z; modes are numbers
    for env in (KOLKATA, {"TZ": "UTC"}):
        rows = json.loads(vbfs("snapshots", "--json", extra_env=env).stdout)
        assert [r["time"] for r in rows] == [a["time"], b["time"]]
        listed = json.loads(vbfs("ls", "web01@latest:/files/web01/p1/etc", "--json", extra_env=env).stdout)
        entry = next(e for e in listed if e["name"] == "hostname")
        assert entry["mtime"] == "2023-11-14T22:13:20.000000Z" and entry["mtime_ns"] == MTIME * 10**9
        hit = json.loads(vbfs("find", "hostname", "--json", extra_env=env).stdout)[0]
        assert (hit["mtime"], hit["mode"], hit["type"]) == (entry["mtime"], entry["mode"], "f")
        assert isinstance(hit["mode"], int) and stat.S_ISREG(hit["mode"])


def test_snapshots_show_sizes_tags_and_notes_and_prune_judges_one_tag(vbfs: Vbfs, tmp_path: Path) -> None:
    image = _image(tmp_path, FILES)
    one = _backup(vbfs, image, "--tag", "nightly", "--note", "before the upgrade")
    changed = _image(tmp_path, {**FILES, "srv/new.bin": "x" * 300_000})
    two = _backup(vbfs, changed, "--tag", "weekly")
    three = _backup(vbfs, changed, "--tag", "nightly")  # the same bytes again
    assert one["tags"] == ["nightly"] and one["note"] == "before the upgrade"

    rows = {r["id"]: r for r in json.loads(vbfs("snapshots", "--json").stdout)}
    assert all(r["size"] == 16 * MiB for r in rows.values())
    assert [rows[s["id"]]["added"] for s in (one, two, three)] == [
        s["stats"]["stored_bytes"] for s in (one, two, three)
    ]
    assert rows[one["id"]]["added"] > 0 and rows[three["id"]]["added"] == 0, "an unchanged backup adds nothing"
    assert rows[two["id"]]["tags"] == ["weekly"] and rows[two["id"]]["note"] is None

    text = vbfs("snapshots").stdout.splitlines()
    assert text[-1] == "3 snapshots of 1 guest"
    first = next(i for i, line in enumerate(text) if one["id"][:8] in line)
    assert "nightly" in text[first] and text[first + 1].strip() == "note: before the upgrade"

    def listed(*tags: str) -> set[str]:
        args = [a for t in tags for a in ("--tag", t)]
        return {r["id"] for r in json.loads(vbfs("snapshots", *args, "--json").stdout)}

    assert listed("nightly") == {one["id"], three["id"]}
    assert listed("nightly,weekly") == set()
    assert listed("nightly", "weekly") == {one["id"], two["id"], three["id"]}

    for bad in (("--tag", "has space"), ("--tag", "-x"), ("--tag", "x" * 65), ("--note", "two\nlines")):
        proc = vbfs("backup", f"image://{image}", *bad, check=False)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, (bad, proc.stderr)
    assert len(json.loads(vbfs("snapshots", "--json").stdout)) == 3

    out = json.loads(vbfs("prune", "--tag", "nightly", "--keep-last", "1", "--json").stdout)
    assert [r["id"] for r in out["removed"]] == [one["id"]]
    assert {r["id"] for r in out["kept"]} == {three["id"]}, "the weekly snapshot is not judged at all"
    assert {r["id"] for r in json.loads(vbfs("snapshots", "--json").stdout)} == {two["id"], three["id"]}


def test_a_job_tags_its_snapshots(vbfs: Vbfs, tmp_path: Path) -> None:
    image = _image(tmp_path, FILES)
    job = tmp_path / "job.toml"
    job.write_text(f'source = "image://{image}"\ntags = ["job-web", "daily"]\n')
    made = json.loads(vbfs("backup", "--job", str(job), "--tag", "extra", "--json").stdout)
    assert [m["tags"] for m in made] == [["extra", "job-web", "daily"]]
    job.write_text(f'source = "image://{image}"\ntags = ["no good"]\n')
    proc = vbfs("backup", "--job", str(job), check=False)
    assert proc.returncode == 2 and "'tags'" in proc.stderr


def _forge(v: Vbfs, changes: dict[str, Any]) -> str:
    """A manifest like the newest one, with ``changes``, stored as the repository stores manifests."""
    repo = Repository.open(str(v.repo), lambda confirm: "")
    base = repo.load_manifest(repo.snapshot_ids()[0])
    snap_id = secrets.token_hex(16)
    doc = {**dataclasses.replace(base, id=snap_id).to_json(), **changes}
    name = f"snapshots/{snap_id}"
    repo.backend.put(name, repo.codec.encode(json.dumps(doc, sort_keys=True).encode(), name))
    return snap_id


@pytest.mark.parametrize(
    "changes",
    [
        {"tags": ["a,b"]},
        {"tags": ["x"] * 40},
        {"tags": [7]},
        {"tags": "nightly"},
        {"note": "\x1b]0;pwned\x07"},
        {"note": "x" * 5000},
        {"note": ["not", "text"]},
    ],
)
def test_a_hostile_manifest_label_is_refused_and_the_rest_is_listed(
    vbfs: Vbfs, tmp_path: Path, changes: dict[str, Any]
) -> None:
    good = _backup(vbfs, _image(tmp_path, FILES), "--tag", "ok")
    bad = _forge(vbfs, changes)
    proc = vbfs("snapshots")
    assert f"snapshot {bad} is not listed" in proc.stderr and "\x1b" not in proc.stdout + proc.stderr
    assert good["id"][:8] in proc.stdout and proc.stdout.splitlines()[-1] == "1 snapshot of 1 guest"
    assert [r["id"] for r in json.loads(vbfs("snapshots", "--tag", "ok", "--json").stdout)] == [good["id"]]


def test_diff_leaves_out_folder_times_and_sums_up(vbfs: Vbfs, tmp_path: Path) -> None:
    old = {"etc/app.conf": "v1\n", "etc/old.conf": "old\n", "srv/data/keep.txt": "same\n"}
    new = {"etc/app.conf": "version two\n", "srv/data/keep.txt": "same\n", "srv/data/new.txt": "n" * 1000}
    a = _backup(vbfs, _image(tmp_path, old))
    later = {"etc/app.conf": MTIME + 100, "srv/data": MTIME + 100, "srv/data/new.txt": MTIME + 100, "etc": MTIME + 50}
    b = _backup(vbfs, _image(tmp_path, new, mtimes=later))

    plain = vbfs("diff", f"web01@{a['name']}", f"web01@{b['name']}").stdout.splitlines()
    assert plain[2:-1] == [
        "M /files/web01/p1/etc/app.conf",
        "- /files/web01/p1/etc/old.conf",
        "+ /files/web01/p1/srv/data/new.txt",
    ], plain
    change = 1000 + len("version two\n") - len("v1\n") - len("old\n")
    assert plain[-1] == f"1 added, 1 removed, 1 changed; files +{change} B", plain[-1]
    assert plain[0].startswith(f"--- web01@{a['name']}") and plain[1].startswith(f"+++ web01@{b['name']}")

    doc = json.loads(vbfs("diff", f"web01@{a['name']}", f"web01@{b['name']}", "--json").stdout)
    assert doc["summary"] == {"added": 1, "removed": 1, "changed": 1, "size_change": change}
    assert doc["older"]["id"] == a["id"] and doc["newer"]["time"] == b["time"]
    app = next(c for c in doc["changes"] if c["path"].endswith("app.conf"))
    assert app["before"]["size"] == 3 and app["size"] == 12 and app["type"] == "f"

    with_times = vbfs("diff", "--times", f"web01@{a['name']}", f"web01@{b['name']}").stdout.splitlines()
    assert {"M /files/web01/p1/srv/data", "M /files/web01/p1/etc"} <= set(with_times), with_times


def test_info_shows_the_space_used_and_the_ratios(vbfs: Vbfs, tmp_path: Path) -> None:
    image = _image(tmp_path, {**FILES, "srv/log.txt": "".join(f"line {i}\n" for i in range(50000))})
    first = _backup(vbfs, image)["stats"]
    again = _backup(vbfs, image)["stats"]  # the same bytes again: all deduplicated
    assert again["new_bytes"] == 0 and again["dedup_bytes"] == first["new_bytes"] + first["dedup_bytes"]
    doc = json.loads(vbfs("info", "--json").stdout)
    assert doc["snapshots"] == 2 and doc["snapshots_size"] == 2 * 16 * MiB
    handled = first["new_bytes"] + first["dedup_bytes"] + again["dedup_bytes"]
    assert doc["deduplication_ratio"] == round(handled / first["new_bytes"], 3) >= 2.0
    assert doc["compression_ratio"] == round(first["new_bytes"] / first["stored_bytes"], 3) > 2
    on_disk = sum(
        p.lstat().st_blocks * 512 for p in vbfs.repo.rglob("*") if p.is_file() and "catalog.sqlite" not in p.name
    )
    assert 0 < doc["stored_bytes"] <= on_disk
    text = vbfs("info").stdout
    assert re.search(rf"^deduplication\s+{doc['deduplication_ratio']:.2f} : 1\s+\S", text, re.M), text
    assert re.search(r"^repository size\s+\d", text, re.M) and "compression ratio" in text
