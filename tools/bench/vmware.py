"""VMware incremental benchmark: vbfs with CBT through the vCenter simulator vs borg re-reading the whole image.

The disk is the backup benchmark's 4 GiB GPT/ext4 image (about 2 GB of files from /usr), placed in the flat file
of a VM of the vCenter simulator (tools/vcsim, on loopback). vbfs backs the VM up through the vSphere API and the
datastore's HTTPS interface; borg backs up the same flat file (`--chunker-params fixed,4194304`). Then 64 MiB of
scattered 64 KiB blocks are changed, the simulator is told which areas changed (as vSphere's CBT would report
them), and both back up again, each with a cold page cache. Bytes read: vbfs's from its own counter and the
simulator's count of bytes served; borg's is the "original size" borg reports for the archive (it has no change
tracking, so it reads the whole file). Results go to <workdir>/vmware.json and a Markdown table on stdout.

    sudo .venv/bin/python tools/bench/vmware.py [--workdir bench-work] [--data-gib 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backup import PASS, build_image
from common import GiB, MiB, Run, drop_caches, du, run_borg, timed, write_json

from vbfs.testing.vcsim import VCenterSimulator

BLOCK = 64 * 1024


def scatter(path: Path, total: int, run: int = BLOCK, seed: int = 1) -> list[list[int]]:
    """Overwrite ``total`` bytes in runs of ``run`` bytes at random 64 KiB-aligned places (runs do not overlap);
    return the changed areas, merged, as CBT would report them."""
    rng = random.Random(seed)
    size = path.stat().st_size
    per_run = run // BLOCK
    slots = sorted(s * per_run for s in rng.sample(range(1, size // run - 1), total // run))
    slots = [s + rng.randrange(per_run) if per_run > 1 else s for s in slots]  # runs need not be run-aligned
    areas: list[list[int]] = []
    with open(path, "r+b") as f:
        for slot in slots:
            f.seek(slot * BLOCK)
            f.write(rng.randbytes(run))
            if areas and areas[-1][0] + areas[-1][1] >= slot * BLOCK:
                areas[-1][1] = max(areas[-1][0] + areas[-1][1], slot * BLOCK + run) - areas[-1][0]
            else:
                areas.append([slot * BLOCK, run])
    return areas


def run_vbfs(vbfs: str, repo: Path, sim: VCenterSimulator, vm: str, step: str) -> tuple[Run, dict[str, Any]]:
    env = dict(
        os.environ, VBFS_PASSPHRASE=PASS, XDG_CACHE_HOME=str(repo.parent / "cache"), VBFS_VMWARE_PASSWORD=sim.password
    )
    if step == "first":
        subprocess.run([vbfs, "init", "-e", "repokey", str(repo)], env=env, check=True, capture_output=True)
    drop_caches()
    before = sim.downloaded()
    argv = [vbfs, "-r", str(repo), "backup", "--insecure", "--no-index", "--json", sim.source(vm)]
    secs, rss, out = timed(argv, env)
    served = sim.downloaded() - before
    result = json.loads(out)  # what `vbfs backup --json` prints of the new snapshot
    return Run("vbfs", step, secs, rss, du(repo), result["stats"]["read_bytes"]), {"served": served, **result}


def change_id_of(vbfs: str, repo: Path, vm: str, work: Path) -> str:
    env = dict(os.environ, VBFS_PASSPHRASE=PASS, XDG_CACHE_HOME=str(repo.parent / "cache"))
    target = work / "vm.json"
    target.unlink(missing_ok=True)
    subprocess.run([vbfs, "-r", str(repo), "restore", f"{vm}@latest:/vm.json", str(target)], env=env, check=True)
    return str(json.loads(target.read_text())["metadata"]["disks"][0]["change_id"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("bench-work"))
    ap.add_argument("--data-gib", type=float, default=2.0)
    ap.add_argument("--changed-mib", type=int, default=64)
    args = ap.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    bindir = Path(sys.executable).parent
    vbfs, exe = str(bindir / "vbfs"), bindir / "vbfs-vcsim"
    if not shutil.which("borg"):
        sys.exit("borg is not installed (apt-get install borgbackup)")
    if not exe.exists():
        sys.exit("the vCenter simulator is not built: run tools/setup")
    image = build_image(work, 4 * GiB, int(args.data_gib * 1e9), "disk4g.raw")
    for d in ("vmw-vbfs-repo", "vmw-borg-repo", "cache", "vmw-borg-repo-base"):
        shutil.rmtree(work / d, ignore_errors=True)
    vm = "DC0_H0_VM0"
    sim = VCenterSimulator(exe)
    runs: list[Run] = []
    served: dict[str, int] = {}
    changed: dict[str, int] = {}
    patterns = {"scattered": BLOCK, "runs": 4 * MiB}  # 64 KiB blocks; 4 MiB runs, as a file written in one go
    try:
        flat = sim.set_disk(image, vm)
        r, info = run_vbfs(vbfs, work / "vmw-vbfs-repo", sim, vm, "first")
        runs.append(r)
        served["first"] = info["served"]
        runs.append(run_borg(work / "vmw-borg-repo", flat, "first", True, PASS))
        for seed, (step, run) in enumerate(patterns.items(), start=1):
            change_id = change_id_of(vbfs, work / "vmw-vbfs-repo", vm, work)
            areas = scatter(flat, args.changed_mib * MiB, run, seed)
            changed[step] = sum(n for _, n in areas)
            sim.changes_file(vm).write_text(json.dumps({change_id: areas}))
            r, info = run_vbfs(vbfs, work / "vmw-vbfs-repo", sim, vm, step)
            if any("rejected" in n for n in info["notes"]):
                sys.exit(f"the incremental was not incremental: {info['notes']}")
            runs.append(r)
            served[step] = info["served"]
            runs.append(run_borg(work / "vmw-borg-repo", flat, step, step == "first", PASS))
        extra: dict[str, object] = {
            "image_bytes": flat.stat().st_size,
            "image_allocated": flat.stat().st_blocks * 512,
            "changed_bytes": changed,
            "served_by_simulator": served,
            "cpus": os.cpu_count(),
            "cold_cache": drop_caches(),
        }
    finally:
        sim.stop()
    for r in runs:
        print(
            f"{r.tool:6} {r.step:8} {r.seconds:7.1f} s {r.peak_rss_mib:6.0f} MiB read {r.read_bytes}", file=sys.stderr
        )
    write_json(work / "vmware.json", runs, extra)
    print(render(runs, extra))


def render(runs: list[Run], extra: dict[str, Any]) -> str:
    by = {(r.tool, r.step): r for r in runs}
    what = {
        "first": "first (full)",
        "scattered": "{} MiB changed in scattered 64 KiB blocks",
        "runs": "{} MiB changed in 4 MiB runs",
    }
    lines = [
        f"Disk: {extra['image_bytes'] / GiB:.0f} GiB, {extra['image_allocated'] / MiB:.0f} MiB allocated; "
        f"{extra['cpus']} CPUs; cold page cache: {extra['cold_cache']}.",
        "",
        "| backup | tool | wall time | vbfs speed-up over borg | bytes read | served by the simulator | "
        "repository growth | peak RSS |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    steps = list(dict.fromkeys(r.step for r in runs))
    for i, step in enumerate(steps):
        borg = by[("borg", step)]
        label = what[step].format(round(extra["changed_bytes"].get(step, 0) / MiB))
        for tool in ("vbfs", "borg"):
            r = by[(tool, step)]
            speed = f"{borg.seconds / r.seconds:.1f}x" if tool == "vbfs" else ""
            sim = f"{extra['served_by_simulator'][step] / MiB:.0f} MiB" if tool == "vbfs" else ""
            growth = r.repo_bytes - (by[(tool, steps[i - 1])].repo_bytes if i else 0)
            lines.append(
                f"| {label} | {tool} | {r.seconds:.1f} s | {speed} | {(r.read_bytes or 0) / MiB:.0f} MiB | {sim} | "
                f"{growth / MiB:.0f} MiB | {r.peak_rss_mib:.0f} MiB |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
