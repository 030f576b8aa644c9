"""The repository config: what its fields may hold, its seal, and what this user remembers about repositories.

Every field of a config is checked before any of it is used (an ``id`` names a folder in the user's cache, a chunk
size decides how disks are cut), so a damaged or hostile config is one clear error, never a write elsewhere.

A format 2 config is sealed: an encrypted repository's config carries a ``mac`` (keyed BLAKE3 under a key derived
from the master key, see :func:`vbfs.store.keys.config_mac`) that is verified right after the key is unlocked, so
changing any field is detected; a plaintext repository's config carries a ``checksum`` (plain BLAKE3), which finds
damage but, without a secret, not a deliberate change.

That a repository is encrypted is remembered per repository id and per location in the user's cache folder
(``vbfs/security/``), and a config that later says otherwise is refused. So is a config that says "none" beside a
key file: turning an encrypted repository's config into a plaintext one never makes a backup store plaintext.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
from pathlib import Path
from typing import Any

import blake3

from vbfs.errors import IntegrityError, RepositoryFormatError
from vbfs.store.keys import MasterKey, canonical_json, config_mac, mac_matches

REPO_FORMAT = "vbfs-repository"
REPO_VERSION = 2  # objects with a checksum in every mode, a sealed config
OLD_REPO_VERSION = 1  # read only
MIN_CHUNK_SIZE, MAX_CHUNK_SIZE = 64 * 1024, 16 * 1024 * 1024
MIN_CDC, MAX_CDC = 4 * 1024, 64 * 1024 * 1024
ENCRYPTIONS = {"none": "blake3", "repokey": "blake3-keyed"}  # encryption -> the chunk id hash it goes with
_FIELDS = {"format", "version", "id", "chunk_size", "hash", "compression", "zstd_level", "cdc", "encryption"}
_ID_RE = re.compile(r"[0-9a-f]{32}")


def _is_int(v: Any) -> bool:
    return type(v) is int


def validate_config(config: Any, location: str) -> dict[str, Any]:
    """The config if every field is known and in range; :class:`IntegrityError` naming the first bad one."""

    def bad(what: str) -> IntegrityError:
        return IntegrityError(f"the repository config at {location} is damaged ({what})")

    if not isinstance(config, dict):
        raise bad("not a JSON object")
    if config.get("format") != REPO_FORMAT:
        raise IntegrityError(f"{location} is not a vbfs repository (its config is damaged or another program's)")
    version = config.get("version")
    if not _is_int(version):
        raise bad("version is not a number")
    if version not in (REPO_VERSION, OLD_REPO_VERSION):
        raise RepositoryFormatError(f"repository format version {version} is not supported by this vbfs")
    seal = set() if version == OLD_REPO_VERSION else {"mac" if config.get("encryption") == "repokey" else "checksum"}
    missing = sorted(_FIELDS - config.keys())
    if missing:
        raise bad(f"no {missing[0]}")
    unknown = sorted(config.keys() - _FIELDS - seal)
    if unknown:
        raise bad(f"unknown field {unknown[0]!r}")
    if not isinstance(config["id"], str) or not _ID_RE.fullmatch(config["id"]):
        raise bad("id is not 32 lowercase hex digits")
    cs = config["chunk_size"]
    if not _is_int(cs) or not MIN_CHUNK_SIZE <= cs <= MAX_CHUNK_SIZE or cs & (cs - 1):
        raise bad("chunk_size is not a power of two between 64 KiB and 16 MiB")
    if config["encryption"] not in ENCRYPTIONS:
        raise bad(f"unknown encryption {str(config['encryption'])[:40]!r}")
    if config["hash"] != ENCRYPTIONS[config["encryption"]]:
        raise bad(f"hash {str(config['hash'])[:40]!r} does not go with encryption {config['encryption']!r}")
    if config["compression"] != "zstd":
        raise bad(f"unknown compression {str(config['compression'])[:40]!r}")
    if not _is_int(config["zstd_level"]) or not 1 <= config["zstd_level"] <= 22:
        raise bad("zstd_level is not a whole number from 1 to 22")
    cdc = config["cdc"]
    if not isinstance(cdc, dict) or set(cdc) != {"algorithm", "min", "avg", "max"}:
        raise bad("cdc does not have exactly algorithm, min, avg and max")
    if cdc["algorithm"] != "fastcdc2020":
        raise bad("unknown cdc algorithm")
    if not all(_is_int(cdc[k]) for k in ("min", "avg", "max")) or not (
        MIN_CDC <= cdc["min"] <= cdc["avg"] <= cdc["max"] <= MAX_CDC
    ):
        raise bad("cdc sizes are not whole numbers with min <= avg <= max between 4 KiB and 64 MiB")
    for field in seal:
        if not isinstance(config.get(field), str):
            raise bad(f"no {field}")
    return config


def _checksum(config: dict[str, Any]) -> str:
    return blake3.blake3(canonical_json({k: v for k, v in config.items() if k != "checksum"})).hexdigest()


def seal(config: dict[str, Any], key: MasterKey | None) -> dict[str, Any]:
    """The config with its ``mac`` (encrypted) or ``checksum`` (plaintext) added."""
    body = {k: v for k, v in config.items() if k not in ("mac", "checksum")}
    if key is not None:
        body["mac"] = config_mac(key, body)
    else:
        body["checksum"] = _checksum(body)
    return body


def verify_seal(config: dict[str, Any], key: MasterKey | None, location: str) -> None:
    """The config's ``mac`` (given the key) or ``checksum`` matches its other fields, before they are trusted."""
    if key is not None:
        if not mac_matches(config_mac(key, config), config.get("mac")):
            raise IntegrityError(
                f"the repository config at {location} does not match the repository's key (changed or damaged): "
                "refusing to use it"
            )
    elif not mac_matches(_checksum(config), config.get("checksum")):
        raise IntegrityError(f"the repository config at {location} is damaged (checksum mismatch)")


class SecurityRecords:
    """What this user's vbfs has seen of repositories: which ids and which locations were encrypted."""

    def __init__(self, cache_root: Path | None = None):
        root = cache_root or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vbfs"
        self.folder = root / "security"

    def _location_file(self, location: str) -> Path:
        digest = hashlib.sha256(os.path.realpath(location).encode()).hexdigest()[:32]
        return self.folder / f"location-{digest}.json"

    def _id_file(self, repo_id: str) -> Path:
        return self.folder / f"{repo_id}.json"

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        try:
            doc = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def _write(self, path: Path, doc: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):  # a cache that cannot be written only loses this safeguard
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = path.with_name(f".tmp-{os.getpid()}-{secrets.token_hex(4)}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f)
            os.replace(tmp, path)

    def _remember(self, location: str, repo_id: str, **fields: Any) -> None:
        for path in (self._id_file(repo_id), self._location_file(location)):
            doc = self._read(path)
            if doc.get("id") != repo_id:
                doc = {}  # the location held another repository before
            new = {**doc, "id": repo_id, "location": os.path.realpath(location), **fields}
            if new != doc:
                self._write(path, new)

    def remember_encrypted(self, location: str, repo_id: str) -> None:
        self._remember(location, repo_id, encryption="repokey")

    def remember_format(self, location: str, repo_id: str, version: int) -> None:
        self._remember(location, repo_id, version=version)

    def refuse_older_format(self, location: str, repo_id: str, version: int) -> None:
        """Raise if this user saw this repository with a newer format than its config now says (a config
        downgraded to format 1 would drop its seal: refused like any other change)."""
        for path in (self._id_file(repo_id), self._location_file(location)):
            seen = self._read(path)
            if seen.get("id") == repo_id and _is_int(seen.get("version")) and seen["version"] > version:
                raise IntegrityError(
                    f"the repository {repo_id} had format {seen['version']} when this user last used it, but its "
                    f"config now says format {version}: the config was downgraded or replaced; refusing it"
                )

    def forget_location(self, location: str) -> None:
        """A new repository was created at ``location``: what was there before is no reason to refuse it."""
        with contextlib.suppress(OSError):
            self._location_file(location).unlink()

    def refuse_plaintext(self, location: str, repo_id: str) -> None:
        """Raise if this repository, or the repository last seen at this location, was encrypted."""
        if self._read(self._id_file(repo_id)).get("encryption") == "repokey":
            raise IntegrityError(
                f"repository {repo_id} was encrypted when this user last used it, but its config now says it is "
                "not: refusing to use the changed config"
            )
        seen = self._read(self._location_file(location))
        if seen.get("encryption") == "repokey":
            raise IntegrityError(
                f"the repository at {location} was encrypted (id {str(seen.get('id'))[:32]}) when this user last "
                f"used it, but its config now says it is not: refusing (if it was replaced on purpose, delete "
                f"{self._location_file(location)})"
            )
