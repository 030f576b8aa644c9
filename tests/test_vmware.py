"""The VMware plugin end to end, against the vCenter simulator (tools/vcsim: govmomi's vcsim plus vbfs's CBT
additions) through the real pyvmomi client and the real `vbfs` command. This is a simulator, not vSphere: what it
does and does not imitate is in docs/simulators.md."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pyVim.task import WaitForTask
from pyVmomi import vim

from tests.conftest import MiB, Vbfs, copy_sparse, sha256
from vbfs.testing.images import gpt_ext4, write_tree
from vbfs.testing.vcsim import VM, VCenterSimulator

DISK = "scsi0-0"
BLOCK = 64 * 1024  # the granularity of the changed areas the tests record, as vSphere's CBT reports them


@pytest.fixture
def sim(vcsim: VCenterSimulator) -> VCenterSimulator:
    return vcsim


@pytest.fixture
def vmw(vbfs: Vbfs) -> Vbfs:
    """The repository runner with the simulator's password in the environment, as an administrator sets it."""
    vbfs.env["VBFS_VMWARE_PASSWORD"] = "secret"
    return vbfs


def backup(v: Vbfs, source: str, *args: str, **kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(v("backup", "--insecure", "--json", source, *args, **kw).stdout)
    return out


def vm_json(v: Vbfs, tmp_path: Path, snapshot: str = "latest") -> dict[str, Any]:
    target = tmp_path / f"vm-{snapshot}.json"
    target.unlink(missing_ok=True)
    v("restore", f"{VM}@{snapshot}:/vm.json", str(target))
    out: dict[str, Any] = json.loads(target.read_text())["metadata"]
    return out


def changed_areas(old: Path, new: Path) -> list[list[int]]:
    """The BLOCK-sized areas in which ``new`` differs from ``old``, merged, as CBT would report them."""
    areas: list[list[int]] = []
    with open(old, "rb") as a, open(new, "rb") as b:
        offset = 0
        while True:
            x, y = a.read(BLOCK), b.read(BLOCK)
            if not x and not y:
                break
            if x != y:
                if areas and areas[-1][0] + areas[-1][1] == offset:
                    areas[-1][1] += len(y)
                else:
                    areas.append([offset, len(y)])
            offset += BLOCK
    return areas


def scatter(path: Path, start: int, end: int, total: int, seed: int) -> None:
    """Overwrite ``total`` bytes of ``path`` in BLOCK-sized pieces at random aligned places in [start, end)."""
    rng = random.Random(seed)
    slots = rng.sample(range(start // BLOCK, end // BLOCK), total // BLOCK)
    with open(path, "r+b") as f:
        for slot in slots:
            f.seek(slot * BLOCK)
            f.write(rng.randbytes(BLOCK))


def edit_guest(flat: Path, work: Path, files: dict[str, bytes]) -> None:
    """Change files inside the guest's ext4 (partition 1 at 1 MiB) through a real kernel mount."""
    mnt = work / "guest-mnt"
    mnt.mkdir(exist_ok=True)
    subprocess.run(["mount", "-o", f"loop,offset={MiB}", str(flat), str(mnt)], check=True)
    try:
        for rel, content in files.items():
            (mnt / rel).parent.mkdir(parents=True, exist_ok=True)
            (mnt / rel).write_bytes(content)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.fixture
def guest_disk(tmp_path: Path) -> Path:
    """A 1 GiB sparse GPT disk: ext4 in the first 256 MiB, free space after it."""
    if os.geteuid() != 0:
        pytest.skip("changing the guest's files needs a loop mount (root)")
    tree = write_tree(
        tmp_path / "tree",
        {
            "etc/hostname": "web01\n",
            "etc/nginx/nginx.conf": "worker_processes 4;\n" * 40,
            "srv/app/data.bin": random.Random(7).randbytes(8 * MiB),
        },
    )
    return gpt_ext4(tmp_path / "guest.raw", 1024 * MiB, tree, fs_size=256 * MiB)


@pytest.mark.slow
def test_full_then_cbt_incremental_then_rejected_change_id(
    sim: VCenterSimulator, vmw: Vbfs, guest_disk: Path, tmp_path: Path, mounted: Any
) -> None:
    sim.set_disk(guest_disk)
    flat = sim.flat()

    # Full backup: CBT is switched on, the snapshot is quiesced, only allocated areas are read.
    before = sim.downloaded()
    full = backup(vmw, sim.source())
    allocated = int(subprocess.run(["du", "-B1", str(flat)], capture_output=True, text=True).stdout.split()[0])
    assert full["consistency"] == "filesystem-consistent"
    assert any("changed block tracking was off" in n for n in full["notes"]), full["notes"]
    read_full = full["stats"]["read_bytes"]
    assert read_full == sim.downloaded() - before
    assert read_full <= allocated + MiB, (read_full, allocated)
    assert sim.vbfs_snapshots() == [], "the backup's snapshot must be removed"
    info = vm_json(vmw, tmp_path)
    assert info["quiesce"] == "quiesced through VMware Tools"
    assert info["cbt"] is True
    change_id = info["disks"][0]["change_id"]
    assert change_id

    m = mounted(vmw)
    snap = m.path / VM / "latest"
    assert (snap / "files" / DISK / "p1" / "etc" / "hostname").read_text() == "web01\n"
    assert sorted(p.name for p in (snap / "config").iterdir()) == [f"{VM}.nvram", f"{VM}.vmx"]
    assert (snap / "disks" / f"{DISK}.img").stat().st_size == 1024 * MiB

    # 64 MiB of scattered blocks in the free space, plus changed files in the guest's filesystem.
    old = tmp_path / "old.raw"
    copy_sparse(flat, old)
    scatter(flat, 300 * MiB, 1024 * MiB, 64 * MiB, seed=1)
    edit_guest(flat, tmp_path, {"etc/hostname": b"web01-renamed\n", "srv/app/new.txt": b"written after backup 1\n"})
    areas = changed_areas(old, flat)
    changed = sum(n for _, n in areas)
    assert 64 * MiB <= changed < 66 * MiB
    sim.changes_file().write_text(json.dumps({change_id: areas}))

    before = sim.downloaded()
    inc = backup(vmw, sim.source())
    assert inc["stats"]["read_bytes"] == changed, "an incremental reads exactly the changed areas"
    assert sim.downloaded() - before == changed, "the simulator served only the changed areas"
    assert not any("rejected" in n for n in inc["notes"])
    restored = tmp_path / "restored.img"
    vmw("restore", f"{VM}@latest:/disks/{DISK}.img", str(restored))
    assert sha256(restored) == sha256(flat), "the restored disk equals the disk at snapshot time"
    newest = sorted(p.name for p in (m.path / VM).iterdir() if p.name != "latest")[-1]
    files = m.path / VM / newest / "files" / DISK / "p1"
    assert (files / "etc" / "hostname").read_text() == "web01-renamed\n"
    assert (files / "srv" / "app" / "new.txt").read_text() == "written after backup 1\n"

    # A changeId that vSphere no longer knows: a correct full backup, not a wrong incremental.
    scatter(flat, 300 * MiB, 1024 * MiB, 8 * BLOCK, seed=2)  # touches at most 8 chunks
    sim.changes_file().write_text("{}")
    before = sim.downloaded()
    again = backup(vmw, sim.source())
    assert any("rejected" in n for n in again["notes"]), again["notes"]
    assert again["stats"]["read_bytes"] == sim.downloaded() - before
    assert again["stats"]["read_bytes"] > 64 * MiB, "a rejected changeId must lead to a full read"
    # deduplicated: new are only the 8 chunks changed now and the few that the incremental stored as patch records
    # (a full read stores those whole again)
    assert again["stats"]["new_bytes"] <= 16 * MiB, "the full read is deduplicated"
    restored.unlink()
    vmw("restore", f"{VM}@latest:/disks/{DISK}.img", str(restored))
    assert sha256(restored) == sha256(flat)
    vmw("check", "--verify-data")


@pytest.mark.slow
def test_read_failure_and_kill_leave_no_snapshot_behind(
    sim: VCenterSimulator, vmw: Vbfs, guest_disk: Path, tmp_path: Path
) -> None:
    sim.set_disk(guest_disk)
    backup(vmw, sim.source())
    assert len(json.loads(vmw("snapshots", "--json").stdout)) == 1

    # The datastore starts answering HTTP 500 in the middle of the read.
    sim.changes_file().unlink(missing_ok=True)  # every changeId is rejected: a full read of ~20 MiB
    (sim.datastore / "vbfs-fail-after").write_text("5")
    proc = vmw("backup", "--insecure", sim.source(), check=False)
    (sim.datastore / "vbfs-fail-after").unlink()
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("vbfs: error:")]
    assert len(errors) == 1 and "HTTP 500" in errors[0], proc.stderr
    assert sim.vbfs_snapshots() == [], "a failed backup removes its snapshot"
    assert len(json.loads(vmw("snapshots", "--json").stdout)) == 1, "no partial snapshot in the repository"

    # kill -9 in the middle of the read: the snapshot stays, the next run removes it and succeeds.
    proc = vmw("backup", "--insecure", sim.source(), check=False, extra_env={"VBFS_FAILPOINT": "chunk-read:4"})
    assert proc.returncode == -9
    assert len(sim.vbfs_snapshots()) == 1, "a killed backup cannot remove its snapshot"
    out = backup(vmw, sim.source())
    assert any("cleanup: removed snapshot vbfs-" in n for n in out["notes"]), out["notes"]
    assert sim.vbfs_snapshots() == []
    assert len(json.loads(vmw("snapshots", "--json").stdout)) == 2
    vmw("check")


def test_quiesce_failure_gives_a_crash_consistent_backup_and_disks_are_consolidated(
    sim: VCenterSimulator, vmw: Vbfs, tmp_path: Path
) -> None:
    (sim.datastore / "vbfs-quiesce-fails").write_text("")
    sim.needs_consolidation()
    assert sim.consolidation_needed()
    out = backup(vmw, sim.source())
    assert f"cleanup: consolidated the disks of {VM}, as vSphere asked" in out["notes"], out["notes"]
    assert not sim.consolidation_needed()
    assert out["consistency"] == "crash-consistent"
    assert any("quiescing" in n and "crash-consistent" in n for n in out["notes"]), out["notes"]
    assert "ApplicationQuiesceFault" in vm_json(vmw, tmp_path)["quiesce"]
    assert sim.vbfs_snapshots() == []


def test_errors_are_one_clear_line(sim: VCenterSimulator, vmw: Vbfs, tmp_path: Path) -> None:
    def error(*args: str, env: dict[str, str] | None = None) -> str:
        proc = vmw(*args, check=False, extra_env=env)
        assert proc.returncode != 0, proc.stdout
        lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith("vbfs: warning:")]
        assert len(lines) == 1 and lines[0].startswith("vbfs: error: "), proc.stderr
        return lines[0]

    assert "wrong user name or password" in error(
        "backup", "--insecure", sim.source(), env={"VBFS_VMWARE_PASSWORD": "wrong"}
    )
    assert "no VM 'nosuchvm'" in error("backup", "--insecure", sim.source("nosuchvm"))
    assert "no datacenter 'DC9'" in error("guests", "--insecure", f"vmware://backup@{sim.hostport}/DC9")
    assert "TLS certificate" in error("backup", sim.source())  # the simulator's certificate is not trusted
    assert "not accepted in the source URL" in error(
        "guests", "--insecure", f"vmware://backup:secret@{sim.hostport}/DC0"
    )
    no_password = {k: v for k, v in vmw.env.items() if k != "VBFS_VMWARE_PASSWORD"}
    password_file = tmp_path / "vcenter.password"
    password_file.write_text("secret\n")
    password_file.chmod(0o644)
    saved = dict(vmw.env)
    try:
        vmw.env = no_password
        assert "no vSphere password" in error("guests", "--insecure", f"vmware://backup@{sim.hostport}/DC0")
        assert "chmod 600" in error(
            "guests",
            "--insecure",
            f"vmware://backup@{sim.hostport}/DC0",
            env={"VBFS_VMWARE_PASSWORD_FILE": str(password_file)},
        )
        password_file.chmod(0o600)
        vmw(
            "guests",
            "--insecure",
            f"vmware://backup@{sim.hostport}/DC0",
            extra_env={"VBFS_VMWARE_PASSWORD_FILE": str(password_file)},
        )
    finally:
        vmw.env = saved
    # a VM whose disks were all removed
    vm = sim.vm("DC0_H0_VM1")
    disk = next(d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk))
    remove = vim.vm.device.VirtualDeviceSpec(operation=vim.vm.device.VirtualDeviceSpec.Operation.remove, device=disk)
    WaitForTask(vm.ReconfigVM_Task(vim.vm.ConfigSpec(deviceChange=[remove])))
    assert "has no virtual disks" in error("backup", "--insecure", sim.source("DC0_H0_VM1"))
    assert json.loads(vmw("snapshots", "--json").stdout) == []


def test_guests_and_job_file(sim: VCenterSimulator, vmw: Vbfs, tmp_path: Path) -> None:
    rows = json.loads(vmw("guests", "--insecure", "--json", f"vmware://backup@{sim.hostport}/DC0").stdout)
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == {"DC0_H0_VM0", "DC0_H0_VM1", "DC0_C0_RP0_VM0", "DC0_C0_RP0_VM1"}
    assert by_name[VM]["state"] == "poweredOn"
    assert by_name[VM]["disks"] == [{"name": DISK, "size": MiB}]
    assert by_name[VM]["cbt"] is False and by_name[VM]["tools"]

    job = tmp_path / "nightly.toml"
    job.write_text(
        f'source = "vmware://backup@{sim.hostport}/DC0"\n'
        'guests = ["DC0_H0_*", "DC0_C0_RP0_VM1", "gone-vm"]\n'
        'exclude = ["*_VM1"]\n'
        "insecure = true\n"
    )
    proc = vmw("backup", "--job", str(job), check=False)
    assert proc.returncode != 0
    assert "1 of 2 guests failed: gone-vm: no such guest" in proc.stderr
    assert sorted(s["guest"] for s in json.loads(vmw("snapshots", "--json").stdout)) == ["DC0_H0_VM0"]
    rows = json.loads(vmw("guests", "--insecure", "--json", f"vmware://backup@{sim.hostport}/DC0").stdout)
    assert {r["name"]: r["cbt"] for r in rows}[VM] is True

    job.write_text(f'source = "vmware://backup@{sim.hostport}/DC0"\ninsecure = true\nguests = "x"\n')
    assert "'guests' must be a list" in vmw("backup", "--job", str(job), check=False).stderr


def test_session_expiry_during_a_backup_logs_in_again(
    sim: VCenterSimulator, guest_disk: Path, monkeypatch: Any
) -> None:
    """vCenter drops idle sessions (and administrators end them): reads and API calls log in again."""
    from vbfs_vmware import VmwareHypervisor

    from vbfs.sources import SourceURL
    from vbfs.testing.conformance import check_hypervisor

    sim.set_disk(guest_disk)
    monkeypatch.setenv("VBFS_VMWARE_PASSWORD", "secret")
    hv = VmwareHypervisor(SourceURL.parse(sim.source()), {"insecure": True})
    try:
        check_hypervisor(hv, VM)
        with hv.snapshot(VM) as snap:
            disk = snap.disks()[0]
            first = hv.session.generation

            def end_vbfs_sessions() -> None:
                mine = sim.content.sessionManager.currentSession.key
                others = [s.key for s in sim.content.sessionManager.sessionList if s.key != mine]
                assert others
                sim.content.sessionManager.TerminateSession(others)

            end_vbfs_sessions()
            head = snap.read(disk, 0, MiB)  # HTTP 401, log in, read again
            with open(sim.flat(), "rb") as f:
                assert head == f.read(MiB)
            assert hv.session.generation == first + 1
            end_vbfs_sessions()
            assert snap.allocated_extents(disk)  # NotAuthenticated, log in, ask again
            assert hv.session.generation == first + 2
        assert sim.vbfs_snapshots() == []
    finally:
        hv.close()
