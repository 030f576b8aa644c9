"""The object codec: chunk ids, compression, authenticated encryption, and verification on every read.

Stored object layout (all integers are single bytes)::

    version (1) | encryption (0 = none, 1 = AES-256-GCM) | body
    body, unencrypted:  compression | payload
    body, encrypted:    nonce (12) | AES-GCM( compression | payload ) with the object name as associated data

``compression`` is 0 (stored as is) or 1 (one zstd frame), plus 2 (``PATCH``) when the payload is a patch record
(:mod:`vbfs.store.patch`) rather than a chunk's bytes. The object name is bound into the tag, so an object
cannot be swapped for another one under a different name without the swap being detected.

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

FORMAT_VERSION = 1
ENC_NONE = 0
ENC_AESGCM = 1
COMP_NONE = 0
COMP_ZSTD = 1
PATCH = 2  # flag in the compression byte: the payload is a patch record
ID_SIZE = 32
NONCE_SIZE = 12
# Decompressed objects are never larger than this (chunk lists and manifests included).
MAX_OBJECT_SIZE = 256 * 1024 * 1024

ChunkId = bytes


class Codec:
    def __init__(self, *, id_key: bytes | None, enc_key: bytes | None, zstd_level: int = 3):
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
        if self.aead is None:
            return bytes([FORMAT_VERSION, ENC_NONE]) + inner
        nonce = os.urandom(NONCE_SIZE)
        return bytes([FORMAT_VERSION, ENC_AESGCM]) + nonce + self.aead.encrypt(nonce, inner, name.encode())

    def _open(self, blob: bytes, name: str) -> tuple[bool, bytes]:
        if len(blob) < 3 or blob[0] != FORMAT_VERSION:
            raise IntegrityError(f"object {name} is damaged (bad header)")
        enc = blob[1]
        if enc == ENC_NONE:
            if self.aead is not None:
                raise IntegrityError(f"object {name} is not encrypted in an encrypted repository")
            inner = memoryview(blob)[2:]
        elif enc == ENC_AESGCM:
            if self.aead is None:
                raise IntegrityError(f"object {name} is encrypted in an unencrypted repository")
            nonce = blob[2 : 2 + NONCE_SIZE]
            try:
                inner = memoryview(self.aead.decrypt(nonce, blob[2 + NONCE_SIZE :], name.encode()))
            except InvalidTag:
                raise IntegrityError(f"object {name} is damaged (authentication failed)") from None
        else:
            raise IntegrityError(f"object {name} is damaged (unknown encryption {enc})")
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
