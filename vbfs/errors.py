"""The domain errors of vbfs.

Every error a user can cause or meet is a :class:`VbfsError` with a one-line message. The CLI turns them into a
line on stderr and a non-zero exit code (``exit_code``); the FUSE adapter maps them to an errno. Nothing else in
vbfs decides how an error is shown.
"""

from __future__ import annotations


class VbfsError(Exception):
    """Base of all errors that are shown to a user as one line."""

    exit_code = 2


class RepositoryNotFound(VbfsError):
    pass


class RepositoryExists(VbfsError):
    pass


class RepositoryFormatError(VbfsError):
    """The repository's config or an object in it cannot be understood."""


class WrongPassphrase(VbfsError):
    pass


class IntegrityError(VbfsError):
    """A stored object failed verification (bad hash, bad tag, cannot be decoded)."""

    exit_code = 3


class ObjectMissing(IntegrityError):
    pass


class LockError(VbfsError):
    exit_code = 4


class SnapshotNotFound(VbfsError):
    pass


class PathNotFound(VbfsError):
    pass


class SourceError(VbfsError):
    """A hypervisor or image source cannot be read or is not what it claims to be."""


class UnknownScheme(SourceError):
    pass


class NotSupported(VbfsError):
    pass


class StorageFull(VbfsError):
    exit_code = 5
