"""Who may use the admin API: two bearer tokens, loopback-only without one, the unix socket, no foreign Host or Origin.

Two levels: the operator may do everything, a reader only GET (and HEAD). With a token configured (``[admin] token``
or ``RABBITPROXY_ADMIN_TOKEN`` for the operator, ``[admin] read_token`` or ``RABBITPROXY_ADMIN_READ_TOKEN`` for
readers) every ``/api`` and ``/metrics`` request must carry ``Authorization: Bearer <token>``; ``/healthz`` and the
page itself do not (the page asks for the token). A reader's change is refused with 403. Without any token the API
listens on loopback only and every caller there is the operator. On the unix socket (``[admin] socket``) every
caller is the operator: the file's owner, group and mode decide who may connect, as with HAProxy's stats socket.

Changes are only accepted as PATCH/POST/DELETE with a JSON body or none, which a cross-site HTML form cannot send,
and a browser ``Origin`` that is not this server's own is refused. Each ``/api`` and ``/metrics`` answer says the
caller's level in ``X-Rabbitproxy-Access`` (``operator`` or ``read``), so the page hides the buttons of a reader.
"""

from __future__ import annotations

import hmac
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import structlog
from aiohttp import web

from rabbitproxy.admin.common import READ_TOKEN_KEY, TOKEN_KEY, error, who
from rabbitproxy.config import (
    READ_TOKEN_ENV,
    TOKEN_ENV,
    AdminConfig,
    ConfigError,
    admin_token_error,
    is_loopback,
)

log = structlog.get_logger("rabbitproxy.admin")

# TOKEN_ENV, READ_TOKEN_ENV and is_loopback are re-exported from here, where callers have always found them.
__all__ = ["READ_TOKEN_ENV", "TOKEN_ENV", "Tokens", "admin_token", "admin_tokens", "guard", "is_loopback"]

ACCESS_HEADER = "X-Rabbitproxy-Access"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


@dataclass(frozen=True, slots=True)
class Tokens:
    """The bearer tokens in force: the operator's and the readers' (None = not configured)."""

    operator: str | None
    read: str | None


def admin_tokens(cfg: AdminConfig, env: Mapping[str, str] | None = None) -> Tokens:
    """Both tokens (config first, then the environment); ConfigError if the API would be open off loopback."""
    environ = os.environ if env is None else env
    # The rule itself is the configuration's, so check-config and a reload judge a file exactly as this does.
    problem = admin_token_error(cfg, environ)
    if problem is not None:
        raise ConfigError([problem])
    return Tokens(cfg.token or environ.get(TOKEN_ENV) or None, cfg.read_token or environ.get(READ_TOKEN_ENV) or None)


def admin_token(cfg: AdminConfig, env: Mapping[str, str] | None = None) -> str | None:
    """The operator's bearer token in force; ConfigError if one is needed and missing."""
    return admin_tokens(cfg, env).operator


def _origin_ok(request: web.Request) -> bool:
    """A browser's Origin must name this very server; non-browser clients send none."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == request.host.lower()


def _host_is_loopback(request: web.Request) -> bool:
    host = urlsplit(f"//{request.host}").hostname or ""
    return is_loopback(host)


def _via_unix_socket(request: web.Request) -> bool:
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    return sock is not None and sock.family == socket.AF_UNIX


def _bearer_level(request: web.Request) -> str | None:
    """``operator`` or ``read`` for a valid bearer token, None for none or a wrong one."""
    token, read = request.app[TOKEN_KEY], request.app[READ_TOKEN_KEY]
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    raw = given.strip().encode()
    # compare_digest: the time taken must not tell an attacker how much of a guess was right. Both are compared,
    # so the time does not tell which of the two tokens a guess came close to either.
    is_operator = token is not None and hmac.compare_digest(raw, token.encode())
    is_reader = read is not None and hmac.compare_digest(raw, read.encode())
    return "operator" if is_operator else "read" if is_reader else None


def _unauthorized() -> web.Response:
    return web.json_response(
        {"error": "a valid bearer token is required (Authorization: Bearer <token>)"},
        status=401,
        headers={"WWW-Authenticate": 'Bearer realm="rabbitproxy"'},
    )


@web.middleware
async def guard(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    path = request.path
    guarded = path.startswith("/api") or path == "/metrics"
    open_api = request.app[TOKEN_KEY] is None and request.app[READ_TOKEN_KEY] is None
    level: str | None
    if _via_unix_socket(request):
        # Whoever could open the socket passed its file permissions: that is the access control here.
        level = "operator"
    elif open_api:
        if not _host_is_loopback(request):
            # Without a token the API listens on loopback only, so any other Host is a DNS-rebinding page
            # (evil.example resolving to 127.0.0.1) whose Origin matches its own Host and would pass the check below.
            log.warning("admin request refused: foreign Host", host=request.host, who=who(request))
            return error(403, "requests must address the admin API by a loopback address or localhost")
        level = "operator"
    else:
        level = _bearer_level(request)
        if level is None and guarded:
            return _unauthorized()
    if guarded and request.method not in SAFE_METHODS and level != "operator":
        log.warning("admin change refused: read-only token", method=request.method, path=path, who=who(request))
        return error(
            403,
            "the read-only token (admin.read_token) may only read; a change needs the operator's token "
            "(admin.token) or the admin socket (admin.socket)",
        )
    if request.method not in SAFE_METHODS and not _origin_ok(request):
        log.warning("admin request refused: foreign origin", origin=request.headers.get("Origin"), who=who(request))
        return error(403, "cross-origin requests are not accepted")
    response = await handler(request)
    if guarded and level is not None:
        response.headers[ACCESS_HEADER] = level
    return response
