"""The Debian archive this machine installs from, read from its apt sources, for debootstrap.

No archive host is written in the code: a machine behind a mirror, a caching proxy or a snapshot already says
where its packages come from, in ``/etc/apt/sources.list`` (one-line ``deb URI SUITE COMPONENTS`` entries),
``/etc/apt/sources.list.d/*.list`` (the same) and ``/etc/apt/sources.list.d/*.sources`` (deb822 stanzas:
``Types:``, ``URIs:``, ``Suites:``, ``Components:``, ``Enabled:``). The main archive is the entry that carries the
machine's own release (``VERSION_CODENAME`` of ``/etc/os-release``) as a suite; the security archive the one that
carries ``CODENAME-security``. Third-party repositories (a vendor's ``stable main``) carry neither and are passed
over. ``RABBITPROXY_DEBIAN_MIRROR`` and ``RABBITPROXY_DEBIAN_SECURITY_MIRROR`` override what is found.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

MIRROR_ENV = "RABBITPROXY_DEBIAN_MIRROR"
SECURITY_ENV = "RABBITPROXY_DEBIAN_SECURITY_MIRROR"


class AptSourcesError(RuntimeError):
    """No Debian archive could be found in the apt sources; the message says where it looked."""


@dataclass(frozen=True)
class Source:
    """One ``deb`` entry: where it came from, its URIs and its suites."""

    origin: str
    uris: tuple[str, ...]
    suites: tuple[str, ...]


def parse_one_line(text: str, origin: str) -> Iterator[Source]:
    """The ``deb`` lines of a ``sources.list``-style file; ``deb-src`` and comments are skipped."""
    for number, raw in enumerate(text.splitlines(), 1):
        words = raw.split("#", 1)[0].split()
        if not words or words[0] != "deb":
            continue
        words = words[1:]
        # Options in brackets ([arch=amd64 signed-by=...]) may hold spaces only between options.
        if words and words[0].startswith("["):
            while words and not words[0].endswith("]"):
                words.pop(0)
            words = words[1:]
        if len(words) >= 2:
            yield Source(f"{origin}:{number}", (words[0],), (words[1],))


def parse_deb822(text: str, origin: str) -> Iterator[Source]:
    """The enabled ``Types: deb`` stanzas of a ``.sources`` file."""
    stanza: dict[str, str] = {}
    start = 1
    key = ""
    for number, raw in enumerate([*text.splitlines(), ""], 1):
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if stanza:
                yield from _stanza(stanza, f"{origin}:{start}")
            stanza, key = {}, ""
            continue
        if not stanza:
            start = number
        if raw[0] in " \t" and key:
            # A continuation line: more values of the field above.
            stanza[key] += " " + raw.strip()
            continue
        key, _, value = raw.partition(":")
        key = key.strip().lower()
        stanza[key] = value.strip()


def _stanza(fields: Mapping[str, str], origin: str) -> Iterator[Source]:
    if "deb" not in fields.get("types", "").split():
        return
    if fields.get("enabled", "yes").strip().lower() in ("no", "false", "0"):
        return
    uris, suites = tuple(fields.get("uris", "").split()), tuple(fields.get("suites", "").split())
    if uris and suites:
        yield Source(origin, uris, suites)


def read_sources(root: Path = Path("/")) -> list[Source]:
    """Every ``deb`` entry of the machine's apt sources, in the order apt reads the files."""
    found: list[Source] = []
    main = root / "etc/apt/sources.list"
    if main.is_file():
        found.extend(parse_one_line(main.read_text(errors="replace"), str(main)))
    parts = root / "etc/apt/sources.list.d"
    for path in sorted(parts.glob("*")) if parts.is_dir() else []:
        if path.suffix == ".list":
            found.extend(parse_one_line(path.read_text(errors="replace"), str(path)))
        elif path.suffix == ".sources":
            found.extend(parse_deb822(path.read_text(errors="replace"), str(path)))
    return found


def codename(root: Path = Path("/")) -> str:
    """``VERSION_CODENAME`` from os-release ("" when it says none)."""
    for name in ("etc/os-release", "usr/lib/os-release"):
        path = root / name
        if path.is_file():
            for line in path.read_text(errors="replace").splitlines():
                key, _, value = line.partition("=")
                if key.strip() == "VERSION_CODENAME":
                    return value.strip().strip("\"'")
    return ""


def _uri_for(sources: list[Source], suite: str) -> str | None:
    for source in sources:
        if suite in source.suites:
            return source.uris[0].rstrip("/")
    return None


def debian_mirror(env: Mapping[str, str] | None = None, root: Path = Path("/")) -> str:
    """The main Debian archive's URI: ``RABBITPROXY_DEBIAN_MIRROR``, else the apt sources' entry for this release."""
    environ = os.environ if env is None else env
    if environ.get(MIRROR_ENV):
        return environ[MIRROR_ENV].rstrip("/")
    release = codename(root)
    uri = _uri_for(read_sources(root), release) if release else None
    if uri is None:
        raise AptSourcesError(
            f"no apt source for this machine's release ({release or 'unknown'}) in {root / 'etc/apt/sources.list'} "
            f"or {root / 'etc/apt/sources.list.d'}; set {MIRROR_ENV} to a Debian archive URI"
        )
    return uri


def security_mirror(env: Mapping[str, str] | None = None, root: Path = Path("/")) -> str | None:
    """The Debian security archive's URI (``RABBITPROXY_DEBIAN_SECURITY_MIRROR``, else the apt sources), or None."""
    environ = os.environ if env is None else env
    if environ.get(SECURITY_ENV):
        return environ[SECURITY_ENV].rstrip("/")
    release = codename(root)
    return _uri_for(read_sources(root), f"{release}-security") if release else None
