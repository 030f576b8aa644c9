"""Driving the vCenter simulator (tools/vcsim, built by tools/setup) from tests and benchmarks.

:class:`VCenterSimulator` starts ``vbfs-vcsim`` on a loopback port with fixed credentials, stops it by its PID,
and does what a test needs around it with the real pyvmomi client: give a VM's disk the bytes of an image, list
the snapshots vbfs left on a VM, and read the simulator's count of bytes served by datastore downloads. What the
simulator imitates and what it does not is in docs/simulators.md.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

USER = "backup"
PASSWORD = "secret"
VM = "DC0_H0_VM0"  # one of the simulator's VMs, the default of the methods below


class VCenterSimulator:
    def __init__(self, exe: Path, user: str = USER, password: str = PASSWORD):
        self.user, self.password = user, password
        argv = [str(exe), "-listen", "127.0.0.1:0", "-username", user, "-password", password]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        try:
            assert self.proc.stdout is not None
            info = json.loads(self.proc.stdout.readline())
        except BaseException:
            self.stop()
            raise
        self.url: str = info["url"]
        self.datastore = Path(info["datastore"])
        self.hostport = self.url.split("//")[1].split("/")[0]
        self._si: Any = None

    # ---- the pyvmomi side ----------------------------------------------------------------------------------------

    @property
    def si(self) -> Any:
        if self._si is None:
            from pyVim.connect import SmartConnect

            host, port = self.hostport.split(":")
            self._si = SmartConnect(
                host=host,
                port=int(port),
                user=self.user,
                pwd=self.password,
                sslContext=ssl._create_unverified_context(),
            )
        return self._si

    @property
    def content(self) -> Any:
        return self.si.RetrieveContent()

    def source(self, vm: str = VM) -> str:
        return f"vmware://{self.user}@{self.hostport}/DC0/vm/{vm}"

    def vm(self, name: str = VM) -> Any:
        found = self.content.searchIndex.FindByInventoryPath(f"DC0/vm/{name}")
        if found is None:
            raise KeyError(name)
        return found

    def flat(self, vm: str = VM) -> Path:
        return self.datastore / vm / "disk1-flat.vmdk"

    def changes_file(self, vm: str = VM) -> Path:
        """Where the simulator looks up the areas changed since a changeId (see docs/simulators.md)."""
        return self.datastore / vm / "disk1-changes.json"

    def set_disk(self, image: Path, vm_name: str = VM) -> Path:
        """Make the VM's disk the size of ``image`` and put the image's bytes (sparse) in its flat file."""
        from pyVim.task import WaitForTask
        from pyVmomi import vim

        vm = self.vm(vm_name)
        disk = next(d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk))
        disk.capacityInKB = image.stat().st_size // 1024
        edit = vim.vm.device.VirtualDeviceSpec(operation=vim.vm.device.VirtualDeviceSpec.Operation.edit, device=disk)
        WaitForTask(vm.ReconfigVM_Task(vim.vm.ConfigSpec(deviceChange=[edit])))
        flat = self.flat(vm_name)
        flat.unlink(missing_ok=True)
        subprocess.run(["cp", "--sparse=always", str(image), str(flat)], check=True)
        return flat

    def vbfs_snapshots(self, vm_name: str = VM) -> list[str]:
        """Names of the VM's snapshots that vbfs made (``vbfs-...``), read through the property collector."""
        from pyVmomi import vim, vmodl

        pc = vmodl.query.PropertyCollector
        spec = pc.FilterSpec(
            objectSet=[pc.ObjectSpec(obj=self.vm(vm_name))],
            propSet=[pc.PropertySpec(type=vim.VirtualMachine, pathSet=["snapshot"])],
        )
        result = self.content.propertyCollector.RetrievePropertiesEx([spec], pc.RetrieveOptions())
        props = {p.name: p.val for p in result.objects[0].propSet} if result and result.objects else {}
        todo = list(getattr(props.get("snapshot"), "rootSnapshotList", None) or [])
        names = []
        while todo:
            node = todo.pop()
            names.append(node.name)
            todo += list(node.childSnapshotList or [])
        return sorted(n for n in names if n.startswith("vbfs-"))

    def needs_consolidation(self, vm_name: str = VM) -> None:
        """Make vSphere say the VM's disks need consolidating (``runtime.consolidationNeeded``)."""
        ctx = ssl._create_unverified_context()
        url = f"https://{self.hostport}/vbfs/needs-consolidation?vm={self.vm(vm_name)._moId}"
        with urllib.request.urlopen(urllib.request.Request(url, method="POST"), context=ctx):
            pass

    def consolidation_needed(self, vm_name: str = VM) -> bool:
        return bool(self.vm(vm_name).runtime.consolidationNeeded)

    def downloaded(self) -> int:
        """Bytes the simulator has served from datastore files so far."""
        ctx = ssl._create_unverified_context()
        with urllib.request.urlopen(f"https://{self.hostport}/vbfs/stats", context=ctx) as resp:
            return int(json.load(resp)["downloaded_bytes"])

    def stop(self) -> None:
        if self._si is not None:
            from pyVim.connect import Disconnect

            with contextlib.suppress(Exception):  # the simulator may be gone already
                Disconnect(self._si)
            self._si = None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
