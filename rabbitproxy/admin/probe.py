"""``rabbitproxy healthcheck``: ask a running proxy's admin API whether it is healthy.

This is what a container ``HEALTHCHECK``, a Kubernetes exec probe or a keepalived ``track_script`` runs, every one
to ten seconds. It is a separate short-lived process, so it reads the config file with ``tomllib``, asks with
``http.client`` and imports nothing else of ours but :mod:`rabbitproxy.addresses`: no typer, pydantic, asyncio or
aiohttp, which would cost a few hundred milliseconds of CPU per run (issue 19; tests/integration/test_probe_cost.py
keeps it so, and bench/probe_cost.py measures what is left). Only an error path (an unusual ``[admin]`` table, a
bad ``--admin``) loads :mod:`rabbitproxy.config`, so that the message is the one ``serve`` would print.

It talks to the admin address directly: ``http.client`` never reads ``HTTP_PROXY``-style variables, which a
container often inherits and which would send the probe somewhere else (urllib.request would honour them).
"""

from __future__ import annotations

import os

from rabbitproxy.addresses import DEFAULT_ADMIN_LISTEN, DEFAULT_CONFIG_FILE, format_host_port, split_host_port

# Not ``typing.TYPE_CHECKING``: importing typing costs the probe a few milliseconds; mypy honours the name anyway.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

EXIT_HEALTHY = 0
EXIT_UNHEALTHY = 1
EXIT_CONFIG = 2
HEALTHZ_PATH = "/healthz"
# /healthz answers with a tiny JSON object; anything much larger is not our admin API.
MAX_BODY = 64 * 1024
# A wildcard listen address cannot be connected to; the probe runs beside the proxy, so loopback reaches it.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


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

    The usual table (strings and a boolean, a listen address that parses) is read here with ``tomllib``. Anything
    else, including a file that cannot be read or parsed, goes to :func:`rabbitproxy.config.load_admin`, which
    either raises the error ``serve`` would raise (as :class:`AdminConfigError`) or accepts what pydantic accepts
    (``enabled = "false"``, say), so the probe never disagrees with the proxy about the address. A file that is
    not UTF-8 is refused here, naming the first bad byte, as ``check-config`` names it.
    """
    import tomllib

    section: object = None
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError:
        pass
    else:
        try:
            # Universal newlines, as Path.read_text gives ``serve`` its text.
            text = data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
        except UnicodeDecodeError as exc:
            from rabbitproxy.config import ConfigError

            raise AdminConfigError(str(ConfigError([f"not UTF-8 at byte {exc.start}"], _shown(os.fspath(path)))))
        try:
            section = tomllib.loads(text).get("admin", {})
        except tomllib.TOMLDecodeError:
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
    from urllib.parse import urlsplit

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
        raw = f"http://{format_host_port(host, port)}"
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


def check(url: str, timeout: float) -> HealthResult:
    """GET ``url``: healthy only on HTTP 200 with a JSON body whose ``status`` is ``"ok"``.

    ``http.client`` writes the Host header itself, with an IPv6 literal in brackets (``[::1]:9080``), which the
    admin API's loopback guard needs to recognise it.
    """
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = kind(host, parts.port, timeout=timeout)
    try:
        conn.request("GET", parts.path or HEALTHZ_PATH, headers={"Accept": "application/json"})
        resp = conn.getresponse()
        status, body = resp.status, resp.read(MAX_BODY)
    except http.client.HTTPException as exc:
        # Before OSError: RemoteDisconnected is both, and a peer that hangs up without a word is not HTTP either.
        return HealthResult(False, f"{url}: not an HTTP answer ({type(exc).__name__} {str(exc).strip()!r})")
    except OSError as exc:
        # A timeout is an OSError too; say how long we waited, which "timed out" alone does not.
        reason = f"no answer within {timeout:g}s" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
        return HealthResult(False, f"{url}: {reason}")
    finally:
        conn.close()
    shown = _status_of(body)
    if status == 200 and shown == "ok":
        return HealthResult(True, f"{url}: ok")
    if shown is None:
        shown = body[:200].decode("utf-8", "replace").strip() or "(empty body)"
    return HealthResult(False, f"{url}: HTTP {status}, status {shown}")


def _status_of(body: bytes) -> str | None:
    import json

    try:
        data = json.loads(body)
    except ValueError:
        return None
    status = data.get("status") if isinstance(data, dict) else None
    return status if isinstance(status, str) else None
