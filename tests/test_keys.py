"""Passphrases and keys: each passphrase source, change-passphrase, and exporting and importing the key."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import MiB, Vbfs, random_bytes, sha256
from vbfs.errors import VbfsError
from vbfs.store.keys import export_key
from vbfs.store.repository import Repository

PASSPHRASE = "correct horse"


def _image(path: Path, seed: int = 7) -> Path:
    with open(path, "wb") as f:
        f.truncate(16 * MiB)
        f.seek(3 * MiB)
        f.write(random_bytes(3 * MiB, seed))
    return path


def _one_line_error(proc: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vbfs: error: "), proc.stderr
    assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr
    return lines[0]


def _without_passphrase(v: Vbfs, **env: str) -> Vbfs:
    """The same repository with no passphrase in the environment, and ``env`` instead."""
    base = {k: val for k, val in v.env.items() if k != "VBFS_PASSPHRASE"}
    return Vbfs(v.repo, {**base, **env})


def _secret_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.fixture
def backed_up(make_vbfs: Callable[..., Vbfs], tmp_path: Path) -> tuple[Vbfs, Path]:
    """An encrypted repository holding one backup of a 16 MiB image."""
    v = make_vbfs(passphrase=PASSPHRASE)
    v.init("repokey")
    image = _image(tmp_path / "web01.raw")
    v("backup", f"image://{image}")
    return v, image


def _restores(v: Vbfs, image: Path, out: Path) -> None:
    v("restore", f"{image.stem}@latest:/disks/{image.stem}.img", str(out))
    assert sha256(out) == sha256(image)
    out.unlink()


# ---- passphrase sources ---------------------------------------------------------------------------------------


def test_each_passphrase_source_opens_the_repository(backed_up: tuple[Vbfs, Path], tmp_path: Path) -> None:
    v, image = backed_up
    file = _secret_file(tmp_path / "pass", f"{PASSPHRASE}\nthe second line is not part of it\n")
    command = f'sh -c \'test "$VBFS_REPO" = {v.repo} && printf "%s\\nmore\\n" "$0"\' \'{PASSPHRASE}\''
    for env in ({"VBFS_PASSPHRASE_FILE": str(file)}, {"VBFS_PASSCOMMAND": command}):
        w = _without_passphrase(v, **env)
        assert json.loads(w("info", "--json").stdout)["id"] == json.loads((v.repo / "config").read_text())["id"]
        _restores(w, image, tmp_path / "out.img")

    wrong = _secret_file(tmp_path / "wrong", "not it\n")
    line = _one_line_error(_without_passphrase(v, VBFS_PASSPHRASE_FILE=str(wrong))("info", check=False))
    assert line == "vbfs: error: wrong passphrase for this repository"


def test_passphrase_file_open_to_others_is_refused(backed_up: tuple[Vbfs, Path], tmp_path: Path) -> None:
    v, _ = backed_up
    for mode in (0o640, 0o604, 0o620):
        file = _secret_file(tmp_path / f"pass-{mode:o}", f"{PASSPHRASE}\n", mode)
        proc = _without_passphrase(v, VBFS_PASSPHRASE_FILE=str(file))("snapshots", check=False)
        line = _one_line_error(proc)
        assert f"mode 0{mode:o}" in line and "chmod 600" in line, line
        assert PASSPHRASE not in proc.stdout + proc.stderr
    empty = _secret_file(tmp_path / "empty", "\nsecond\n")
    assert "first line is empty" in _one_line_error(
        _without_passphrase(v, VBFS_PASSPHRASE_FILE=str(empty))("info", check=False)
    )


def test_two_passphrase_sources_are_refused(backed_up: tuple[Vbfs, Path], tmp_path: Path) -> None:
    v, _ = backed_up
    file = _secret_file(tmp_path / "pass", f"{PASSPHRASE}\n")
    proc = v("info", check=False, extra_env={"VBFS_PASSPHRASE_FILE": str(file)})
    line = _one_line_error(proc)
    assert "VBFS_PASSPHRASE, VBFS_PASSPHRASE_FILE are set" in line
    assert PASSPHRASE not in proc.stdout + proc.stderr


def test_passcommand_failures_name_only_the_command(backed_up: tuple[Vbfs, Path]) -> None:
    v, _ = backed_up
    cases = [
        ("sh -c 'exit 3' SECRET-ARGUMENT", {}, "the passphrase command sh failed (it exited 3)"),
        (
            "no-such-vbfs-passcommand SECRET-ARGUMENT",
            {},
            "the passphrase command no-such-vbfs-passcommand was not found",
        ),
        ("true SECRET-ARGUMENT", {}, "the passphrase command true printed no passphrase"),
        (
            "sh -c 'exec sleep 30' SECRET-ARGUMENT",
            {"VBFS_PASSCOMMAND_TIMEOUT": "1"},
            "the passphrase command sh did not answer within 1 s",
        ),
    ]
    for command, env, expected in cases:
        started = time.monotonic()
        proc = _without_passphrase(v, VBFS_PASSCOMMAND=command, **env)("snapshots", check=False)
        line = _one_line_error(proc)
        assert expected in line, line
        assert "SECRET-ARGUMENT" not in proc.stdout + proc.stderr
        assert time.monotonic() - started < 20


def test_the_passphrase_is_in_no_output_of_a_failing_command(backed_up: tuple[Vbfs, Path], tmp_path: Path) -> None:
    v, _ = backed_up
    file = _secret_file(tmp_path / "pass", f"{PASSPHRASE}\n")
    runs = [
        v("restore", "nosuchguest@latest:/disks/x.img", str(tmp_path / "x"), check=False),
        v("backup", f"image://{tmp_path / 'missing.raw'}", check=False, extra_env={"VBFS_DEBUG": "1"}),
        _without_passphrase(v, VBFS_PASSPHRASE_FILE=str(file))("key", "import", str(tmp_path / "nothing"), check=False),
        v("key", "change-passphrase", check=False, extra_env={"VBFS_NEW_PASSPHRASE_FILE": str(tmp_path / "absent")}),
    ]
    for proc in runs:
        assert proc.returncode != 0
        assert PASSPHRASE not in proc.stdout + proc.stderr, proc.stderr


def test_the_prompt_names_the_repository(backed_up: tuple[Vbfs, Path]) -> None:
    v, _ = backed_up
    env = _without_passphrase(v).env
    pid, fd = pty.fork()
    if pid == 0:  # the child: vbfs on a terminal of its own
        os.execve(sys.executable, [sys.executable, "-m", "vbfs.cli", "info"], env)
    seen = b""
    deadline = time.monotonic() + 60
    answered = False
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
        if not answered and f"Passphrase for {v.repo}: ".encode() in seen:
            os.write(fd, f"{PASSPHRASE}\n".encode())
            answered = True
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert answered, seen
    assert os.waitstatus_to_exitcode(status) == 0, seen
    assert re.search(rb"encryption\s+repokey", seen), seen
    assert PASSPHRASE.encode() not in seen, "the typed passphrase is not echoed"


# ---- change-passphrase ----------------------------------------------------------------------------------------


def test_change_passphrase(backed_up: tuple[Vbfs, Path], make_vbfs: Callable[..., Vbfs], tmp_path: Path) -> None:
    v, image = backed_up
    before = (v.repo / "keys" / "repokey").read_bytes()
    loose = _secret_file(tmp_path / "new-loose", "new one\n", 0o644)
    refused = _one_line_error(
        v("key", "change-passphrase", check=False, extra_env={"VBFS_NEW_PASSPHRASE_FILE": str(loose)})
    )
    assert "chmod 600" in refused
    assert (v.repo / "keys" / "repokey").read_bytes() == before

    new_file = _secret_file(tmp_path / "new", "a new passphrase\n")
    v("key", "change-passphrase", extra_env={"VBFS_NEW_PASSPHRASE_FILE": str(new_file)})
    after = json.loads((v.repo / "keys" / "repokey").read_text())
    assert after["kdf"]["salt"] != json.loads(before)["kdf"]["salt"], "a new salt"
    assert oct((v.repo / "keys" / "repokey").stat().st_mode & 0o777) == "0o600"

    old = make_vbfs(v.repo, passphrase=PASSPHRASE)
    assert _one_line_error(old("snapshots", check=False)) == "vbfs: error: wrong passphrase for this repository"
    new = make_vbfs(v.repo, passphrase="a new passphrase")
    _restores(new, image, tmp_path / "out.img")
    new("backup", f"image://{image}")  # the same master key: the second backup dedups against the first
    assert len(json.loads(new("snapshots", "--json").stdout)) == 2
    new("check", "--verify-data")


@pytest.mark.parametrize(("failpoint", "lands"), [("put-partial:keys", False), ("after-key-put", True)])
def test_a_killed_change_leaves_one_valid_key(
    backed_up: tuple[Vbfs, Path], make_vbfs: Callable[..., Vbfs], tmp_path: Path, failpoint: str, lands: bool
) -> None:
    v, image = backed_up
    killed = v(
        "key", "change-passphrase", check=False, extra_env={"VBFS_NEW_PASSPHRASE": "two", "VBFS_FAILPOINT": failpoint}
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    works, refused = (make_vbfs(v.repo, "two"), v) if lands else (v, make_vbfs(v.repo, "two"))
    _restores(works, image, tmp_path / "out.img")
    assert "wrong passphrase" in _one_line_error(refused("snapshots", check=False))
    works("key", "change-passphrase", extra_env={"VBFS_NEW_PASSPHRASE": "three"})  # the dead one's lock is no obstacle
    _restores(make_vbfs(v.repo, "three"), image, tmp_path / "out.img")


# ---- export and import ----------------------------------------------------------------------------------------


def test_export_delete_import_restores(backed_up: tuple[Vbfs, Path], tmp_path: Path) -> None:
    v, image = backed_up
    export = tmp_path / "key.export"
    v("key", "export", str(export))
    assert export.stat().st_mode & 0o777 == 0o600
    doc = json.loads(export.read_text())
    assert doc["repository"] == json.loads((v.repo / "config").read_text())["id"]
    keyfile = v.repo / "keys" / "repokey"
    assert doc["repokey"] == json.loads(keyfile.read_text()), "the key file as it is, still wrapped"
    assert PASSPHRASE not in export.read_text()

    keyfile.unlink()
    line = _one_line_error(v("snapshots", check=False), code=3)
    assert "keys/repokey is missing" in line and "vbfs key import" in line

    wrong = v("key", "import", str(export), check=False, extra_env={"VBFS_PASSPHRASE": "not it"})
    assert _one_line_error(wrong) == "vbfs: error: wrong passphrase for this repository"
    assert not keyfile.exists(), "nothing is written before the passphrase is verified"

    done = v("key", "import", str(export))
    assert "restored keys/repokey" in done.stderr
    assert keyfile.stat().st_mode & 0o777 == 0o600
    _restores(v, image, tmp_path / "out.img")

    # a damaged key file is replaced the same way
    raw = bytearray(keyfile.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    keyfile.write_bytes(bytes(raw))
    assert "damaged" in _one_line_error(v("snapshots", check=False), code=3)
    assert "replaced keys/repokey" in v("key", "import", str(export)).stderr
    _restores(v, image, tmp_path / "out.img")


def test_import_of_an_old_export_brings_back_its_passphrase(
    backed_up: tuple[Vbfs, Path], make_vbfs: Callable[..., Vbfs], tmp_path: Path
) -> None:
    v, image = backed_up
    v("key", "export", str(tmp_path / "old.export"))
    v("key", "change-passphrase", extra_env={"VBFS_NEW_PASSPHRASE": "forgotten later"})
    v("key", "import", str(tmp_path / "old.export"))  # asks the export's passphrase: the old one
    _restores(v, image, tmp_path / "out.img")
    assert "wrong passphrase" in _one_line_error(make_vbfs(v.repo, "forgotten later")("snapshots", check=False))


def test_a_key_of_another_repository_is_refused(
    backed_up: tuple[Vbfs, Path], make_vbfs: Callable[..., Vbfs], tmp_path: Path
) -> None:
    v, image = backed_up
    other = make_vbfs(tmp_path / "other", passphrase=PASSPHRASE)
    other.init("repokey")
    other("key", "export", str(tmp_path / "other.export"))
    other("key", "export", "--paper", str(tmp_path / "other.paper"))
    keyfile = v.repo / "keys" / "repokey"
    before = keyfile.read_bytes()
    for name in ("other.export", "other.paper"):
        line = _one_line_error(v("key", "import", str(tmp_path / name), check=False))
        assert "holds the key of repository" in line and "refusing" in line, line
    assert keyfile.read_bytes() == before

    # The other key relabelled with this repository's id gets past the id, not past the config's MAC.
    this_id = json.loads((v.repo / "config").read_text())["id"]
    forged = tmp_path / "forged.export"
    forged.write_bytes(export_key((other.repo / "keys" / "repokey").read_bytes(), this_id))
    line = _one_line_error(v("key", "import", str(forged), check=False))
    assert "does not verify the config" in line, line
    assert keyfile.read_bytes() == before
    _restores(v, image, tmp_path / "out.img")


def test_a_damaged_export_is_refused(backed_up: tuple[Vbfs, Path], tmp_path: Path) -> None:
    v, _ = backed_up
    export = tmp_path / "key.export"
    v("key", "export", str(export))
    doc = json.loads(export.read_text())
    doc["repokey"]["nonce"] = doc["repokey"]["nonce"][::-1]
    export.write_text(json.dumps(doc))
    (v.repo / "keys" / "repokey").unlink()
    line = _one_line_error(v("key", "import", str(export), check=False), code=3)
    assert line == f"vbfs: error: the key export {export} is damaged (checksum mismatch)"
    assert not (v.repo / "keys" / "repokey").exists()
    line = _one_line_error(v("key", "import", str(tmp_path / "key.export.absent"), check=False))
    assert "cannot read" in line


def test_paper_round_trip(backed_up: tuple[Vbfs, Path], tmp_path: Path) -> None:
    v, image = backed_up
    paper = v("key", "export", "--paper", "-").stdout
    this_id = json.loads((v.repo / "config").read_text())["id"]
    lines = paper.splitlines()
    assert lines[0] == "vbfs repository key, paper form 1" and lines[1] == f"repository {this_id}"
    numbered = [line for line in lines if re.match(r"\s*\d+:", line)]
    assert numbered and all(len(line) <= 60 for line in numbered), "short lines, each with a checksum"

    (v.repo / "keys" / "repokey").unlink()
    # What someone types back from the printout: only the numbered lines, spacing their own, uppercase.
    typed = tmp_path / "typed.txt"
    typed.write_text("\n".join(line.replace(" ", "").upper() for line in numbered) + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "vbfs.cli", "key", "import", "--paper", "-"],
        input=typed.read_text(),
        env=v.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    _restores(v, image, tmp_path / "out.img")
    v("check")


def test_a_mistyped_paper_line_is_named(backed_up: tuple[Vbfs, Path], tmp_path: Path) -> None:
    v, _ = backed_up
    paper = tmp_path / "key.paper"
    v("key", "export", "--paper", str(paper))
    assert paper.stat().st_mode & 0o777 == 0o600
    (v.repo / "keys" / "repokey").unlink()
    lines = paper.read_text().splitlines()
    row = next(i for i, line in enumerate(lines) if line.lstrip().startswith("4:"))
    for damage in ("digit", "checksum"):
        changed = list(lines)
        text = changed[row]
        at = text.index(":") + 3 if damage == "digit" else len(text) - 1
        changed[row] = text[:at] + ("0" if text[at] != "0" else "1") + text[at + 1 :]
        mistyped = tmp_path / f"mistyped-{damage}.paper"
        mistyped.write_text("\n".join(changed) + "\n")
        line = _one_line_error(v("key", "import", str(mistyped), check=False), code=3)
        assert "line 4 of the paper key" in line and "mistyped" in line, line
    missing = tmp_path / "missing.paper"
    missing.write_text("\n".join(lines[:row] + lines[row + 1 :]) + "\n")
    assert "line 4 of the paper key" in _one_line_error(v("key", "import", str(missing), check=False))
    assert not (v.repo / "keys" / "repokey").exists()
    v("key", "import", str(paper))  # the form is found by its header
    v("snapshots")


def test_key_commands_on_a_plaintext_repository(make_vbfs: Callable[..., Vbfs], tmp_path: Path) -> None:
    v = make_vbfs()
    v.init("none")
    for args in (("key", "export", str(tmp_path / "k")), ("key", "change-passphrase")):
        assert "not encrypted" in _one_line_error(v(*args, check=False, extra_env={"VBFS_NEW_PASSPHRASE": "x"}))
    assert not (tmp_path / "k").exists()


def test_change_passphrase_shares_the_repository_with_backups_not_with_another_change(
    backed_up: tuple[Vbfs, Path], make_vbfs: Callable[..., Vbfs], tmp_path: Path
) -> None:
    v, image = backed_up
    repo = Repository.open(str(v.repo), lambda confirm: PASSPHRASE)
    with repo.lock_shared():  # what a running backup or mount holds
        v("key", "change-passphrase", extra_env={"VBFS_NEW_PASSPHRASE": "two"})
    two = make_vbfs(v.repo, "two")
    with repo.lock_gc():  # what another change of the key (or a prune) holds
        busy = two("key", "change-passphrase", "--lock-wait", "0", check=False, extra_env={"VBFS_NEW_PASSPHRASE": "x"})
        assert "locked" in _one_line_error(busy, code=4)
    _restores(two, image, tmp_path / "out.img")

    # A change that opened the repository before another one landed stops instead of overwriting it.
    late = Repository.open(str(v.repo), lambda confirm: "two")
    two("key", "change-passphrase", extra_env={"VBFS_NEW_PASSPHRASE": "three"})
    with pytest.raises(VbfsError, match="changed by another process meanwhile"):
        late.change_passphrase("two", "four")
    _restores(make_vbfs(v.repo, "three"), image, tmp_path / "out.img")
