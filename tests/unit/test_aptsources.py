"""Where debootstrap fetches from: the machine's own apt sources, in both of apt's formats, never a built-in host."""

from __future__ import annotations

from pathlib import Path

import pytest

from rabbitproxy.dev.aptsources import (
    AptSourcesError,
    debian_mirror,
    parse_deb822,
    parse_one_line,
    read_sources,
    security_mirror,
)

MIRROR = "http://mirror.example.internal/debian"
SECURITY = "http://mirror.example.internal/debian-security"


def machine(tmp_path: Path, codename: str = "bookworm", **files: str) -> Path:
    """A fake root with os-release and the given files under etc/apt (keys: 'sources.list', 'd/NAME')."""
    (tmp_path / "etc/apt/sources.list.d").mkdir(parents=True)
    (tmp_path / "etc/os-release").write_text(f'PRETTY_NAME="Debian"\nVERSION_CODENAME={codename}\nID=debian\n')
    for name, text in files.items():
        target = tmp_path / "etc/apt" / name.replace("d/", "sources.list.d/", 1)
        target.write_text(text)
    return tmp_path


DEB822 = f"""Types: deb
# http://snapshot.example.internal/archive/debian/20250520T000000Z
URIs: {MIRROR}/
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: {SECURITY}
Suites: bookworm-security
Components: main
"""

VENDOR = """Types: deb
URIs: https://vendor.example/apt
Suites: stable
Components: main
"""


def test_deb822_gives_the_main_and_the_security_archive(tmp_path: Path) -> None:
    root = machine(tmp_path, **{"d/vendor.sources": VENDOR, "d/debian.sources": DEB822})
    assert debian_mirror({}, root) == MIRROR
    assert security_mirror({}, root) == SECURITY


def test_one_line_form_with_options_and_deb_src(tmp_path: Path) -> None:
    text = (
        "# a comment\n"
        f"deb-src {MIRROR} bookworm main\n"
        f"deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {MIRROR} bookworm main\n"
        f"deb {SECURITY} bookworm-security main  # trailing comment\n"
    )
    root = machine(tmp_path, **{"sources.list": text})
    assert debian_mirror({}, root) == MIRROR
    assert security_mirror({}, root) == SECURITY
    assert [s.origin for s in read_sources(root)] == [
        f"{root}/etc/apt/sources.list:3",
        f"{root}/etc/apt/sources.list:4",
    ]


def test_the_release_decides_which_entry_is_the_archive(tmp_path: Path) -> None:
    # A trixie machine with a bookworm entry left over: the entry for its own release is the archive.
    other = "http://old.example.internal/debian"
    text = f"deb {other} bookworm main\ndeb {MIRROR} trixie main\n"
    assert debian_mirror({}, machine(tmp_path, "trixie", **{"sources.list": text})) == MIRROR


def test_disabled_stanzas_and_other_types_are_skipped(tmp_path: Path) -> None:
    text = (
        f"Types: deb\nURIs: http://off.example.internal/debian\nSuites: bookworm\nEnabled: no\n\n"
        f"Types: deb-src\nURIs: http://src.example.internal/debian\nSuites: bookworm\n\n"
        f"Types: deb deb-src\nURIs: {MIRROR}\nSuites:\n bookworm\n bookworm-updates\n"
    )
    sources = list(parse_deb822(text, "x.sources"))
    assert [(s.uris, s.suites) for s in sources] == [((MIRROR,), ("bookworm", "bookworm-updates"))]
    assert sources[0].origin == "x.sources:10"


def test_the_environment_wins(tmp_path: Path) -> None:
    root = machine(tmp_path, **{"d/debian.sources": DEB822})
    env = {"RABBITPROXY_DEBIAN_MIRROR": "http://env.example/debian/", "RABBITPROXY_DEBIAN_SECURITY_MIRROR": "http://s"}
    assert debian_mirror(env, root) == "http://env.example/debian"
    assert security_mirror(env, root) == "http://s"


def test_no_source_for_the_release_is_an_error_naming_the_variable(tmp_path: Path) -> None:
    root = machine(tmp_path, **{"d/vendor.sources": VENDOR})
    with pytest.raises(AptSourcesError, match=r"bookworm.*RABBITPROXY_DEBIAN_MIRROR"):
        debian_mirror({}, root)
    assert security_mirror({}, root) is None
    assert list(parse_one_line("deb\ndeb only-a-uri\n", "x")) == []


def test_this_machine_names_its_archive_in_its_apt_sources() -> None:
    # What rootfs.py and scripts/container-smoke hand debootstrap on the CI machine: an entry of its own sources.
    mirror = debian_mirror({})
    files = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]
    texts = [p.read_text() for p in files if p.is_file()]
    assert any(mirror in text for text in texts)
