"""Mounting and unmounting: the trio main loop around pyfuse3, the background process, ``vbfs umount``.

``vbfs mount`` checks what it can before it forks (the mount point, access to ``/dev/fuse``, ``fusermount3``), then
forks: the child mounts, tells the parent over a pipe that the mount is up (or why it is not), and serves until it
is unmounted; the parent exits as soon as it knows. libfuse and ``fusermount3`` give the reason for a failed mount
only on stderr, so the mount captures its own stderr around ``pyfuse3.init`` and makes that reason the error's text.
The child logs to ``mount.log`` in the catalog's folder. SIGINT and SIGTERM unmount cleanly.

``vbfs umount`` unmounts only vbfs mounts; a busy one (a process has its working folder or an open file in it) is
refused with the processes that hold it, or detached with ``lazy`` (it ends when the last of them lets go).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import pyfuse3
import trio

from vbfs.errors import VbfsError
from vbfs.fuse.ops import VbfsOperations
from vbfs.vfs import Node

log = logging.getLogger("vbfs.mount")


FUSE_DEVICE = "/dev/fuse"


def check_mountpoint(mountpoint: Path) -> None:
    """What can be checked before forking: the mount point is a folder that nothing is mounted on, this process may
    open ``/dev/fuse``, and a user other than root has ``fusermount3`` (libfuse mounts through it for them)."""
    if is_mounted(mountpoint):  # first: a dead FUSE mount cannot even be stat()ed
        raise VbfsError(f"{mountpoint} is already a mount point (vbfs umount {mountpoint} first)")
    try:
        st = os.stat(mountpoint)
    except FileNotFoundError:
        raise VbfsError(f"{mountpoint} does not exist: create the folder to mount on") from None
    except OSError as exc:
        raise VbfsError(f"{mountpoint}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise VbfsError(f"{mountpoint} is not a folder")
    try:
        os.close(os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
            hint = "install fuse3 and load the fuse module (modprobe fuse)"
        elif exc.errno in (errno.EACCES, errno.EPERM):
            hint = "mounting needs read and write access to it (run as root, or give this user access)"
        else:
            hint = "cannot use the FUSE device"
        raise VbfsError(f"{FUSE_DEVICE}: {exc.strerror}: {hint}") from None
    if os.geteuid() != 0 and fusermount() is None:
        raise VbfsError("fusermount3: not found: install fuse3 (a user other than root mounts through it)")


def fusermount() -> str | None:
    """The ``fusermount3`` program (libfuse looks in /usr/bin, then in PATH), or None."""
    for exe in ("/usr/bin/fusermount3", shutil.which("fusermount3"), shutil.which("fusermount")):
        if exe and os.access(exe, os.X_OK):
            return exe
    return None


def mountpoint_is_empty(mountpoint: Path) -> bool:
    """Whether the folder holds nothing (a mount hides what it holds); True if it cannot be listed."""
    try:
        with os.scandir(mountpoint) as entries:
            return next(entries, None) is None
    except OSError:
        return True


async def _serve() -> None:
    async with trio.open_nursery() as nursery:

        async def on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _sig in signals:
                    pyfuse3.terminate()
                    return

        nursery.start_soon(on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def limit_malloc_arenas() -> None:
    """Keep freed chunk buffers from piling up in glibc's per-thread arenas.

    A mount reads megabyte-sized buffers on several threads; with glibc's defaults each thread's arena keeps what
    was freed, and the dynamic mmap threshold moves such buffers off mmap, so the resident size grows with the
    bytes read. Two arenas and a fixed 256 KiB mmap threshold return large buffers to the system when freed.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold, m_arena_max = -3, -8
    libc.mallopt(m_arena_max, 2)
    libc.mallopt(m_mmap_threshold, 256 * 1024)


def serve(root: Node, mountpoint: Path, on_ready: Callable[[], None] | None = None, debug: bool = False) -> None:
    """Mount ``root`` at ``mountpoint`` and serve until unmounted (blocks)."""
    limit_malloc_arenas()
    ops = VbfsOperations(root)
    options = set(pyfuse3.default_options)
    options.discard("default_permissions")
    # Guests have device nodes and setuid programs: in the mount they are only names, never the host's devices
    # (nodev) and never privileges (nosuid).
    options |= {"fsname=vbfs", "subtype=vbfs", "ro", "default_permissions", "nodev", "nosuid"}
    if debug:
        options.add("debug")
    _fuse_init(ops, mountpoint, options)
    log.info("mounted at %s", mountpoint)
    try:  # from here on every way out unmounts, a failure to report readiness included
        if on_ready is not None:
            on_ready()
        trio.run(_serve)
    except BaseException:
        log.exception("the mount loop failed")
        raise
    finally:
        try:
            pyfuse3.close(unmount=True)
        except Exception:
            log.exception("closing the mount failed")
        log.info("unmounted %s", mountpoint)


def _fuse_init(ops: VbfsOperations, mountpoint: Path, options: set[str]) -> None:
    """``pyfuse3.init`` with this process's stderr captured: libfuse and ``fusermount3`` print why a mount failed
    there (pyfuse3 itself only says "fuse_session_mount failed"), and that becomes the error's text. What they print
    when the mount works (``debug`` output) goes to the log."""
    sys.stderr.flush()
    capture = os.memfd_create("vbfs-mount-stderr", os.MFD_CLOEXEC)
    saved = os.dup(2)
    os.dup2(capture, 2)
    failure: RuntimeError | None = None
    try:
        pyfuse3.init(ops, str(mountpoint), options)
    except RuntimeError as exc:
        failure = exc
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        said = os.pread(capture, 64 * 1024, 0).decode(errors="replace")
        os.close(capture)
    lines = [line.strip() for line in said.splitlines() if line.strip()]
    for line in lines:
        log.info("libfuse: %s", line)
    if failure is None:
        return
    cause = "; ".join(line.removeprefix("fuse: ") for line in lines) or str(failure)
    raise VbfsError(f"cannot mount at {mountpoint}: {cause}")


def serve_in_background(run: Callable[[Callable[[], None]], None], log_file: Path) -> int:
    """Fork; the child calls ``run(on_ready)``, which mounts and serves. Returns the child's pid once the mount is
    up (``on_ready`` was called), raises with the child's message if it failed."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as r:
            answer = r.read().decode(errors="replace")
        if answer != "ok":
            _, status = os.waitpid(pid, 0)
            if answer:
                raise VbfsError(answer)
            how = f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else "exited"
            raise VbfsError(f"the mount process {how} before mounting (see {log_file})")
        return pid
    # the child
    os.close(read_fd)
    code = 0
    try:
        os.setsid()
        log_file.parent.mkdir(parents=True, exist_ok=True)
        _log_to(log_file)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)

        def ready() -> None:
            os.write(write_fd, b"ok")
            os.close(write_fd)

        run(ready)
    except VbfsError as exc:
        log.error("mount failed: %s", exc)
        _tell(write_fd, str(exc))
        code = 2
    except BaseException as exc:
        log.exception("mount failed")
        _tell(write_fd, f"the mount failed: {exc} (see {log_file})")
        code = 1
    finally:
        os._exit(code)


def _log_to(log_file: Path) -> None:
    """The server's logging, in the child: everything of vbfs at INFO and above goes to the mount log, and only
    there (the command's own handlers wrote to a terminal the server no longer has)."""
    handler = logging.StreamHandler(open_log(log_file))
    handler.setFormatter(logging.Formatter("%(asctime)s vbfs-mount[%(process)d] %(levelname)s %(message)s"))
    vbfs_log = logging.getLogger("vbfs")
    for old in list(vbfs_log.handlers):
        vbfs_log.removeHandler(old)
    vbfs_log.propagate = True
    vbfs_log.setLevel(logging.NOTSET)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def open_log(path: Path) -> TextIO:
    """The mount log, for appending: created under the umask (0600 by default: it names guest files), never through
    a symlink, and an older log with wider permissions is narrowed to what the umask allows."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    umask = os.umask(0)
    os.umask(umask)
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    if mode & umask:
        os.fchmod(fd, mode & ~umask)
    return os.fdopen(fd, "a", encoding="utf-8", errors="replace")


def _tell(fd: int, message: str) -> None:
    try:
        os.write(fd, message.encode())
        os.close(fd)
    except OSError:
        pass


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo: where, what type (``fuse.vbfs`` for vbfs) and from what."""

    mountpoint: str
    fstype: str
    source: str

    @property
    def is_vbfs(self) -> bool:
        return self.fstype == "fuse.vbfs" or (self.fstype.startswith("fuse") and self.source == "vbfs")


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (``\\040``)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_at(mountpoint: Path) -> MountEntry | None:
    """The topmost mount at ``mountpoint`` (also a dead FUSE mount, which ``ismount`` misses), or None."""
    target = os.path.realpath(mountpoint)
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            ids, _, rest = line.partition(" - ")
            fields, more = ids.split(), rest.split()
            if len(fields) >= 5 and len(more) >= 2 and _unescape(fields[4]) == target:
                found = MountEntry(target, more[0], _unescape(more[1]))
    return found


def is_mounted(mountpoint: Path) -> bool:
    """Whether the kernel has a mount at ``mountpoint`` (also a dead FUSE mount, which ``ismount`` misses)."""
    try:
        return mount_at(mountpoint) is not None
    except OSError:
        return os.path.ismount(mountpoint)


def users_of(mountpoint: Path) -> list[str]:
    """The processes (``name[pid]``) whose working folder, root or an open file is inside ``mountpoint``: what
    keeps it busy. Only the links in /proc are read, never the mount itself."""
    target = os.path.realpath(mountpoint)
    found = []
    for pid in sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int):
        if int(pid) == os.getpid():
            continue
        try:
            links = [f"/proc/{pid}/cwd", f"/proc/{pid}/root"]
            links += [f"/proc/{pid}/fd/{fd}" for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        for link in links:
            try:
                where = os.readlink(link)
            except OSError:
                continue
            if where == target or where.startswith(target + "/"):
                try:
                    name = Path(f"/proc/{pid}/comm").read_text().strip()
                except OSError:
                    name = "?"
                found.append(f"{name}[{pid}]")
                break
    return found


def unmount(mountpoint: Path, lazy: bool = False) -> bool:
    """Unmount a vbfs mount, also one whose process was killed (a stale mount).

    A busy mount is refused with who holds it; with ``lazy`` it is detached instead (True is returned): it leaves
    the folder tree at once and ends when the last process using it lets go."""
    entry = mount_at(mountpoint)
    if entry is None:
        raise VbfsError(f"{mountpoint} is not mounted")
    if not entry.is_vbfs:
        raise VbfsError(f"{mountpoint} is not a vbfs mount but {entry.fstype} ({entry.source}): use umount(8)")
    exe = fusermount()
    if exe is None:
        raise VbfsError("fusermount3: not found: install fuse3")
    proc = subprocess.run([exe, "-u", str(mountpoint)], capture_output=True, text=True)
    if proc.returncode == 0:
        return False
    err = proc.stderr.strip()
    if "not found in /etc/mtab" in err or "not mounted" in err:
        raise VbfsError(f"{mountpoint} is not mounted")
    if "busy" in err and not lazy:
        users = users_of(mountpoint)
        who = ", ".join(users[:5]) + (" and more" if len(users) > 5 else "") if users else "a process"
        has = "have their working folders or open files" if len(users) > 1 else "has its working folder or an open file"
        raise VbfsError(
            f"{mountpoint} is busy: {who} {has} in it; "
            f"leave it and try again, or detach it now with vbfs umount --lazy {mountpoint}"
        )
    # busy and asked to detach, or a connection whose server is gone: the kernel finishes when the last user leaves
    detach = subprocess.run([exe, "-u", "-z", str(mountpoint)], capture_output=True, text=True)
    if detach.returncode != 0:
        raise VbfsError(f"cannot unmount {mountpoint}: {_fusermount_reason(detach.stderr) or _fusermount_reason(err)}")
    return "busy" in err


def _fusermount_reason(stderr: str) -> str:
    return "; ".join(line.strip() for line in stderr.splitlines() if line.strip())


def wait_unmounted(mountpoint: Path, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while is_mounted(mountpoint):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
