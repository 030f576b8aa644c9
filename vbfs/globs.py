"""Shell-style patterns over slash-separated paths, as ``vbfs find`` and ``vbfs restore --include/--exclude``
read them: one reading of ``*``, ``?``, ``[...]`` and ``**`` for every command.

``*``, ``?`` and ``[...]`` match within one name, never across a ``/`` (not even a range that holds it, such as
``[.-0]``; ``[!...]`` is the complement, ``\\`` escapes); ``**`` as a whole name matches any number of folders
(``a/**/b`` matches ``a/b`` too). :func:`path_regex`: a pattern without a ``/`` matches a name at any depth, one with
a ``/`` is matched from the start (a leading or trailing ``/`` is ignored). A pattern that is not one (``[z-a]``)
is a :class:`VbfsError`.
"""

from __future__ import annotations

import re

from vbfs.errors import VbfsError


def part_regex(part: str) -> str:
    """One name of a pattern as a regular expression: ``*``, ``?`` and ``[...]`` never match a ``/``."""
    out: list[str] = []
    i, n = 0, len(part)
    while i < n:
        c = part[i]
        i += 1
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\" and i < n:
            out.append(re.escape(part[i]))
            i += 1
        elif c == "[":
            j = i
            if j < n and part[j] in "!^":
                j += 1
            if j < n and part[j] == "]":
                j += 1
            while j < n and part[j] != "]":
                j += 1
            if j >= n:
                out.append(re.escape(c))
                continue
            body, i = part[i:j], j + 1
            negated = body[:1] in ("!", "^")
            if negated:
                body = body[1:]
            body = "".join(ch if ch == "-" else re.escape(ch) for ch in body)
            out.append(f"[^/{body}]" if negated else f"(?!/)[{body}]")  # a range such as [.-0] holds "/" too
        else:
            out.append(re.escape(c))
    return "".join(out)


def path_regex(pattern: str) -> re.Pattern[str]:
    parts: list[str] = []
    for p in pattern.split("/"):
        if p and not (p == "**" and parts[-1:] == ["**"]):  # **/** is **, and one less (.*/)? to backtrack
            parts.append(p)
    if not parts:
        raise VbfsError(f"the pattern {pattern!r} names nothing: give a name, a glob or a path")
    anchored = "/" in pattern.rstrip("/")
    out = "" if anchored else "(?:.*/)?"
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            out += ".*" if last else "(?:.*/)?"
        else:
            out += part_regex(part) + ("" if last else "/")
    try:
        return re.compile(out, re.DOTALL)
    except re.error as exc:  # a range the wrong way round: [z-a]
        raise VbfsError(f"the pattern {pattern!r} is not a glob: {exc.msg}") from None


def name_regex(pattern: str) -> re.Pattern[str]:
    """A pattern matched against one name (no folders)."""
    try:
        return re.compile(part_regex(pattern), re.DOTALL)
    except re.error as exc:
        raise VbfsError(f"the pattern {pattern!r} is not a glob: {exc.msg}") from None
