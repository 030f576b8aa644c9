"""The repository key: a random master key wrapped by a passphrase (``repokey`` mode).

The master key is 64 random bytes: 32 for AES-256-GCM and 32 for the keyed BLAKE3 that names chunks. It is stored
in ``keys/repokey`` encrypted with AES-256-GCM under a key derived from the passphrase by scrypt; the scrypt
parameters and the salt are stored beside it, so they can be raised later without a format change. Losing the
passphrase loses the repository: there is no back door.

Key files of format 2 repositories carry a ``checksum`` (BLAKE3 of the canonical JSON of the other fields), so a
damaged key file is told apart from a wrong passphrase. The master key also yields the key of the config's MAC
(:func:`config_mac`), which is how an encrypted repository's config is authenticated.
"""

from __future__ import annotations

import base64
import hmac
import json
import os
from dataclasses import dataclass
from typing import Any

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from vbfs.errors import IntegrityError, RepositoryFormatError, WrongPassphrase

SCRYPT_N = 2**16
SCRYPT_R = 8
SCRYPT_P = 1
_AAD = b"vbfs repokey v1"


@dataclass(frozen=True)
class MasterKey:
    enc_key: bytes
    id_key: bytes


def _kek(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode())


def create_key(passphrase: str) -> tuple[bytes, MasterKey]:
    """Make a new master key; return the key file's bytes and the key."""
    raw = os.urandom(64)
    salt = os.urandom(16)
    nonce = os.urandom(12)
    wrapped = AESGCM(_kek(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)).encrypt(nonce, raw, _AAD)
    doc = {
        "version": 1,
        "kdf": {
            "name": "scrypt",
            "n": SCRYPT_N,
            "r": SCRYPT_R,
            "p": SCRYPT_P,
            "salt": base64.b64encode(salt).decode(),
        },
        "cipher": "aes-256-gcm",
        "nonce": base64.b64encode(nonce).decode(),
        "wrapped_key": base64.b64encode(wrapped).decode(),
    }
    doc["checksum"] = _checksum(doc)
    return json.dumps(doc, indent=2).encode() + b"\n", MasterKey(raw[:32], raw[32:])


def canonical_json(doc: dict[str, Any]) -> bytes:
    """The bytes a checksum or MAC of a JSON document is computed over: sorted keys, no spaces."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _checksum(doc: dict[str, Any]) -> str:
    return blake3.blake3(canonical_json({k: v for k, v in doc.items() if k != "checksum"})).hexdigest()


def config_mac(key: MasterKey, config: dict[str, Any]) -> str:
    """The MAC of a repository config (every field but ``mac``), keyed by a key derived from the master key."""
    mac_key = blake3.blake3(key.enc_key + key.id_key, derive_key_context="vbfs 2026-12 config mac").digest()
    body = {k: v for k, v in config.items() if k != "mac"}
    return blake3.blake3(canonical_json(body), key=mac_key).hexdigest()


def mac_matches(expected: str, found: object) -> bool:
    return isinstance(found, str) and hmac.compare_digest(expected, found)


def unlock_key(keyfile: bytes, passphrase: str, require_checksum: bool = True) -> MasterKey:
    damaged = "the repository key file keys/repokey is damaged"
    try:
        doc = json.loads(keyfile)
        if not isinstance(doc, dict):
            raise IntegrityError(damaged)
        if ("checksum" in doc or require_checksum) and doc.get("checksum") != _checksum(doc):
            raise IntegrityError(f"{damaged} (checksum mismatch)")
        kdf = doc["kdf"]
        if kdf["name"] != "scrypt" or doc["cipher"] != "aes-256-gcm":
            raise RepositoryFormatError("the repository key uses an unknown KDF or cipher")
        salt = base64.b64decode(kdf["salt"], validate=True)
        nonce = base64.b64decode(doc["nonce"], validate=True)
        wrapped = base64.b64decode(doc["wrapped_key"], validate=True)
        n, r, p = (kdf[k] for k in ("n", "r", "p"))
        if not all(type(v) is int for v in (n, r, p)) or not (2**14 <= n <= 2**22 and n & (n - 1) == 0):
            raise IntegrityError(f"{damaged} (scrypt parameters out of range)")
        if not (1 <= r <= 32 and 1 <= p <= 16) or len(nonce) != 12 or len(wrapped) != 64 + 16 or len(salt) < 16:
            raise IntegrityError(f"{damaged} (a field has the wrong size)")
        kek = _kek(passphrase, salt, n, r, p)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise IntegrityError(damaged) from None
    try:
        raw = AESGCM(kek).decrypt(nonce, wrapped, _AAD)
    except InvalidTag:
        raise WrongPassphrase("wrong passphrase for this repository") from None
    return MasterKey(raw[:32], raw[32:])
