"""The vCenter simulator that the VMware plugin's tests run against (tools/vcsim: govmomi's vcsim plus vbfs's
changed-block additions), driven by the real pyvmomi client. This tests the simulator, not vSphere."""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from pyVim.connect import Disconnect, SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim

from vbfs.testing.vcsim import VCenterSimulator

MiB = 1024 * 1024


def _connect(sim: VCenterSimulator, context: ssl.SSLContext | None = None, pwd: str = "secret"):  # type: ignore[no-untyped-def]
    host, port = sim.hostport.split(":")
    context = context or ssl._create_unverified_context()
    return SmartConnect(host=host, port=int(port), user="backup", pwd=pwd, sslContext=context)


def _first_vm(si):  # type: ignore[no-untyped-def]
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    return sorted(view.view, key=lambda v: v.name)[0]


def _disk(devices):  # type: ignore[no-untyped-def]
    return next(d for d in devices if isinstance(d, vim.vm.device.VirtualDisk))


def test_tls_is_verified_unless_turned_off_and_passwords_checked(vcsim: VCenterSimulator) -> None:
    with pytest.raises(ssl.SSLError):
        _connect(vcsim, ssl.create_default_context())
    with pytest.raises(vim.fault.InvalidLogin):
        _connect(vcsim, pwd="wrong")
    si = _connect(vcsim)
    assert si.RetrieveContent().about.apiType == "VirtualCenter"
    Disconnect(si)


def test_snapshots_changed_areas_and_datastore_reads(vcsim: VCenterSimulator) -> None:
    si = _connect(vcsim)
    vm = _first_vm(si)
    disk = _disk(vm.config.hardware.device)
    rel = disk.backing.fileName.split("] ", 1)[1]
    flat = Path(vcsim.datastore) / rel.replace(".vmdk", "-flat.vmdk")
    disk.capacityInKB = 64 * 1024  # the simulator's disks are 1 MiB: make this one 64 MiB
    edit = vim.vm.device.VirtualDeviceSpec(operation=vim.vm.device.VirtualDeviceSpec.Operation.edit, device=disk)
    WaitForTask(vm.ReconfigVM_Task(vim.vm.ConfigSpec(deviceChange=[edit])))
    disk = _disk(vm.config.hardware.device)
    size = disk.capacityInKB * 1024
    assert size == 64 * MiB
    with open(flat, "wb") as f:  # a sparse flat disk with data at 1 MiB and 5 MiB
        f.truncate(size)
        for off in (MiB, 5 * MiB):
            f.seek(off)
            f.write(os.urandom(64 * 1024))

    WaitForTask(vm.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=True)))
    snaps = []
    for n in range(2):
        task = vm.CreateSnapshot_Task(f"vbfs-{n}", "test", False, True)
        WaitForTask(task)
        snaps.append(task.info.result)
    ids = [_disk(s.config.hardware.device).backing.changeId for s in snaps]
    assert all(ids) and ids[0] != ids[1], ids

    key = _disk(snaps[1].config.hardware.device).key
    everything = vm.QueryChangedDiskAreas(snaps[1], key, 0, "*")
    assert [(a.start, a.length) for a in everything.changedArea] == [(MiB, 64 * 1024), (5 * MiB, 64 * 1024)]

    (flat.parent / rel.split("/")[-1].replace(".vmdk", "-changes.json")).write_text(
        json.dumps({ids[0]: [[0, 4096], [3 * MiB, 8192]]})
    )
    since = vm.QueryChangedDiskAreas(snaps[1], key, 0, ids[0])
    assert [(a.start, a.length) for a in since.changedArea] == [(0, 4096), (3 * MiB, 8192)]
    with pytest.raises(vim.fault.FileFault):
        vm.QueryChangedDiskAreas(snaps[1], key, 0, "52 forgotten/1")

    url = (
        vcsim.url.rsplit("/sdk", 1)[0]
        + "/folder/"
        + rel.replace(".vmdk", "-flat.vmdk")
        + f"?dcPath=DC0&dsName={disk.backing.datastore.name}"
    )
    request = urllib.request.Request(url, headers={"Range": f"bytes={MiB}-{MiB + 9}", "Cookie": si._stub.cookie})
    with urllib.request.urlopen(request, context=ssl._create_unverified_context()) as resp:
        assert resp.status == 206
        with open(flat, "rb") as f:
            f.seek(MiB)
            assert resp.read() == f.read(10)
    # injected failure: one more download works, the next ones get HTTP 500 until the file is gone
    (Path(vcsim.datastore) / "vbfs-fail-after").write_text("1")
    codes = []
    for _ in range(3):
        try:
            with urllib.request.urlopen(request, context=ssl._create_unverified_context()) as resp:
                codes.append(resp.status)
        except urllib.error.HTTPError as err:
            codes.append(err.code)
    assert codes == [206, 500, 500]
    (Path(vcsim.datastore) / "vbfs-fail-after").unlink()
    with urllib.request.urlopen(request, context=ssl._create_unverified_context()) as resp:
        assert resp.status == 206
    Disconnect(si)
