"""KVM benchmark: full and incremental backup of a running domain's 4 GiB qcow2 disk, vbfs vs virtnbdbackup vs borg.

The disk is the backup benchmark's 4 GiB GPT/ext4 image (about 2 GB of files from /usr) converted to qcow2, attached
to two running domains (no OS, KVM) of a private libvirtd: one backed up by vbfs, one by virtnbdbackup (Debian's
package), so that neither tool's checkpoints meet the other's. After the full backups, 64 MiB of scattered 64 KiB
blocks are written into both running disks through QEMU, and each tool backs up again; borg backs up the first
domain's image file each time (`--chunker-params fixed,4194304`), as a tool without change tracking must. Each
run starts with a cold page cache. Results go to <workdir>/kvm.json and a Markdown table on stdout.

    sudo .venv/bin/python tools/bench/kvm.py [--workdir bench-work] [--data-gib 2]
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

from vbfs.testing.libvirtd import Libvirtd, domain_xml, kvm_usable, write_through_qemu

BLOCK = 64 * 1024


def run_vbfs(vbfs: str, repo: Path, source: str, step: str, run_dir: Path) -> Run:
    env = dict(
        os.environ, VBFS_PASSPHRASE=PASS, XDG_CACHE_HOME=str(repo.parent / "kvm-cache"), VBFS_RUN_DIR=str(run_dir)
    )
    if step == "full":
        subprocess.run([vbfs, "init", "-e", "repokey", str(repo)], env=env, check=True, capture_output=True)
    drop_caches()
    secs, rss, out = timed([vbfs, "-r", str(repo), "backup", "--no-index", "--json", source], env)
    stats = json.loads(out)["stats"]
    return Run("vbfs", step, secs, rss, du(repo), stats["read_bytes"])


def run_virtnbdbackup(uri: str, domain: str, out: Path, step: str) -> Run:
    if step == "full":
        shutil.rmtree(out, ignore_errors=True)
    before = du(out) if out.exists() else 0
    drop_caches()
    argv = ["virtnbdbackup", "-U", uri, "-d", domain, "-l", "full" if step == "full" else "inc", "-o", str(out)]
    secs, rss, _ = timed(argv)
    size = du(out)
    return Run("virtnbdbackup", step, secs, rss, size, size - before)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("bench-work"))
    ap.add_argument("--data-gib", type=float, default=2.0)
    ap.add_argument("--changed-mib", type=int, default=64)
    args = ap.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    vbfs = str(Path(sys.executable).parent / "vbfs")
    for tool in ("borg", "virtnbdbackup"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed (apt-get install borgbackup virtnbdbackup)")
    raw = build_image(work, 4 * GiB, int(args.data_gib * 1e9), "disk4g.raw")
    for d in ("kvm-vbfs-repo", "kvm-borg-repo", "kvm-virtnbd", "kvm-cache", "kvm-borg-repo-base"):
        shutil.rmtree(work / d, ignore_errors=True)
    daemon = Libvirtd()
    import libvirt

    conn = None
    domains: list[Any] = []
    runs: list[Run] = []
    try:
        images = daemon.dir / "images"
        images.mkdir(mode=0o755)
        conn = libvirt.open(daemon.uri)
        for name in ("bench-vbfs", "bench-virtnbd"):
            disk = images / f"{name}.qcow2"
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(disk)], check=True)
            dom = conn.defineXML(domain_xml(name, disk, kvm_usable()))
            dom.create()
            domains.append(dom)
        source = daemon.source("bench-vbfs")
        run_dir = daemon.dir / "vbfs-run"
        for step in ("full", "incremental"):
            if step == "incremental":
                rng = random.Random(1)
                slots = rng.sample(range(1, 4 * GiB // BLOCK), args.changed_mib * MiB // BLOCK)
                for i, slot in enumerate(slots):
                    for dom in domains:
                        write_through_qemu(dom, "vda", slot * BLOCK, 0x40 + i % 64, BLOCK)
            runs.append(run_vbfs(vbfs, work / "kvm-vbfs-repo", source, step, run_dir))
            runs.append(run_virtnbdbackup(daemon.uri, "bench-virtnbd", work / "kvm-virtnbd", step))
            runs.append(run_borg(work / "kvm-borg-repo", images / "bench-vbfs.qcow2", step, step == "full", PASS))
            for r in runs[-3:]:
                print(f"{r.tool:14} {r.step:12} {r.seconds:7.1f} s {r.read_bytes}", file=sys.stderr)
    finally:
        for dom in domains:
            try:
                dom.destroy()
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
            except libvirt.libvirtError:
                pass
        if conn is not None:
            conn.close()
        daemon.stop()
        shutil.rmtree(daemon.dir, ignore_errors=True)
    extra = {"kvm": kvm_usable(), "changed_bytes": args.changed_mib * MiB, "cpus": os.cpu_count()}
    write_json(work / "kvm.json", runs, extra)
    print(render(runs, extra))


def render(runs: list[Run], extra: dict[str, Any]) -> str:
    by = {(r.tool, r.step): r for r in runs}
    lines = [
        f"{extra['changed_bytes'] / MiB:.0f} MiB changed in 64 KiB blocks between the backups; KVM: {extra['kvm']}; "
        f"{extra['cpus']} CPUs.",
        "",
        "| backup | tool | wall time | vbfs speed-up | bytes read or saved | peak RSS |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for step in ("full", "incremental"):
        mine = by[("vbfs", step)]
        for tool in ("vbfs", "virtnbdbackup", "borg"):
            r = by[(tool, step)]
            speed = "" if tool == "vbfs" else f"{r.seconds / mine.seconds:.1f}x"
            lines.append(
                f"| {step} | {tool} | {r.seconds:.1f} s | {speed} | {(r.read_bytes or 0) / MiB:.0f} MiB | "
                f"{r.peak_rss_mib:.0f} MiB |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
