"""Times as vbfs shows them and reads them from users.

- Shown to a person (tables of ``snapshots``, ``ls``, ``find``, ``diff``, ``prune``): the local time zone (``TZ``
  honoured) with its offset, to the second: ``2026-12-02 10:15:03+01:00``; with ``utc=True`` (the global
  ``--utc``) the same in UTC: ``2026-12-02 09:15:03+00:00``. :func:`show` never fails: a time out of range (a
  hostile guest file's) is shown as its seconds since the epoch.
- Printed as JSON: ISO 8601 in UTC with microseconds and ``Z``, the format of the manifests'
  ``time``: ``2026-12-02T09:15:03.000000Z`` (:func:`json_time`), whatever the local zone or ``--utc``.
- Typed by a user (``GUEST@2026-12-01T10:00``): read by :func:`parse` in the local time zone unless the text carries
  a zone (``Z``, ``+01:00``, ``-0500``). A time given to the minute means the end of that minute, a date alone the
  end of that day, so "at or before" includes what was taken during it.

This module imports nothing of vbfs: the store, the catalog and the CLI all use it.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone, tzinfo

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
JSON_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"  # the manifests' `time` format, too

_USER_TIME = re.compile(
    r"(?P<date>\d{4}-\d{2}-\d{2})"
    r"(?:[T ](?P<hour>\d{2}):?(?P<minute>\d{2})(?::?(?P<second>\d{2})(?:[.,](?P<frac>\d{1,9}))?)?)?"
    r"\s*(?P<zone>[Zz]|[+-]\d{2}(?::?\d{2})?)?"
)


def from_ns(ns: int) -> datetime:
    """Nanoseconds since the epoch as an aware UTC time (to the microsecond); any signed 64-bit value fits."""
    return EPOCH + timedelta(microseconds=ns // 1000)


def from_stored(text: str) -> datetime:
    """A time as the manifests and the catalog keep it (``JSON_FORMAT``)."""
    return datetime.strptime(text, JSON_FORMAT).replace(tzinfo=UTC)


def show(t: datetime, utc: bool = False) -> str:
    """For a person: ``2026-12-02 10:15:03+01:00`` in the local zone, or in UTC with ``utc``."""
    try:
        shown = t.astimezone(UTC) if utc else t.astimezone()
        return shown.replace(microsecond=0).isoformat(sep=" ")
    except (OverflowError, ValueError, OSError):
        return f"@{int((t - EPOCH).total_seconds())}"


def show_ns(ns: int, utc: bool = False) -> str:
    return show(from_ns(ns), utc)


def show_stored(text: str, utc: bool = False) -> str:
    """A stored time (a manifest's ``time``) for a person; a text that is not one is shown as it is."""
    try:
        return show(from_stored(text), utc)
    except ValueError:
        return text


def json_time(t: datetime) -> str:
    """For JSON: ISO 8601, UTC, microseconds, ``Z``."""
    return t.astimezone(UTC).strftime(JSON_FORMAT)


def json_ns(ns: int) -> str:
    return json_time(from_ns(ns))


def _zone(text: str | None, default: tzinfo | None) -> tzinfo | None:
    if text is None:
        return default
    if text in ("Z", "z"):
        return UTC
    digits = text[1:].replace(":", "")
    minutes = int(digits[:2]) * 60 + (int(digits[2:]) if len(digits) > 2 else 0)
    if minutes >= 24 * 60:
        raise ValueError("offset out of range")
    return timezone((-1 if text[0] == "-" else 1) * timedelta(minutes=minutes))


def parse(text: str, tz: tzinfo | None = None) -> datetime | None:
    """A point in time as a user types it, or None if ``text`` is not one.

    ISO 8601 date and time with or without the colons (``2026-12-01T10:00``, ``2026-12-01 10:00:30``,
    ``2026-12-01T100030Z``, ``2026-12-01``), an optional fraction and an optional zone. Without a zone it is a time
    in ``tz`` (None: the local time zone). What is left out counts as its end: ``10:00`` is 10:00:59.999999, a
    date alone 23:59:59.999999 of that day."""
    m = _USER_TIME.fullmatch(text.strip())
    if m is None:
        return None
    try:
        day = datetime.strptime(m["date"], "%Y-%m-%d")
        zone = _zone(m["zone"], tz)
        if m["hour"] is None:
            t = day.replace(hour=23, minute=59, second=59, microsecond=999999)
        else:
            t = day.replace(hour=int(m["hour"]), minute=int(m["minute"]))
            if m["second"] is None:
                t = t.replace(second=59, microsecond=999999)
            elif m["frac"] is None:
                t = t.replace(second=int(m["second"]), microsecond=999999)
            else:
                t = t.replace(second=int(m["second"]), microsecond=int(m["frac"].ljust(6, "0")[:6]))
        # A naive time is local: astimezone() reads it so (DST gaps and folds as the C library decides).
        return t.replace(tzinfo=zone) if zone is not None else t.astimezone()
    except (ValueError, OverflowError):
        return None
