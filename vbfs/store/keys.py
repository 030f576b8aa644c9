"""The repository key: a random master key wrapped by a passphrase (``repokey`` mode).

The master key is 64 random bytes: 32 for AES-256-GCM and 32 for the keyed BLAKE3 that names chunks. It is stored
in ``keys/repokey`` encrypted with AES-256-GCM under a key derived from the passphrase by scrypt; the scrypt
parameters and the salt are stored beside it, so they can be raised later without a format change. Losing the
passphrase loses the repository: there is no back door.

Key files of format 2 repositories carry a ``checksum`` (BLAKE3 of the canonical JSON of the other fields), so a
damaged key file is told apart from a wrong passphrase. The master key also yields the key of the config's MAC
(:func:`config_mac`), which is how an encrypted repository's config is authenticated.

Exports of the key are owned here too: the export file (the key file as it is, the repository's id and a checksum)
and the paper form (the key file's fields as numbered lines of hex, each with a checksum of its own), both laid out
in docs/repository-format.md. Neither holds the master key unwrapped.
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import re
from dataclasses import dataclass
from typing import Any

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from vbfs.errors import IntegrityError, RepositoryFormatError, VbfsError, WrongPassphrase

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
    key = MasterKey(raw[:32], raw[32:])
    return wrap_key(key, passphrase), key


def wrap_key(key: MasterKey, passphrase: str) -> bytes:
    """The bytes of a key file holding ``key`` wrapped by ``passphrase``, with a fresh salt and nonce (so a new
    passphrase for the same master key shares nothing with the old key file)."""
    salt = os.urandom(16)
    nonce = os.urandom(12)
    kek = _kek(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    wrapped = AESGCM(kek).encrypt(nonce, key.enc_key + key.id_key, _AAD)
    return _key_file(SCRYPT_N, SCRYPT_R, SCRYPT_P, salt, nonce, wrapped)


def _key_file(n: int, r: int, p: int, salt: bytes, nonce: bytes, wrapped: bytes) -> bytes:
    doc: dict[str, Any] = {
        "version": 1,
        "kdf": {"name": "scrypt", "n": n, "r": r, "p": p, "salt": base64.b64encode(salt).decode()},
        "cipher": "aes-256-gcm",
        "nonce": base64.b64encode(nonce).decode(),
        "wrapped_key": base64.b64encode(wrapped).decode(),
    }
    doc["checksum"] = _checksum(doc)
    return json.dumps(doc, indent=2).encode() + b"\n"


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


KEY_FILE = "keys/repokey"
RESTORE_HINT = "; if you have an export of the key, restore it with vbfs key import"


@dataclass(frozen=True)
class _Wrapped:
    """The fields of a key file: the scrypt parameters and salt, and the wrapped master key."""

    n: int
    r: int
    p: int
    salt: bytes
    nonce: bytes
    wrapped: bytes


def _parse_key_file(keyfile: bytes, require_checksum: bool, what: str, hint: str) -> _Wrapped:
    damaged = f"{what} is damaged"
    try:
        doc = json.loads(keyfile)
        if not isinstance(doc, dict):
            raise IntegrityError(f"{damaged}{hint}")
        if ("checksum" in doc or require_checksum) and doc.get("checksum") != _checksum(doc):
            raise IntegrityError(f"{damaged} (checksum mismatch){hint}")
        kdf = doc["kdf"]
        if kdf["name"] != "scrypt" or doc["cipher"] != "aes-256-gcm":
            raise RepositoryFormatError("the repository key uses an unknown KDF or cipher")
        salt = base64.b64decode(kdf["salt"], validate=True)
        nonce = base64.b64decode(doc["nonce"], validate=True)
        wrapped = base64.b64decode(doc["wrapped_key"], validate=True)
        n, r, p = (kdf[k] for k in ("n", "r", "p"))
        if not all(type(v) is int for v in (n, r, p)) or not (2**14 <= n <= 2**22 and n & (n - 1) == 0):
            raise IntegrityError(f"{damaged} (scrypt parameters out of range){hint}")
        if not (1 <= r <= 32 and 1 <= p <= 16) or len(nonce) != 12 or len(wrapped) != 64 + 16 or len(salt) < 16:
            raise IntegrityError(f"{damaged} (a field has the wrong size){hint}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise IntegrityError(f"{damaged}{hint}") from None
    return _Wrapped(n, r, p, salt, nonce, wrapped)


def unlock_key(
    keyfile: bytes,
    passphrase: str,
    require_checksum: bool = True,
    what: str = f"the repository key file {KEY_FILE}",
    hint: str = RESTORE_HINT,
) -> MasterKey:
    """The master key in ``keyfile``; :class:`IntegrityError` (naming ``what``, then ``hint``) for a damaged file,
    :class:`WrongPassphrase` for a passphrase that does not unwrap it."""
    w = _parse_key_file(keyfile, require_checksum, what, hint)
    kek = _kek(passphrase, w.salt, w.n, w.r, w.p)
    try:
        raw = AESGCM(kek).decrypt(w.nonce, w.wrapped, _AAD)
    except InvalidTag:
        raise WrongPassphrase("wrong passphrase for this repository") from None
    return MasterKey(raw[:32], raw[32:])


# ---- exports ------------------------------------------------------------------------------------------------------

EXPORT_FORMAT = "vbfs-key-export"
PAPER_HEADER = "vbfs repository key, paper form 1"
PAPER_BYTES_PER_LINE = 16
_PAPER_VERSION = 1
_ID_RE = re.compile(r"[0-9a-f]{32}")
_EXPORT_MAX = 64 * 1024


@dataclass(frozen=True)
class KeyExport:
    """What an export holds: the id of the repository it belongs to and the key file's bytes (still wrapped)."""

    repository_id: str
    keyfile: bytes


def export_key(keyfile: bytes, repository_id: str) -> bytes:
    """The export file: the key file as it is in the repository, the repository's id, and a checksum of both."""
    doc: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "version": 1,
        "repository": repository_id,
        "repokey": json.loads(keyfile),
    }
    doc["checksum"] = _checksum(doc)
    return json.dumps(doc, indent=2).encode() + b"\n"


def _line_check(number: int, data: bytes) -> str:
    return blake3.blake3(f"{number}:".encode() + data).hexdigest()[:4]


def paper_key(keyfile: bytes, repository_id: str) -> str:
    """The printable form: a header naming the repository, then numbered lines of hex, each ending in a checksum of
    its number and bytes, then a checksum of the whole."""
    w = _parse_key_file(keyfile, False, f"the repository key file {KEY_FILE}", RESTORE_HINT)
    if len(w.salt) > 255:
        raise RepositoryFormatError("the repository key's salt is too long for the paper form")
    blob = (
        bytes([_PAPER_VERSION])
        + bytes.fromhex(repository_id)
        + bytes([w.n.bit_length() - 1, w.r, w.p, len(w.salt)])
        + w.salt
        + w.nonce
        + w.wrapped
    )
    pieces = [blob[i : i + PAPER_BYTES_PER_LINE] for i in range(0, len(blob), PAPER_BYTES_PER_LINE)]
    out = [
        PAPER_HEADER,
        f"repository {repository_id}",
        f"lines {len(pieces)}",
        "Type each numbered line (spaces do not matter); the 4 digits after '-' are that line's checksum.",
        "",
    ]
    width = len(str(len(pieces)))
    for number, piece in enumerate(pieces, 1):
        groups = " ".join(piece[i : i + 2].hex() for i in range(0, len(piece), 2))
        out.append(f"{number:>{width}}: {groups} - {_line_check(number, piece)}")
    out += ["", f"end {blake3.blake3(blob).hexdigest()[:16]}"]
    return "\n".join(out) + "\n"


def read_export(data: bytes, name: str, paper: bool | None = None) -> KeyExport:
    """An export read back (the file form, or the paper form when ``paper`` or when its header says so); one line
    naming ``name`` (and, for the paper form, the line) when it is damaged or not an export."""
    if len(data) > _EXPORT_MAX:
        raise VbfsError(f"{name} is not a vbfs key export (it is larger than {_EXPORT_MAX // 1024} KiB)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise VbfsError(f"{name} is not a vbfs key export (not text)") from None
    if paper is None:
        paper = text.lstrip().startswith(PAPER_HEADER)
    return _read_paper(text, name) if paper else _read_file_form(text, name)


def _read_file_form(text: str, name: str) -> KeyExport:
    try:
        doc = json.loads(text)
    except ValueError:
        raise VbfsError(
            f"{name} is not a vbfs key export (not JSON, and no paper form header: add --paper for typed lines)"
        ) from None
    if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT:
        raise VbfsError(f"{name} is not a vbfs key export")
    if doc.get("version") != 1:
        raise RepositoryFormatError(f"{name} is a key export of version {str(doc.get('version'))[:20]}, unknown here")
    if doc.get("checksum") != _checksum(doc):
        raise IntegrityError(f"the key export {name} is damaged (checksum mismatch)")
    repo_id, keydoc = doc.get("repository"), doc.get("repokey")
    if not isinstance(repo_id, str) or not _ID_RE.fullmatch(repo_id) or not isinstance(keydoc, dict):
        raise IntegrityError(f"the key export {name} is damaged (no repository id or no key)")
    return KeyExport(repo_id, json.dumps(keydoc, indent=2).encode() + b"\n")


def _read_paper(text: str, name: str) -> KeyExport:
    pieces: dict[int, bytes] = {}
    expected_lines: int | None = None
    header_id: str | None = None
    end: str | None = None
    for file_line, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line == PAPER_HEADER or line.startswith("Type each"):
            continue
        word, _, rest = line.partition(" ")
        if word == "repository":
            header_id = rest.strip().lower()
            continue
        if word == "lines" and rest.strip().isdigit():
            expected_lines = int(rest)
            continue
        if word == "end":
            end = "".join(rest.split()).lower()
            continue
        number_text, colon, body = line.partition(":")
        if not colon or not number_text.strip().isdigit():
            raise VbfsError(f"{name} line {file_line} is not a line of a paper key (expected 'N: hex ... - check')")
        number = int(number_text)
        data_text, dash, check = body.rpartition("-")
        data_hex = "".join(data_text.split()).lower()
        mistyped = IntegrityError(
            f"line {number} of the paper key in {name} is mistyped (its checksum does not match): "
            "compare it with the printout"
        )
        if not dash or len(data_hex) % 2 or not re.fullmatch(r"[0-9a-f]*", data_hex):
            raise mistyped
        piece = bytes.fromhex(data_hex)
        if _line_check(number, piece) != "".join(check.split()).lower():
            raise mistyped
        if number in pieces:
            raise VbfsError(f"line {number} of the paper key in {name} is there twice")
        pieces[number] = piece
    if not pieces:
        raise VbfsError(f"{name} holds no lines of a paper key")
    count = expected_lines or max(pieces)
    missing = [n for n in range(1, count + 1) if n not in pieces]
    if missing:
        raise VbfsError(f"line {missing[0]} of the paper key in {name} is missing")
    if max(pieces) > count:
        raise VbfsError(f"the paper key in {name} has line {max(pieces)}, but its header says {count} lines")
    blob = b"".join(pieces[n] for n in range(1, count + 1))
    if end is not None and blake3.blake3(blob).hexdigest()[:16] != end:
        raise IntegrityError(f"the paper key in {name} does not add up (its 'end' checksum does not match)")
    try:
        if blob[0] != _PAPER_VERSION:
            raise RepositoryFormatError(f"the paper key in {name} has version {blob[0]}, unknown here")
        repo_id = blob[1:17].hex()
        log_n, r, p, salt_len = blob[17:21]
        salt = blob[21 : 21 + salt_len]
        nonce = blob[21 + salt_len : 33 + salt_len]
        wrapped = blob[33 + salt_len :]
    except (IndexError, ValueError):
        raise IntegrityError(f"the paper key in {name} is incomplete (lines missing at the end)") from None
    if len(salt) != salt_len or len(nonce) != 12 or len(wrapped) != 64 + 16:
        raise IntegrityError(f"the paper key in {name} is incomplete (lines missing at the end)")
    if header_id is not None and header_id != repo_id:
        raise IntegrityError(f"the paper key in {name} is damaged (its header names another repository id)")
    return KeyExport(repo_id, _key_file(1 << log_n, r, p, salt, nonce, wrapped))
