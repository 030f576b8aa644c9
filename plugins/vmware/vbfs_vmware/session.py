"""The vSphere API session: credentials, TLS, login, re-login, property reads and task waits.

One :class:`Session` is one login to a vCenter or ESXi host through pyvmomi. Every API call goes through
:meth:`Session.call`, which logs in again once when the server says the session is gone (vCenter drops idle
sessions after about 30 minutes, and an administrator can end one), so a long datastore read does not fail
because its control session expired. The datastore HTTP transport takes its cookie from here too.

Passwords never come from the command line: ``VBFS_VMWARE_PASSWORD``, or a file named by
``VBFS_VMWARE_PASSWORD_FILE`` (or ``password_file`` in a job) that nobody but its owner may read.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import ssl
import stat
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from vbfs.errors import SourceError
from vbfs.sources import SourceURL

T = TypeVar("T")

DEFAULT_PORT = 443
TASK_TIMEOUT = 3600.0


class VmwareError(SourceError):
    """An error reported by vSphere or met on the way to it."""


def fault_text(exc: BaseException) -> str:
    """A vSphere fault as a short sentence: its message, or its type name when it has none."""
    msg = getattr(exc, "msg", None) or getattr(exc, "localizedMessage", None)
    name = type(exc).__name__
    if msg:
        return f"{msg} ({name})"
    faults = getattr(exc, "faultMessage", None)
    if faults:
        return f"{name}: {'; '.join(str(getattr(f, 'message', f)) for f in faults)}"
    return name


def read_password(options: Mapping[str, Any]) -> str:
    """The password from the environment or from a private file; never from the URL or the command line."""
    env = os.environ.get("VBFS_VMWARE_PASSWORD")
    if env:
        return env
    name = options.get("password_file") or os.environ.get("VBFS_VMWARE_PASSWORD_FILE")
    if not name:
        raise VmwareError(
            "no vSphere password: set VBFS_VMWARE_PASSWORD, or VBFS_VMWARE_PASSWORD_FILE to a file of mode 0600"
        )
    path = Path(str(name)).expanduser()
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise VmwareError(f"password file {path}: {exc.strerror or exc}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise VmwareError(
            f"password file {path} can be read by others (mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it"
        )
    password = text.splitlines()[0] if text.strip() else ""
    if not password:
        raise VmwareError(f"password file {path} is empty")
    return password


def tls_context(host: str, options: Mapping[str, Any]) -> ssl.SSLContext:
    """Verified TLS unless ``insecure`` is set, which prints a warning; ``ca_file`` adds a private CA."""
    if options.get("insecure"):
        print(
            f"vbfs: warning: the TLS certificate of {host} is not verified (--insecure); "
            "anyone on the path can read the password and the disks",
            file=sys.stderr,
        )
        return ssl._create_unverified_context()
    ca_file = options.get("ca_file") or os.environ.get("VBFS_VMWARE_CA_FILE")
    try:
        return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise VmwareError(f"CA file {ca_file}: {getattr(exc, 'strerror', None) or exc}") from None


class Session:
    """A logged-in pyvmomi service instance that logs in again when its session is dropped."""

    def __init__(self, url: SourceURL, options: Mapping[str, Any]):
        from urllib.parse import urlsplit

        if urlsplit(url.raw).password is not None:
            raise VmwareError(
                "passwords are not accepted in the source URL; set VBFS_VMWARE_PASSWORD or VBFS_VMWARE_PASSWORD_FILE"
            )
        if not url.host:
            raise VmwareError(f"{url.raw}: name the vCenter or ESXi host: vmware://user@host/datacenter/vm/name")
        self.host = url.host
        self.port = url.port or DEFAULT_PORT
        self.user = url.user or options.get("user")
        if not self.user:
            raise VmwareError(f"{url.raw}: name the user: vmware://user@{url.host}{url.path}")
        self.password = read_password(options)
        self.ssl_context = tls_context(f"{self.host}:{self.port}", options)
        self._lock = threading.Lock()
        self.generation = 0  # counts logins, so concurrent callers re-login once, not once each
        self.si: Any = None
        self.content: Any = None  # the ServiceContent, read once per login (each read is a round trip)
        self._connect()

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}" if self.port != DEFAULT_PORT else self.host

    def _connect(self) -> None:
        from pyVim.connect import SmartConnect
        from pyVmomi import vim

        try:
            self.si = SmartConnect(
                host=self.host,
                port=self.port,
                user=self.user,
                pwd=self.password,
                sslContext=self.ssl_context,
                connectionPoolTimeout=60,
            )
        except vim.fault.InvalidLogin:
            raise VmwareError(
                f"vSphere at {self.where} refused the login of {self.user}: wrong user name or password"
            ) from None
        except ssl.SSLCertVerificationError as exc:
            raise VmwareError(
                f"the TLS certificate of {self.where} is not trusted ({exc.verify_message}); give its CA with "
                "VBFS_VMWARE_CA_FILE, or pass --insecure to skip the check"
            ) from None
        except ssl.SSLError as exc:
            raise VmwareError(f"TLS with {self.where} failed: {exc.reason or exc}") from None
        except (ConnectionError, socket.gaierror, TimeoutError, OSError, http.client.HTTPException) as exc:
            why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise VmwareError(f"cannot reach vSphere at {self.where}: {why}") from None
        except vim.fault.VimFault as exc:
            raise VmwareError(f"vSphere at {self.where} refused the login: {fault_text(exc)}") from None
        self.content = self.si.RetrieveContent()
        self.generation += 1

    def cookie(self) -> str:
        """The session cookie (``name=value``) for datastore HTTP requests."""
        raw = str(self.si._stub.cookie or "")
        return raw.split(";", 1)[0].strip()

    def relogin(self, seen_generation: int) -> None:
        """Log in again, unless another thread already did since ``seen_generation``."""
        from pyVmomi import vim

        with self._lock:
            if self.generation != seen_generation:
                return
            try:
                self.content.sessionManager.Login(self.user, self.password)
                self.generation += 1
            except vim.fault.InvalidLogin:
                raise VmwareError(
                    f"vSphere at {self.where} refused to log {self.user} in again: wrong user name or password"
                ) from None
            except Exception as exc:
                raise VmwareError(f"logging in to vSphere at {self.where} again failed: {fault_text(exc)}") from None

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call an API method; on NotAuthenticated log in again and call it once more."""
        from pyVmomi import vim

        seen = self.generation
        try:
            return fn(*args, **kwargs)
        except vim.fault.NotAuthenticated:
            self.relogin(seen)
            return fn(*args, **kwargs)

    def props(self, obj: Any, paths: list[str]) -> dict[str, Any]:
        """Properties of one managed object read in one round trip; unset properties are absent."""
        found = self.props_many([obj], type(obj), paths)
        return found[0][1] if found else {}

    def props_many(
        self, objs: list[Any], kind: Any, paths: list[str], container: Any = None
    ) -> list[tuple[Any, dict[str, Any]]]:
        """Properties of many objects of one type (or of everything in a container view) in one retrieval."""
        from pyVmomi import vmodl

        pc = vmodl.query.PropertyCollector
        if container is not None:
            traverse = pc.TraversalSpec(name="view", path="view", skip=False, type=type(container))
            obj_specs = [pc.ObjectSpec(obj=container, skip=True, selectSet=[traverse])]
        else:
            obj_specs = [pc.ObjectSpec(obj=o) for o in objs]
        spec = pc.FilterSpec(objectSet=obj_specs, propSet=[pc.PropertySpec(type=kind, pathSet=paths)])
        collector = self.content.propertyCollector

        def retrieve() -> list[tuple[Any, dict[str, Any]]]:
            out = []
            result = collector.RetrievePropertiesEx([spec], pc.RetrieveOptions())
            while result is not None:
                out += [(o.obj, {p.name: p.val for p in o.propSet}) for o in result.objects]
                result = collector.ContinueRetrievePropertiesEx(result.token) if result.token else None
            return out

        return self.call(retrieve)

    def wait_task(self, task: Any, what: str, timeout: float = TASK_TIMEOUT) -> Any:
        """Wait for a task; return its result, raise the vSphere fault it ended with.

        Only ``info.state`` and ``info.error`` are polled: some results (RemoveSnapshot's) do not deserialize.
        """
        deadline = time.monotonic() + timeout
        delay = 0.01  # snapshot tasks of idle VMs end in tens of milliseconds; long ones are polled each second
        while True:
            info = self.props(task, ["info.state", "info.error"])
            state = info.get("info.state")
            if state == "success":
                return None
            if state == "error":
                err = info.get("info.error")
                fault = err if isinstance(err, BaseException) else getattr(err, "fault", None)
                if isinstance(fault, BaseException):  # pyvmomi gives the fault itself, or wrapped
                    raise fault
                raise VmwareError(f"{what} failed: {getattr(err, 'localizedMessage', None) or err}")
            if time.monotonic() > deadline:
                raise VmwareError(f"{what} did not finish within {timeout:.0f} s")
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def task_result(self, task: Any) -> Any:
        return self.props(task, ["info.result"]).get("info.result")

    def close(self) -> None:
        if self.si is None:
            return
        with contextlib.suppress(Exception):  # the session may already be gone; the server drops it on its own
            self.content.sessionManager.Logout()
        self.si = self.content = None
