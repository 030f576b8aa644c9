"""The progress interface that long operations report to (a terminal bar in the CLI, nothing elsewhere).

A phase is begun with its label, its total and the unit it counts in: ``"bytes"`` (shown as sizes and a rate) or
a plural noun (``"files"``, ``"chunks"``, ``"snapshots"``, ``"objects"``) shown as counts. A total of 0 means
"unknown": the bar then counts without an end.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def begin(self, label: str, total: int, unit: str = "bytes") -> None: ...

    def advance(self, n: int) -> None: ...

    def end(self) -> None: ...


class NoProgress:
    def begin(self, label: str, total: int, unit: str = "bytes") -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def end(self) -> None:
        pass
