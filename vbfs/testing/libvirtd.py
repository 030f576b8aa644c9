"""A private libvirt daemon and test domains for tests and benchmarks of the libvirt source, on the real thing.

:class:`Libvirtd` starts ``virtlogd`` and ``libvirtd`` (system mode, as root) with the daemon's sockets in a folder
of its own, and stops both by their PIDs; :meth:`Libvirtd.uri` is the libvirt URI of that daemon. A machine has
one system-mode QEMU driver state (``/run/libvirt/qemu``), so only one such daemon runs at a time and an already
running system daemon is refused. :func:`domain_xml` makes a minimal domain (no OS needed) with one virtio disk;
:func:`write_through_qemu` writes bytes into a running domain's disk through QEMU's own block layer.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any


def kvm_usable() -> bool:
    """Whether QEMU, running as libvirt-qemu (group kvm), can open /dev/kvm."""
    try:
        st = os.stat("/dev/kvm")
    except OSError:
        return False
    import grp

    try:
        kvm_gid = grp.getgrnam("kvm").gr_gid
    except KeyError:
        return False
    return bool(st.st_gid == kvm_gid and st.st_mode & stat.S_IRGRP and st.st_mode & stat.S_IWGRP)


class Libvirtd:
    def __init__(self, workdir: Path | None = None):
        if Path("/run/libvirt/virtlogd-sock").exists() and _connectable("/run/libvirt/virtlogd-sock"):
            raise RuntimeError("a system virtlogd is already running; stop it or run the tests elsewhere")
        self.dir = workdir or Path(tempfile.mkdtemp(prefix="vbfs-libvirtd-"))
        self.dir.chmod(0o755)  # QEMU (libvirt-qemu) must reach the disk images below it
        (self.dir / "run").mkdir(exist_ok=True)
        conf = self.dir / "libvirtd.conf"
        conf.write_text(
            f'unix_sock_dir = "{self.dir / "run"}"\n'
            'unix_sock_rw_perms = "0700"\n'
            'auth_unix_rw = "none"\n'
            'auth_unix_ro = "none"\n'
            f'log_outputs = "3:file:{self.dir / "libvirtd.log"}"\n'
        )
        self.pids: list[int] = []
        try:
            self.pids.append(self._start(["virtlogd", "-d", "-p", str(self.dir / "virtlogd.pid")], "virtlogd.pid"))
            self.pids.append(
                self._start(["libvirtd", "-d", "-f", str(conf), "-p", str(self.dir / "libvirtd.pid")], "libvirtd.pid")
            )
            self._wait_for(self.dir / "run" / "libvirt-sock")
        except BaseException:
            self.stop()
            raise

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.dir / 'run' / 'libvirt-sock'}"

    def source(self, domain: str | None = None) -> str:
        """The vbfs source URL of a domain of this daemon."""
        return f"libvirt:///system{'/' + domain if domain else ''}?socket={self.dir / 'run' / 'libvirt-sock'}"

    def _start(self, argv: list[str], pidfile: str) -> int:
        subprocess.run(argv, check=True)
        path = self.dir / pidfile
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = path.read_text().strip() if path.exists() else ""
            if text.isdigit():
                return int(text)
            time.sleep(0.05)
        raise RuntimeError(f"{argv[0]} did not write {path}")

    def _wait_for(self, sock: Path) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if sock.exists() and _connectable(str(sock)):
                return
            time.sleep(0.05)
        log = (self.dir / "libvirtd.log").read_text()[-2000:] if (self.dir / "libvirtd.log").exists() else ""
        raise RuntimeError(f"libvirtd did not open {sock}: {log}")

    def stop(self) -> None:
        for pid in reversed(self.pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and _running(pid):
                time.sleep(0.05)
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        self.pids.clear()


def _running(pid: int) -> bool:
    """Alive and not a zombie (a daemon whose parent has not reaped it yet has exited all the same)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _connectable(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def domain_xml(
    name: str,
    disk: Path,
    kvm: bool,
    agent: bool = False,
    memory_mib: int = 128,
    boot: tuple[Path, Path, Path] | None = None,
) -> str:
    """A domain with one virtio qcow2 disk ``vda``: no OS, or with ``boot`` = (kernel, initrd, console log) a
    kernel booted directly with its serial console in a file; ``agent`` adds a guest agent channel."""
    channel = "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>" if agent else ""
    os_xml = "<os><type arch='x86_64' machine='pc'>hvm</type></os>"
    serial = ""
    if boot is not None:
        kernel, initrd, console = boot
        os_xml = (
            f"<os><type arch='x86_64' machine='pc'>hvm</type><kernel>{kernel}</kernel><initrd>{initrd}</initrd>"
            "<cmdline>console=ttyS0 panic=-1 quiet</cmdline></os><on_reboot>destroy</on_reboot>"
        )
        serial = f"<serial type='file'><source path='{console}'/><target port='0'/></serial>"
    return f"""<domain type='{"kvm" if kvm else "qemu"}'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  {os_xml}
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    {channel}
    {serial}
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>"""


def write_through_qemu(dom: Any, target: str, offset: int, data_pattern: int, length: int) -> None:
    """Write ``length`` bytes of ``data_pattern`` at ``offset`` of a running domain's disk, as the guest would
    (QEMU's block layer marks the dirty bitmaps), with the HMP ``qemu-io`` command on the disk's device."""
    import xml.etree.ElementTree as ET

    import libvirt_qemu

    root = ET.fromstring(dom.XMLDesc())
    alias = None
    for disk in root.findall("./devices/disk"):
        t = disk.find("target")
        if t is not None and t.get("dev") == target:
            a = disk.find("alias")
            alias = a.get("name") if a is not None else None
    if not alias:
        raise RuntimeError(f"disk {target} has no device alias")
    cmd = f'qemu-io -d /machine/peripheral/{alias}/virtio-backend "write -P {data_pattern:#x} {offset} {length}"'
    out = libvirt_qemu.qemuMonitorCommand(dom, cmd, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
    if out.strip():
        raise RuntimeError(f"qemu-io: {out.strip()}")
