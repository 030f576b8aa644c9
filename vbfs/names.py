"""Where names that come from a guest become names on the backup host: here and nowhere else.

A guest's filesystem is attacker-controlled data. Its directory entries may be called ``..``, hold a ``/`` or a
NUL byte, be empty, or be longer than a Linux name may be (an NTFS name of 255 UTF-16 units is up to 765 bytes of
UTF-8). The tree (:mod:`vbfs.vfs`) shows every guest folder through :func:`host_names`, so the mount, the
guest-file index and ``restore`` only ever see names that are one path component of at most ``NAME_MAX`` bytes.

A name that is already safe is kept as it is. Any other is escaped (``/`` as ``%2F``, NUL as ``%00``, ``.`` and
``..`` as ``%2E`` and ``%2E%2E``, an empty name as ``%``), cut with a hash of the original when it is too long,
and given a ``~<hash>`` suffix where it would meet another name of the same folder: two guest names never become
one host name. Every change comes with a note that says what was changed and why.

The names a source gives for a guest, a disk or a config file become folder and file names of the repository
through :func:`repository_name`: plain names are kept, any other gets a readable form and a hash of the original, so
two different source names are never kept as one (and ``latest`` of one guest is never another guest's).
"""

from __future__ import annotations

import hashlib
import os
import re

NAME_MAX = 255  # bytes in one path component (Linux, and the limit of every filesystem a restore writes to)
_KEEP_BYTES = 200  # a cut name keeps this much of its start, then "~" and a hash


def _digest(name: str, n: int = 12) -> str:
    return hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()[:n]


def _encodable(name: str) -> bool:
    """Whether the name has host bytes (a lone UTF-16 surrogate from an NTFS name has none)."""
    try:
        os.fsencode(name)
    except UnicodeEncodeError:
        return False
    return True


def is_safe(name: str) -> bool:
    """One path component that every Linux filesystem takes as it is."""
    if name in ("", ".", ".."):
        return False
    if "/" in name or "\x00" in name or not _encodable(name):
        return False
    return len(os.fsencode(name)) <= NAME_MAX


def _escape(name: str) -> tuple[str, str]:
    """An escaped form of an unsafe name, and why it was needed."""
    if name == "":
        return "%", "an empty name"
    if name in (".", ".."):
        return name.replace(".", "%2E"), f"the name {name!r} means a folder itself or its parent"
    why = []
    out = name
    if "/" in out:
        out = out.replace("/", "%2F")
        why.append("'/'")
    if "\x00" in out:
        out = out.replace("\x00", "%00")
        why.append("NUL")
    if not _encodable(out):
        out = "".join(c if _encodable(c) else f"%u{ord(c):04X}" for c in out)
        why.append("a character that has no UTF-8 form")
    return out, ("it holds " + " and ".join(why)) if why else ""


def _cut(name: str) -> str:
    """``name`` cut to fit ``NAME_MAX`` bytes: its start (whole characters), ``~`` and a hash of all of it."""
    raw = os.fsencode(name)
    cut = _KEEP_BYTES
    while cut > _KEEP_BYTES - 3 and cut < len(raw) and raw[cut] & 0xC0 == 0x80:  # never split a character in two
        cut -= 1
    if cut < len(raw) and raw[cut] & 0xC0 == 0x80:
        cut = _KEEP_BYTES  # not UTF-8 here anyway
    return f"{os.fsdecode(raw[:cut])}~{_digest(name)}"


def host_name(guest_name: str) -> tuple[str, str]:
    """The host name of one guest name, and a reason when it differs (``""`` when the name was safe)."""
    if is_safe(guest_name):
        return guest_name, ""
    name, why = _escape(guest_name)
    if len(os.fsencode(name)) > NAME_MAX:
        name = _cut(name)
        why = f"{why}; " if why else ""
        why += f"longer than {NAME_MAX} bytes"
    return name, why


def host_names(guest_names: list[str]) -> tuple[list[str], list[str]]:
    """Host names for the guest names of one folder (in the same order, all different) and a note per change.

    Safe names are kept; an unsafe name, or a second entry of a name already taken (a damaged folder may list
    one name twice), gets a name that no other entry of the folder has.
    """
    out: list[str] = []
    notes: list[str] = []
    safe = {n for n in guest_names if is_safe(n)}
    taken: set[str] = set()
    for guest in guest_names:
        name, why = host_name(guest)
        if name in taken or (why and name in safe):
            base = name if len(os.fsencode(name)) <= NAME_MAX - 14 else _cut(name)
            name = f"{base}~{_digest(guest, 8)}"
            n = 1
            while name in taken or name in safe:
                n += 1
                name = f"{base}~{_digest(guest, 8)}-{n}"
            why = why or "the folder lists this name more than once"
        taken.add(name)
        out.append(name)
        if why:
            notes.append(f"guest name {guest!r} is shown as {name!r} ({why})")
    return out, notes


_REPOSITORY_FIRST = "A-Za-z0-9._+-"
_REPOSITORY_REST = "A-Za-z0-9._+@ -"
_REPOSITORY_MAX = 201  # characters of a name kept as it is
PLAIN_NAME = re.compile(rf"[{_REPOSITORY_FIRST}][{_REPOSITORY_REST}]{{0,{_REPOSITORY_MAX - 1}}}")
_MAPPED_NAME = re.compile(rf"[{_REPOSITORY_FIRST}][{_REPOSITORY_REST}]{{0,190}}~[0-9a-f]{{8,16}}")


def is_plain_name(name: str) -> bool:
    """A name the repository keeps as it is: letters, digits, ``. _ + - @`` and spaces, up to 201 characters."""
    return PLAIN_NAME.fullmatch(name) is not None and name not in (".", "..")


def is_repository_name(name: str) -> bool:
    """A name that :func:`repository_name` can give: a plain name, or a mapped one (``<readable>~<hash>``)."""
    return is_plain_name(name) or _MAPPED_NAME.fullmatch(name) is not None


def repository_name(name: str) -> str:
    """The name a guest, disk or config file of a source is kept under in the repository.

    A plain name (:func:`is_plain_name`) is kept as it is. Any other is kept as a readable form (each other
    character as ``_``, at most 183 characters, ``_`` in front of a first character that may not start a name)
    followed by ``~`` and 16 hex digits (64 bits: no name can be searched for that meets another one) of a hash
    of the whole original: ``a/b`` is ``a_b~<hash>``, never ``a_b``.
    A plain name has no ``~``, so a mapped name never equals a plain one, and two originals meet only if their
    hashes do. The caller notes the change; the original stays in the manifest.
    """
    if is_plain_name(name):
        return name
    readable = re.sub(f"[^{_REPOSITORY_REST}]", "_", name) or "guest"
    if not re.match(f"[{_REPOSITORY_FIRST}]", readable):
        readable = "_" + readable
    digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()[:16]
    return f"{readable[:183]}~{digest}"
