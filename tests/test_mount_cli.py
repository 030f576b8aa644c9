"""`vbfs mount` and `vbfs umount` when something is in the way: a mount that cannot be made says why (the cause
libfuse or fusermount3 gave, not "fuse_session_mount failed"), a busy mount is refused unless `--lazy`, and only
vbfs mounts are unmounted.

The FUSE device is taken away in a private mount namespace (`unshare -m`) or by running as an unprivileged user, so
that no other process on the machine sees a change.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Vbfs
from vbfs.fuse.mount import is_mounted

NOBODY = 65534

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("setpriv")),
    reason="mount namespaces (unshare) and other users (setpriv) need root and util-linux",
)


def _vbfs_in(v: Vbfs, setup: list[str], *args: str, as_nobody: bool = False) -> subprocess.CompletedProcess[str]:
    """Run `vbfs ARGS` in a private mount namespace after the shell commands ``setup`` (mounts only it sees)."""
    command = [sys.executable, "-m", "vbfs.cli", *args]
    if as_nobody:
        command = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command]
    script = " && ".join([*setup, 'exec "$@"'])
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-ec", script, "sh", *command],
        env=v.env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("vbfs: error: ")]
    assert len(errors) == 1 and "fuse_session_mount failed" not in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return errors[0]


def _fuse_node(where: Path, mode: int) -> Path:
    """A device node of the FUSE device (10:229) with ``mode``: bound over /dev/fuse in a private namespace."""
    if os.statvfs(where).f_flag & os.ST_NODEV:
        pytest.skip(f"{where} is mounted nodev: no device node works there")
    node = where / "fuse"
    os.mknod(node, 0o600 | 0o020000, os.makedev(10, 229))  # S_IFCHR
    os.chmod(node, mode)
    return node


def _server_pid(out: str) -> int:
    found = re.search(r"\(process (\d+),", out)
    assert found, out
    return int(found.group(1))


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _wait_gone(pid: int, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while _running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def nobody_repo(make_vbfs: Callable[..., Vbfs]) -> Iterator[Vbfs]:
    """A repository, cache and home that user 65534 owns, in a folder that user can reach."""
    top = Path(tempfile.mkdtemp(prefix="vbfs-nobody-"))
    try:
        top.chmod(0o755)
        for name in ("repo", "cache", "home"):
            (top / name).mkdir()
            os.chown(top / name, NOBODY, NOBODY)
        v = make_vbfs(repo=top / "repo" / "r")
        v.env.update(XDG_CACHE_HOME=str(top / "cache"), HOME=str(top / "home"))
        done = _vbfs_in(v, [], "init", "-e", "none", as_nobody=True)
        assert done.returncode == 0, done.stderr
        (top / "mnt").mkdir()  # root's, 0755: nobody may not mount on it
        yield v
    finally:
        shutil.rmtree(top)


def test_mount_without_access_to_the_fuse_device_says_so(nobody_repo: Vbfs) -> None:
    top = nobody_repo.repo.parent.parent
    node = _fuse_node(top, 0o600)  # root's alone
    mnt = top / "mine"
    mnt.mkdir()
    os.chown(mnt, NOBODY, NOBODY)
    proc = _vbfs_in(nobody_repo, [f"mount --bind {node} /dev/fuse"], "mount", str(mnt), as_nobody=True)
    error = _one_error_line(proc)
    assert "/dev/fuse: Permission denied" in error, error
    assert not is_mounted(mnt)


def test_mount_without_the_fuse_device_says_so(vbfs: Vbfs, tmp_path: Path) -> None:
    (tmp_path / "null").touch()
    (tmp_path / "mnt").mkdir()
    no_fuse = [  # a /dev without fuse; /dev/null kept, the server needs it
        f"mount --bind /dev/null {tmp_path / 'null'}",
        "mount -t tmpfs none /dev",
        "touch /dev/null",
        f"mount --bind {tmp_path / 'null'} /dev/null",
    ]
    error = _one_error_line(_vbfs_in(vbfs, no_fuse, "mount", str(tmp_path / "mnt")))
    assert "/dev/fuse: No such file or directory" in error and "modprobe fuse" in error, error


def test_a_failure_inside_the_mount_process_reports_what_fusermount3_said(nobody_repo: Vbfs) -> None:
    """/dev/fuse is open to the user, so the checks before the fork pass; the mount process then fails in libfuse,
    which mounts through fusermount3 for a user other than root, and fusermount3 refuses a folder of root's."""
    top = nobody_repo.repo.parent.parent
    node = _fuse_node(top, 0o666)
    mnt = top / "mnt"
    proc = _vbfs_in(nobody_repo, [f"mount --bind {node} /dev/fuse"], "mount", str(mnt), as_nobody=True)
    if proc.returncode == 0:  # never expected: end the server, which lives in the namespace of that command
        os.kill(_server_pid(proc.stdout), signal.SIGTERM)
    error = _one_error_line(proc)
    assert f"cannot mount at {mnt}: fusermount3: user has no write access to mountpoint {mnt}" in error, error
    log = (nobody_repo.repo / "mount.log").read_text()
    assert "user has no write access to mountpoint" in log, log


def test_mount_point_checks(vbfs: Vbfs, tmp_path: Path) -> None:
    error = _one_error_line(vbfs("mount", str(tmp_path / "missing"), check=False))
    assert error.endswith("missing does not exist: create the folder to mount on"), error
    (tmp_path / "file").touch()
    error = _one_error_line(vbfs("mount", str(tmp_path / "file"), check=False))
    assert error.endswith("file is not a folder"), error


def test_mounting_on_a_folder_that_is_not_empty_warns(vbfs: Vbfs, tmp_path: Path) -> None:
    mnt = tmp_path / "full"
    mnt.mkdir()
    (mnt / "mine.txt").write_text("hidden while mounted\n")
    out = vbfs("mount", str(mnt))
    try:
        assert f"vbfs: warning: {mnt} is not empty" in out.stderr, out.stderr
        assert is_mounted(mnt) and not (mnt / "mine.txt").exists()
    finally:
        vbfs("umount", str(mnt))
    assert (mnt / "mine.txt").read_text() == "hidden while mounted\n"


@pytest.fixture
def backed_up(vbfs: Vbfs, template_image: Path) -> Vbfs:
    vbfs("backup", f"image://{template_image}")
    return vbfs


@pytest.mark.parametrize("hold", ["cwd", "open file"])
def test_busy_umount_is_refused_and_lazy_detaches(backed_up: Vbfs, tmp_path: Path, hold: str) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    server = _server_pid(backed_up("mount", str(mnt)).stdout)
    held = mnt / "template" / "latest" / "vm.json"
    user: subprocess.Popen[bytes] | None = None
    try:
        if hold == "cwd":
            user = subprocess.Popen(["sleep", "300"], cwd=held.parent)
        else:
            with open(held, "rb") as f:
                user = subprocess.Popen(["sleep", "300"], stdin=f)
        refused = backed_up("umount", str(mnt), check=False)
        error = _one_error_line(refused)
        assert f"{mnt} is busy: sleep[{user.pid}] has its working folder or an open file in it" in error, error
        assert "--lazy" in error
        assert is_mounted(mnt) and held.read_bytes(), "a refused umount leaves the mount serving"

        lazy = backed_up("umount", "--lazy", str(mnt))
        assert f"{mnt} is busy: detached" in lazy.stderr and "when the last process using it" in lazy.stderr
        assert f"sleep[{user.pid}]" in lazy.stderr, lazy.stderr
        assert not is_mounted(mnt) and not held.exists(), "detached: gone from the folder tree at once"
        assert _running(server), "the mount ends only when its last user lets go"
        os.kill(user.pid, signal.SIGKILL)
        user.wait(10)
        user = None
        assert _wait_gone(server), "the mount process did not end after its last user left"
    finally:
        if user is not None:
            os.kill(user.pid, signal.SIGKILL)
            user.wait(10)
        if is_mounted(mnt):
            backed_up("umount", "--lazy", str(mnt), check=False)


def test_umount_when_nobody_uses_the_mount(backed_up: Vbfs, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    server = _server_pid(backed_up("mount", str(mnt)).stdout)
    try:
        out = backed_up("umount", "--lazy", str(mnt))
        assert out.stderr == "" and not is_mounted(mnt)
        assert _wait_gone(server)
    finally:
        if is_mounted(mnt):
            backed_up("umount", str(mnt), check=False)


def test_umount_of_what_is_not_a_vbfs_mount(vbfs: Vbfs, tmp_path: Path) -> None:
    folder = tmp_path / "plain"
    folder.mkdir()
    for path in (folder, tmp_path / "missing"):
        error = _one_error_line(vbfs("umount", str(path), check=False))
        assert error == f"vbfs: error: {path} is not mounted", error
    # a tmpfs, mounted where only that command sees it
    proc = _vbfs_in(vbfs, [f"mount -t tmpfs scratch {folder}"], "umount", str(folder))
    error = _one_error_line(proc)
    assert error == f"vbfs: error: {folder} is not a vbfs mount but tmpfs (scratch): use umount(8)", error
    error = _one_error_line(vbfs("umount", "/proc", check=False))
    assert "/proc is not a vbfs mount but proc" in error, error
    assert os.path.ismount("/proc")
