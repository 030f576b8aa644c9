"""A file-like view of a byte range of something with random access (a stored disk, a partition of it).

Every read is an :func:`~vbfs.guestfs.bounds.io_section`: a parser that runs past its time budget is stopped
when its read returns, never inside the store's code.
"""

from __future__ import annotations

import io
from collections.abc import Callable

from vbfs.guestfs.bounds import io_section


class RangeReader(io.RawIOBase):
    """Seekable, read-only; ``read_at(offset, length)`` does the work. One position per instance: not shared."""

    def __init__(self, read_at: Callable[[int, int], bytes], size: int, base: int = 0):
        self._read_at = read_at
        self.size = size
        self.base = base
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        else:
            pos = self.size + offset
        if pos < 0:
            raise OSError("negative seek position")
        self._pos = pos
        return pos

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = self.size - self._pos
        size = max(0, min(size, self.size - self._pos))
        if size == 0:
            return b""
        with io_section():
            data = self._read_at(self.base + self._pos, size)
        self._pos += len(data)
        return data

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def sub(self, offset: int, size: int) -> RangeReader:
        """A new, independent reader of ``[offset, offset + size)`` of this one."""
        return RangeReader(self._read_at, size, self.base + offset)
