"""The root ``admin`` table of a TOML document, read without ``tomllib`` when that is safe.

``rabbitproxy healthcheck`` needs three keys of the config file (``admin.listen``, ``admin.enabled`` and whether
``admin.token`` is a string) and runs every second or two. ``tomllib`` is correct but imports ``re``, ``datetime``
and ``typing``, which cost the probe more CPU than everything else it does together (issue 19). This module reads
the document line by line, following strings, comments and brackets closely enough to know where each statement
starts, and answers only when it is sure: for every way the admin keys can be written that it does not fully
understand (multi-line strings anywhere, escapes or numbers in an admin value, an inline ``admin = {...}`` table,
``[[admin]]``, sub-tables, a key defined twice, an unterminated string or array, ...) it answers None, and the
caller parses the file with ``tomllib`` as before. tests/unit/test_tomlscan.py compares the two on each form.

It does not validate the rest of the document: a syntax error elsewhere that the scanner can step over is left to
``serve`` and ``check-config``, as the probe leaves the rest of the configuration to them.
"""

from __future__ import annotations

# Bare keys (TOML 1.0): ASCII letters, digits, '_' and '-'.
_BARE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
# Control characters are not allowed in TOML strings, except the tab; a value holding one is left to tomllib,
# which refuses it.
_CONTROL = frozenset(chr(c) for c in (*range(0x09), *range(0x0A, 0x20), 0x7F))


class _Unsure(Exception):  # noqa: N818 - a verdict, not an error
    """The document has a form the scanner does not decide; tomllib must."""


def admin_table(text: str) -> dict[str, str | bool] | None:
    """The root ``admin`` table of TOML document ``text`` if it holds only strings and booleans written plainly.

    ``{}`` when the document has no ``admin`` keys; None when the scanner cannot be sure what tomllib would
    answer (see the module docstring), including every document tomllib would refuse for a reason the scanner
    noticed. ``text`` is as read in text mode, with universal newlines.
    """
    if '"""' in text or "'''" in text:
        # A multi-line string can hide anything, a "[admin]" line included; rare in a config file.
        return None
    try:
        return _scan(text)
    except _Unsure:
        return None


def _scan(text: str) -> dict[str, str | bool]:
    admin: dict[str, str | bool] = {}
    table: tuple[str, ...] = ()
    header_seen = dotted_seen = False
    depth = 0
    for line in text.split("\n"):
        if depth:
            # Still inside a multi-line array value.
            depth = _skip_value(line, 0, depth)
            continue
        pos = _skip_ws(line, 0)
        if pos == len(line) or line[pos] == "#":
            continue
        if line[pos] == "[":
            array = line.startswith("[[", pos)
            path, pos = _key(line, pos + (2 if array else 1))
            close = "]]" if array else "]"
            if not line.startswith(close, pos):
                raise _Unsure
            _end_of_line(line, pos + len(close))
            if path[0] == "admin":
                # Only one plain [admin] header, and not after admin.* keys at the root (tomllib refuses that).
                if array or len(path) > 1 or header_seen or dotted_seen:
                    raise _Unsure
                header_seen = True
            table = path
            continue
        key, pos = _key(line, pos)
        if not line.startswith("=", pos):
            raise _Unsure
        pos = _skip_ws(line, pos + 1)
        full = table + key
        if full[0] != "admin":
            depth = _skip_value(line, pos, 0)
            continue
        # ``admin = ...`` (an inline table, or a wrong type), ``admin.a.b`` and a key seen twice go to tomllib.
        if len(full) != 2 or full[1] in admin:
            raise _Unsure
        if not table:
            dotted_seen = True
        value, pos = _plain_value(line, pos)
        _end_of_line(line, pos)
        admin[full[1]] = value
    if depth:
        raise _Unsure
    return admin


def _skip_ws(line: str, pos: int) -> int:
    while pos < len(line) and line[pos] in " \t":
        pos += 1
    return pos


def _end_of_line(line: str, pos: int) -> None:
    pos = _skip_ws(line, pos)
    if pos < len(line) and line[pos] != "#":
        raise _Unsure


def _key(line: str, pos: int) -> tuple[tuple[str, ...], int]:
    """A dotted key (``a.b``, ``"a" . 'b'``) starting at ``pos``: its parts and the position after it and any blanks."""
    parts: list[str] = []
    n = len(line)
    while True:
        pos = _skip_ws(line, pos)
        if pos >= n:
            raise _Unsure
        quote = line[pos]
        if quote in "\"'":
            end = line.find(quote, pos + 1)
            part = line[pos + 1 : end]
            # An escape in a quoted key would need decoding (and may hide the quote that ends it).
            if end < 0 or (quote == '"' and "\\" in part):
                raise _Unsure
            pos = end + 1
        else:
            start = pos
            while pos < n and line[pos] in _BARE:
                pos += 1
            if pos == start:
                raise _Unsure
            part = line[start:pos]
        parts.append(part)
        pos = _skip_ws(line, pos)
        if pos < n and line[pos] == ".":
            pos += 1
            continue
        return tuple(parts), pos


def _plain_value(line: str, pos: int) -> tuple[str | bool, int]:
    """A single-line string without escapes, or a boolean; anything else is for tomllib to read."""
    for word, value in (("true", True), ("false", False)):
        if line.startswith(word, pos):
            end = pos + len(word)
            if end == len(line) or line[end] in " \t#":
                return value, end
            raise _Unsure
    quote = line[pos : pos + 1]
    if quote not in ('"', "'"):
        raise _Unsure
    end = line.find(quote, pos + 1)
    text = line[pos + 1 : end]
    if end < 0 or (quote == '"' and "\\" in text) or not _CONTROL.isdisjoint(text):
        raise _Unsure
    return text, end + 1


def _skip_value(line: str, pos: int, depth: int) -> int:
    """Step over (the rest of) a value that is not an admin key; the bracket depth open at the end of the line.

    Only strings, comments and brackets matter here: they decide where the next statement starts.
    """
    n = len(line)
    while pos < n:
        char = line[pos]
        if char == '"':
            pos += 1
            while True:
                if pos >= n:
                    # An unterminated string (single-line strings cannot continue on the next line).
                    raise _Unsure
                char = line[pos]
                if char == "\\":
                    pos += 2
                elif char == '"':
                    break
                else:
                    pos += 1
        elif char == "'":
            pos = line.find("'", pos + 1)
            if pos < 0:
                raise _Unsure
        elif char == "#":
            break
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
            if depth < 0:
                raise _Unsure
        pos += 1
    return depth
