"""The ``libvirt`` source: backups of running KVM/QEMU domains through libvirt's backup API (pull mode).

``libvirt:///system`` lists the domains of the local system libvirt (``?socket=/path`` picks another daemon socket,
as in libvirt's own URIs); ``libvirt:///system/web01`` names one domain. ``qemu+ssh://user@host/system/web01``
(libvirt's own remote URI and parameters) backs up a domain of another host: libvirt's ssh transport carries the
API calls, and the disks are read through an ssh forward of the job's NBD socket (:mod:`vbfs_libvirt.hosts`).

One backup of a domain:

1. end a backup job that a killed vbfs run left running (and its socket folder), and drop vbfs checkpoints that no
   committed backup can use any more;
2. freeze the guest's filesystems through the QEMU guest agent when it answers (with a response deadline);
3. ``backupBegin`` in pull mode with a new checkpoint: incremental from the checkpoint of the last backup when it
   is still usable, else full. A missing or inconsistent checkpoint or bitmap gives a full backup, deduplicated by
   hash, and a note — never a failure that needs a person;
4. thaw the guest right after the job has started, whatever happened, retrying until a deadline;
5. read each disk over the job's NBD export (:mod:`vbfs_libvirt.nbd`): only allocated extents for a full backup,
   only the dirty extents of ``qemu:dirty-bitmap:backup-<disk>`` for an incremental;
6. end the job with ``abortJob`` in all cases, and delete the new checkpoint if the backup did not complete.

The domain XML is kept under ``config/``. Disks are named by their target (``vda``, ``sdb``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlsplit

from vbfs.errors import NotSupported, SourceError
from vbfs.failpoints import failpoint
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
from vbfs_libvirt.hosts import Host, LocalHost, SshHost
from vbfs_libvirt.nbd import BASE_ALLOCATION, STATE_DIRTY, STATE_ZERO, NbdClient

__version__ = "0.1.0"

CHECKPOINT_PREFIX = "vbfs-"
RUN_DIR = Path("/run/vbfs")  # per-backup socket folders: <domain>-<pid>-<random>
AGENT_TIMEOUT = 10  # seconds libvirt waits for the guest agent to answer a freeze or thaw
THAW_DEADLINE = 60.0  # seconds to keep retrying a thaw that failed
STATES = {0: "no state", 1: "running", 2: "blocked", 3: "paused", 4: "shutting down", 5: "shut off", 6: "crashed"}


class LibvirtError(SourceError):
    pass


def _libvirt() -> Any:
    try:
        import libvirt
    except ImportError:
        raise LibvirtError(
            "the libvirt source needs the libvirt Python bindings (pip install libvirt-python)"
        ) from None
    libvirt.registerErrorHandler(lambda *_: None, None)  # errors arrive as exceptions; do not print them too
    return libvirt


def _message(exc: BaseException) -> str:
    get = getattr(exc, "get_error_message", None)
    return str(get() if get else exc) or type(exc).__name__


@dataclass(frozen=True)
class DomainDisk:
    target: str
    source: str | None
    driver: str | None
    kind: str


def domain_disks(xml: str) -> list[DomainDisk]:
    """The domain's writable disks (not CD-ROMs, floppies or read-only/shared disks), in XML order."""
    root = ET.fromstring(xml)
    out = []
    for disk in root.findall("./devices/disk"):
        if disk.get("device", "disk") not in ("disk", "lun"):
            continue
        if disk.find("readonly") is not None or disk.find("shareable") is not None:
            continue
        target = disk.find("target")
        if target is None or not target.get("dev"):
            continue
        src = disk.find("source")
        source = None
        if src is not None:
            source = src.get("file") or src.get("dev") or src.get("name") or src.get("volume")
        driver = disk.find("driver")
        out.append(
            DomainDisk(
                target.get("dev", ""),
                source,
                driver.get("type") if driver is not None else None,
                disk.get("type", "file"),
            )
        )
    return out


def _has_agent_channel(xml: str) -> bool:
    root = ET.fromstring(xml)
    return any(t.get("name") == "org.qemu.guest_agent.0" for t in root.findall("./devices/channel/target"))


def _agent_connected(xml: str) -> bool:
    root = ET.fromstring(xml)
    return any(
        t.get("name") == "org.qemu.guest_agent.0" and t.get("state") == "connected"
        for t in root.findall("./devices/channel/target")
    )


def _qemu_owner(xml: str) -> tuple[int, int] | None:
    """The uid:gid QEMU runs as, from the domain's DAC security label."""
    root = ET.fromstring(xml)
    for label in root.findall("./seclabel"):
        if label.get("model") == "dac":
            text = (label.findtext("label") or "").replace("+", "")
            uid, _, gid = text.partition(":")
            if uid.isdigit() and gid.isdigit():
                return int(uid), int(gid)
    return None


class LibvirtSnapshot:
    """A running pull-mode backup job of one domain; valid inside :meth:`LibvirtHypervisor.snapshot`."""

    def __init__(self, hv: LibvirtHypervisor, dom: Any, job: BackupJob, facts: dict[str, Any], consistency: str):
        self.hv = hv
        self.dom = dom
        self.job = job
        self.facts = facts
        self.consistency = consistency
        self._clients: dict[str, NbdClient] = {}
        self._disks = [
            DiskInfo(d.target, self._size(d.target), {"source": d.source, "format": d.driver, "type": d.kind})
            for d in job.disks
        ]

    def _size(self, target: str) -> int:
        try:
            return int(self.dom.blockInfo(target)[0])
        except Exception as exc:
            raise LibvirtError(f"disk {target} of {self.facts['domain']}: size unknown ({_message(exc)})") from None

    @property
    def notes(self) -> list[str]:
        return list(self.facts.get("notes", []))

    def disks(self) -> list[DiskInfo]:
        return list(self._disks)

    def _client(self, disk: DiskInfo) -> NbdClient:
        client = self._clients.get(disk.name)
        if client is None:
            export = self.job.exports.get(disk.name, disk.name)
            contexts = [BASE_ALLOCATION]
            bitmap = self.job.bitmaps.get(disk.name)
            if bitmap:
                contexts.append(f"qemu:dirty-bitmap:{bitmap}")
            client = NbdClient(export, unix_path=str(self.job.socket), meta_contexts=contexts)
            if client.size != disk.size:
                client.close()
                raise LibvirtError(
                    f"disk {disk.name}: the NBD export has {client.size} bytes, libvirt says {disk.size}"
                )
            self._clients[disk.name] = client
        return client

    def allocated_extents(self, disk: DiskInfo) -> list[Extent] | None:
        return _merge(
            Extent(e.offset, e.length)
            for e in self._client(disk).block_status(BASE_ALLOCATION)
            if not e.flags & STATE_ZERO
        )

    def changed_extents(self, disk: DiskInfo, since: ChangeToken) -> list[Extent] | None:
        bitmap = self.job.bitmaps.get(disk.name)
        if self.job.incremental_from != since or not bitmap:
            return None
        return _merge(
            Extent(e.offset, e.length)
            for e in self._client(disk).block_status(f"qemu:dirty-bitmap:{bitmap}")
            if e.flags & STATE_DIRTY
        )

    def read(self, disk: DiskInfo, offset: int, length: int) -> bytes:
        return self._client(disk).read(offset, max(0, min(length, disk.size - offset)))

    def read_ranges(self, disk: DiskInfo, ranges: Iterable[tuple[int, int]]) -> Iterator[bytes]:
        return self._client(disk).read_ranges(ranges)

    def change_token(self, disk: DiskInfo) -> ChangeToken | None:
        return self.job.checkpoint

    def metadata(self) -> dict[str, Any]:
        info = self.dom.info()
        return {
            "hypervisor": "libvirt",
            **{k: v for k, v in self.facts.items() if k != "notes"},
            "uuid": self.dom.UUIDString(),
            "vcpus": info[3],
            "memory_kib": info[1],
            "checkpoint": self.job.checkpoint,
            "incremental_from": self.job.incremental_from,
            "disks": [{"name": d.name, "size": d.size, **dict(d.details)} for d in self._disks],
        }

    def config_files(self) -> dict[str, bytes]:
        return {"domain.xml": self.job.domain_xml.encode()}

    def close(self) -> None:
        for client in self._clients.values():
            with contextlib.suppress(Exception):
                client.close()
        self._clients.clear()


def _merge(extents: Iterable[Extent]) -> list[Extent]:
    out: list[Extent] = []
    for e in extents:
        if e.length <= 0:
            continue
        if out and e.offset <= out[-1].end:
            out[-1] = Extent(out[-1].offset, max(out[-1].end, e.end) - out[-1].offset)
        else:
            out.append(e)
    return out


@dataclass
class BackupJob:
    socket: Path
    checkpoint: str
    incremental_from: str | None
    disks: list[DomainDisk]
    exports: dict[str, str]
    bitmaps: dict[str, str]
    domain_xml: str


class LibvirtHypervisor:
    """A connection to one libvirt daemon."""

    scheme: ClassVar[str] = "libvirt"
    remote: ClassVar[bool] = False

    def __init__(self, url: SourceURL, options: Mapping[str, Any]):
        parts = [p for p in url.path.split("/") if p]
        if not parts or parts[0] not in ("system", "session"):
            raise LibvirtError(
                f"{url.raw}: expected {self.scheme}://{'HOST' if self.remote else ''}/system[/DOMAIN] "
                f"or {self.scheme}://{'HOST' if self.remote else ''}/session[/DOMAIN]"
            )
        if len(parts) > 2:
            raise LibvirtError(f"{url.raw}: a domain name has no '/'")
        query = urlsplit(url.raw).query
        params = dict(parse_qsl(query))
        self.domain_name = parts[1] if len(parts) == 2 else None
        self.run_dir = Path(str(options.get("run_dir") or os.environ.get("VBFS_RUN_DIR") or RUN_DIR))
        self.hosts: Host
        if self.remote:
            if not url.host:
                raise LibvirtError(f"{url.raw}: name the KVM host: qemu+ssh://user@host/system/DOMAIN")
            where = f"{url.user + '@' if url.user else ''}{url.host}{':' + str(url.port) if url.port else ''}"
            self.uri = f"qemu+ssh://{where}/{parts[0]}" + (f"?{query}" if query else "")
            self.hosts = SshHost(url.user, url.host, url.port, params)
        else:
            if url.host:
                raise LibvirtError(f"{url.raw}: for another host use qemu+ssh://user@{url.host}/system/DOMAIN")
            unknown = sorted(set(params) - {"socket"})
            if unknown:
                raise LibvirtError(f"{url.raw}: unknown URI parameter {unknown[0]!r}")
            self.uri = f"qemu:///{parts[0]}" + (f"?{query}" if query else "")
            self.hosts = LocalHost()
        lv = _libvirt()
        try:
            self.conn = lv.open(self.uri)
        except lv.libvirtError as exc:
            raise LibvirtError(f"cannot connect to libvirt at {self.uri}: {_message(exc)}") from None

    # ---- inventory -----------------------------------------------------------------------------------------------

    def _domain(self, name: str) -> Any:
        lv = _libvirt()
        try:
            return self.conn.lookupByName(name)
        except lv.libvirtError:
            raise LibvirtError(f"no domain {name!r} at {self.uri}") from None

    def guests(self) -> list[GuestInfo]:
        out = []
        for dom in sorted(self.conn.listAllDomains(), key=lambda d: d.name()):
            xml = dom.XMLDesc()
            disks = []
            for d in domain_disks(xml):
                try:
                    size = int(dom.blockInfo(d.target)[0])
                except Exception:
                    size = 0
                disks.append(DiskInfo(d.target, size, {"source": d.source}))
            checkpoints = [c.getName() for c in dom.listAllCheckpoints()]
            out.append(
                GuestInfo(
                    dom.name(),
                    STATES.get(dom.info()[0], "unknown"),
                    tuple(disks),
                    {
                        "checkpoints": len(checkpoints),
                        "vbfs_checkpoint": next(
                            (c for c in reversed(checkpoints) if c.startswith(CHECKPOINT_PREFIX)), "-"
                        ),
                        "agent": "connected"
                        if _agent_connected(xml)
                        else ("configured" if _has_agent_channel(xml) else "none"),
                    },
                )
            )
        return out

    def default_guest(self) -> str | None:
        return self.domain_name

    # ---- leftovers and checkpoints -------------------------------------------------------------------------------

    def remove_leftovers(self, guest: str) -> list[str]:
        lv = _libvirt()
        dom = self._domain(guest)
        removed: list[str] = []
        stats = dom.jobStats() if dom.isActive() else {}
        if stats.get("type", 0) != 0 and stats.get("operation") == lv.VIR_DOMAIN_JOB_OPERATION_BACKUP:
            try:
                xml = ET.fromstring(dom.backupGetXMLDesc())
                server = xml.find("server")
                socket_path = Path(server.get("socket", "")) if server is not None else Path()
            except lv.libvirtError:
                socket_path = Path()
            owner = self._run_dir_owner(socket_path.parent)
            if owner is None:
                raise LibvirtError(
                    f"domain {guest} has a backup job that vbfs did not start (socket {socket_path}); end it first"
                )
            if vbfs_process_alive(owner) and owner != os.getpid():
                raise LibvirtError(f"domain {guest} is being backed up by vbfs process {owner}")
            with contextlib.suppress(lv.libvirtError):
                dom.abortJob()
            removed.append(f"ended the backup job of {guest} left by killed vbfs process {owner}")
        live_runs = False
        for folder in self.hosts.folders(self.run_dir, f"{guest}-"):
            if folder.name.rsplit("-", 2)[0] != guest:
                continue  # another domain whose name starts like this one's
            owner = self._run_dir_owner(folder)
            if owner is not None and not vbfs_process_alive(owner):
                self.hosts.remove_folder(folder)
            elif owner is not None and owner != os.getpid():
                live_runs = True
        # A vbfs run killed between freeze and thaw leaves the guest frozen: thaw it, unless a run is under way.
        if not live_runs and dom.isActive() and _agent_connected(dom.XMLDesc()) and self._agent_frozen(dom):
            with contextlib.suppress(lv.libvirtError):
                dom.fsThaw()
                removed.append(f"thawed the filesystems of {guest}, left frozen by a killed run")
        return removed

    @staticmethod
    def _agent_frozen(dom: Any) -> bool:
        try:
            import libvirt_qemu

            reply = libvirt_qemu.qemuAgentCommand(dom, '{"execute": "guest-fsfreeze-status"}', AGENT_TIMEOUT, 0)
            return '"frozen"' in reply
        except Exception:
            return False

    def _run_dir_owner(self, folder: Path) -> int | None:
        """The vbfs process that made ``folder`` (``<run dir>/<domain>-<pid>-<random>``), or None if not vbfs's."""
        if folder.parent != self.run_dir:
            return None
        pid = folder.name.rsplit("-", 2)[-2] if folder.name.count("-") >= 2 else ""
        return int(pid) if pid.isdigit() else None

    def _vbfs_checkpoints(self, dom: Any) -> list[Any]:
        found = [c for c in dom.listAllCheckpoints() if c.getName().startswith(CHECKPOINT_PREFIX)]
        return sorted(found, key=lambda c: int(ET.fromstring(c.getXMLDesc()).findtext("creationTime") or 0))

    def _delete_checkpoint(self, cp: Any) -> None:
        lv = _libvirt()
        try:
            cp.delete(0)
        except lv.libvirtError:
            # its bitmap is gone or broken: forget the checkpoint without touching the disks
            with contextlib.suppress(lv.libvirtError):
                cp.delete(lv.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)

    # ---- the backup job ------------------------------------------------------------------------------------------

    def _socket_folder(self, dom: Any, xml: str) -> Path:
        folder = self.run_dir / f"{dom.name()}-{os.getpid()}-{secrets.token_hex(4)}"
        self.hosts.make_folder(folder, _qemu_owner(xml))  # QEMU creates the socket and the scratch files there
        return folder

    def _begin(self, dom: Any, folder: Path, disks: list[DomainDisk], checkpoint: str, since: str | None) -> None:
        backup = ET.Element("domainbackup", mode="pull")
        if since:
            ET.SubElement(backup, "incremental").text = since
        ET.SubElement(backup, "server", transport="unix", socket=str(folder / "nbd.sock"))
        bdisks = ET.SubElement(backup, "disks")
        cp = ET.Element("domaincheckpoint")
        ET.SubElement(cp, "name").text = checkpoint
        cdisks = ET.SubElement(cp, "disks")
        for d in disks:
            disk = ET.SubElement(bdisks, "disk", name=d.target, backup="yes", type="file")
            ET.SubElement(disk, "scratch", file=str(folder / f"scratch-{d.target}.qcow2"))
            ET.SubElement(cdisks, "disk", name=d.target, checkpoint="bitmap")
        dom.backupBegin(ET.tostring(backup, encoding="unicode"), ET.tostring(cp, encoding="unicode"))

    def _freeze(self, dom: Any, facts: dict[str, Any]) -> bool:
        lv = _libvirt()
        if not _has_agent_channel(dom.XMLDesc()):
            facts["freeze"] = "no guest agent channel: crash-consistent"
            facts["notes"].append("the domain has no QEMU guest agent channel; crash-consistent backup")
            return False
        with contextlib.suppress(lv.libvirtError, AttributeError):
            dom.agentSetResponseTimeout(AGENT_TIMEOUT, 0)
        try:
            count = dom.fsFreeze()
        except lv.libvirtError as exc:
            facts["freeze"] = f"failed ({_message(exc)}): crash-consistent"
            facts["notes"].append(f"the guest agent did not freeze the filesystems ({_message(exc)}); crash-consistent")
            return False
        facts["freeze"] = f"{count} filesystems frozen through the QEMU guest agent"
        return True

    def _thaw(self, dom: Any, facts: dict[str, Any], frozen_at: float) -> None:
        lv = _libvirt()
        deadline = time.monotonic() + THAW_DEADLINE
        delay = 0.2
        while True:
            try:
                dom.fsThaw()
                facts["frozen_for_s"] = round(time.monotonic() - frozen_at, 3)
                return
            except lv.libvirtError as exc:
                if time.monotonic() > deadline:
                    msg = (
                        f"the guest {dom.name()} may still be frozen: thawing failed for {THAW_DEADLINE:.0f} s "
                        f"({_message(exc)}); run: virsh domfsthaw {dom.name()}"
                    )
                    print(f"vbfs: error: {msg}", file=sys.stderr)
                    facts["notes"].append(msg)
                    return
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    @contextmanager
    def snapshot(self, guest: str, since: Mapping[str, ChangeToken] | None = None) -> Iterator[LibvirtSnapshot]:
        lv = _libvirt()
        dom = self._domain(guest)
        if not dom.isActive():
            raise NotSupported(
                f"domain {guest} is not running: libvirt backs up running domains only; back up its disk image "
                "files with the image source (image:///path/to/disk.qcow2)"
            )
        xml = dom.XMLDesc()
        disks = domain_disks(xml)
        if not disks:
            raise LibvirtError(f"domain {guest} has no disks to back up")
        facts: dict[str, Any] = {"domain": guest, "libvirt": self.uri, "notes": []}
        tokens = set((since or {}).values())
        checkpoints = {c.getName(): c for c in self._vbfs_checkpoints(dom)}
        start_from: str | None = None
        if since and len(tokens) == 1 and set(since) >= {d.target for d in disks}:
            token = next(iter(tokens))
            if token in checkpoints:
                start_from = token
            else:
                facts["notes"].append(f"checkpoint {token} of the last backup is gone; full backup, deduplicated")
        elif since:
            facts["notes"].append("the disks changed since the last backup; full backup, deduplicated")
        # Checkpoints no committed backup can use: all but the one this backup starts from.
        for name, cp in checkpoints.items():
            if name != start_from:
                self._delete_checkpoint(cp)
        name = f"{CHECKPOINT_PREFIX}{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"
        folder = self._socket_folder(dom, xml)
        started = False
        try:
            frozen = self._freeze(dom, facts)
            frozen_at = time.monotonic()
            failpoint("guest-frozen")
            try:
                try:
                    self._begin(dom, folder, disks, name, start_from)
                except lv.libvirtError as exc:
                    if start_from is None:
                        raise
                    facts["notes"].append(
                        f"checkpoint {start_from} cannot be used ({_message(exc)}); full backup, deduplicated"
                    )
                    for cp in self._vbfs_checkpoints(dom):
                        self._delete_checkpoint(cp)
                    start_from = None
                    self._begin(dom, folder, disks, name, None)
                started = True
            finally:
                if frozen:
                    self._thaw(dom, facts, frozen_at)
        except lv.libvirtError as exc:
            self.hosts.remove_folder(folder)
            raise LibvirtError(f"cannot start a backup of {guest}: {_message(exc)}") from None
        except BaseException:
            self.hosts.remove_folder(folder)
            raise
        assert started
        snap: LibvirtSnapshot | None = None
        completed = False
        try:
            job = self._job(dom, folder, name, start_from, disks)
            with self.hosts.reach(job.socket) as local_socket:
                job.socket = local_socket
                snap = LibvirtSnapshot(self, dom, job, facts, FILESYSTEM_CONSISTENT if frozen else CRASH_CONSISTENT)
                try:
                    yield snap
                    completed = True
                finally:
                    snap.close()
        finally:
            with contextlib.suppress(lv.libvirtError):
                dom.abortJob()
            self.hosts.remove_folder(folder)
            if not completed:  # no manifest will name this checkpoint: do not leave it in the chain
                with contextlib.suppress(lv.libvirtError):
                    self._delete_checkpoint(dom.checkpointLookupByName(name))

    def _job(self, dom: Any, folder: Path, name: str, start_from: str | None, disks: list[DomainDisk]) -> BackupJob:
        desc = ET.fromstring(dom.backupGetXMLDesc())
        exports: dict[str, str] = {}
        bitmaps: dict[str, str] = {}
        for d in desc.findall("./disks/disk"):
            target = d.get("name", "")
            if d.get("backup") != "yes" or not target:
                continue
            exports[target] = d.get("exportname") or target
            bitmap = d.get("exportbitmap")
            if bitmap:
                bitmaps[target] = bitmap
        return BackupJob(folder / "nbd.sock", name, start_from, disks, exports, bitmaps, dom.XMLDesc())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()


class RemoteLibvirtHypervisor(LibvirtHypervisor):
    """``qemu+ssh://user@host/system/DOMAIN``: libvirt on another host, its disks read through an ssh forward."""

    scheme: ClassVar[str] = "qemu+ssh"
    remote: ClassVar[bool] = True


@hookimpl
def vbfs_register_hypervisors(registry: Registry) -> None:
    registry.add_hypervisor(LibvirtHypervisor.scheme, LibvirtHypervisor)
    registry.add_hypervisor(RemoteLibvirtHypervisor.scheme, RemoteLibvirtHypervisor)
