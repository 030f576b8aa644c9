"""Backup benchmark: vbfs vs borg vs restic on the same 4 GiB disk image, in one run.

The image is a GPT disk with one ext4 partition holding about 2 GB of real files copied from /usr, sparse where
the filesystem is empty. "vbfs" is the default (which also indexes the guest's files for find/diff);
"--no-index" variants show the backup alone. Each tool backs it up cold (page cache dropped), then 64 MiB of
scattered 64 KiB blocks are changed and each tool backs it up again. A 16 GiB sparse image with the same files
measures vbfs's memory on a larger disk. Results go to bench-work/backup.json and a Markdown table on stdout.

    sudo .venv/bin/python tools/bench/backup.py [--workdir bench-work] [--data-gib 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import GiB, MiB, Run, drop_caches, du, run_borg, scatter_changes, timed, write_json

from vbfs.testing.images import gpt_ext4

PASS = "benchmark passphrase"


def build_image(work: Path, size: int, data_bytes: int, name: str) -> Path:
    from common import copy_usr_tree

    tree = work / "tree"
    if not (work / "tree.done").exists():
        copied = copy_usr_tree(tree, data_bytes)
        (work / "tree.done").write_text(str(copied))
    image = work / name
    if not image.exists():
        gpt_ext4(image, size, tree)
    return image


def run_vbfs(vbfs: str, repo: Path, image: Path, step: str, chunk_mib: int = 1, index: bool = True) -> Run:
    env = dict(os.environ, VBFS_PASSPHRASE=PASS, XDG_CACHE_HOME=str(repo.parent / "cache"))
    if step == "first":
        subprocess.run(
            [vbfs, "init", "-e", "repokey", "--chunk-size", str(chunk_mib * MiB), str(repo)],
            env=env,
            check=True,
            capture_output=True,
        )
    drop_caches()
    argv = [vbfs, "-r", str(repo), "backup", f"image://{image}", "--guest", "bench", "--json"]
    secs, rss, out = timed(argv + ([] if index else ["--no-index"]), env)
    result = json.loads(out)
    stats = result["stats"]
    print(f"{repo.name} {step}: backend calls {result.get('backend_calls')}", file=sys.stderr)
    tool = "vbfs" if chunk_mib == 1 else f"vbfs {chunk_mib} MiB chunks"
    if not index:
        tool += " --no-index"
    return Run(tool, step, secs, rss, du(repo), stats["read_bytes"])


def run_restic(repo: Path, image: Path, step: str) -> Run:
    env = dict(os.environ, RESTIC_PASSWORD=PASS, RESTIC_CACHE_DIR=str(repo.parent / "restic-cache"))
    if step == "first":
        subprocess.run(["restic", "init", "-r", str(repo)], env=env, check=True, capture_output=True)
    drop_caches()
    secs, rss, _ = timed(["restic", "-r", str(repo), "backup", "--quiet", str(image)], env)
    return Run("restic", step, secs, rss, du(repo))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("bench-work"))
    ap.add_argument("--data-gib", type=float, default=2.0)
    ap.add_argument("--skip-16g", action="store_true")
    ap.add_argument(
        "--chunk-sweep",
        type=lambda t: [int(x) for x in t.split(",") if x],
        default=[2, 4],
        help="other vbfs chunk sizes to measure, in MiB (default 2,4)",
    )
    args = ap.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    vbfs = str(Path(sys.executable).parent / "vbfs")
    for tool in ("borg", "restic"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed (apt-get install borgbackup restic)")

    pristine = build_image(work, 4 * GiB, int(args.data_gib * 1e9), "disk4g.raw")
    image = work / "disk4g-work.raw"
    subprocess.run(["cp", "--sparse=always", str(pristine), str(image)], check=True)
    repos = ["vbfs-repo", "borg-repo", "restic-repo", "cache", "borg-repo-base", "restic-cache"]
    repos += [f"vbfs-{c}m-repo" for c in args.chunk_sweep] + ["vbfs-noindex-repo"]
    for d in repos:
        shutil.rmtree(work / d, ignore_errors=True)
    runs: list[Run] = []
    for step in ("first", "changed"):
        if step == "changed":
            changed = scatter_changes(image, 1 * MiB, 4 * GiB - MiB, 64 * MiB)
            print(f"changed {changed // MiB} MiB in 64 KiB blocks", file=sys.stderr)
        n = len(runs)
        runs.append(run_vbfs(vbfs, work / "vbfs-repo", image, step))
        runs.append(run_vbfs(vbfs, work / "vbfs-noindex-repo", image, step, index=False))
        runs.append(run_borg(work / "borg-repo", image, step, step == "first", PASS))
        runs.append(run_restic(work / "restic-repo", image, step))
        for c in args.chunk_sweep:
            runs.append(run_vbfs(vbfs, work / f"vbfs-{c}m-repo", image, step, c, index=False))
        for r in runs[n:]:
            print(
                f"{r.tool:22} {r.step:8} {r.seconds:7.1f} s  {r.peak_rss_mib:6.0f} MiB  {r.repo_bytes / MiB:8.0f} MiB",
                file=sys.stderr,
            )

    extra: dict[str, object] = {
        "image_bytes": image.stat().st_size,
        "image_allocated": image.stat().st_blocks * 512,
        "data_bytes": int((work / "tree.done").read_text()),
        "cold_cache": drop_caches(),
        "cpus": os.cpu_count(),
    }
    if not args.skip_16g:
        big = build_image(work, 16 * GiB, int(args.data_gib * 1e9), "disk16g.raw")
        shutil.rmtree(work / "vbfs16-repo", ignore_errors=True)
        r16 = run_vbfs(vbfs, work / "vbfs16-repo", big, "first")
        r16.tool, r16.step = "vbfs", "16GiB-sparse"
        runs.append(r16)
    write_json(work / "backup.json", runs, extra)
    print(render(runs, extra))


def render(runs: list[Run], extra: dict[str, object]) -> str:
    by = {(r.tool, r.step): r for r in runs}
    lines = [
        f"Image: {int(extra['image_bytes']) / GiB:.0f} GiB GPT/ext4, {int(extra['data_bytes']) / 1e9:.2f} GB of files "
        f"from /usr, {int(extra['image_allocated']) / MiB:.0f} MiB allocated; {extra['cpus']} CPUs; "
        f"cold page cache: {extra['cold_cache']}.",
        "",
        "| run | tool | wall time | ratio to borg | repository size | growth | peak RSS |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    tools = list(dict.fromkeys(r.tool for r in runs if r.step == "first"))
    for step in ("first", "changed"):
        borg = by[("borg", step)]
        for tool in tools:
            r = by[(tool, step)]
            growth = r.repo_bytes - by[(tool, "first")].repo_bytes if step == "changed" else None
            lines.append(
                f"| {step} | {tool} | {r.seconds:.1f} s | {r.seconds / borg.seconds:.2f} | "
                f"{r.repo_bytes / MiB:.0f} MiB | {'' if growth is None else f'{growth / MiB:.0f} MiB'} | "
                f"{r.peak_rss_mib:.0f} MiB |"
            )
    if ("vbfs", "16GiB-sparse") in by:
        r = by[("vbfs", "16GiB-sparse")]
        lines.append(
            f"| 16 GiB sparse | vbfs | {r.seconds:.1f} s | | {r.repo_bytes / MiB:.0f} MiB | | "
            f"{r.peak_rss_mib:.0f} MiB |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
