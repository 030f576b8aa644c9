"""The libvirt plugin end to end against a real libvirtd and real QEMU (KVM when /dev/kvm is usable), started by
these tests and stopped by their PIDs; the disks are read over QEMU's NBD export by vbfs's own NBD client."""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MiB, Vbfs, sha256
from vbfs.testing.images import gpt_ext4, write_tree

libvirt = pytest.importorskip("libvirt")
from vbfs.testing.guest import build as build_guest  # noqa: E402
from vbfs.testing.libvirtd import Libvirtd, domain_xml, kvm_usable, write_through_qemu  # noqa: E402

BLOCK = 64 * 1024  # the dirty-bitmap granularity of a qcow2 disk with 64 KiB clusters
DISK_SIZE = 256 * MiB


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[Libvirtd]:
    if os.geteuid() != 0:
        pytest.skip("the libvirt tests start a system libvirtd (root)")
    if not shutil.which("libvirtd") or not shutil.which("qemu-system-x86_64"):
        pytest.skip("libvirtd and QEMU are installed by tools/setup")
    daemon = Libvirtd()
    try:
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(daemon.dir, ignore_errors=True)


class Domain:
    """A running test domain with one qcow2 disk holding GPT/ext4, and the raw image it should equal.

    With ``agent``, the domain boots vbfs's tiny agent guest (vbfs.testing.guest), which mounts the disk's ext4
    and runs qemu-ga. It boots under TCG: Debian's kernel does not come up under this machine's nested KVM
    (the domains without an OS do run under KVM)."""

    def __init__(self, daemon: Libvirtd, work: Path, agent: bool = False):
        self.name = f"vbfs-test-{secrets.token_hex(3)}"
        tree = write_tree(
            work / "tree",
            {
                "etc/hostname": "kvm01\n",
                "etc/fstab": "/dev/vda1 / ext4 defaults 0 1\n",
                "srv/app/data.bin": random.Random(3).randbytes(4 * MiB),
            },
        )
        self.expected = gpt_ext4(work / "expected.raw", DISK_SIZE, tree, fs_size=128 * MiB)
        self.disk = work / "vda.qcow2"
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(self.expected), str(self.disk)], check=True
        )
        self.conn = libvirt.open(daemon.uri)
        if agent:
            kernel, initrd = (shutil.copy(p, work) for p in build_guest(Path(sys.prefix) / "guest"))
            boot = (Path(kernel), Path(initrd), work / "console.log")
            xml = domain_xml(self.name, self.disk, kvm=False, agent=True, memory_mib=256, boot=boot)
        else:
            xml = domain_xml(self.name, self.disk, kvm_usable())
        self.dom = self.conn.defineXML(xml)
        self.dom.create()
        self.source = daemon.source(self.name)
        self.console = work / "console.log"

    def agent(self, command: str, timeout: int = 5) -> Any:
        import libvirt_qemu

        return json.loads(libvirt_qemu.qemuAgentCommand(self.dom, json.dumps({"execute": command}), timeout, 0))[
            "return"
        ]

    def wait_for_agent(self, seconds: float = 120) -> None:
        deadline = time.monotonic() + seconds
        while True:
            try:
                self.agent("guest-ping", 2)
                return
            except libvirt.libvirtError:
                if time.monotonic() > deadline:
                    console = self.console.read_text()[-2000:] if self.console.exists() else ""
                    raise AssertionError(
                        f"the guest agent did not answer in {seconds} s; console:\n{console}"
                    ) from None
                time.sleep(0.5)

    def write(self, offset: int, length: int, pattern: int) -> None:
        """Write into the running disk through QEMU, and the same bytes into the expected image."""
        write_through_qemu(self.dom, "vda", offset, pattern, length)
        with open(self.expected, "r+b") as f:
            f.seek(offset)
            f.write(bytes([pattern]) * length)

    def vbfs_checkpoints(self) -> list[str]:
        return sorted(c.getName() for c in self.dom.listAllCheckpoints() if c.getName().startswith("vbfs-"))

    def backup_job_running(self) -> bool:
        return bool(self.dom.jobStats().get("type", 0))

    def close(self) -> None:
        try:
            if self.dom.isActive():
                self.dom.destroy()
            self.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
        finally:
            self.conn.close()


@pytest.fixture
def make_domain(libvirtd: Libvirtd, tmp_path: Path) -> Iterator[Callable[..., Domain]]:
    made: list[tuple[Domain, Path]] = []

    def make(agent: bool = False) -> Domain:
        work = Path(libvirtd.dir) / f"{tmp_path.name}-{len(made)}"  # below the daemon's folder: QEMU can reach it
        work.mkdir(mode=0o755)
        made.append((Domain(libvirtd, work, agent), work))
        return made[-1][0]

    yield make
    for d, work in made:
        d.close()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def domain(make_domain: Callable[..., Domain]) -> Domain:
    return make_domain()


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """An ssh server of the tests' own on a loopback port, accepting one generated key for root."""
    if not shutil.which("sshd") and not Path("/usr/sbin/sshd").exists():
        pytest.skip("sshd comes with openssh-server (tools/setup installs it)")
    d = tmp_path_factory.mktemp("sshd")
    for key in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    shutil.copy(d / "client.pub", d / "authorized_keys")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (d / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {d / 'host'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nStrictModes no\nUsePAM no\n"
        f"PidFile {d / 'sshd.pid'}\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation folder
    proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", str(d / "sshd_config"), "-E", str(d / "log")])
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"sshd did not start: {(d / 'log').read_text()}")
            time.sleep(0.05)
        yield {"port": str(port), "key": str(d / "client")}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def lv(vbfs: Vbfs, libvirtd: Libvirtd) -> Vbfs:
    vbfs.env["VBFS_RUN_DIR"] = str(libvirtd.dir / "vbfs-run")
    return vbfs


def backup(v: Vbfs, source: str, **kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(v("backup", "--json", source, **kw).stdout)
    return out


def vm_json(v: Vbfs, guest: str, tmp_path: Path) -> dict[str, Any]:
    target = tmp_path / "vm.json"
    target.unlink(missing_ok=True)
    v("restore", f"{guest}@latest:/vm.json", str(target))
    out: dict[str, Any] = json.loads(target.read_text())
    return out


def restored_equals(v: Vbfs, d: Domain, tmp_path: Path) -> bool:
    target = tmp_path / "vda.img"
    target.unlink(missing_ok=True)
    v("restore", f"{d.name}@latest:/disks/vda.img", str(target))
    return sha256(target) == sha256(d.expected)


def scattered_writes(d: Domain, count: int, seed: int) -> int:
    """``count`` 64 KiB writes at random aligned places of the disk (some inside the filesystem's free space)."""
    rng = random.Random(seed)
    slots = rng.sample(range(130 * MiB // BLOCK, DISK_SIZE // BLOCK), count)
    for i, slot in enumerate(slots):
        d.write(slot * BLOCK, BLOCK, 0x40 + i % 64)
    return count * BLOCK


@pytest.mark.slow
def test_full_then_incremental_reads_only_dirty_extents(
    lv: Vbfs, libvirtd: Libvirtd, domain: Domain, tmp_path: Path, mounted: Any
) -> None:
    rows = json.loads(lv("guests", "--json", libvirtd.source()).stdout)
    row = next(r for r in rows if r["name"] == domain.name)
    assert row["state"] == "running" and row["disks"] == [{"name": "vda", "size": DISK_SIZE}]
    assert row["agent"] == "none"

    full = backup(lv, domain.source)
    allocated = int(
        subprocess.run(["du", "-B1", str(domain.expected)], capture_output=True, text=True).stdout.split()[0]
    )
    assert full["consistency"] == "crash-consistent"
    assert any("no QEMU guest agent" in n for n in full["notes"]), full["notes"]
    assert 0 < full["stats"]["read_bytes"] <= allocated, "a full backup reads only allocated extents"
    assert not domain.backup_job_running()
    assert len(domain.vbfs_checkpoints()) == 1
    info = vm_json(lv, domain.name, tmp_path)
    assert info["disks"][0]["mode"] == "full"
    first_checkpoint = info["metadata"]["checkpoint"]
    assert domain.vbfs_checkpoints() == [first_checkpoint]

    m = mounted(lv)
    snap = m.path / domain.name / "latest"
    assert (snap / "files" / "vda" / "p1" / "etc" / "hostname").read_text() == "kvm01\n"
    assert b"<domain" in (snap / "config" / "domain.xml").read_bytes()

    written = scattered_writes(domain, 48, seed=1)
    domain.write(0, BLOCK, 0x11)  # the partition table's first block too
    written += BLOCK
    inc = backup(lv, domain.source)
    assert inc["stats"]["read_bytes"] == written, "an incremental reads exactly the dirty extents"
    info = vm_json(lv, domain.name, tmp_path)
    assert info["disks"][0]["mode"] == "incremental"
    assert info["metadata"]["incremental_from"] == first_checkpoint
    assert restored_equals(lv, domain, tmp_path), "the restored disk equals the disk at checkpoint time"
    assert len(domain.vbfs_checkpoints()) == 2, "the last committed checkpoint and the new one"

    # a third backup: the checkpoint no backup needs any more is deleted
    domain.write(140 * MiB, BLOCK, 0x22)
    third = backup(lv, domain.source)
    assert third["stats"]["read_bytes"] == BLOCK
    assert len(domain.vbfs_checkpoints()) == 2
    assert restored_equals(lv, domain, tmp_path)
    lv("check", "--verify-data")


def _remove_bitmaps(d: Domain) -> list[str]:
    """Delete the domain's persistent dirty bitmaps behind libvirt's back, through QMP."""
    import libvirt_qemu

    nodes = json.loads(libvirt_qemu.qemuMonitorCommand(d.dom, json.dumps({"execute": "query-named-block-nodes"}), 0))[
        "return"
    ]
    removed = []
    for node in nodes:
        for bitmap in node.get("dirty-bitmaps", []):
            if bitmap["name"].startswith("vbfs-"):
                cmd = {
                    "execute": "block-dirty-bitmap-remove",
                    "arguments": {"node": node["node-name"], "name": bitmap["name"]},
                }
                libvirt_qemu.qemuMonitorCommand(d.dom, json.dumps(cmd), 0)
                removed.append(bitmap["name"])
    return removed


@pytest.mark.slow
def test_deleted_bitmap_gives_a_correct_full_backup(lv: Vbfs, domain: Domain, tmp_path: Path) -> None:
    first = backup(lv, domain.source)
    assert _remove_bitmaps(domain), "the checkpoint's bitmap must exist to be removed"
    scattered_writes(domain, 8, seed=2)
    out = backup(lv, domain.source)
    assert any("full backup" in n for n in out["notes"]), out["notes"]
    assert out["stats"]["read_bytes"] >= first["stats"]["read_bytes"], "a full read, not a wrong incremental"
    assert vm_json(lv, domain.name, tmp_path)["disks"][0]["mode"] == "full"
    assert restored_equals(lv, domain, tmp_path)
    # and the chain works again afterwards
    domain.write(150 * MiB, BLOCK, 0x33)
    again = backup(lv, domain.source)
    assert again["stats"]["read_bytes"] == BLOCK
    assert restored_equals(lv, domain, tmp_path)


@pytest.mark.slow
def test_kill_during_nbd_read_then_next_run_ends_the_job_and_continues(
    lv: Vbfs, libvirtd: Libvirtd, domain: Domain, tmp_path: Path
) -> None:
    backup(lv, domain.source)
    written = scattered_writes(domain, 16, seed=3)
    proc = lv("backup", domain.source, check=False, extra_env={"VBFS_FAILPOINT": "chunk-read:3"})
    assert proc.returncode == -9
    assert domain.backup_job_running(), "a killed backup cannot end its job"
    assert len(json.loads(lv("snapshots", "--json").stdout)) == 1, "no partial snapshot in the repository"

    out = backup(lv, domain.source)
    assert any("cleanup: ended the backup job" in n for n in out["notes"]), out["notes"]
    assert out["stats"]["read_bytes"] == written, "still an incremental from the last committed checkpoint"
    assert not domain.backup_job_running()
    assert restored_equals(lv, domain, tmp_path)
    assert len(domain.vbfs_checkpoints()) == 2
    assert not any((libvirtd.dir / "vbfs-run").glob(f"{domain.name}-*")), "socket folders are removed"
    lv("check")


def test_errors_are_one_clear_line(lv: Vbfs, libvirtd: Libvirtd, domain: Domain) -> None:
    def error(*args: str) -> str:
        proc = lv(*args, check=False)
        assert proc.returncode != 0, proc.stdout
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("vbfs: error: "), proc.stderr
        return lines[0]

    assert "no domain 'nosuch'" in error("backup", libvirtd.source("nosuch"))
    assert "for another host use qemu+ssh" in error("guests", "libvirt://kvmhost/system")
    assert "cannot connect to libvirt" in error("backup", "qemu+ssh://root@127.0.0.1:1/system/web01?no_verify=1")
    assert "expected libvirt:///system" in error("guests", "libvirt:///nowhere")
    assert "cannot connect to libvirt" in error("guests", "libvirt:///system?socket=/nonexistent/sock")
    domain.dom.destroy()
    assert "is not running" in error("backup", domain.source)
    assert json.loads(lv("snapshots", "--json").stdout) == []


@pytest.mark.slow
def test_guest_agent_freeze_then_thaw_around_the_checkpoint(
    lv: Vbfs, make_domain: Callable[..., Domain], tmp_path: Path
) -> None:
    d = make_domain(agent=True)
    d.wait_for_agent()
    # killed while the guest is frozen: the next run thaws it first
    proc = lv("backup", d.source, check=False, extra_env={"VBFS_FAILPOINT": "guest-frozen"})
    assert proc.returncode == -9
    assert d.agent("guest-fsfreeze-status") == "frozen"
    out = backup(lv, d.source)
    assert any("cleanup: thawed the filesystems" in n for n in out["notes"]), out["notes"]
    assert out["consistency"] == "filesystem-consistent", out["notes"]
    meta = vm_json(lv, d.name, tmp_path)["metadata"]
    assert meta["freeze"] == "1 filesystems frozen through the QEMU guest agent"
    assert meta["frozen_for_s"] < 30
    assert d.agent("guest-fsfreeze-status") == "thawed"
    target = tmp_path / "hostname"
    lv("restore", f"{d.name}@latest:/files/vda/p1/etc/hostname", str(target))
    assert target.read_text() == "kvm01\n"


@pytest.mark.slow
def test_thaw_follows_freeze_when_the_backup_job_cannot_start(
    lv: Vbfs, libvirtd: Libvirtd, make_domain: Callable[..., Domain], tmp_path: Path
) -> None:
    d = make_domain(agent=True)
    d.wait_for_agent()
    closed = tmp_path / "closed"  # QEMU (libvirt-qemu) cannot reach below it: the NBD socket cannot be made
    closed.mkdir(mode=0o700)
    proc = lv("backup", d.source, check=False, extra_env={"VBFS_RUN_DIR": str(closed / "run")})
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("vbfs: error:")]
    assert len(errors) == 1 and "cannot start a backup" in errors[0], proc.stderr
    assert d.agent("guest-fsfreeze-status") == "thawed", "thaw must follow freeze when the job fails to start"
    assert d.vbfs_checkpoints() == []
    assert not d.backup_job_running()
    assert not any((closed / "run").iterdir()), "the socket folder is removed"
    assert json.loads(lv("snapshots", "--json").stdout) == []


@pytest.mark.slow
def test_remote_host_over_ssh(
    lv: Vbfs, libvirtd: Libvirtd, domain: Domain, sshd: dict[str, str], tmp_path: Path
) -> None:
    """qemu+ssh: libvirt's own ssh transport for control, an ssh forward of the NBD socket for the bytes."""
    remote_socket = libvirtd.dir / "run" / "libvirt-sock"
    params = f"socket={remote_socket}&keyfile={sshd['key']}&no_verify=1&proxy=netcat"
    source = f"qemu+ssh://root@127.0.0.1:{sshd['port']}/system/{domain.name}?{params}"
    rows = json.loads(lv("guests", "--json", source.replace(f"/{domain.name}?", "?")).stdout)
    assert domain.name in [r["name"] for r in rows]
    full = backup(lv, source)
    assert full["stats"]["read_bytes"] > 0
    written = scattered_writes(domain, 8, seed=4)
    inc = backup(lv, source)
    assert inc["stats"]["read_bytes"] == written, "an incremental over ssh reads only the dirty extents"
    assert restored_equals(lv, domain, tmp_path)
    assert not domain.backup_job_running()
    assert not any((libvirtd.dir / "vbfs-run").glob(f"{domain.name}-*")), "the remote socket folder is removed"
    forwards = subprocess.run(["pgrep", "-f", "ssh .*-N .*nbd.sock"], capture_output=True, text=True).stdout
    assert not forwards.strip(), "no ssh forward is left running"
