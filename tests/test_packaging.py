"""What vbfs ships around the command itself: man pages made from the live click tree, shell completion, and the
systemd units and job file example of contrib/, checked with the tools an administrator has (man, groff,
systemd-analyze, bash) and run for real against a repository."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import pytest

from tests.conftest import Vbfs, copy_sparse
from vbfs.cli import cli
from vbfs.cli.manpage import MARKER, write_pages
from vbfs.job import Job

ROOT = Path(__file__).resolve().parent.parent
CONTRIB = ROOT / "contrib"
SERVICE = CONTRIB / "systemd" / "vbfs-backup@.service"
TIMER = CONTRIB / "systemd" / "vbfs-backup@.timer"
VENV_VBFS = Path(sys.executable).parent / "vbfs"


def command_paths(group: click.Group, ctx: click.Context, words: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every visible command of the tree, walked here independently of the man page writer."""
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if cmd is None or cmd.hidden:
            continue
        yield (*words, name)
        if isinstance(cmd, click.Group):
            yield from command_paths(cmd, click.Context(cmd, info_name=name, parent=ctx), (*words, name))


def rendered(page: Path) -> str:
    """The page as a reader sees it, through man (or groff when man is missing), without bold and underline."""
    if shutil.which("man"):
        env = dict(os.environ, MANWIDTH="200", MANPAGER="cat", PAGER="cat")
        out = subprocess.run(["man", "-l", str(page)], capture_output=True, text=True, env=env, check=True).stdout
    elif shutil.which("groff"):
        out = subprocess.run(
            ["groff", "-man", "-Tutf8", "-rLL=200n", str(page)], capture_output=True, text=True, check=True
        ).stdout
    else:
        pytest.skip("neither man nor groff is installed to render a man page")
    return re.sub(".\b", "", out)


def test_man_pages_exist_for_every_command_and_show_its_options(tmp_path: Path) -> None:
    man1 = tmp_path / "man" / "man1"
    write_pages(man1)
    paths = list(command_paths(cli, click.Context(cli, info_name="vbfs")))
    assert ("backup",) in paths and ("catalog", "rebuild") in paths
    expected = {"vbfs.1"} | {"-".join(("vbfs", *p)) + ".1" for p in paths}
    assert {p.name for p in man1.iterdir()} == expected

    backup = cli.get_command(click.Context(cli), "backup")
    assert backup is not None
    text = rendered(man1 / "vbfs-backup.1")
    first_words = " ".join((backup.help or "").split()[:3])
    assert f"vbfs-backup - {first_words}" in " ".join(text.split()), "NAME: the command's own first words"
    for param in backup.params:
        if isinstance(param, click.Option) and not param.hidden:
            assert param.opts[-1] in text, f"{param.opts[-1]} is missing from vbfs-backup(1)"
    top = rendered(man1 / "vbfs.1")
    assert "vbfs-catalog-rebuild(1)" in top and "VBFS_REPO" in top and "EXIT STATUS" in top

    if shutil.which("groff"):
        for page in sorted(man1.iterdir()):
            check = subprocess.run(["groff", "-man", "-ww", "-z", str(page)], capture_output=True, text=True)
            assert check.returncode == 0 and not check.stderr, f"{page.name}: {check.stderr}"
    else:
        for page in sorted(man1.iterdir()):
            lines = page.read_text().splitlines()
            assert lines[0] == MARKER and lines[1].startswith(".TH ") and ".SH NAME" in lines
            known = {".TH", ".SH", ".TP", ".PP", ".nf", ".fi", ".nh", ".ad", ".nr", '.\\"'}
            assert all(line.split(" ")[0] in known for line in lines if line.startswith(".")), page.name


@pytest.mark.skipif(not shutil.which("man"), reason="man (man-db) is not installed")
def test_man_finds_a_subcommand_page_by_name(tmp_path: Path) -> None:
    write_pages(tmp_path / "man" / "man1")
    env = dict(os.environ, MANPATH=str(tmp_path / "man"), MANWIDTH="200", MANPAGER="cat", PAGER="cat")
    out = subprocess.run(["man", "vbfs-catalog-rebuild"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "vbfs [GLOBAL OPTIONS] catalog rebuild" in re.sub(".\b", "", out.stdout)


def test_man_pages_follow_the_tree_and_leave_other_files_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    @click.group()
    def root() -> None:
        """A tool."""

    @root.command()
    @click.option("--dry-run", is_flag=True, help="Change nothing \\ at all.")
    def plain() -> None:
        """First line.

        .starts with a dot and 'quote

        \b
        vbfs plain  # kept as one line
          vbfs plain --dry-run
        """

    @root.command(hidden=True)
    def secret() -> None:
        """Not documented."""

    @root.group()
    def nested() -> None:
        """A group."""

    @nested.command()
    def leaf() -> None:
        """A leaf."""

    man1 = tmp_path / "man1"
    man1.mkdir()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1764547200")  # 2025-12-01
    (man1 / "vbfs-nested.1").write_text(".TH SOMEONE-ELSE 1\n")  # a page vbfs did not write
    (man1 / "vbfs-gone.1").write_text(MARKER + "\n.TH VBFS-GONE 1\n")  # of a command that no longer exists
    result = write_pages(man1, root)
    assert sorted(p.name for p in man1.iterdir()) == ["vbfs-nested-leaf.1", "vbfs-nested.1", "vbfs-plain.1", "vbfs.1"]
    assert (man1 / "vbfs-nested.1").read_text() == ".TH SOMEONE-ELSE 1\n"
    assert [p.name for p in result.skipped] == ["vbfs-nested.1"] and [p.name for p in result.removed] == ["vbfs-gone.1"]
    text = rendered(man1 / "vbfs-plain.1")
    assert ".starts with a dot and 'quote" in text and "Change nothing \\ at all." in text and "--dry-run" in text
    assert re.search(r"^ +vbfs plain  # kept as one line\n +  vbfs plain --dry-run$", text, re.M), text
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    again = write_pages(man1, root)
    assert not again.written and len(again.unchanged) == 3, "only the date would change: the pages are kept"
    assert '"2025-12-01"' in (man1 / "vbfs-plain.1").read_text().split("\n")[1]


def bash_completions(words: list[str], tmp_path: Path) -> list[str]:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    if not (bindir / "vbfs").exists():
        (bindir / "vbfs").symlink_to(VENV_VBFS)
    script = (
        'eval "$(_VBFS_COMPLETE=bash_source vbfs)"\n'
        f"COMP_WORDS=({' '.join(words)}); COMP_CWORD={len(words) - 1}\n"
        "_vbfs_completion vbfs  # bash passes the command name\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_bash_completion_completes_commands_and_options(tmp_path: Path) -> None:
    assert "backup" in bash_completions(["vbfs", "ba"], tmp_path)
    assert bash_completions(["vbfs", "catalog", "re"], tmp_path) == ["rebuild"]
    assert "--job" in bash_completions(["vbfs", "backup", "--j"], tmp_path)


@pytest.mark.parametrize(
    ("shell", "needle"), [("zsh", "#compdef vbfs"), ("fish", "complete --no-files --command vbfs")]
)
def test_zsh_and_fish_completion_scripts(shell: str, needle: str) -> None:
    out = subprocess.run([str(VENV_VBFS)], env=dict(os.environ, _VBFS_COMPLETE=f"{shell}_source"), capture_output=True)
    assert out.returncode == 0 and needle in out.stdout.decode(), out.stderr


def test_the_example_job_file_loads() -> None:
    job = Job.load(CONTRIB / "vbfs" / "nightly.toml")
    assert job.source.startswith("vmware://") and job.guests and job.retention is not None
    assert job.options["password_file"] == "/etc/vbfs/vcenter.password"


def unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file's sections and their settings (systemd allows a key more than once)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"{path.name}: {raw!r}"
        key, value = line.split("=", 1)
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_the_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    service, timer = unit(SERVICE), unit(TIMER)
    known = {
        "Unit": {"Description", "Documentation", "Wants", "After"},
        "Service": {
            "Type", "EnvironmentFile", "ExecStart", "Nice", "CPUSchedulingPolicy", "IOSchedulingClass",
            "IOSchedulingPriority", "UMask", "PrivateTmp", "KillMode", "TimeoutStopSec", "TimeoutStartSec",
        },
        "Timer": {"OnCalendar", "RandomizedDelaySec", "Persistent", "AccuracySec"},
        "Install": {"WantedBy"},
    }  # fmt: skip
    for name, sections in (("service", service), ("timer", timer)):
        for section, keys in sections.items():
            assert section in known, f"{name}: unknown section [{section}]"
            assert set(keys) <= known[section], f"{name} [{section}]: unknown {set(keys) - known[section]}"
    assert service["Service"]["Type"] == ["oneshot"]
    assert all(cmd.startswith("/usr/local/bin/vbfs ") for cmd in service["Service"]["ExecStart"])
    assert timer["Timer"]["Persistent"] == ["true"] and timer["Install"]["WantedBy"] == ["timers.target"]

    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed: the units were checked by the parse above only")
    units = tmp_path / "units"
    units.mkdir()
    # verify insists that ExecStart's program exists, and looks up the Documentation= man pages.
    (units / SERVICE.name).write_text(SERVICE.read_text().replace("/usr/local/bin/vbfs", str(VENV_VBFS)))
    shutil.copy(TIMER, units / TIMER.name)
    write_pages(tmp_path / "man" / "man1")
    env = dict(os.environ, MANPATH=str(tmp_path / "man"), SYSTEMD_LOG_LEVEL="notice")
    instances = [str(units / "vbfs-backup@nightly.service"), str(units / "vbfs-backup@nightly.timer")]
    man = [] if shutil.which("man") else ["--man=no"]
    out = subprocess.run(["systemd-analyze", "verify", *man, *instances], capture_output=True, text=True, env=env)
    ours = [line for line in (out.stdout + out.stderr).splitlines() if "vbfs" in line]
    assert out.returncode == 0 and not ours, out.stdout + out.stderr


def environment_file(path: Path, etc: Path) -> dict[str, str]:
    """NAME=value lines as systemd's EnvironmentFile= reads them, with /etc/vbfs moved to ``etc``."""
    env = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            env[key.strip()] = value.strip().replace("/etc/vbfs", str(etc))
    return env


@pytest.mark.slow
def test_the_service_commands_back_up_and_prune_a_job(
    make_vbfs: Callable[..., Vbfs], template_image: Path, tmp_path: Path
) -> None:
    etc = tmp_path / "etc-vbfs"
    etc.mkdir()
    repo = tmp_path / "repo"
    admin = make_vbfs(repo, passphrase="nightly secret")
    admin.init("repokey")
    (etc / "passphrase").write_text("nightly secret\n")
    (etc / "passphrase").chmod(0o600)
    image = copy_sparse(template_image, tmp_path / "web01.raw")
    (etc / "web.toml").write_text(f'source = "image://{image}"\nguests = ["web01"]\n\n[retention]\nkeep-last = 1\n')
    settings = environment_file(CONTRIB / "vbfs" / "vbfs.env", etc)
    assert settings["VBFS_PASSPHRASE_FILE"] == str(etc / "passphrase")
    settings["VBFS_REPO"] = str(repo)
    # What systemd gives the service: the environment files and little else.
    env = {"PATH": os.environ["PATH"], "XDG_CACHE_HOME": str(tmp_path / "cache"), **settings}

    commands = unit(SERVICE)["Service"]["ExecStart"]
    for night in (1, 2):
        for command in commands:
            args = command.replace("%i", "web").replace("/etc/vbfs", str(etc)).split()
            assert args[0] == "/usr/local/bin/vbfs"
            run = subprocess.run([sys.executable, "-m", "vbfs.cli", *args[1:]], env=env, capture_output=True, text=True)
            assert run.returncode == 0, f"night {night}: {command}: {run.stderr}"
    kept = json.loads(admin("snapshots", "--json").stdout)
    assert [s["guest"] for s in kept] == ["web01"], "two nights of backups, the job's keep-last = 1 kept one"
