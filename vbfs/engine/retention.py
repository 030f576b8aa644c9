"""Retention: which snapshots of a guest a policy keeps, and why; and ``prune``, which forgets the others and
collects the garbage they leave.

A policy is a set of rules, each applied on its own to all snapshots of one guest, newest first (the semantics of
restic's ``forget``, which borg's ``prune`` shares but for how rules share periods):

- ``last N`` keeps the N newest snapshots;
- ``hourly/daily/weekly/monthly/yearly N`` keeps the newest snapshot of each of the N newest hours, days, ISO
  weeks, months or years that have a snapshot (in the time zone given, the machine's local one by default);
- ``within D`` keeps every snapshot taken at most D before the guest's newest snapshot (not before "now": a guest
  whose backups stopped keeps its last ones).

A snapshot is kept when any rule keeps it; each rule that does is named as its reason ("daily 3": the third day).
A protected snapshot is always kept (reason "protected") and otherwise counts like any other. A policy without any
rule keeps nothing, so it is refused rather than applied.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, tzinfo
from typing import TYPE_CHECKING, Any

from vbfs.errors import VbfsError

if TYPE_CHECKING:
    from vbfs.engine.gc import GcResult
    from vbfs.engine.progress import Progress
    from vbfs.store.repository import Repository

_WITHIN_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "M": 30 * 86400, "y": 365 * 86400}
_WITHIN_RE = re.compile(r"(\d+)([smhdwMy])")


class PolicyError(VbfsError):
    pass


def parse_within(text: str) -> int:
    """A duration such as ``7d``, ``12h``, ``2w``, ``6M`` (months of 30 days), ``1y`` or ``1y6M``, in seconds."""
    text = text.strip()
    parts = _WITHIN_RE.findall(text)
    if not text or "".join(n + u for n, u in parts) != text:
        raise PolicyError(
            f"bad duration {text!r}: use a number and a unit, s m h d w M (30 days) y, e.g. 7d, 12h, 1y6M"
        )
    seconds = sum(int(n) * _WITHIN_UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise PolicyError(f"bad duration {text!r}: it must be longer than zero")
    return seconds


def format_within(seconds: int) -> str:
    for unit in ("y", "d", "h", "m"):  # days rather than weeks or 30-day months: what users type most
        if seconds % _WITHIN_UNITS[unit] == 0:
            return f"{seconds // _WITHIN_UNITS[unit]}{unit}"
    return f"{seconds}s"


_PERIODS: dict[str, Callable[[datetime], Any]] = {
    "hourly": lambda t: (t.year, t.month, t.day, t.hour),
    "daily": lambda t: (t.year, t.month, t.day),
    "weekly": lambda t: t.isocalendar()[:2],
    "monthly": lambda t: (t.year, t.month),
    "yearly": lambda t: t.year,
}


@dataclass(frozen=True)
class Policy:
    """How many snapshots each rule keeps (0: the rule is not used); ``within`` in seconds."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if type(v) is not int or v < 0:
                raise PolicyError(f"keep-{f.name} must be a whole number of zero or more, not {v!r}")

    @property
    def empty(self) -> bool:
        return not any(getattr(self, f.name) for f in fields(self))

    @classmethod
    def from_mapping(cls, data: dict[str, Any], where: str) -> Policy:
        """A policy from a job file's ``[retention]`` table: ``keep-last = 7``, ``keep-within = "7d"``, ..."""
        known = {f"keep-{f.name}": f.name for f in fields(cls)}
        values: dict[str, int] = {}
        for key, value in data.items():
            if key not in known:
                raise PolicyError(f"{where}: unknown retention setting {key!r} (known: {', '.join(sorted(known))})")
            if known[key] == "within":
                if not isinstance(value, str):
                    raise PolicyError(f'{where}: {key} is a duration in quotes, e.g. "7d"')
                try:
                    values["within"] = parse_within(value)
                except PolicyError as exc:
                    raise PolicyError(f"{where}: {key}: {exc}") from None
            elif type(value) is not int or value < 0:
                raise PolicyError(f"{where}: {key} must be a whole number of zero or more")
            else:
                values[known[key]] = value
        policy = cls(**values)
        if policy.empty:
            raise PolicyError(f"{where}: a retention table needs at least one keep rule above zero")
        return policy

    def describe(self) -> str:
        counts = [(f.name, getattr(self, f.name)) for f in fields(self) if f.name != "within"]
        parts = [f"{name} {n}" for name, n in counts if n]
        if self.within:
            parts.append(f"within {format_within(self.within)}")
        return ", ".join(parts) or "nothing"


@dataclass(frozen=True)
class Candidate:
    """A snapshot as retention sees it; ``time_ns`` is its start time (nanoseconds since the epoch, UTC)."""

    id: str
    guest: str
    name: str
    time_ns: int
    protected: bool = False


@dataclass(frozen=True)
class Decision:
    snapshot: Candidate
    keep: bool
    reasons: tuple[str, ...]


def plan(snapshots: Iterable[Candidate], policy: Policy, tz: tzinfo | None = None) -> list[Decision]:
    """What ``policy`` keeps of ``snapshots`` (any guests; each guest's are judged apart), newest first per guest,
    guests in name order. ``tz`` is the zone periods are counted in (None: the machine's local time zone)."""
    if policy.empty:
        raise PolicyError("no keep rule given: that would remove every snapshot (give at least one --keep-* option)")
    by_guest: dict[str, list[Candidate]] = {}
    for s in snapshots:
        by_guest.setdefault(s.guest, []).append(s)
    out: list[Decision] = []
    for guest in sorted(by_guest):
        out += _plan_guest(by_guest[guest], policy, tz)
    return out


def _local(time_ns: int, tz: tzinfo | None) -> datetime:
    return datetime.fromtimestamp(time_ns // 1_000_000_000, tz)


def _plan_guest(snaps: list[Candidate], policy: Policy, tz: tzinfo | None) -> list[Decision]:
    ordered = sorted(snaps, key=lambda s: (s.time_ns, s.id), reverse=True)
    newest = ordered[0].time_ns
    rules = [(name, getattr(policy, name), fn) for name, fn in _PERIODS.items() if getattr(policy, name)]
    left = {name: count for name, count, _ in rules}
    last_key: dict[str, Any] = {}
    out = []
    for i, s in enumerate(ordered):
        reasons: list[str] = []
        if s.protected:
            reasons.append("protected")
        if i < policy.last:
            reasons.append(f"last {i + 1}")
        if policy.within and newest - s.time_ns <= policy.within * 1_000_000_000:
            reasons.append(f"within {format_within(policy.within)}")
        when = _local(s.time_ns, tz)
        for name, count, fn in rules:
            if not left[name]:
                continue
            key = fn(when)
            if name in last_key and last_key[name] == key:
                continue
            last_key[name] = key
            left[name] -= 1
            reasons.append(f"{name} {count - left[name]}")
        out.append(Decision(s, bool(reasons), tuple(reasons)))
    return out


def local_zone() -> tzinfo | None:
    """The machine's time zone as datetime sees it (``TZ`` honoured); None only if it cannot be told."""
    return datetime.now().astimezone().tzinfo


# ---- applying a policy --------------------------------------------------------------------------------------------


@dataclass
class PruneResult:
    decisions: list[Decision]
    removed: list[str] = field(default_factory=list)
    """Ids of the snapshots forgotten."""
    unreadable: list[str] = field(default_factory=list)
    """Snapshots whose manifest cannot be read: kept (their time is unknown), one line each."""
    gc: GcResult | None = None


def candidates(
    repo: Repository, guest: str | None = None, tags: Sequence[frozenset[str]] = ()
) -> tuple[list[Candidate], list[str]]:
    """Every snapshot of the repository (of ``guest`` only, and passing the tag filter ``tags`` of
    :func:`vbfs.store.manifest.tag_filter`, if given) as retention sees it, read from the manifests themselves (the
    catalog is only a cache); and one line per manifest that cannot be read."""
    from vbfs.store import marks
    from vbfs.store.manifest import tags_match, time_ns

    protected = marks.protected_ids(repo)
    out, unreadable = [], []
    for snap_id in repo.snapshot_ids():
        try:
            m = repo.load_manifest(snap_id)
        except VbfsError as exc:
            unreadable.append(f"snapshot {snap_id[:40]} is kept: its manifest cannot be read ({exc})")
            continue
        if (guest is None or m.guest == guest) and tags_match(m.tags, tags):
            out.append(Candidate(m.id, m.guest, m.name, time_ns(m.time), m.id in protected))
    return out, unreadable


def prune(
    repo: Repository,
    policy: Policy,
    *,
    guest: str | None = None,
    tags: Sequence[frozenset[str]] = (),
    policies: dict[str, Policy] | None = None,
    dry_run: bool = False,
    tz: tzinfo | None = None,
    progress: Progress | None = None,
    wait: float = 0.0,
) -> PruneResult:
    """Forget what ``policy`` does not keep, then collect garbage. With ``policies`` (a job file's), only the
    guests it names are judged, each by its own entry; with ``tags``, only the snapshots that pass that filter
    (the others are neither counted nor touched, as with restic's ``forget --tag``).

    The caller holds the gc lock. Forgetting writes a forget record before it deletes a manifest
    (:mod:`vbfs.store.marks`), so an interrupted prune is finished by the next ``gc`` or ``prune``."""
    from vbfs.engine.gc import collect
    from vbfs.failpoints import failpoint
    from vbfs.store import marks

    snaps, unreadable = candidates(repo, guest, tags)
    decisions: list[Decision] = []
    by_guest: dict[str, list[Candidate]] = {}
    for s in snaps:
        by_guest.setdefault(s.guest, []).append(s)
    for g in sorted(by_guest):
        if policies is not None and g not in policies:
            continue  # a job's policy is for the job's guests only: the others are not touched
        decisions += plan(by_guest[g], policy if policies is None else policies[g], tz)
    result = PruneResult(decisions, unreadable=unreadable)
    if dry_run:
        gone = frozenset(d.snapshot.id for d in decisions if not d.keep)
        result.gc = collect(repo, progress, dry_run=True, without=gone)
        return result
    for d in decisions:
        if d.keep:
            continue
        manifest = repo.load_manifest(d.snapshot.id)
        marks.forget(repo, manifest, f"prune: {policy.describe()}")
        result.removed.append(d.snapshot.id)
        failpoint("prune-forgot")
    result.gc = collect(repo, progress, wait=wait)
    return result
