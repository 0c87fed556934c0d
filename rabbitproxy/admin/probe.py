"""``rabbitproxy healthcheck``: ask a running proxy's admin API whether it is healthy.

This is what a container ``HEALTHCHECK``, a Kubernetes exec probe or a keepalived ``track_script`` runs, every one
to ten seconds. It is a separate short-lived process, so it uses blocking stdlib HTTP and imports only the standard
library, :mod:`rabbitproxy.addresses` and :mod:`rabbitproxy.admin.tomlscan`: no typer, pydantic, asyncio or
aiohttp, which would cost a few hundred milliseconds of CPU per run, and on the usual path not even pathlib,
tomllib, json, urllib.parse or the socket module, each a millisecond or more against a budget of a few (issue 19;
tests/integration/test_probe_cost.py keeps it so). Only an error path (an
unusual ``[admin]`` table, a bad ``--admin``) loads :mod:`rabbitproxy.config`, so that the message is the one
``serve`` would print. It talks to the admin address directly and deliberately ignores ``HTTP_PROXY``-style
variables, which a container often inherits and which would send the probe somewhere else.
"""

from __future__ import annotations

import os

from rabbitproxy.addresses import DEFAULT_ADMIN_LISTEN, DEFAULT_CONFIG_FILE, format_host_port, split_host_port
from rabbitproxy.admin.tomlscan import admin_table

# Not ``typing.TYPE_CHECKING``: every import on this path is paid at every probe; mypy honours the name anyway.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import _socket
    from collections.abc import Mapping

EXIT_HEALTHY = 0
EXIT_UNHEALTHY = 1
EXIT_CONFIG = 2
HEALTHZ_PATH = "/healthz"
# /healthz answers with a tiny JSON object; anything much larger is not our admin API.
MAX_BODY = 64 * 1024
# A wildcard listen address cannot be connected to; the probe runs beside the proxy, so loopback reaches it.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
# Host names and IPv4 addresses made of these characters mean the same to urllib.parse.urlsplit as to the few lines
# that read them here (tests/unit/test_probe_urls.py checks that); anything else goes through urlsplit.
_PLAIN_HOST = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-")
# aiohttp's ``json_response({"status": "ok"})``, byte for byte: the one answer that needs no JSON parser.
_OK_BODY = b'{"status": "ok"}'


class HealthResult:
    """The answer to one probe. A plain class: ``dataclasses`` imports ``inspect``, which the probe cannot afford."""

    __slots__ = ("detail", "healthy")

    def __init__(self, healthy: bool, detail: str) -> None:
        self.healthy = healthy
        self.detail = detail

    def __repr__(self) -> str:
        return f"HealthResult(healthy={self.healthy!r}, detail={self.detail!r})"


class Outcome:
    """What ``rabbitproxy healthcheck`` prints (nothing if ``message`` is empty) and its exit status."""

    __slots__ = ("code", "message", "to_stderr")

    def __init__(self, code: int, message: str, to_stderr: bool) -> None:
        self.code = code
        self.message = message
        self.to_stderr = to_stderr


class AdminConfigError(Exception):
    """The config file's ``[admin]`` table cannot be used; the text is :class:`~rabbitproxy.config.ConfigError`'s."""


def run(
    admin: str | None, config: str | os.PathLike[str] | None, timeout: float, quiet: bool, env: Mapping[str, str]
) -> Outcome:
    """Find the admin address as ``serve`` would, probe it, and say what to print and the exit status.

    ``admin`` and ``config`` are the ``--admin`` and ``--config`` values with their environment variables already
    applied. Without a config file the image's default file is read when it exists. A config file that cannot be
    read, or whose ``[admin]`` table is invalid, is a configuration error (exit 2); so is a bad ``--admin``. The
    rest of the file is not validated: the probe asks the running proxy, ``check-config`` judges the file.
    """
    # A str, not a Path: pathlib costs the probe more than its own code (only the messages below need one).
    path = os.fspath(config) if config is not None else None
    if path is None and os.path.exists(DEFAULT_CONFIG_FILE):
        path = DEFAULT_CONFIG_FILE
    listen: str | None = None
    if path is not None:
        try:
            enabled, listen = admin_settings(path)
        except AdminConfigError as exc:
            return Outcome(EXIT_CONFIG, str(exc), True)
        if not enabled:
            return Outcome(
                EXIT_UNHEALTHY,
                f"{_shown(path)}: the admin API is disabled (admin.enabled = false); nothing to probe",
                True,
            )
    try:
        url = admin_url(admin, env, listen)
    except ValueError as exc:
        from rabbitproxy.config import ConfigError

        return Outcome(EXIT_CONFIG, str(ConfigError([f"--admin: {exc}"])), True)
    result = check(url, timeout)
    message = "" if quiet else ("healthy: " if result.healthy else "unhealthy: ") + result.detail
    return Outcome(EXIT_HEALTHY if result.healthy else EXIT_UNHEALTHY, message, not result.healthy)


def _shown(path: str) -> str:
    """``path`` as a message shows it: the way typer's Path option (and ``load_admin``) print it."""
    from pathlib import Path

    return str(Path(path))


_ADMIN_KEYS = frozenset({"listen", "token", "enabled"})


def admin_settings(path: str | os.PathLike[str]) -> tuple[bool, str]:
    """``(enabled, listen)`` from a config file's ``[admin]`` table, validated as ``serve`` validates it.

    The usual table (strings and a boolean, a listen address that parses) is read here, by
    :func:`~rabbitproxy.admin.tomlscan.admin_table` where it is sure of the answer and by ``tomllib`` where it is
    not. Anything else, including a file that cannot be read or parsed, goes to
    :func:`rabbitproxy.config.load_admin`, which either raises the error ``serve`` would raise (as
    :class:`AdminConfigError`) or accepts what pydantic accepts (``enabled = "false"``, say), so the probe never
    disagrees with the proxy about the address. A file that is not UTF-8 is refused here, naming the offset of its
    first bad byte (from 0), as ``check-config`` names it.
    """
    section: object = None
    try:
        with open(path, "rb") as file:
            raw = file.read()
        # As config.loading reads it: a byte order mark skipped, universal newlines. Not the "utf-8-sig" codec:
        # that is one more module to import on every probe.
        text = raw.decode("utf-8").removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    except OSError:
        pass
    except UnicodeDecodeError as exc:
        from rabbitproxy.config import ConfigError

        line = raw.count(b"\n", 0, exc.start) + 1
        where = f"byte 0x{raw[exc.start]:02x} at offset {exc.start} (line {line})"
        error = ConfigError([f"not UTF-8: {where}; TOML files are UTF-8"], _shown(os.fspath(path)))
        raise AdminConfigError(str(error)) from None
    else:
        section = admin_table(text)
        if section is None:
            try:
                import tomllib

                section = tomllib.loads(text).get("admin", {})
            except ValueError:
                pass
    if isinstance(section, dict) and section.keys() <= _ADMIN_KEYS:
        listen = section.get("listen", DEFAULT_ADMIN_LISTEN)
        enabled = section.get("enabled", True)
        token = section.get("token")
        if isinstance(listen, str) and type(enabled) is bool and (token is None or isinstance(token, str)):
            try:
                split_host_port(listen)
            except ValueError:
                pass
            else:
                return enabled, listen
    from rabbitproxy.config import ConfigError, load_admin

    try:
        admin = load_admin(path)
    except ConfigError as exc:
        raise AdminConfigError(str(exc)) from None
    return admin.enabled, admin.listen


def admin_url(value: str | None, env: Mapping[str, str], config_listen: str | None = None) -> str:
    """The ``/healthz`` URL to probe.

    ``value`` (``--admin``) wins, then ``RABBITPROXY_ADMIN``, then where the proxy was told to listen, looked up the
    way ``rabbitproxy serve`` looks it up: the config file's ``admin.listen`` (``config_listen``), else
    ``RABBITPROXY_ADMIN_LISTEN``, else the built-in default. Each may be a full URL or a bare ``host:port``.
    Raises ValueError naming the bad value.
    """
    raw = (
        value
        or env.get("RABBITPROXY_ADMIN")
        or config_listen
        or env.get("RABBITPROXY_ADMIN_LISTEN")
        or DEFAULT_ADMIN_LISTEN
    )
    raw = raw.strip()
    if "://" not in raw:
        host, port = split_host_port(raw)
        host = _WILDCARDS.get(host, host)
        if raw.isascii() and _PLAIN_HOST.issuperset(host):
            # The usual ``host:port``: the URL urlsplit would give (below), without importing urllib.parse.
            return f"http://{host.lower()}:{port}{HEALTHZ_PATH}"
        raw = f"http://{format_host_port(host, port)}"
    return _healthz_url(raw)


def _healthz_url(raw: str) -> str:
    """``raw``, a URL, as the ``/healthz`` URL to probe: wildcards to loopback, the path completed."""
    from urllib.parse import urlsplit

    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{raw!r}: the admin URL must start with http:// or https://")
    if not parts.hostname:
        raise ValueError(f"{raw!r}: the admin URL has no host")
    try:
        url_port = parts.port
    except ValueError:
        raise ValueError(f"{raw!r}: the admin URL has a bad port") from None
    url_host = _WILDCARDS.get(parts.hostname, parts.hostname)
    netloc = format_host_port(url_host, url_port) if url_port else (f"[{url_host}]" if ":" in url_host else url_host)
    path = parts.path.rstrip("/")
    if not path.endswith(HEALTHZ_PATH):
        path += HEALTHZ_PATH
    return f"{parts.scheme}://{netloc}{path}"


class _NotHTTP(Exception):  # noqa: N818 - an answer, not an error of ours
    """The peer answered with something that is not an HTTP response."""


def _connect(host: str, port: int, timeout: float) -> _socket.socket:
    """``socket.create_connection((host, port), timeout)``, on the ``_socket`` extension module.

    The ``socket`` module wraps ``_socket`` in Python and imports ``selectors``, ``array`` and ``enum`` to do so,
    which costs a probe more than its whole request; nothing of that wrapper is needed for one blocking request.
    An ASCII host is passed as bytes: getaddrinfo encodes a str host with the ``idna`` codec, whose import (with
    ``stringprep`` and ``unicodedata``) costs another millisecond and changes nothing for an ASCII name.
    """
    import _socket

    name: str | bytes = host.encode("ascii") if host.isascii() else host
    # Like create_connection: try each address in turn and raise the first error if none connects.
    errors: list[OSError] = []
    for family, kind, proto, _, address in _socket.getaddrinfo(name, port, 0, _socket.SOCK_STREAM):
        sock = _socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(address)
        except OSError as exc:
            sock.close()
            errors.append(exc)
        else:
            return sock
    if errors:
        raise errors[0]
    raise OSError("getaddrinfo returns an empty list")


def _get_plain(host: str, port: int, path: str, timeout: float) -> tuple[int, bytes]:
    """``GET path`` over plain HTTP/1.1 with ``Connection: close``; the status and at most MAX_BODY bytes of body.

    A hand-written request rather than http.client: that module imports the email package to parse headers, which
    was the largest part of a probe's CPU (keepalived runs the probe every second). The admin API is ours and
    answers a small JSON body, so reading to the end of the stream and finding the status line is all it takes.
    """
    # The Host header brackets an IPv6 literal (``[::1]:9080``): a bare ``::1`` is no valid Host, and the admin
    # API's loopback guard refused it, so a token-less admin API on [::1] always probed unhealthy (issue 25 item 7).
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {format_host_port(host, port)}\r\nAccept: application/json\r\n"
        "Connection: close\r\n\r\n"
    )
    sock = _connect(host, port, timeout)
    try:
        sock.sendall(request.encode("ascii"))
        chunks: list[bytes] = []
        size = 0
        # Headers plus the body, bounded: a peer that streams forever is cut off, not buffered.
        while size < MAX_BODY + 16384:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        sock.close()
    raw = b"".join(chunks)
    head, sep, body = raw.partition(b"\r\n\r\n")
    status_line, _, header_block = head.partition(b"\r\n")
    parts = status_line.split(b" ", 2)
    if not sep or len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise _NotHTTP(f"status line {status_line[:40].decode('ascii', 'replace')!r}")
    if b"transfer-encoding: chunked" in header_block.lower():
        body = _dechunk(body)
    return int(parts[1]), body[:MAX_BODY]


def _dechunk(data: bytes) -> bytes:
    """The payload of a chunked body (aiohttp answers with Content-Length, but a proxy in between might not)."""
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        try:
            size = int(size_line.split(b";", 1)[0], 16)
        except ValueError:
            break
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return bytes(out)


def _plain_target(url: str) -> tuple[str, str, int | None, str] | None:
    """``(scheme, host, port, path)`` of an ``http://`` URL in the form :func:`admin_url` writes for a host name or
    an IPv4 address, exactly as urlsplit would split it; None for any other URL (urlsplit splits those)."""
    if not url.startswith("http://"):
        return None
    netloc, slash, path = url[7:].partition("/")
    host, colon, port_text = netloc.partition(":")
    if not host or not _PLAIN_HOST.issuperset(host):
        return None
    port: int | None = None
    if colon:
        if not (port_text.isascii() and port_text.isdigit() and int(port_text) <= 65535):
            return None
        port = int(port_text)
    # urlsplit ends the path at '?' or '#' and drops blanks and control characters; a path free of them is
    # taken as it is.
    if slash and (not path.isascii() or not path.isprintable() or any(c in path for c in " ?#")):
        return None
    return "http", host.lower(), port, slash + path


def _split_target(url: str) -> tuple[str, str, int | None, str]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.scheme, parts.hostname or "127.0.0.1", parts.port, parts.path


def check(url: str, timeout: float) -> HealthResult:
    """GET ``url``: healthy only on HTTP 200 with a JSON body whose ``status`` is ``"ok"``."""
    scheme, host, port, path = _plain_target(url) or _split_target(url)
    path = path or HEALTHZ_PATH
    try:
        if scheme == "https":
            status, body = _get_tls(host, port, path, timeout)
        else:
            status, body = _get_plain(host, port or 80, path, timeout)
    except _NotHTTP as exc:
        return HealthResult(False, f"{url}: not an HTTP answer ({exc})")
    except OSError as exc:
        # A timeout is an OSError too; say how long we waited, which "timed out" alone does not.
        reason = f"no answer within {timeout:g}s" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
        return HealthResult(False, f"{url}: {reason}")
    shown_status = _status_of(body)
    if status == 200 and shown_status == "ok":
        return HealthResult(True, f"{url}: ok")
    shown = shown_status
    if shown is None:
        shown = body[:200].decode("utf-8", "replace").strip() or "(empty body)"
    return HealthResult(False, f"{url}: HTTP {status}, status {shown}")


def _get_tls(host: str, port: int | None, path: str, timeout: float) -> tuple[int, bytes]:
    """The same request over https, through http.client (TLS needs ssl anyway, so its import cost is moot)."""
    import http.client

    conn = http.client.HTTPSConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Accept": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read(MAX_BODY)
    except http.client.HTTPException as exc:
        raise _NotHTTP(f"{type(exc).__name__} {str(exc).strip()!r}") from None
    finally:
        conn.close()


def _status_of(body: bytes) -> str | None:
    if body == _OK_BODY:
        # What our admin API sends when healthy; json.loads would say the same, at the cost of importing json.
        return "ok"
    import json

    try:
        data = json.loads(body)
    except ValueError:
        return None
    status = data.get("status") if isinstance(data, dict) else None
    return status if isinstance(status, str) else None
