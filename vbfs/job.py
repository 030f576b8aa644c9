"""Backup jobs: one source, many guests, chosen by name, inventory path or shell pattern (a TOML file).

```toml
source = "vmware://backup@vcenter.example/DC0"
guests = ["web*", "prod/db/*"]   # names or inventory paths, shell patterns; all guests when absent
exclude = ["*-test"]
insecure = false                  # skip TLS verification (prints a warning)
ca_file = "/etc/vbfs/vcenter-ca.pem"
password_file = "/etc/vbfs/vcenter.password"
index = true                      # index the guests' files for find and diff
tags = ["nightly"]                # tags of every snapshot the job makes (besides backup --tag)

[retention]                       # optional: what `vbfs prune` keeps of each guest of this job
keep-daily = 7
keep-weekly = 4
keep-within = "2d"
```

A guest named without a pattern that the source does not have is an error of the job, not silently skipped.
"""

from __future__ import annotations

import fnmatch
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vbfs.engine.retention import Policy
from vbfs.errors import VbfsError
from vbfs.sources import GuestInfo
from vbfs.store.manifest import LabelError, check_tags

OPTION_KEYS = {"insecure": bool, "ca_file": str, "password_file": str, "user": str, "streams": int}


class JobError(VbfsError):
    pass


@dataclass
class Job:
    source: str
    guests: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    index: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    retention: Policy | None = None  # the job's [retention] table, when it has one
    tags: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> Job:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise JobError(f"job {path}: {exc.strerror or exc}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise JobError(f"job {path}: not valid TOML ({exc})") from None
        known = {"source", "guests", "exclude", "index", "retention", "tags", *OPTION_KEYS}
        unknown = sorted(set(data) - known)
        if unknown:
            raise JobError(f"job {path}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(known))})")
        source = data.get("source")
        if not isinstance(source, str) or not source:
            raise JobError(f"job {path}: 'source' (a source URL) is required")
        lists = {}
        for key in ("guests", "exclude"):
            value = data.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise JobError(f"job {path}: {key!r} must be a list of names or patterns")
            lists[key] = value
        options: dict[str, Any] = {}
        for key, kind in OPTION_KEYS.items():
            if key in data:
                if not isinstance(data[key], kind):
                    raise JobError(f"job {path}: {key!r} must be a {kind.__name__}")
                options[key] = data[key]
        index = data.get("index", True)
        if not isinstance(index, bool):
            raise JobError(f"job {path}: 'index' must be true or false")
        retention = None
        if "retention" in data:
            table = data["retention"]
            if not isinstance(table, dict):
                raise JobError(f"job {path}: 'retention' must be a table ([retention] with keep-... settings)")
            retention = Policy.from_mapping(table, f"job {path} [retention]")
        tags = data.get("tags", [])
        if not isinstance(tags, list):
            raise JobError(f"job {path}: 'tags' must be a list of tags, e.g. tags = [\"nightly\"]")
        try:
            check_tags(tags)
        except LabelError as exc:
            raise JobError(f"job {path}: 'tags': {exc}") from None
        return cls(source, lists["guests"], lists["exclude"], index, options, retention, list(tags))

    def select(self, offered: list[GuestInfo]) -> tuple[list[str], list[str]]:
        """The guests to back up, in the order offered, and the job's explicit names that matched nothing."""

        def names(g: GuestInfo) -> list[str]:
            return [g.name, str(g.details.get("path", g.name))]

        def hit(g: GuestInfo, patterns: list[str]) -> bool:
            return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names(g))

        chosen = [g.name for g in offered if (not self.guests or hit(g, self.guests)) and not hit(g, self.exclude)]
        missing = [p for p in self.guests if not any(c in p for c in "*?[") and not any(p in names(g) for g in offered)]
        return chosen, missing
