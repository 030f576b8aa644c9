"""Patch records: a disk chunk stored as an earlier chunk plus the pieces of it that changed.

A backup that knows which bytes of a chunk changed (from CBT or a dirty bitmap) or hold data at all (an
allocation map) stores the chunk as a patch record instead of rebuilding and recompressing the whole chunk: the id
of a full *base* chunk (the zero id for a chunk of zeros), the chunk's length, and the pieces. Reading it reads
the base and writes the pieces over it. A record's base is always a full chunk: patching a patched chunk merges
the new pieces into its record, so a read never follows a chain. When the pieces grow past half the chunk (or
number more than 256), the writer stores the full chunk again.

Plaintext layout (big-endian)::

    version (1, = 1) | base chunk id (32) | length (4) | piece count (4)
    piece count x ( offset (4) | size (4) ) | the pieces' bytes, in the same order

Pieces are sorted, do not overlap, and lie inside ``length``. The record is stored like a chunk, flagged as a
patch in the object header (see :mod:`vbfs.store.codec`), under an id computed with a hash function of its own,
so a patch id can never equal a full chunk's id.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vbfs.errors import IntegrityError
from vbfs.store.codec import ID_SIZE, ChunkId

VERSION = 1
_HEAD = struct.Struct(f">B{ID_SIZE}sII")
_PIECE = struct.Struct(">II")


@dataclass(frozen=True)
class PatchRecord:
    base: ChunkId
    length: int
    pieces: tuple[tuple[int, bytes], ...]  # (offset in the chunk, bytes), sorted, not overlapping

    @property
    def piece_bytes(self) -> int:
        return sum(len(d) for _, d in self.pieces)

    def to_bytes(self) -> bytes:
        out = bytearray(_HEAD.pack(VERSION, self.base, self.length, len(self.pieces)))
        for off, data in self.pieces:
            out += _PIECE.pack(off, len(data))
        for _, data in self.pieces:
            out += data
        return bytes(out)

    @classmethod
    def from_bytes(cls, raw: bytes, what: str) -> PatchRecord:
        try:
            version, base, length, count = _HEAD.unpack_from(raw, 0)
            if version != VERSION:
                raise IntegrityError(f"{what}: unknown patch record version {version}")
            pos = _HEAD.size
            sizes = [_PIECE.unpack_from(raw, pos + i * _PIECE.size) for i in range(count)]
        except struct.error:
            raise IntegrityError(f"{what}: damaged patch record") from None
        pos += count * _PIECE.size
        pieces = []
        end = 0
        for off, size in sizes:
            if off < end or off + size > length or pos + size > len(raw):
                raise IntegrityError(f"{what}: damaged patch record (bad piece at {off})")
            pieces.append((off, raw[pos : pos + size]))
            pos += size
            end = off + size
        if pos != len(raw):
            raise IntegrityError(f"{what}: damaged patch record (trailing bytes)")
        return cls(base, length, tuple(pieces))

    def apply(self, base: bytes) -> bytes:
        if len(base) != self.length:
            raise IntegrityError(f"the base chunk {self.base.hex()[:16]} has {len(base)} bytes, not {self.length}")
        buf = bytearray(base)
        for off, data in self.pieces:
            buf[off : off + len(data)] = data
        return bytes(buf)

    def overlay(self, newer: list[tuple[int, bytes]]) -> PatchRecord:
        """This record with ``newer`` pieces written over it (newer bytes win), merged and sorted."""
        pieces = list(self.pieces)
        for off, data in sorted(newer):
            end = off + len(data)
            if off < 0 or end > self.length:
                raise ValueError(f"piece {off}+{len(data)} is outside the chunk ({self.length} bytes)")
            kept = []
            for o, d in pieces:
                e = o + len(d)
                if e <= off or o >= end:
                    kept.append((o, d))
                    continue
                if o < off:
                    kept.append((o, d[: off - o]))
                if e > end:
                    kept.append((end, d[end - o :]))
            kept.append((off, data))
            pieces = sorted(kept)
        merged: list[tuple[int, bytes]] = []
        for o, d in pieces:
            if merged and merged[-1][0] + len(merged[-1][1]) == o:
                merged[-1] = (merged[-1][0], merged[-1][1] + d)
            elif d:
                merged.append((o, d))
        return PatchRecord(self.base, self.length, tuple(merged))
