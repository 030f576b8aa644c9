"""Where the backup job's NBD socket lives, and how vbfs reaches it: on this machine, or on a KVM host over ssh.

QEMU creates the socket in a folder that its user may write (``/run/vbfs/<domain>-<pid>-<random>``). On this
machine (:class:`LocalHost`) vbfs makes that folder and connects to the socket. For a ``qemu+ssh://`` source
(:class:`SshHost`) it makes and removes the folder with ssh commands, and reaches the socket through an ssh
forward of a local Unix socket to the remote one (``ssh -N -L local:remote``), so disk contents cross the network
only inside ssh. The ssh options follow libvirt's own URI parameters: ``keyfile``, ``no_verify``, ``known_hosts``.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from vbfs.errors import SourceError


class Host(Protocol):
    def make_folder(self, folder: Path, owner: tuple[int, int] | None) -> None: ...

    def remove_folder(self, folder: Path) -> None: ...

    def folders(self, run_dir: Path, prefix: str) -> list[Path]: ...

    def reach(self, socket: Path) -> contextlib.AbstractContextManager[Path]: ...


class LocalHost:
    def make_folder(self, folder: Path, owner: tuple[int, int] | None) -> None:
        if not folder.parent.is_dir():
            folder.parent.mkdir(parents=True, exist_ok=True)
            folder.parent.chmod(0o755)  # QEMU, another user, goes through it (vbfs's umask would make it 0700)
        folder.mkdir(mode=0o700)
        if owner is not None and os.geteuid() == 0:
            os.chown(folder, owner[0], os.getgid())  # QEMU creates the socket and the scratch files here
            folder.chmod(0o770)

    def remove_folder(self, folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)

    def folders(self, run_dir: Path, prefix: str) -> list[Path]:
        return sorted(run_dir.glob(f"{prefix}*")) if run_dir.is_dir() else []

    @contextmanager
    def reach(self, socket: Path) -> Iterator[Path]:
        yield socket


class SshHost:
    """A KVM host reached with the ssh client, as libvirt's ``qemu+ssh`` transport reaches it."""

    def __init__(self, user: str | None, host: str, port: int | None, params: Mapping[str, str]):
        if shutil.which("ssh") is None:
            raise SourceError("qemu+ssh sources need the ssh client (apt-get install openssh-client)")
        self.where = f"{user + '@' if user else ''}{host}{':' + str(port) if port else ''}"
        self.argv = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=30"]
        if port:
            self.argv += ["-p", str(port)]
        if user:
            self.argv += ["-l", user]
        if params.get("keyfile"):
            self.argv += ["-i", params["keyfile"]]
        if params.get("no_verify") == "1":
            self.argv += [
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "LogLevel=ERROR",
            ]
        elif params.get("known_hosts"):
            self.argv += ["-o", f"UserKnownHostsFile={params['known_hosts']}"]
        self.host = host

    def run(self, command: str) -> str:
        proc = subprocess.run([*self.argv, self.host, command], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            why = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            raise SourceError(f"ssh {self.where}: {why}")
        return proc.stdout

    def make_folder(self, folder: Path, owner: tuple[int, int] | None) -> None:
        q = shlex.quote(str(folder))
        command = f"mkdir -p -m 0755 {shlex.quote(str(folder.parent))} && mkdir -m 0700 {q}"
        if owner is not None:
            command += f" && chown {owner[0]} {q} && chmod 0770 {q}"
        self.run(command)

    def remove_folder(self, folder: Path) -> None:
        with contextlib.suppress(SourceError, subprocess.TimeoutExpired):
            self.run(f"rm -rf {shlex.quote(str(folder))}")

    def folders(self, run_dir: Path, prefix: str) -> list[Path]:
        out = self.run(f"ls -1 {shlex.quote(str(run_dir))} 2>/dev/null || true")
        return sorted(run_dir / name for name in out.splitlines() if name.startswith(prefix))

    @contextmanager
    def reach(self, socket: Path) -> Iterator[Path]:
        local_dir = Path(tempfile.mkdtemp(prefix="vbfs-nbd-"))
        local = local_dir / "nbd.sock"
        argv = [
            *self.argv,
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "StreamLocalBindUnlink=yes",
            "-L",
            f"{local}:{socket}",
            self.host,
        ]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while not local.exists():
                if proc.poll() is not None:
                    err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
                    raise SourceError(f"ssh {self.where}: cannot forward the NBD socket ({err or 'ssh exited'})")
                if time.monotonic() > deadline:
                    raise SourceError(f"ssh {self.where}: the NBD socket forward did not start in 30 s")
                time.sleep(0.02)
            yield local
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stderr:
                proc.stderr.close()
            shutil.rmtree(local_dir, ignore_errors=True)
