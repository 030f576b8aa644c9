"""The retention planner (vbfs.engine.retention): which snapshots a policy keeps, and the reason it names for each.

The expected tables below are written out by hand from the rules in the planner's docstring (restic's ``forget``
semantics), not derived by code, so a change in what a prune would delete shows up as a changed row.
"""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from vbfs.engine.retention import Candidate, Policy, PolicyError, parse_within, plan

DAY = 86400


def at(text: str) -> int:
    """Nanoseconds since the epoch of a UTC time written ``YYYY-MM-DD HH:MM``."""
    return int(dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp()) * 1_000_000_000


def snap(sid: str, when: str, guest: str = "web", protected: bool = False) -> Candidate:
    return Candidate(id=sid, guest=guest, name=f"{guest}-{when}", time_ns=at(when), protected=protected)


# One guest over two years, irregular: single snapshots months apart, two on one day, month and year ends, a leap
# day, a dense December with two snapshots in one hour, and the ISO week boundary (Sunday 2025-12-28 is 2025-W52,
# Monday 2025-12-29 is already 2026-W01). All times UTC.
TIMES = {
    "a01": "2024-01-15 10:00",
    "a02": "2024-02-29 23:30",  # leap day
    "a03": "2024-03-31 23:59",  # month end
    "a04": "2024-06-10 08:00",
    "a05": "2024-06-10 20:00",  # same day as a04
    "a06": "2024-12-31 23:00",  # last of 2024
    "a07": "2025-01-01 00:30",  # first of 2025, 90 minutes after a06
    "a08": "2025-03-15 12:00",
    "a09": "2025-05-31 18:00",
    "a10": "2025-06-01 06:00",
    "a11": "2025-08-20 09:00",  # after a gap of eleven weeks
    "a12": "2025-10-31 22:00",
    "a13": "2025-11-30 23:00",  # Sunday, 2025-W48
    "a14": "2025-12-01 01:00",  # Monday, 2025-W49; nothing in W50
    "a15": "2025-12-15 09:00",  # 2025-W51 ...
    "a16": "2025-12-15 15:00",
    "a17": "2025-12-16 09:00",
    "a18": "2025-12-17 09:00",  # ... newest of W51
    "a19": "2025-12-22 02:00",  # 2025-W52 ...
    "a20": "2025-12-24 12:00",
    "a21": "2025-12-28 23:00",  # ... Sunday, newest of W52
    "a22": "2025-12-29 00:10",  # Monday: 2026-W01 although still 2025
    "a23": "2025-12-31 23:50",
    "a24": "2026-01-01 10:05",  # same hour as a25
    "a25": "2026-01-01 10:40",
    "a26": "2026-01-02 02:00",  # newest; 2026-01-01 21:00 in New York
}


def two_years(protected: frozenset[str] = frozenset()) -> list[Candidate]:
    # Given oldest first on purpose: the planner sorts.
    return [snap(sid, when, protected=sid in protected) for sid, when in TIMES.items()]


def table(snapshots: list[Candidate], policy: Policy, tz: dt.tzinfo) -> list[tuple[str, tuple[str, ...]]]:
    decisions = plan(snapshots, policy, tz)
    for d in decisions:
        assert d.keep == bool(d.reasons), d
    return [(d.snapshot.id, d.reasons) for d in decisions]


EVERY_RULE = Policy(last=2, hourly=3, daily=4, weekly=3, monthly=13, yearly=3, within=DAY)

# Newest first; () means the snapshot would be removed.
# - a24 and a25 share the hour 2026-01-01 10h: hourly takes only the newer (a25); a24 is kept by "within 1d" alone
#   (2026-01-01 10:05 is 15h55 before the newest, 2026-01-02 02:00), a23 (26h10 before) is not.
# - weekly: a26, a25, a24, a23 and a22 all fall in 2026-W01 (Mon 2025-12-29 .. Sun 2026-01-04), so weekly 2 is
#   a21 (Sunday 2025-12-28, W52), not a22; weekly 3 is a18, the newest of W51.
# - monthly counts only months that have a snapshot: 2026-01 a26, 2025-12 a23, 11 a13, 10 a12, 08 a11, 06 a10,
#   05 a09, 03 a08, 01 a07, 2024-12 a06, 06 a05, 03 a03, 02 a02 (the leap day) = 13; a01 (2024-01) is the 14th.
# - yearly 3 is a06 (the newest of 2024), not a01; a07, 90 minutes later, already belongs to 2025.
EVERY_RULE_TABLE = [
    ("a26", ("last 1", "within 1d", "hourly 1", "daily 1", "weekly 1", "monthly 1", "yearly 1")),
    ("a25", ("last 2", "within 1d", "hourly 2", "daily 2")),
    ("a24", ("within 1d",)),
    ("a23", ("hourly 3", "daily 3", "monthly 2", "yearly 2")),
    ("a22", ("daily 4",)),
    ("a21", ("weekly 2",)),
    ("a20", ()),
    ("a19", ()),
    ("a18", ("weekly 3",)),
    ("a17", ()),
    ("a16", ()),
    ("a15", ()),
    ("a14", ()),
    ("a13", ("monthly 3",)),
    ("a12", ("monthly 4",)),
    ("a11", ("monthly 5",)),
    ("a10", ("monthly 6",)),
    ("a09", ("monthly 7",)),
    ("a08", ("monthly 8",)),
    ("a07", ("monthly 9",)),
    ("a06", ("monthly 10", "yearly 3")),
    ("a05", ("monthly 11",)),
    ("a04", ()),
    ("a03", ("monthly 12",)),
    ("a02", ("monthly 13",)),
    ("a01", ()),
]


def test_every_rule_at_once_over_two_years() -> None:
    assert table(two_years(), EVERY_RULE, dt.UTC) == EVERY_RULE_TABLE


def test_weekly_and_monthly_only() -> None:
    # weekly: 2026-W01 a26, 2025-W52 a21, W51 a18, then W49 a14 (Mon 2025-12-01): W50 has no snapshot and is not
    # counted. monthly: 2026-01 a26, 2025-12 a23, 2025-11 a13 (two hours before a14, in another week and month).
    expected = {
        "a26": ("weekly 1", "monthly 1"),
        "a23": ("monthly 2",),
        "a21": ("weekly 2",),
        "a18": ("weekly 3",),
        "a14": ("weekly 4",),
        "a13": ("monthly 3",),
    }
    rows = table(two_years(), Policy(weekly=4, monthly=3), dt.UTC)
    assert [sid for sid, _ in rows] == sorted(TIMES, reverse=True)
    assert {sid: reasons for sid, reasons in rows if reasons} == expected


@pytest.mark.parametrize(
    "zone", [ZoneInfo("America/New_York"), dt.timezone(dt.timedelta(hours=-5))], ids=["new-york", "utc-5"]
)
def test_days_and_weeks_are_counted_in_the_zone_given(zone: dt.tzinfo) -> None:
    policy = Policy(daily=3, weekly=2)
    # In UTC: days 01-02 a26, 01-01 a25, 12-31 a23; weeks 2026-W01 a26, 2025-W52 a21.
    in_utc = {
        "a26": ("daily 1", "weekly 1"),
        "a25": ("daily 2",),
        "a23": ("daily 3",),
        "a21": ("weekly 2",),
    }
    # In New York (UTC-5 in winter) a26 (02:00 UTC) is 2026-01-01 21:00, the same local day as a25 and a24, so
    # daily 2 is a23 (2025-12-31 18:50 local) and daily 3 is a22, which is 2025-12-28 19:10 local: a Sunday, so it
    # is also the newest snapshot of 2025-W52 there and takes weekly 2 from a21.
    in_new_york = {
        "a26": ("daily 1", "weekly 1"),
        "a23": ("daily 2",),
        "a22": ("daily 3", "weekly 2"),
    }
    assert {sid: r for sid, r in table(two_years(), policy, dt.UTC) if r} == in_utc
    assert {sid: r for sid, r in table(two_years(), policy, zone) if r} == in_new_york


def test_protected_snapshots_are_kept_and_still_counted() -> None:
    # a26 is protected and still takes "last 1" and every other first place, so "last 2" stays a25 and a24 is kept
    # by "within" only; a20 and a01, which no rule keeps, are kept as protected alone; a23 adds "protected" to its
    # own reasons. Every other row is the one of EVERY_RULE_TABLE.
    changed = {
        "a26": ("protected", "last 1", "within 1d", "hourly 1", "daily 1", "weekly 1", "monthly 1", "yearly 1"),
        "a23": ("protected", "hourly 3", "daily 3", "monthly 2", "yearly 2"),
        "a20": ("protected",),
        "a01": ("protected",),
    }
    expected = [(sid, changed.get(sid, reasons)) for sid, reasons in EVERY_RULE_TABLE]
    assert table(two_years(frozenset(changed)), EVERY_RULE, dt.UTC) == expected


def test_protected_snapshot_in_a_period_does_not_make_room_for_an_older_one() -> None:
    # a25 is protected; it is still the newest of its hour and day, so a24 (same hour) gets neither.
    rows = table(two_years(frozenset({"a25"})), Policy(hourly=2, daily=2), dt.UTC)
    assert [(sid, r) for sid, r in rows if r] == [
        ("a26", ("hourly 1", "daily 1")),
        ("a25", ("protected", "hourly 2", "daily 2")),
    ]


def test_each_guest_is_judged_apart_and_listed_in_name_order() -> None:
    # Given interleaved; "db" stopped backing up in June 2025 and still keeps its newest day ("within" counts from a
    # guest's own newest snapshot, and w3 is exactly one day before w1: "at most" includes it).
    snapshots = [
        snap("w4", "2026-01-01 12:00", "web"),
        snap("d2", "2025-06-01 11:00", "db"),
        snap("w1", "2026-01-10 12:00", "web"),
        snap("d3", "2025-05-30 12:00", "db"),
        snap("w3", "2026-01-09 12:00", "web"),
        snap("d1", "2025-06-01 12:00", "db"),
        snap("w2", "2026-01-10 08:00", "web"),
        snap("m1", "2024-03-01 00:00", "mail"),
    ]
    decisions = plan(snapshots, Policy(last=1, daily=2, within=DAY), dt.UTC)
    assert [(d.snapshot.guest, d.snapshot.id, d.keep, d.reasons) for d in decisions] == [
        ("db", "d1", True, ("last 1", "within 1d", "daily 1")),
        ("db", "d2", True, ("within 1d",)),
        ("db", "d3", True, ("daily 2",)),
        ("mail", "m1", True, ("last 1", "within 1d", "daily 1")),
        ("web", "w1", True, ("last 1", "within 1d", "daily 1")),
        ("web", "w2", True, ("within 1d",)),
        ("web", "w3", True, ("within 1d", "daily 2")),
        ("web", "w4", False, ()),
    ]


def one_line(exc: pytest.ExceptionInfo[PolicyError]) -> str:
    text = str(exc.value)
    assert text and "\n" not in text
    return text


@pytest.mark.parametrize("snapshots", [[], [snap("a", "2026-01-01 00:00")]], ids=["none", "one"])
def test_an_empty_policy_is_refused(snapshots: list[Candidate]) -> None:
    with pytest.raises(PolicyError) as exc:
        plan(snapshots, Policy(), dt.UTC)
    assert "keep" in one_line(exc)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("7d", 7 * DAY), ("12h", 12 * 3600), ("2w", 14 * DAY), ("6M", 180 * DAY), ("1y6M", (365 + 180) * DAY)],
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_within(text) == seconds


@pytest.mark.parametrize("text", ["", "7", "7x", "0d", "-1d"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(PolicyError) as exc:
        parse_within(text)
    assert repr(text) in one_line(exc)


def test_a_retention_table_becomes_a_policy() -> None:
    policy = Policy.from_mapping({"keep-last": 7, "keep-monthly": 12, "keep-within": "2w"}, "job.toml")
    assert policy == Policy(last=7, monthly=12, within=14 * DAY)
    assert policy.describe() == "last 7, monthly 12, within 14d"


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ({"keep-last": 7, "keep-dayly": 3}, "'keep-dayly'"),
        ({"keep_last": 7}, "'keep_last'"),
        ({"keep-last": "7"}, "keep-last"),
        ({"keep-last": 1.5}, "keep-last"),
        ({"keep-last": True}, "keep-last"),
        ({"keep-daily": -1}, "keep-daily"),
        ({"keep-within": 7}, "keep-within"),
        ({"keep-last": 0, "keep-daily": 0}, "at least one"),
        ({}, "at least one"),
    ],
    ids=["unknown", "underscore", "string", "float", "bool", "negative", "within-number", "all-zero", "empty"],
)
def test_bad_retention_tables_are_refused(data: dict[str, object], says: str) -> None:
    with pytest.raises(PolicyError) as exc:
        Policy.from_mapping(data, "job.toml")
    text = one_line(exc)
    assert text.startswith("job.toml: ")
    assert says in text
