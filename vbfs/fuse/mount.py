"""Mounting and unmounting: the trio main loop around pyfuse3, the background process, ``vbfs umount``.

``vbfs mount`` forks: the child mounts, tells the parent over a pipe that the mount is up (or why it is not), and
serves until it is unmounted; the parent exits as soon as it knows. The child logs to ``mount.log`` in the
catalog's folder. SIGINT and SIGTERM unmount cleanly.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import pyfuse3
import trio

from vbfs.errors import VbfsError
from vbfs.fuse.ops import VbfsOperations
from vbfs.vfs import Node

log = logging.getLogger("vbfs.mount")


def check_mountpoint(mountpoint: Path) -> None:
    if not mountpoint.is_dir():
        raise VbfsError(f"{mountpoint} is not a folder")
    if is_mounted(mountpoint):
        raise VbfsError(f"{mountpoint} is already a mount point (vbfs umount {mountpoint} first)")
    if not os.path.exists("/dev/fuse"):
        raise VbfsError("/dev/fuse is missing: install fuse3 and load the fuse module")


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
    try:
        pyfuse3.init(ops, str(mountpoint), options)
    except RuntimeError as exc:
        raise VbfsError(f"cannot mount at {mountpoint}: {exc}") from None
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
            os.waitpid(pid, 0)
            raise VbfsError(answer or "the mount process died before mounting")
        return pid
    # the child
    os.close(read_fd)
    code = 0
    try:
        os.setsid()
        log_file.parent.mkdir(parents=True, exist_ok=True)
        logging.basicConfig(
            handlers=[logging.StreamHandler(open_log(log_file))],
            level=logging.INFO,
            format="%(asctime)s vbfs-mount[%(process)d] %(levelname)s %(message)s",
        )
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)

        def ready() -> None:
            os.write(write_fd, b"ok")
            os.close(write_fd)

        run(ready)
    except VbfsError as exc:
        _tell(write_fd, str(exc))
        code = 2
    except BaseException as exc:
        log.exception("mount failed")
        _tell(write_fd, f"the mount failed: {exc}")
        code = 1
    finally:
        os._exit(code)


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


def is_mounted(mountpoint: Path) -> bool:
    """Whether the kernel has a mount at ``mountpoint`` (also a dead FUSE mount, which ``ismount`` misses)."""
    target = os.path.realpath(mountpoint)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                where = line.split()[4].encode().decode("unicode_escape")
                if where == target:
                    return True
    except OSError:
        return os.path.ismount(mountpoint)
    return False


def unmount(mountpoint: Path) -> None:
    """Unmount a vbfs mount, also one whose process was killed (a stale mount)."""
    exe = shutil.which("fusermount3") or shutil.which("fusermount")
    if exe is None:
        raise VbfsError("fusermount3 is missing: install fuse3")
    if not is_mounted(mountpoint):
        raise VbfsError(f"{mountpoint} is not mounted")
    proc = subprocess.run([exe, "-u", str(mountpoint)], capture_output=True, text=True)
    if proc.returncode == 0:
        return
    err = proc.stderr.strip()
    if "not found in /etc/mtab" in err or "not mounted" in err:
        raise VbfsError(f"{mountpoint} is not mounted")
    # busy or a dead connection: detach it now, the kernel finishes when the last user lets go
    lazy = subprocess.run([exe, "-u", "-z", str(mountpoint)], capture_output=True, text=True)
    if lazy.returncode != 0:
        raise VbfsError(f"cannot unmount {mountpoint}: {lazy.stderr.strip() or err}")


def wait_unmounted(mountpoint: Path, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while is_mounted(mountpoint):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
