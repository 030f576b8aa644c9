"""The object codec: chunk ids, compression, authenticated encryption, and verification on every read.

Stored object layout, format 2 (all integers are single bytes)::

    version (2) | encryption (0 = none, 1 = AES-256-GCM) | body
    body, unencrypted:  checksum (32) | compression | payload
    body, encrypted:    nonce (12) | AES-GCM( compression | payload ), associated data: the two header bytes and
                        the object name

``compression`` is 0 (stored as is) or 1 (one zstd frame), plus 2 (``PATCH``) when the payload is a patch record
(:mod:`vbfs.store.patch`) rather than a chunk's bytes. The checksum of an unencrypted object is BLAKE3, keyed with
a key derived for this purpose alone, of the object name, a zero byte, the two header bytes and the rest of the
body; so in every mode a flipped bit anywhere in an object, and an object moved to another name, is detected
before any of its bytes are used. A codec reads only objects of its repository's format: in a format 2 repository
a format 1 object (which has no checksum when unencrypted) is damage, never an unchecked object.

Format 1 (repositories of version 1, read only): ``1 | encryption | body`` with no checksum in unencrypted
objects and only the object name as associated data.

Chunk ids are BLAKE3 of the plaintext; in an encrypted repository BLAKE3 in keyed mode with the repository's id
key, so the storage learns nothing from the names. ``open_chunk`` recomputes the id and compares: a flipped bit
anywhere is an :class:`IntegrityError`, never silently wrong data. Patch records have ids of their own: BLAKE3 keyed
with a key derived from the id key (or from nothing, unencrypted) for that purpose alone, so a patch id and a chunk
id never collide.

Thread-safe: the zstd contexts are per thread; hashing, compression and AES release the GIL.
"""

from __future__ import annotations

import os
import threading

import blake3
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vbfs.errors import IntegrityError

FORMAT_VERSION = 2
OLD_FORMAT_VERSION = 1
ENC_NONE = 0
ENC_AESGCM = 1
COMP_NONE = 0
COMP_ZSTD = 1
PATCH = 2  # flag in the compression byte: the payload is a patch record
ID_SIZE = 32
NONCE_SIZE = 12
CHECKSUM_SIZE = 32
_CHECKSUM_KEY = blake3.blake3(b"", derive_key_context="vbfs 2026-12 object checksum").digest()
# Decompressed objects are never larger than this (chunk lists and manifests included).
MAX_OBJECT_SIZE = 256 * 1024 * 1024

ChunkId = bytes


class Codec:
    def __init__(
        self, *, id_key: bytes | None, enc_key: bytes | None, zstd_level: int = 3, object_format: int = FORMAT_VERSION
    ):
        if object_format not in (FORMAT_VERSION, OLD_FORMAT_VERSION):
            raise ValueError(f"unknown object format {object_format}")
        self.object_format = object_format
        self.id_key = id_key
        self.aead = AESGCM(enc_key) if enc_key else None
        self.zstd_level = zstd_level
        self._local = threading.local()

    @property
    def encrypted(self) -> bool:
        return self.aead is not None

    def chunk_id(self, data: bytes | memoryview) -> ChunkId:
        if self.id_key:
            return blake3.blake3(data, key=self.id_key).digest()
        return blake3.blake3(data).digest()

    def patch_id(self, record: bytes) -> ChunkId:
        key = getattr(self, "_patch_key", None)
        if key is None:
            key = self._patch_key = blake3.blake3(
                self.id_key or b"", derive_key_context="vbfs 2026-11 patch record id"
            ).digest()
        return blake3.blake3(record, key=key).digest()

    def _compressor(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = zstandard.ZstdCompressor(level=self.zstd_level)
        return c

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._local, "d", None)
        if d is None:
            d = self._local.d = zstandard.ZstdDecompressor()
        return d

    def encode(self, data: bytes | memoryview, name: str, patch: bool = False) -> bytes:
        """Compress (when it pays) and, in an encrypted repository, encrypt ``data`` stored under ``name``."""
        packed = self._compressor().compress(data)
        flag = PATCH if patch else 0
        if len(packed) < len(data):
            inner = bytes([COMP_ZSTD | flag]) + packed
        else:
            inner = bytes([COMP_NONE | flag]) + bytes(data)
        version = self.object_format
        if self.aead is None:
            header = bytes([version, ENC_NONE])
            if version == OLD_FORMAT_VERSION:
                return header + inner
            return header + _checksum(name, header, inner) + inner
        header = bytes([version, ENC_AESGCM])
        nonce = os.urandom(NONCE_SIZE)
        return header + nonce + self.aead.encrypt(nonce, inner, self._aad(header, name))

    def _aad(self, header: bytes, name: str) -> bytes:
        return name.encode() if self.object_format == OLD_FORMAT_VERSION else header + name.encode()

    def _open(self, blob: bytes, name: str) -> tuple[bool, bytes]:
        if len(blob) < 3 or blob[0] != self.object_format:
            if len(blob) >= 3 and blob[0] == FORMAT_VERSION and self.object_format == OLD_FORMAT_VERSION:
                raise IntegrityError(
                    f"object {name} has format {FORMAT_VERSION} but the repository's config says format "
                    f"{OLD_FORMAT_VERSION}: the config was downgraded or replaced"
                )
            raise IntegrityError(f"object {name} is damaged (bad header)")
        header, enc = blob[:2], blob[1]
        if enc == ENC_NONE:
            if self.aead is not None:
                raise IntegrityError(f"object {name} is not encrypted in an encrypted repository")
            inner = memoryview(blob)[2:]
            if self.object_format != OLD_FORMAT_VERSION:
                if len(blob) < 3 + CHECKSUM_SIZE:
                    raise IntegrityError(f"object {name} is damaged (too short)")
                inner = memoryview(blob)[2 + CHECKSUM_SIZE :]
                if _checksum(name, header, inner) != blob[2 : 2 + CHECKSUM_SIZE]:
                    raise IntegrityError(f"object {name} is damaged (checksum mismatch)")
        elif enc == ENC_AESGCM:
            if self.aead is None:
                raise IntegrityError(f"object {name} is encrypted in an unencrypted repository")
            nonce = blob[2 : 2 + NONCE_SIZE]
            try:
                inner = memoryview(self.aead.decrypt(nonce, blob[2 + NONCE_SIZE :], self._aad(header, name)))
            except InvalidTag:
                raise IntegrityError(f"object {name} is damaged (authentication failed)") from None
        else:
            raise IntegrityError(f"object {name} is damaged (unknown encryption {enc})")
        if not inner:
            raise IntegrityError(f"object {name} is damaged (empty body)")
        is_patch, comp = bool(inner[0] & PATCH), inner[0] & ~PATCH
        if comp == COMP_NONE:
            return is_patch, bytes(inner[1:])
        if comp == COMP_ZSTD:
            try:
                return is_patch, self._decompressor().decompress(inner[1:], max_output_size=MAX_OBJECT_SIZE)
            except zstandard.ZstdError:
                raise IntegrityError(f"object {name} is damaged (cannot decompress)") from None
        raise IntegrityError(f"object {name} is damaged (unknown compression {comp})")

    def decode(self, blob: bytes, name: str) -> bytes:
        """Authenticate, decrypt and decompress an object; :class:`IntegrityError` on any damage."""
        is_patch, data = self._open(blob, name)
        if is_patch:
            raise IntegrityError(f"object {name} is a patch record where a plain object belongs")
        return data

    def open_chunk(self, blob: bytes, cid: ChunkId, name: str) -> tuple[bool, bytes]:
        """A chunk's bytes, or a patch record's (``True, record``); either checked against ``cid``."""
        is_patch, data = self._open(blob, name)
        if (self.patch_id(data) if is_patch else self.chunk_id(data)) != cid:
            raise IntegrityError(f"chunk {cid.hex()} is damaged (content does not match its id)")
        return is_patch, data


def _checksum(name: str, header: bytes, inner: bytes | memoryview) -> bytes:
    h = blake3.blake3(name.encode() + b"\0" + header, key=_CHECKSUM_KEY)
    h.update(inner)
    return h.digest()
