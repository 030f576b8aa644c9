"""Garbage collection at scale: ``vbfs gc`` on a repository of 1,000,000 chunk objects, half of them garbage.

The repository is plaintext and made through the Python API (no disk image): each of ``--snapshots`` write
sessions stores its share of distinct tiny payloads as chunks and commits a manifest whose one stream (a config
file) names every second chunk it stored. The other half is garbage: stored, named by the sessions' chunk index
objects, needed by no snapshot. Building it takes minutes, so it is made once as a template and every run works
on a copy whose chunk files are hard links into it (garbage collection only deletes, so the template stays
whole).

On the copy, cold: ``vbfs check --json`` (for comparison: it also walks every snapshot and lists every object),
then ``vbfs gc --json``, then ``vbfs gc --json`` again (nothing left to remove: what marking alone costs).
Reported: wall time, peak RSS (``/usr/bin/time``), and what gc says it removed. Results go to
WORKDIR/gc_scale.json and a Markdown table on stdout.

    sudo .venv/bin/python tools/bench/gc_scale.py [--workdir /var/tmp/vbfs-bench-gc] [--objects 1000000] [--clean]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MiB, drop_caches, du, timed

from vbfs.store.manifest import Manifest, Source, StreamRecord, format_time, snapshot_name
from vbfs.store.repository import STREAM_ENTRY, Repository


def build(template: Path, objects: int, snapshots: int) -> dict[str, Any]:
    """Make the template repository: ``objects`` chunks in ``snapshots`` sessions, every second one referenced."""
    if template.exists():
        shutil.rmtree(template)
    started = time.monotonic()
    repo = Repository.init(str(template), "none", lambda confirm: "")
    per = objects // snapshots
    when = datetime(2026, 1, 1, tzinfo=UTC)
    referenced = 0
    for s in range(snapshots):
        with repo.write_session() as session:
            entries = bytearray()
            size = 0
            for i in range(per):
                data = b"vbfs gc benchmark object %d\n" % (s * per + i)
                cid, _ = session.store_blob(data)
                if i % 2 == 0:
                    entries += STREAM_ENTRY.pack(cid, len(data))
                    size += len(data)
                    referenced += 1
            ref = StreamRecord(size, session.write_index(bytes(entries), STREAM_ENTRY.size))
            t = when + timedelta(days=s)
            session.commit(
                Manifest(
                    id=secrets.token_hex(16),
                    guest="gcbench",
                    name=snapshot_name(t),
                    time=format_time(t),
                    finished=format_time(t),
                    source=Source("bench", "bench://gc"),
                    disks=(),
                    config={"objects.bin": ref},
                )
            )
        print(
            f"snapshot {s + 1}/{snapshots}: {(s + 1) * per} objects, {time.monotonic() - started:.0f} s",
            file=sys.stderr,
        )
    info: dict[str, Any] = {
        "objects": per * snapshots,
        "referenced": referenced,
        "snapshots": snapshots,
        "build_seconds": round(time.monotonic() - started, 1),
        "bytes": du(template),
    }
    (template / "bench-build.json").write_text(json.dumps(info) + "\n")
    return info


def clone(template: Path, repo: Path) -> None:
    """A copy of ``template`` whose chunk objects are hard links (gc deletes them, never writes them)."""
    if repo.exists():
        shutil.rmtree(repo)
    for root, dirs, files in os.walk(template):
        rel = Path(root).relative_to(template)
        (repo / rel).mkdir(parents=True, exist_ok=True)
        linked = rel.parts[:1] == ("chunks",)
        for name in files:
            if rel == Path(".") and name == "bench-build.json":
                continue
            src, dst = Path(root) / name, repo / rel / name
            if linked:
                os.link(src, dst)
            else:
                shutil.copy2(src, dst)
        dirs.sort()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/vbfs-bench-gc"))
    ap.add_argument("--objects", type=int, default=1_000_000)
    ap.add_argument("--snapshots", type=int, default=10)
    ap.add_argument("--rebuild", action="store_true", help="make the template again")
    ap.add_argument("--no-check", action="store_true", help="do not run vbfs check")
    ap.add_argument("--clean", action="store_true", help="remove the work directory at the end")
    args = ap.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    template, repo = work / "template", work / "repo"
    built = template / "bench-build.json"
    if args.rebuild or not built.exists() or json.loads(built.read_text())["objects"] != args.objects:
        need = args.objects * 4096 * 11 // 10
        if free < need:
            sys.exit(f"{work}: {free / 2**30:.1f} GiB free, {need / 2**30:.1f} GiB needed")
        info = build(template, args.objects, args.snapshots)
    else:
        info = json.loads(built.read_text())
    print(f"template: {info}", file=sys.stderr)
    t0 = time.monotonic()
    clone(template, repo)
    print(f"cloned in {time.monotonic() - t0:.0f} s", file=sys.stderr)

    vbfs = str(Path(sys.executable).parent / "vbfs")
    env = dict(os.environ, XDG_CACHE_HOME=str(work / "cache"))
    steps: list[dict[str, Any]] = []

    def step(label: str, argv: list[str]) -> dict[str, Any]:
        drop_caches()
        secs, rss, out = timed([vbfs, "-r", str(repo), *argv], env)
        doc: dict[str, Any] = {"step": label, "argv": argv, "seconds": secs, "peak_rss_mib": rss}
        try:
            doc["result"] = json.loads(out)
        except ValueError:
            doc["result"] = out[-2000:]
        steps.append(doc)
        print(f"{label:10} {secs:7.1f} s {rss:7.0f} MiB", file=sys.stderr)
        return doc

    if not args.no_check:
        step("check", ["check", "--json"])
    step("gc", ["gc", "--json"])
    step("gc again", ["gc", "--json"])
    extra = {**info, "cpus": os.cpu_count(), "cold_cache": drop_caches(), "bytes_after": du(repo)}
    (work / "gc_scale.json").write_text(json.dumps({"steps": steps, **extra}, indent=2) + "\n")
    print(render(steps, extra))
    if args.clean:
        shutil.rmtree(work)


def render(steps: list[dict[str, Any]], extra: dict[str, Any]) -> str:
    lines = [
        f"{int(extra['objects']):,} chunk objects in {extra['snapshots']} snapshots, "
        f"{int(extra['referenced']):,} of them referenced; {int(extra['bytes']) / MiB:,.0f} MiB on disk; "
        f"{extra['cpus']} CPUs; cold page cache: {extra['cold_cache']}.",
        "",
        "| command | wall time | peak RSS | objects listed | objects removed | freed |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in steps:
        res = s["result"] if isinstance(s["result"], dict) else {}
        gc = res if "objects_removed" in res else {}
        listed = f"{gc['objects']:,}" if "objects" in gc else ""
        removed = f"{gc['objects_removed']:,}" if gc else ""
        freed = f"{int(gc['bytes_freed']) / MiB:,.0f} MiB" if gc else ""
        what = {"gc again": "`vbfs gc` again (nothing left to remove)"}.get(s["step"], f"`vbfs {s['step']}`")
        lines.append(
            f"| {what} | {float(s['seconds']):.1f} s | {float(s['peak_rss_mib']):.0f} MiB | {listed} | {removed} | "
            f"{freed} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
