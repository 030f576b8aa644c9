"""Prune benchmark: thirty daily backups of one disk into vbfs, borg and restic, then a retention that keeps 7.

The disk is the backup benchmark's 4 GiB GPT/ext4 image (about 2 GB of files from /usr). Between two backups,
64 MiB of the guest's file data change: 1,024 random 64 KiB blocks, each lying wholly inside one file's data
blocks (as ``debugfs`` maps them), so the filesystem stays whole and the image's allocation does not grow. Every
tool backs up every day's image cold into its own repository, in the same run: vbfs ``vbfs backup image://...``
(encrypted ``repokey``, with the file index, as an administrator runs it), borg and restic as backup.py runs them.
Then each repository keeps the 7 newest snapshots and gives back the space of the rest, cold:

- vbfs: ``vbfs -r R prune --keep-last 7 --json`` (forget and garbage collection in one command);
- borg: ``borg prune --keep-last 7`` then ``borg compact`` (borg 1.2 frees space only in compact);
- restic: ``restic forget --keep-last 7 --prune``.

Reported per tool: the retention's wall time and peak RSS, the repository's size (du) before and after it, and
the 30 backups' time as context; for vbfs also the backend calls of the first, the second and the last backup.
Results go to bench-work/prune.json and a Markdown table on stdout.

    sudo .venv/bin/python tools/bench/prune.py [--workdir bench-work] [--rounds 30] [--keep 7]

``--rounds 3`` is a quick try. ``--retention-only`` runs the retention again on the repositories the last run
left (after ``--skip-retention``, or once a copy was put back), without backing up again.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backup import PASS, build_image
from common import GiB, MiB, Run, drop_caches, du, run_borg, timed

TOOLS = ("vbfs", "borg", "restic")
BLOCK = 64 * 1024
PARTITION_OFFSET = 1 * MiB  # where gpt_ext4 puts the ext4 partition


def file_data_blocks(image: Path, tree: Path, cache: Path) -> list[int]:
    """Offsets in ``image`` of every 64 KiB block that lies wholly inside one regular file's data blocks."""
    if cache.exists():
        return [int(x) for x in cache.read_text().split()]
    fs = f"{image}?offset={PARTITION_OFFSET}"
    info = subprocess.run(["debugfs", "-R", "stats", fs], capture_output=True, text=True, check=True).stdout
    block_size = int(next(line for line in info.splitlines() if line.startswith("Block size:")).split()[-1])
    per = BLOCK // block_size
    files = sorted(str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_file() and not p.is_symlink())
    commands = "".join(f'blocks "/{f}"\n' for f in files if '"' not in f and "\n" not in f)
    cmd_file = cache.with_suffix(".debugfs")
    cmd_file.write_text(commands)
    out = subprocess.run(["debugfs", "-f", str(cmd_file), fs], capture_output=True, text=True, check=True).stdout
    cmd_file.unlink()
    offsets = []
    for line in out.splitlines():
        if line.startswith("debugfs:") or not line.strip():
            continue
        blocks = [int(b) for b in line.split() if b.isdigit()]
        present = set(blocks)
        for b in blocks:
            if b % per == 0 and all(b + i in present for i in range(per)):
                offsets.append(PARTITION_OFFSET + b * block_size)
    offsets.sort()
    cache.write_text(" ".join(map(str, offsets)) + "\n")
    return offsets


def change_files(image: Path, candidates: list[int], total: int, seed: int) -> int:
    """Overwrite ``total`` bytes of file data in random 64 KiB blocks chosen among ``candidates``."""
    rng = random.Random(seed)
    chosen = sorted(rng.sample(candidates, total // BLOCK))
    with open(image, "r+b") as f:
        for off in chosen:
            f.seek(off)
            f.write(rng.randbytes(BLOCK))
    os.sync()
    return len(chosen) * BLOCK


def vbfs_env(work: Path) -> dict[str, str]:
    return dict(os.environ, VBFS_PASSPHRASE=PASS, XDG_CACHE_HOME=str(work / "vbfs-cache"))


def restic_env(work: Path) -> dict[str, str]:
    return dict(os.environ, RESTIC_PASSWORD=PASS, RESTIC_CACHE_DIR=str(work / "restic-cache"))


def borg_env(repo: Path) -> dict[str, str]:
    return dict(os.environ, BORG_PASSPHRASE=PASS, BORG_BASE_DIR=f"{repo}-base")


def backup_vbfs(vbfs: str, work: Path, image: Path, day: int) -> tuple[Run, dict[str, int]]:
    """vbfs's backup of the day, cold, with the backend calls it reports."""
    repo, env = work / "vbfs-repo", vbfs_env(work)
    if day == 1:
        subprocess.run([vbfs, "init", "--encryption", "repokey", str(repo)], env=env, check=True, capture_output=True)
    drop_caches()
    argv = [vbfs, "-r", str(repo), "backup", f"image://{image}", "--guest", "bench", "--json"]
    secs, rss, out = timed(argv, env)
    result = json.loads(out)
    return Run("vbfs", f"day{day:02}", secs, rss, du(repo), result["stats"].get("read_bytes")), result.get(
        "backend_calls", {}
    )


def backup_restic(work: Path, image: Path, day: int) -> Run:
    repo, env = work / "restic-repo", restic_env(work)
    if day == 1:
        subprocess.run(["restic", "init", "-r", str(repo)], env=env, check=True, capture_output=True)
    drop_caches()
    secs, rss, _ = timed(["restic", "-r", str(repo), "backup", "--quiet", str(image)], env)
    return Run("restic", f"day{day:02}", secs, rss, du(repo))


def count_snapshots(tool: str, vbfs: str, work: Path) -> int:
    if tool == "vbfs":
        out = subprocess.run(
            [vbfs, "-r", str(work / "vbfs-repo"), "snapshots", "--json"],
            env=vbfs_env(work),
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return len(json.loads(out))
    if tool == "borg":
        repo = work / "borg-repo"
        out = subprocess.run(
            ["borg", "list", "--short", str(repo)], env=borg_env(repo), check=True, capture_output=True, text=True
        ).stdout
        return len(out.split())
    out = subprocess.run(
        ["restic", "-r", str(work / "restic-repo"), "snapshots", "--json"],
        env=restic_env(work),
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return len(json.loads(out))


def retention(tool: str, vbfs: str, work: Path, keep: int) -> dict[str, Any]:
    """Run ``tool``'s retention cold; its time, peak RSS, the repository's size before and after, what it said."""
    repo = work / f"{tool}-repo"
    before = du(repo)
    doc: dict[str, Any] = {
        "tool": tool,
        "bytes_before": before,
        "snapshots_before": count_snapshots(tool, vbfs, work),
    }
    drop_caches()
    if tool == "vbfs":
        argv = [vbfs, "-r", str(repo), "prune", "--keep-last", str(keep), "--json"]
        secs, rss, out = timed(argv, vbfs_env(work))
        result = json.loads(out)
        doc.update(
            commands=[argv[3:]],
            kept=len(result["kept"]),
            removed=len(result["removed"]),
            gc=result["gc"],
            backend_calls=result.get("backend_calls"),
        )
        check = subprocess.run(  # not timed: is the repository whole after the prune?
            [vbfs, "-r", str(repo), "check", "--json"], env=vbfs_env(work), capture_output=True, text=True
        )
        try:
            report = json.loads(check.stdout)
            doc["check_after"] = {k: report.get(k) for k in ("ok", "snapshots", "errors", "warnings")}
        except ValueError:
            doc["check_after"] = {"ok": False, "output": (check.stdout + check.stderr)[-2000:]}
    elif tool == "borg":
        env = borg_env(repo)
        prune_secs, prune_rss, _ = timed(["borg", "prune", "--keep-last", str(keep), str(repo)], env)
        compact_secs, compact_rss, _ = timed(["borg", "compact", str(repo)], env)
        secs, rss = prune_secs + compact_secs, max(prune_rss, compact_rss)
        doc.update(
            commands=[["prune", "--keep-last", str(keep)], ["compact"]],
            steps={"prune": [prune_secs, prune_rss], "compact": [compact_secs, compact_rss]},
        )
    else:
        argv = ["restic", "-r", str(repo), "forget", "--keep-last", str(keep), "--prune"]
        secs, rss, _ = timed(argv, restic_env(work))
        doc.update(commands=[argv[3:]])
    doc.update(
        seconds=secs,
        peak_rss_mib=rss,
        bytes_after=du(repo),
        snapshots_after=count_snapshots(tool, vbfs, work),
    )
    return doc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("bench-work"))
    ap.add_argument("--data-gib", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=30, help="daily backups before the retention (default 30)")
    ap.add_argument("--keep", type=int, default=7, help="snapshots the retention keeps (default 7)")
    ap.add_argument("--change-mib", type=int, default=64, help="file data changed between two backups (MiB)")
    ap.add_argument("--skip-retention", action="store_true", help="stop after the backups")
    ap.add_argument("--retention-only", action="store_true", help="run the retention on the last run's repositories")
    ap.add_argument(
        "--save-vbfs",
        action="store_true",
        help="copy the vbfs repository before its retention; --retention-only then starts from the copy",
    )
    ap.add_argument("--tools", default=",".join(TOOLS), help="which tools to run (default vbfs,borg,restic)")
    args = ap.parse_args()
    tools = [t for t in TOOLS if t in args.tools.split(",")]
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    vbfs = str(Path(sys.executable).parent / "vbfs")
    for tool in ("borg", "restic", "debugfs"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed (apt-get install borgbackup restic e2fsprogs)")
    state_file = work / "prune-backups.json"

    if args.retention_only:
        state = json.loads(state_file.read_text())
        runs = [Run(**r) for r in state["runs"]]
        calls = {int(k): v for k, v in state["backend_calls"].items()}
    else:
        pristine = build_image(work, 4 * GiB, int(args.data_gib * 1e9), "disk4g.raw")
        candidates = file_data_blocks(pristine, work / "tree", work / "file-blocks.txt")
        print(f"{len(candidates)} 64 KiB blocks of file data to change from", file=sys.stderr)
        image = work / "prune-disk.raw"
        subprocess.run(["cp", "--sparse=always", str(pristine), str(image)], check=True)
        for d in ("vbfs-repo", "vbfs-cache", "borg-repo", "borg-repo-base", "restic-repo", "restic-cache"):
            shutil.rmtree(work / d, ignore_errors=True)
        runs, calls = [], {}
        started = time.monotonic()
        for day in range(1, args.rounds + 1):
            if day > 1:
                change_files(image, candidates, args.change_mib * MiB, seed=day)
            day_runs = []
            if "vbfs" in tools:
                r, calls[day] = backup_vbfs(vbfs, work, image, day)
                day_runs.append(r)
            if "borg" in tools:
                day_runs.append(run_borg(work / "borg-repo", image, f"day{day:02}", day == 1, PASS))
            if "restic" in tools:
                day_runs.append(backup_restic(work, image, day))
            runs += day_runs
            print(
                f"day {day:2}: "
                + "  ".join(f"{x.tool} {x.seconds:5.1f} s {x.repo_bytes / MiB:6.0f} MiB" for x in day_runs)
                + f"  (vbfs calls {calls.get(day)}; {time.monotonic() - started:.0f} s so far)",
                file=sys.stderr,
            )
            state_file.write_text(
                json.dumps({"runs": [x.__dict__ for x in runs], "backend_calls": calls}, indent=1) + "\n"
            )
    if args.skip_retention:
        return

    saved = work / "vbfs-saved"
    if "vbfs" in tools and args.save_vbfs:
        if saved.exists() and args.retention_only:  # start again from the repository as the backups left it
            for d in ("vbfs-repo", "vbfs-cache"):
                shutil.rmtree(work / d, ignore_errors=True)
                subprocess.run(["cp", "-a", str(saved / d), str(work / d)], check=True)
        elif not saved.exists():
            saved.mkdir()
            for d in ("vbfs-repo", "vbfs-cache"):
                subprocess.run(["cp", "-a", str(work / d), str(saved / d)], check=True)
    out_file = work / "prune.json"
    previous = json.loads(out_file.read_text())["retention"] if args.retention_only and out_file.exists() else []
    results = {str(r["tool"]): r for r in previous}
    for tool in tools:
        res = retention(tool, vbfs, work, args.keep)
        print(
            f"{tool:7} retention {float(res['seconds']):7.1f} s  {float(res['peak_rss_mib']):6.0f} MiB  "
            f"{int(res['bytes_before']) / MiB:7.0f} -> {int(res['bytes_after']) / MiB:7.0f} MiB  "
            f"snapshots {res['snapshots_before']} -> {res['snapshots_after']}",
            file=sys.stderr,
        )
        results[tool] = res
    extra: dict[str, Any] = {
        "rounds": max(int(r.step[3:]) for r in runs),
        "keep": args.keep,
        "change_mib": args.change_mib,
        "cpus": os.cpu_count(),
        "cold_cache": drop_caches(),
        "backend_calls": calls,
        "retention": [results[t] for t in TOOLS if t in results],
    }
    out_file.write_text(json.dumps({"runs": [r.__dict__ for r in runs], **extra}, indent=2) + "\n")
    print(render(runs, extra))


def render(runs: list[Run], extra: dict[str, Any]) -> str:
    rounds = int(extra["rounds"])
    results = {str(r["tool"]): r for r in extra["retention"]}
    lines = [
        f"{rounds} daily backups of the 4 GiB GPT/ext4 disk, {extra['change_mib']} MiB of file data changed between "
        f"two; then keep the {extra['keep']} newest. {extra['cpus']} CPUs; cold page cache: {extra['cold_cache']}.",
        "",
        f"| tool | {rounds} backups | retention | ratio to borg | repository before | after | freed | "
        "peak RSS of the retention |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    borg = results.get("borg")
    for tool, res in results.items():
        backups = sum(r.seconds for r in runs if r.tool == tool)
        secs, before, after = float(res["seconds"]), int(res["bytes_before"]), int(res["bytes_after"])
        ratio = f"{secs / float(borg['seconds']):.2f}" if borg else ""
        lines.append(
            f"| {tool} | {backups:.0f} s | {secs:.1f} s | {ratio} | {before / MiB:,.0f} MiB | {after / MiB:,.0f} MiB | "
            f"{(before - after) / MiB:,.0f} MiB | {float(res['peak_rss_mib']):.0f} MiB |"
        )
    calls = {int(k): v for k, v in extra["backend_calls"].items()}
    kinds = ("get", "put", "exists", "list", "delete")
    lines += ["", "| vbfs backup | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
    for day in sorted({1, 2, rounds} & set(calls)):
        lines.append(f"| day {day} | " + " | ".join(f"{calls[day].get(k, 0):,}" for k in kinds) + " |")
    vb = results.get("vbfs")
    if vb and isinstance(vb.get("gc"), dict):
        gc = vb["gc"]
        lines += [
            "",
            f"vbfs prune: {vb['removed']} snapshots removed, {vb['kept']} kept; gc removed "
            f"{gc.get('objects_removed', 0):,} objects ({int(gc.get('bytes_freed', 0)) / MiB:,.0f} MiB) in "
            f"{float(gc.get('seconds', 0)):.1f} s, held back {gc.get('held_back_objects', 0):,} objects "
            f"({int(gc.get('held_back_bytes', 0)) / MiB:,.0f} MiB); vbfs check afterwards: "
            f"{'ok' if vb.get('check_after', {}).get('ok') else 'NOT ok'}.",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
