"""The repository key: a random master key wrapped by a passphrase (``repokey`` mode).

The master key is 64 random bytes: 32 for AES-256-GCM and 32 for the keyed BLAKE3 that names chunks. It is stored
in ``keys/repokey`` encrypted with AES-256-GCM under a key derived from the passphrase by scrypt; the scrypt
parameters and the salt are stored beside it, so they can be raised later without a format change. Losing the
passphrase loses the repository: there is no back door.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from vbfs.errors import RepositoryFormatError, WrongPassphrase

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
    return json.dumps(doc, indent=2).encode() + b"\n", MasterKey(raw[:32], raw[32:])


def unlock_key(keyfile: bytes, passphrase: str) -> MasterKey:
    try:
        doc = json.loads(keyfile)
        kdf = doc["kdf"]
        if kdf["name"] != "scrypt" or doc["cipher"] != "aes-256-gcm":
            raise RepositoryFormatError("the repository key uses an unknown KDF or cipher")
        salt = base64.b64decode(kdf["salt"])
        nonce = base64.b64decode(doc["nonce"])
        wrapped = base64.b64decode(doc["wrapped_key"])
        kek = _kek(passphrase, salt, int(kdf["n"]), int(kdf["r"]), int(kdf["p"]))
    except (ValueError, KeyError, TypeError):
        raise RepositoryFormatError("the repository key file is damaged") from None
    try:
        raw = AESGCM(kek).decrypt(nonce, wrapped, _AAD)
    except InvalidTag:
        raise WrongPassphrase("wrong passphrase for this repository") from None
    return MasterKey(raw[:32], raw[32:])
