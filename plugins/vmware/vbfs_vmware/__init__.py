"""The ``vmware`` source: agentless backups of vSphere virtual machines through the vSphere API (pyvmomi).

``vmware://backup@vcenter.example/DC0`` is a datacenter (``vbfs guests`` lists its VMs);
``vmware://backup@vcenter.example/DC0/vm/prod/web01`` names one VM by its inventory path under the datacenter's
VM folder (or just by its name when that is unique in the datacenter).

One backup of a VM:

1. remove snapshots that an earlier vbfs run left behind (its process is gone) and consolidate the disks when
   vSphere says so;
2. turn Changed Block Tracking on if it is off, and make it take effect with a snapshot create/remove cycle;
3. take a snapshot without memory, quiesced through VMware Tools; when quiescing fails, take a crash-consistent
   one and record why in ``vm.json``;
4. ask ``QueryChangedDiskAreas`` for each disk of the snapshot: with ``*`` for a full backup (only allocated
   areas are read), with the changeId the last backup stored for an incremental; a changeId that vSphere rejects
   gives a full read, deduplicated by hash, and a note;
5. read the areas from the snapshot's disk files through a transport (:mod:`vbfs_vmware.transport`), keep the
   ``.vmx`` and ``.nvram`` under ``config/``, and remove the snapshot whatever happened.

Disks are named by their controller and unit (``scsi0-0``, ``sata0-1``, ``ide0-0``, ``nvme0-0``), which stay
the same when a disk file moves to another datastore.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, ClassVar

from vbfs.errors import NotSupported, SourceError
from vbfs.plugins import Registry, hookimpl
from vbfs.sources import (
    CRASH_CONSISTENT,
    FILESYSTEM_CONSISTENT,
    ChangeToken,
    DiskInfo,
    Extent,
    GuestInfo,
    SourceURL,
    vbfs_process_alive,
)
from vbfs_vmware.session import Session, VmwareError, fault_text
from vbfs_vmware.transport import DatastoreFile, DatastoreHttp, Transport

__version__ = "0.1.0"

SNAPSHOT_PREFIX = "vbfs-"
FOREIGN_LEFTOVER_AGE = 24 * 3600  # a snapshot of a vbfs run on another machine is a leftover after this long
CONFIG_FILE_LIMIT = 16 * 1024 * 1024
VM_PROPERTIES = [
    "name",
    "parent",
    "runtime.powerState",
    "runtime.consolidationNeeded",
    "config.template",
    "config.changeTrackingEnabled",
    "config.hardware.device",
    "guest.toolsRunningStatus",
]


def _controller_name(device: Any) -> str:
    from pyVmomi import vim

    kinds = [
        (vim.vm.device.VirtualSCSIController, "scsi"),
        (vim.vm.device.VirtualAHCIController, "sata"),
        (vim.vm.device.VirtualIDEController, "ide"),
    ]
    nvme = getattr(vim.vm.device, "VirtualNVMEController", None)
    if nvme is not None:
        kinds.append((nvme, "nvme"))
    for cls, kind in kinds:
        if isinstance(device, cls):
            return f"{kind}{device.busNumber}"
    return f"ctl{device.key}"


def vm_disks(devices: list[Any]) -> list[tuple[DiskInfo, Any]]:
    """The virtual disks among ``devices``, named ``<controller><bus>-<unit>``, with their device objects."""
    from pyVmomi import vim

    controllers = {d.key: d for d in devices}
    out = []
    for d in devices or []:
        if not isinstance(d, vim.vm.device.VirtualDisk):
            continue
        ctl = controllers.get(d.controllerKey)
        name = f"{_controller_name(ctl) if ctl is not None else 'disk'}-{d.unitNumber}"
        size = int(d.capacityInBytes or d.capacityInKB * 1024)
        backing = d.backing
        details = {
            "label": d.deviceInfo.label if d.deviceInfo else None,
            "file": getattr(backing, "fileName", None),
            "device_key": d.key,
            "backing": type(backing).__name__.rsplit(".", 1)[-1],
        }
        out.append((DiskInfo(name, size, details), d))
    return out


class VmwareSnapshot:
    """One vSphere snapshot of a VM, read through a transport. Valid inside :meth:`VmwareHypervisor.snapshot`."""

    def __init__(
        self,
        hv: VmwareHypervisor,
        vm: Any,
        snap: Any,
        consistency: str,
        facts: dict[str, Any],
    ):
        self.hv = hv
        self.vm = vm
        self.snap = snap
        self.consistency = consistency
        self.facts = facts
        config = hv.session.props(snap, ["config"]).get("config")
        if config is None:
            raise VmwareError(f"snapshot of {facts['vm']} has no configuration")
        self.config = config
        self._disks = vm_disks(list(config.hardware.device))
        self._files: dict[str, DatastoreFile] = {}
        for info, device in self._disks:
            self._files[info.name] = self._flat_file(info, device)

    def _flat_file(self, info: DiskInfo, device: Any) -> DatastoreFile:
        from pyVmomi import vim

        backing = device.backing
        if not isinstance(backing, vim.vm.device.VirtualDisk.FlatVer2BackingInfo):
            raise NotSupported(
                f"disk {info.name} of {self.facts['vm']} has a {type(backing).__name__} backing; the datastore "
                "transport reads flat (thin or thick) VMDKs only"
            )
        if backing.parent is not None:
            raise NotSupported(
                f"disk {info.name} of {self.facts['vm']} is a delta disk (the VM has other snapshots); the datastore "
                "transport reads base disks only: remove the VM's other snapshots first"
            )
        descriptor = DatastoreFile.parse(self.hv.dc_path, backing.fileName)
        if not descriptor.path.endswith(".vmdk"):
            raise NotSupported(f"disk {info.name}: unexpected disk file name {backing.fileName}")
        return descriptor.sibling(descriptor.path.rsplit("/", 1)[-1][: -len(".vmdk")] + "-flat.vmdk")

    @property
    def notes(self) -> list[str]:
        """What the user should know about this backup (quiescing failed, a changeId was rejected, ...)."""
        return list(self.facts.get("notes", []))

    def disks(self) -> list[DiskInfo]:
        return [info for info, _ in self._disks]

    def _device(self, disk: DiskInfo) -> Any:
        for info, device in self._disks:
            if info.name == disk.name:
                return device
        raise SourceError(f"no disk {disk.name} in the snapshot")

    def _query(self, disk: DiskInfo, change_id: str) -> list[Extent]:
        """QueryChangedDiskAreas looped until it has covered the whole disk."""
        device = self._device(disk)
        out: list[Extent] = []
        start = 0
        while start < disk.size:
            info = self.hv.session.call(self.vm.QueryChangedDiskAreas, self.snap, device.key, start, change_id)
            for area in info.changedArea or []:
                a, n = int(area.start), int(area.length)
                if n <= 0:
                    continue
                a, end = max(a, start), min(a + n, disk.size)
                if end <= a:
                    continue
                if out and a <= out[-1].end:
                    out[-1] = Extent(out[-1].offset, max(out[-1].end, end) - out[-1].offset)
                else:
                    out.append(Extent(a, end - a))
            covered = int(info.startOffset) + int(info.length)
            if covered <= start:
                raise VmwareError(f"QueryChangedDiskAreas for disk {disk.name} made no progress at {start}")
            start = covered
        return out

    def allocated_extents(self, disk: DiskInfo) -> list[Extent] | None:
        from pyVmomi import vim, vmodl

        if not self.facts.get("cbt"):
            return None
        try:
            return self._query(disk, "*")
        except (vim.fault.FileFault, vim.fault.NotFound, vmodl.fault.InvalidArgument) as exc:
            self.facts.setdefault("notes", []).append(
                f"disk {disk.name}: allocated areas unknown ({fault_text(exc)}); the whole disk was read"
            )
            return None

    def changed_extents(self, disk: DiskInfo, since: ChangeToken) -> list[Extent] | None:
        from pyVmomi import vim, vmodl

        if not self.facts.get("cbt"):
            return None
        try:
            return self._query(disk, since)
        except (vim.fault.FileFault, vim.fault.NotFound, vmodl.fault.InvalidArgument) as exc:
            self.facts.setdefault("notes", []).append(
                f"disk {disk.name}: vSphere rejected changeId {since!r} ({fault_text(exc)})"
            )
            return None

    def read(self, disk: DiskInfo, offset: int, length: int) -> bytes:
        length = max(0, min(length, disk.size - offset))
        (data,) = self.read_ranges(disk, [(offset, length)])
        return data

    def read_ranges(self, disk: DiskInfo, ranges: Iterable[tuple[int, int]]) -> Iterator[bytes]:
        return self.hv.transport.read_ranges(self._files[disk.name], ranges)

    def change_token(self, disk: DiskInfo) -> ChangeToken | None:
        token = getattr(self._device(disk).backing, "changeId", None)
        return str(token) if token else None

    def metadata(self) -> dict[str, Any]:
        c = self.config
        disks = []
        for info, device in self._disks:
            disks.append(
                {
                    "name": info.name,
                    "label": info.details.get("label"),
                    "file": info.details.get("file"),
                    "capacity": info.size,
                    "change_id": getattr(device.backing, "changeId", None),
                    "thin": getattr(device.backing, "thinProvisioned", None),
                }
            )
        return {
            "hypervisor": "vmware",
            **{k: v for k, v in self.facts.items() if k != "notes"},
            "guest_os": getattr(c, "guestFullName", None) or getattr(c, "guestId", None),
            "cpus": getattr(c.hardware, "numCPU", None),
            "memory_mb": getattr(c.hardware, "memoryMB", None),
            "instance_uuid": getattr(c, "instanceUuid", None),
            "bios_uuid": getattr(c, "uuid", None),
            "disks": disks,
        }

    def config_files(self) -> dict[str, bytes]:
        vmx_name = self.facts.get("vmx")
        if not vmx_name:
            return {}
        vmx = DatastoreFile.parse(self.hv.dc_path, vmx_name)
        out: dict[str, bytes] = {}
        content = self.hv.transport.get_file(vmx, CONFIG_FILE_LIMIT)
        if content is None:
            self.facts.setdefault("notes", []).append(f"{vmx} was not found on the datastore")
            return out
        out[_config_name(vmx.path.rsplit("/", 1)[-1])] = content
        nvram_name = _vmx_value(content, "nvram") or vmx.path.rsplit("/", 1)[-1][: -len(".vmx")] + ".nvram"
        nvram = (
            vmx.sibling(nvram_name) if "/" not in nvram_name else DatastoreFile(vmx.dc_path, vmx.datastore, nvram_name)
        )
        data = self.hv.transport.get_file(nvram, CONFIG_FILE_LIMIT)
        if data is not None:
            out[_config_name(nvram.path.rsplit("/", 1)[-1])] = data
        return out


def _config_name(name: str) -> str:
    """A datastore file name as a name under ``config/`` (VM names may hold characters folder names may not)."""
    safe = re.sub(r"[^A-Za-z0-9._+@ -]", "_", name).strip() or "config"
    return "_" + safe[1:] if safe[0] in "@ " else safe


def _vmx_value(vmx: bytes, key: str) -> str | None:
    for line in vmx.decode("utf-8", "replace").splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip().lower() == key:
            return value.strip().strip('"') or None
    return None


class VmwareHypervisor:
    """A connection to vCenter or ESXi, scoped to one datacenter."""

    scheme: ClassVar[str] = "vmware"

    def __init__(self, url: SourceURL, options: Mapping[str, Any]):
        parts = [p for p in url.path.split("/") if p]
        if "vm" in parts:
            at = parts.index("vm")
            dc_parts, vm_parts = parts[:at], parts[at + 1 :]
        else:
            dc_parts, vm_parts = parts, []
        if not dc_parts:
            raise VmwareError(f"{url.raw}: name the datacenter: vmware://user@host/DATACENTER[/vm/FOLDER/VM]")
        self.url = url
        self.dc_path = "/".join(dc_parts)
        self.vm_path = "/".join(vm_parts)
        self.options = options
        self._found: dict[str, tuple[Any, dict[str, Any]]] = {}
        self.session = Session(url, options)
        try:
            self.datacenter = self._find_datacenter()
            self.transport: Transport = DatastoreHttp(self.session, streams=int(options.get("streams", 4)))
        except BaseException:
            self.session.close()
            raise

    # ---- inventory -----------------------------------------------------------------------------------------------

    def _find_datacenter(self) -> Any:
        from pyVmomi import vim

        found = self.session.call(self.session.content.searchIndex.FindByInventoryPath, self.dc_path)
        if not isinstance(found, vim.Datacenter):
            raise VmwareError(f"no datacenter {self.dc_path!r} at {self.session.where}")
        return found

    def _inventory(self) -> list[tuple[Any, dict[str, Any]]]:
        from pyVmomi import vim

        vm_folder = self.session.props(self.datacenter, ["vmFolder"])["vmFolder"]
        view = self.session.call(
            self.session.content.viewManager.CreateContainerView, vm_folder, [vim.VirtualMachine], True
        )
        try:
            rows = self.session.props_many([], vim.VirtualMachine, VM_PROPERTIES, container=view)
        finally:
            self.session.call(view.DestroyView)
        folders = self._folder_paths(vm_folder)
        for _, p in rows:
            parent = p.get("parent")
            prefix = folders.get(parent._moId if parent is not None else "", "")
            p["path"] = f"{prefix}{p['name']}"
        return [(vm, p) for vm, p in rows if not p.get("config.template")]

    def _folder_paths(self, vm_folder: Any) -> dict[str, str]:
        """Folder moId → ``a/b/`` path under the datacenter's VM folder."""
        from pyVmomi import vim

        view = self.session.call(self.session.content.viewManager.CreateContainerView, vm_folder, [vim.Folder], True)
        try:
            rows = self.session.props_many([], vim.Folder, ["name", "parent"], container=view)
        finally:
            self.session.call(view.DestroyView)
        info = {f._moId: (p["name"], p.get("parent")) for f, p in rows}
        out: dict[str, str] = {vm_folder._moId: ""}

        def path(moid: str, depth: int = 0) -> str:
            if moid in out:
                return out[moid]
            if moid not in info or depth > 64:
                return ""
            name, parent = info[moid]
            out[moid] = path(parent._moId if parent is not None else "", depth + 1) + name + "/"
            return out[moid]

        for moid in info:
            path(moid)
        return out

    def guests(self) -> list[GuestInfo]:
        out = []
        for _, p in sorted(self._inventory(), key=lambda r: r[1]["path"]):
            disks = tuple(info for info, _ in vm_disks(list(p.get("config.hardware.device") or [])))
            out.append(
                GuestInfo(
                    p["name"],
                    str(p.get("runtime.powerState", "unknown")),
                    disks,
                    {
                        "path": p["path"],
                        "cbt": bool(p.get("config.changeTrackingEnabled")),
                        "tools": str(p.get("guest.toolsRunningStatus") or "unknown"),
                    },
                )
            )
        return out

    def default_guest(self) -> str | None:
        return self.vm_path.rsplit("/", 1)[-1] if self.vm_path else None

    def _find_vm(self, guest: str) -> tuple[Any, dict[str, Any]]:
        """The VM and its properties; the inventory is read once per guest and connection (a backup asks twice)."""
        found = self._found.get(guest)
        if found is None:
            found = self._found[guest] = self._lookup_vm(guest)
        return found

    def _lookup_vm(self, guest: str) -> tuple[Any, dict[str, Any]]:
        rows = self._inventory()
        wanted = self.vm_path if self.vm_path and guest == self.default_guest() else guest
        exact = [r for r in rows if r[1]["path"] == wanted]
        if not exact:
            exact = [r for r in rows if r[1]["name"] == wanted.rsplit("/", 1)[-1]] if "/" not in wanted else []
        if not exact:
            raise VmwareError(f"no VM {wanted!r} in datacenter {self.dc_path} at {self.session.where}")
        if len(exact) > 1:
            paths = ", ".join(sorted(r[1]["path"] for r in exact))
            raise VmwareError(f"{len(exact)} VMs are named {wanted!r} in {self.dc_path}: give the path ({paths})")
        return exact[0]

    # ---- snapshots -----------------------------------------------------------------------------------------------

    def _snapshots(self, vm: Any) -> list[Any]:
        """The VM's snapshot tree, flattened (read as a property: reading vm.snapshot directly can fail)."""
        info = self.session.props(vm, ["snapshot"]).get("snapshot")
        out: list[Any] = []
        todo = list(getattr(info, "rootSnapshotList", None) or [])
        while todo:
            node = todo.pop()
            out.append(node)
            todo += list(node.childSnapshotList or [])
        return out

    def _remove_snapshot(self, snap: Any, what: str) -> None:
        task = self.session.call(snap.RemoveSnapshot_Task, removeChildren=False)
        self.session.wait_task(task, f"removing {what}")

    def remove_leftovers(self, guest: str) -> list[str]:
        vm, p = self._find_vm(guest)
        removed = []
        for node in self._snapshots(vm):
            if not node.name.startswith(SNAPSHOT_PREFIX):
                continue
            try:
                owner = json.loads(node.description or "{}")
            except ValueError:
                continue
            if not isinstance(owner, dict) or owner.get("vbfs") != 1:
                continue
            created = node.createTime.timestamp() if node.createTime else 0.0
            if owner.get("host") == socket.gethostname():
                if vbfs_process_alive(int(owner.get("pid", 0))) and int(owner.get("pid", 0)) != os.getpid():
                    continue  # another vbfs run on this machine is reading it
            elif time.time() - created < FOREIGN_LEFTOVER_AGE:
                continue  # maybe still in use by a vbfs run on another machine
            self._remove_snapshot(node.snapshot, f"leftover snapshot {node.name}")
            removed.append(f"removed snapshot {node.name} of {p['name']}, left by an earlier run")
        if self.session.props(vm, ["runtime.consolidationNeeded"]).get("runtime.consolidationNeeded"):
            task = self.session.call(vm.ConsolidateVMDisks_Task)
            self.session.wait_task(task, f"consolidating the disks of {p['name']}")
            removed.append(f"consolidated the disks of {p['name']}, as vSphere asked")
        return removed

    def _create_snapshot(self, vm: Any, name: str, description: str, quiesce: bool) -> Any:
        task = self.session.call(vm.CreateSnapshot_Task, name, description, False, quiesce)
        self.session.wait_task(task, f"snapshot {name}")
        snap = self.session.task_result(task)
        if snap is None:
            raise VmwareError(f"snapshot {name} was created but vSphere did not say which it is")
        return snap

    def _enable_cbt(self, vm: Any, p: dict[str, Any], facts: dict[str, Any]) -> None:
        from pyVmomi import vim

        task = self.session.call(vm.ReconfigVM_Task, vim.vm.ConfigSpec(changeTrackingEnabled=True))
        try:
            self.session.wait_task(task, f"enabling changed block tracking on {p['name']}")
        except vim.fault.VimFault as exc:
            facts["notes"].append(f"changed block tracking could not be enabled ({fault_text(exc)}): full reads")
            return
        facts["cbt_enabled_now"] = True
        facts["notes"].append("changed block tracking was off and has been enabled")
        if p.get("runtime.powerState") == "poweredOn":
            # CBT starts tracking at the next stun/unstun of the VM: a snapshot create and remove does that.
            name = f"{SNAPSHOT_PREFIX}cbt-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
            snap = self._create_snapshot(vm, name, self._owner(), quiesce=False)
            self._remove_snapshot(snap, name)

    @staticmethod
    def _owner() -> str:
        return json.dumps({"vbfs": 1, "host": socket.gethostname(), "pid": os.getpid()})

    @contextmanager
    def snapshot(self, guest: str, since: Mapping[str, ChangeToken] | None = None) -> Iterator[VmwareSnapshot]:
        from pyVmomi import vim

        vm, p = self._find_vm(guest)
        devices = list(p.get("config.hardware.device") or [])
        if not vm_disks(devices):
            raise VmwareError(f"VM {p['path']} has no virtual disks to back up")
        facts: dict[str, Any] = {
            "vcenter": self.session.where,
            "datacenter": self.dc_path,
            "vm": p["name"],
            "inventory_path": p["path"],
            "moref": vm._moId,
            "power_state": p.get("runtime.powerState"),
            "tools": p.get("guest.toolsRunningStatus"),
            "notes": [],
        }
        if not p.get("config.changeTrackingEnabled"):
            self._enable_cbt(vm, p, facts)
        facts["cbt"] = bool(
            self.session.props(vm, ["config.changeTrackingEnabled"]).get("config.changeTrackingEnabled")
        )
        facts["vmx"] = self.session.props(vm, ["config.files.vmPathName"]).get("config.files.vmPathName")
        name = f"{SNAPSHOT_PREFIX}{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
        consistency = CRASH_CONSISTENT
        snap = None
        if p.get("runtime.powerState") != "poweredOn":
            facts["quiesce"] = f"not attempted: the VM is {p.get('runtime.powerState')}"
        else:
            try:
                snap = self._create_snapshot(vm, name, self._owner(), quiesce=True)
                consistency = FILESYSTEM_CONSISTENT
                facts["quiesce"] = "quiesced through VMware Tools"
            except (vim.fault.ApplicationQuiesceFault, vim.fault.ToolsUnavailable, vim.fault.SnapshotFault) as exc:
                facts["quiesce"] = f"failed ({fault_text(exc)}): crash-consistent snapshot instead"
                facts["notes"].append(f"quiescing {p['name']} failed ({fault_text(exc)}); crash-consistent backup")
        if snap is None:
            snap = self._create_snapshot(vm, name, self._owner(), quiesce=False)
        facts["snapshot"] = name
        try:
            yield VmwareSnapshot(self, vm, snap, consistency, facts)
        finally:
            try:
                self._remove_snapshot(snap, f"snapshot {name}")
            except Exception as exc:
                print(
                    f"vbfs: warning: snapshot {name} of {p['name']} could not be removed ({exc}); "
                    "the next backup of this VM removes it",
                    file=sys.stderr,
                )

    def close(self) -> None:
        try:
            self.transport.close()
        finally:
            self.session.close()


@hookimpl
def vbfs_register_hypervisors(registry: Registry) -> None:
    registry.add_hypervisor(VmwareHypervisor.scheme, VmwareHypervisor)
