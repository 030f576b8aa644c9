"""Guest names to host names (vbfs.names): every result is one safe path component, and no two names merge."""

from __future__ import annotations

import os
import random

import pytest

from vbfs.names import NAME_MAX, host_name, host_names, is_safe


def component_ok(name: str) -> bool:
    raw = os.fsencode(name)
    return name not in ("", ".", "..") and b"/" not in raw and b"\0" not in raw and len(raw) <= NAME_MAX


@pytest.mark.parametrize(
    "name",
    ["hosts", "nginx.conf", ".bashrc", "...", "a b", "new\nline", "wéb(1).raw", "\udcff\udcfe", "%2F", "x" * NAME_MAX],
)
def test_safe_names_are_kept(name: str) -> None:
    assert is_safe(name)
    assert host_name(name) == (name, "")
    assert host_names([name, "other"]) == ([name, "other"], [])


@pytest.mark.parametrize(
    ("guest", "host"),
    [
        ("..", "%2E%2E"),
        (".", "%2E"),
        ("", "%"),
        ("../../../../root/x", "..%2F..%2F..%2F..%2Froot%2Fx"),
        ("/etc/passwd", "%2Fetc%2Fpasswd"),
        ("a\0b", "a%00b"),
        ("\ud800x", "%uD800x"),  # a lone UTF-16 surrogate (NTFS allows them) has no bytes on the host
    ],
)
def test_unsafe_names_are_escaped_with_a_reason(guest: str, host: str) -> None:
    assert not is_safe(guest)
    name, why = host_name(guest)
    assert name == host and why
    assert component_ok(name)
    names, notes = host_names([guest])
    assert names == [host] and len(notes) == 1 and repr(guest) in notes[0] and repr(host) in notes[0]


def test_long_names_are_cut_with_a_hash_and_stay_distinct() -> None:
    a, b = "x" * 250 + "-first-version", "x" * 250 + "-second-version"  # the same first 200 bytes
    (ha, why), (hb, _) = host_name(a), host_name(b)
    assert component_ok(ha) and component_ok(hb) and ha != hb
    assert ha.startswith("x" * 200 + "~") and "longer than 255 bytes" in why
    assert host_name(a)[0] == ha, "the same guest name always gets the same host name"
    assert host_name("y" * (NAME_MAX + 1))[0] != "y" * (NAME_MAX + 1)


@pytest.mark.parametrize("char", ["é", "€", "𝄞"])
def test_cutting_never_splits_a_character(char: str) -> None:
    """An NTFS name of 255 UTF-16 units is up to 765 bytes of UTF-8."""
    name, _ = host_name(char * 255)
    raw = os.fsencode(name)
    assert len(raw) <= NAME_MAX
    head = raw.split(b"~")[0]
    assert head.decode("utf-8") == char * (len(head) // len(char.encode()))


def test_a_name_listed_twice_gets_a_second_name() -> None:
    names, notes = host_names(["a", "b", "a"])
    assert names[:2] == ["a", "b"] and names[2].startswith("a~") and len(set(names)) == 3
    assert len(notes) == 1 and "more than once" in notes[0]


def test_an_escaped_name_never_takes_a_name_the_folder_has() -> None:
    """``a/b`` escapes to ``a%2Fb``; a folder that also holds a real ``a%2Fb`` keeps both apart."""
    for order in (["a/b", "a%2Fb"], ["a%2Fb", "a/b"]):
        names, notes = host_names(order)
        assert names[order.index("a%2Fb")] == "a%2Fb"
        assert names[order.index("a/b")].startswith("a%2Fb~")
        assert len(notes) == 1


def test_random_hostile_folders_give_distinct_safe_names() -> None:
    rng = random.Random(9)
    alphabet = ["a", "b", ".", "/", "\0", "%", "2", "F", "~", "é", "\udc80", "\ud800", "€"]
    for _ in range(300):
        lengths = [rng.choice([0, 1, 2, 3, 8, 90, 300]) for _ in range(rng.randint(1, 12))]
        guest = ["".join(rng.choice(alphabet) for _ in range(n)) for n in lengths]
        guest += rng.sample(guest, k=min(2, len(guest)))  # and some names twice
        names, notes = host_names(guest)
        assert len(names) == len(guest) and len(set(names)) == len(names), guest
        assert all(component_ok(n) for n in names), guest
        changed = sum(g != h for g, h in zip(guest, names, strict=True))
        assert len(notes) == changed
        for g, h in zip(guest, names, strict=True):
            if is_safe(g) and guest.count(g) == 1:
                assert h == g, "a safe name that is listed once is kept"
