"""A backup job: the guests of one source backed up one after the other, each failure kept for its guest.

:class:`JobRunner` chooses the guests (by a :class:`vbfs.job.Job` or one name), runs a :class:`BackupRun` for
each and returns a :class:`JobResult` with the manifests that landed and a failure line per guest that did not.
A single-guest backup raises its error; a job goes on with the next guest. It prints nothing: the command reports
each guest as it ends through ``on_done`` and ``on_failed``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from vbfs.engine.backup import BackupRun
from vbfs.engine.progress import NoProgress, Progress
from vbfs.errors import SourceError, VbfsError
from vbfs.job import Job
from vbfs.sources import Hypervisor
from vbfs.store.manifest import Manifest
from vbfs.store.repository import Repository


@dataclass
class JobResult:
    manifests: list[Manifest] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # "<guest>: <why>", one per guest that failed

    @property
    def total(self) -> int:
        return len(self.manifests) + len(self.failures)


@dataclass
class JobRunner:
    repo: Repository
    pm: pluggy.PluginManager
    filesystems: dict[str, Any] | None = None
    index_files: bool = True
    progress: Callable[[], Progress] = NoProgress
    tags: tuple[str, ...] = ()
    """Tags of every snapshot, with the job's own ``tags`` after them."""
    note: str | None = None
    on_done: Callable[[Manifest, dict[str, float]], None] | None = None
    """Told of each snapshot that landed, with the seconds of its phases (read, index, commit)."""
    on_failed: Callable[[str, VbfsError], None] | None = None

    def run(
        self, hv: Hypervisor, source: str, job: Job | None = None, guest: str | None = None, where: str = ""
    ) -> JobResult:
        """Back up ``guest`` (or the source's own guest), or every guest ``job`` selects."""
        result = JobResult()
        if job is not None:
            names, missing = job.select(hv.guests())
            result.failures += [f"{m}: no such guest at {source}" for m in missing]
            if not names and not missing:
                raise SourceError(f"job {where}: no guest of {source} matches")
        else:
            name = guest or hv.default_guest()
            if not name:
                raise SourceError(f"{source} names no guest: give --guest")
            names = [name]
        for name in names:
            tags = tuple(dict.fromkeys([*self.tags, *(job.tags if job is not None else [])]))
            run = BackupRun(
                self.repo,
                self.pm,
                self.progress(),
                index_files=self.index_files,
                filesystems=self.filesystems,
                tags=tags,
                note=self.note,
            )
            try:
                manifest = run.run(hv, name, source)
            except VbfsError as exc:
                if job is None:
                    raise
                result.failures.append(f"{name}: {exc}")
                if self.on_failed is not None:
                    self.on_failed(name, exc)
                continue
            result.manifests.append(manifest)
            if self.on_done is not None:
                self.on_done(manifest, run.phases)
        return result
