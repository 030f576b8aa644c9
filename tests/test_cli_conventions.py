"""What every command shares, as a user of cron, systemd and shell pipes meets it: options after the command's
name, -q/-v, --log-file and --log-json, a closed pipe, permission errors, --lock-wait and break-lock, progress on
a terminal and the backup summary's times."""

from __future__ import annotations

import json
import os
import pty
import re
import secrets
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Vbfs, copy_sparse
from vbfs.store.backend import host_id


@pytest.fixture
def backed_up(vbfs: Vbfs, template_image: Path, tmp_path: Path) -> Vbfs:
    vbfs("backup", f"image://{copy_sparse(template_image, tmp_path / 'web01.raw')}")
    return vbfs


def without_repo_env(v: Vbfs) -> dict[str, str]:
    return {k: val for k, val in v.env.items() if k != "VBFS_REPO"}


def run(v: Vbfs, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vbfs.cli", *args], env=env or v.env, capture_output=True, text=True, timeout=300
    )


def test_options_may_follow_the_command(backed_up: Vbfs, tmp_path: Path) -> None:
    env = without_repo_env(backed_up)
    before = run(backed_up, "-r", str(backed_up.repo), "snapshots", "--json", env=env)
    after = run(backed_up, "snapshots", "-r", str(backed_up.repo), "--json", env=env)
    assert before.returncode == after.returncode == 0, (before.stderr, after.stderr)
    assert json.loads(before.stdout) == json.loads(after.stdout) and len(json.loads(after.stdout)) == 1
    # given twice, the one after the command's name wins
    both = run(backed_up, "-r", str(tmp_path / "nowhere"), "snapshots", "-r", str(backed_up.repo), env=env)
    assert both.returncode == 0, both.stderr
    # a group's subcommand too
    rebuilt = run(backed_up, "catalog", "rebuild", "-r", str(backed_up.repo), env=env)
    assert rebuilt.returncode == 0 and "1 snapshot" in rebuilt.stdout, rebuilt.stderr


def test_a_closed_pipe_ends_quietly(backed_up: Vbfs) -> None:
    for args in (["snapshots"], ["ls", "web01@latest:/files/web01/p1/srv/data"], ["find", "*"]):
        proc = subprocess.Popen(
            [sys.executable, "-m", "vbfs.cli", *args],
            env=backed_up.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # before the command writes a byte: every write meets a closed pipe
        err = proc.stderr.read().decode()
        code = proc.wait(timeout=120)
        assert err == "", err
        assert code == 141, code  # as a program ended by SIGPIPE
    shell = subprocess.run(
        f"{sys.executable} -m vbfs.cli find '*' | head -c 1",
        shell=True,
        env=backed_up.env,
        capture_output=True,
        text=True,
    )
    assert "Exception ignored" not in shell.stderr and "BrokenPipe" not in shell.stderr, shell.stderr


def test_quiet_verbose_log_file_and_json(backed_up: Vbfs, tmp_path: Path) -> None:
    (backed_up.repo / "snapshots" / ("0" * 32)).write_bytes(b"not a manifest")  # a warning for every command
    plain = backed_up("snapshots")
    assert "vbfs: warning:" in plain.stderr, plain.stderr
    log_file = tmp_path / "vbfs.log"
    quiet = backed_up("snapshots", "-q", "--log-file", str(log_file))
    assert "vbfs: warning:" in quiet.stderr, "warnings stay with -q"
    assert "web01" in quiet.stdout, "the command's output stays with -q"
    text = log_file.read_text()
    assert re.search(
        r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d \[\d+\] vbfs: info: started: vbfs", text, re.M
    ), text
    assert "vbfs: warning:" in text and "finished in" in text and "exit code 0" in text, text
    assert os.stat(log_file).st_mode & 0o777 == 0o600

    missing = backed_up("ls", "nosuch@latest", "--log-json", check=False)
    assert missing.returncode == 2
    docs = [json.loads(line) for line in missing.stderr.splitlines()]
    assert {d["kind"] for d in docs} >= {"warning", "error"}, docs
    error = next(d for d in docs if d["kind"] == "error")
    assert "nosuch" in error["message"] and error["command"] == "ls" and error["time"][-6] in "+-", error

    verbose = backed_up("-v", "info")
    assert "vbfs: info: started: vbfs -v info" in verbose.stderr, verbose.stderr


def test_the_log_never_holds_a_password_of_a_source_url(vbfs: Vbfs, tmp_path: Path) -> None:
    log_file = tmp_path / "vbfs.log"
    vbfs("--log-file", str(log_file), "guests", "vmware://admin:s3cret@127.0.0.1:9/", check=False)
    text = log_file.read_text()
    assert "s3cret" not in text and "vmware://admin@127.0.0.1:9/" in text, text


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder that an unprivileged user can reach (pytest's own temporary folders are root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="vbfs-perm-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def as_nobody(v: Vbfs, cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run vbfs as another user")
    env = dict(v.env, XDG_CACHE_HOME=str(cache), HOME=str(cache))
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "vbfs.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_permission_problems_are_one_line_naming_the_path(
    make_vbfs: object, template_image: Path, shared_dir: Path
) -> None:
    assert callable(make_vbfs)
    v: Vbfs = make_vbfs(shared_dir / "repo")
    v.init()
    cache = shared_dir / "cache"
    cache.mkdir(mode=0o777)
    cache.chmod(0o777)
    image = copy_sparse(template_image, shared_dir / "web01.raw")
    image.chmod(0o600)  # root's alone
    v("backup", f"image://{image}")

    # an image the user may not read
    proc = as_nobody(v, cache, "backup", f"image://{image}", "-r", str(v.repo))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "internal error" not in lines[0] and "permission denied" in lines[0], lines
    assert str(v.repo) in lines[0] or str(image) in lines[0], lines

    # a repository the user may read but not write: not "read-only storage"
    for p in [v.repo, *v.repo.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    image.chmod(0o644)
    proc = as_nobody(v, cache, "backup", f"image://{image}")
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("vbfs: error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "read-only storage" not in proc.stderr and "not writable by user id 65534" in lines[0], proc.stderr
    listed = as_nobody(v, cache, "snapshots")
    assert listed.returncode == 0 and "web01" in listed.stdout, listed.stderr

    # a repository the user may not even read
    v.repo.chmod(0o700)
    proc = as_nobody(v, cache, "snapshots")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "internal error" not in lines[0], proc.stderr
    assert str(v.repo) in lines[0] and "permission denied" in lines[0], lines


def plant_lock(repo: Path, kind: str, host: str, hid: str, pid: int, age: float = 0.0) -> Path:
    path = repo / "locks" / f"{kind}-{secrets.token_hex(8)}"
    record = {"kind": kind, "host": host, "hostid": hid, "pid": pid, "time": time.time() - age}
    path.write_text(json.dumps(record))
    return path


def test_lock_wait_locks_and_break_lock(backed_up: Vbfs) -> None:
    other = plant_lock(backed_up.repo, "exclusive", "backup-host-2", "0123456789ab", 4242)
    started = time.monotonic()
    proc = backed_up("check", "--lock-wait", "2", check=False)
    waited = time.monotonic() - started
    assert proc.returncode == 4 and "pid 4242 on backup-host-2" in proc.stderr, proc.stderr
    assert "break-lock" in proc.stderr and waited >= 2, (waited, proc.stderr)

    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        mine = plant_lock(backed_up.repo, "shared", socket.gethostname(), host_id(), sleeper.pid)
        listed = backed_up("locks", "--json")
        states = {Path(lk["name"]).name: lk["state"] for lk in json.loads(listed.stdout)}
        assert states == {other.name: "elsewhere", mine.name: "running"}, states

        broke = backed_up("break-lock")
        assert "removed the exclusive lock of pid 4242 on backup-host-2" in broke.stderr, broke.stderr
        assert "kept the shared lock of pid" in broke.stderr and not other.exists() and mine.exists()
        assert backed_up("check").returncode == 0  # the lock that was in the way is gone
        backed_up("break-lock", "--running")
        assert not mine.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def on_a_terminal(v: Vbfs, *args: str) -> tuple[int, str]:
    """Run vbfs with stdout and stderr on a pseudo-terminal; its exit code and all it wrote."""
    master, slave = pty.openpty()
    os.set_blocking(master, False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "vbfs.cli", *args],
        env=dict(v.env, COLUMNS="160", TERM="xterm"),
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
    )
    os.close(slave)
    out = bytearray()
    while True:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(timeout=60), out.decode(errors="replace")


def test_progress_on_a_terminal_and_the_summary_times(vbfs: Vbfs, template_image: Path, tmp_path: Path) -> None:
    image = copy_sparse(template_image, tmp_path / "web01.raw")
    code, out = on_a_terminal(vbfs, "backup", f"image://{image}")
    assert code == 0, out
    assert "indexing guest files" in out and "files" in out, out
    summary = re.search(
        r"web01@\S+ \(\w{8}\): read .*; (\d+\.\d) s \(read (\d+\.\d) s, index (\d+\.\d) s, commit (\d+\.\d) s\)", out
    )
    assert summary, out
    total, *phases = (float(x) for x in summary.groups())
    assert total + 0.15 >= sum(phases), (total, phases)  # the whole command's time, the phases within it

    code, out = on_a_terminal(vbfs, "check", "--verify-data")
    assert code == 0 and "verifying chunks" in out and " chunks" in out, out

    quiet_code, quiet = on_a_terminal(vbfs, "check", "--verify-data", "-q")
    assert quiet_code == 0 and "verifying chunks" not in quiet, quiet

    piped = vbfs("backup", f"image://{image}")  # not a terminal: no bar, the summary alone
    assert "\x1b[" not in piped.stderr and "\x1b[" not in piped.stdout


def test_a_job_ends_with_its_total(vbfs: Vbfs, template_image: Path, tmp_path: Path) -> None:
    image = copy_sparse(template_image, tmp_path / "web01.raw")
    job = tmp_path / "nightly.toml"
    job.write_text(f'source = "image://{image}"\nguests = ["web01"]\n')
    out = vbfs("backup", "--job", str(job)).stdout
    assert re.search(r"^1 of 1 guest\(s\) backed up in \d+\.\d s$", out, re.M), out
    assert out.count(" s (read ") == 1, out
