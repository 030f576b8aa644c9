"""The progress interface that long operations report to (a terminal bar in the CLI, nothing elsewhere)."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def begin(self, label: str, total: int) -> None: ...

    def advance(self, n: int) -> None: ...

    def end(self) -> None: ...


class NoProgress:
    def begin(self, label: str, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def end(self) -> None:
        pass
