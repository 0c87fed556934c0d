"""The admin API: JSON over HTTP, Prometheus metrics and the System Overview page, inside the proxy's own loop.

It runs on aiohttp's ``AppRunner(handle_signals=False)`` + ``TCPSite`` so that signals stay with ``serve()`` and
the API sees the live :class:`~rabbitproxy.control.supervisor.Supervisor` without any copying or locking: every
handler runs on the same event loop as the data path. It changes backends only through
:class:`~rabbitproxy.balancing.pool.Backend` methods.

Access: with a token configured (``[admin] token`` or ``RABBITPROXY_ADMIN_TOKEN``) every ``/api`` and ``/metrics``
request must carry ``Authorization: Bearer <token>``; ``/healthz`` and the page itself do not (the page asks for the
token). Changes are only accepted as PATCH/POST with a JSON body, which a cross-site HTML form cannot send, and a
browser ``Origin`` that is not this server's own is refused.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

from rabbitproxy.admin import connections
from rabbitproxy.admin.metrics import registry_for, render
from rabbitproxy.admin.readiness import health_status
from rabbitproxy.balancing.pool import ADMIN_STATES, AdminState, Backend, Connection, NodeView
from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.config import AdminConfig, ConfigError, split_host_port
from rabbitproxy.control.supervisor import ReloadRefusedError

if TYPE_CHECKING:
    from rabbitproxy.control.supervisor import Supervisor
    from rabbitproxy.relay.service import Service

log = structlog.get_logger("rabbitproxy.admin")

TOKEN_ENV = "RABBITPROXY_ADMIN_TOKEN"  # noqa: S105 - the variable's name, not a secret
PROXY_KEY: web.AppKey[Supervisor] = web.AppKey("proxy")
TOKEN_KEY: web.AppKey[str | None] = web.AppKey("token", str)
REGISTRY_KEY: web.AppKey[CollectorRegistry] = web.AppKey("registry", CollectorRegistry)
# Bodies are a handful of fields; anything bigger is a mistake or an attack.
MAX_BODY = 64 * 1024
# A drain deadline longer than a week is a typo, not a plan.
MAX_DEADLINE = 7 * 24 * 3600


# -- token ---------------------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals; any other name may resolve to a public address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def admin_token(cfg: AdminConfig, env: Mapping[str, str] | None = None) -> str | None:
    """The bearer token in force (config first, then the environment); ConfigError if one is needed and missing."""
    environ = os.environ if env is None else env
    token = cfg.token or environ.get(TOKEN_ENV) or None
    host, _ = split_host_port(cfg.listen)
    if token is None and not is_loopback(host):
        raise ConfigError(
            [
                f"admin.token: required because admin.listen ({cfg.listen}) is not a loopback address; "
                f"set [admin] token or {TOKEN_ENV}"
            ]
        )
    return token


# -- views ---------------------------------------------------------------------------------------------------------


def backend_view(backend: Backend) -> dict[str, Any]:
    """Everything an operator wants to know about one backend, as JSON-ready data."""
    traffic_in, traffic_out = backend.traffic()
    return {
        "name": backend.name,
        "address": backend.address,
        "port": backend.port,
        "backup": backend.backup,
        "status": backend.status,
        "weight": backend.configured_weight,
        "configured_weight": backend.config.weight,
        "weight_overridden": backend.weight_overridden,
        "effective_weight": backend.effective_weight,
        "health": {
            "status": "up" if backend.healthy else "down",
            "detail": backend.health_detail,
            "time": backend.health_time,
            "duration": backend.check_duration,
        },
        "admin_state": backend.admin_state,
        "operator_state": backend.operator_state,
        "agent": {
            "state": backend.agent_state,
            "status": backend.agent_status,
            "detail": backend.agent_detail,
            "percent": backend.agent_percent,
            "reply": backend.agent_reply,
            "duration": backend.agent_duration,
        },
        "connections": {"active": backend.active, "total": backend.total, "connect_errors": backend.connect_errors},
        "rebalance_hold": backend.rebalance_hold,
        "bytes": {"in": traffic_in, "out": traffic_out},
        "slow_start": _slow_start_view(backend),
        "rabbitmq": rabbitmq_view(backend.rabbitmq),
    }


def _slow_start_view(backend: Backend) -> dict[str, Any] | None:
    """The running slow-start ramp, or None when none runs (or slow start is off)."""
    start = backend.ramp_start
    if start is None or not backend.slow_start:
        return None
    elapsed = time.monotonic() - start
    return {
        "seconds": backend.slow_start,
        "elapsed": round(elapsed, 3),
        "remaining": max(0.0, backend.slow_start - elapsed),
    }


def rabbitmq_view(node: NodeView | None) -> dict[str, Any] | None:
    """What the node monitor knows of the backend's RabbitMQ node; None without [services.rabbitmq]."""
    if node is None:
        return None
    stats = node.stats
    return {
        "node": node.node,
        "version": node.version,
        "alarms": list(node.alarms),
        "maintenance": node.maintenance,
        "maintenance_detail": node.maintenance_detail,
        "management": {"status": node.status, "detail": node.detail},
        "poll_time": node.poll_time,
        "stats_time": node.stats_time,
        "fd": {"used": stats.fd_used, "total": stats.fd_total} if stats else None,
        "sockets": {"used": stats.sockets_used, "total": stats.sockets_total} if stats else None,
        "memory": {"used": stats.mem_used, "limit": stats.mem_limit} if stats else None,
        "processes": {"used": stats.proc_used, "total": stats.proc_total} if stats else None,
    }


def service_view(service: Service) -> dict[str, Any]:
    cfg = service.config
    return {
        "name": service.name,
        "listen": cfg.listen,
        "bound": [f"{h}:{p}" for h, p in service.bound],
        "balance": cfg.balance,
        "accepting": service.accepting,
        "health_check": cfg.health_check.type,
        "feedback": cfg.feedback.type,
        "rabbitmq": cfg.rabbitmq is not None,
        "slow_start": cfg.slow_start,
        "connections": {"active": service.active, "total": service.total},
        "ended": dict(sorted(service.ended.items())),
        "backends": [backend_view(b) for b in service.pool.backends],
    }


def _steered_backend(proxy: Supervisor, service: str, view: dict[str, Any]) -> dict[str, Any]:
    """A backend's view plus what the control plane steers: the seconds left of a drain's deadline, the hold."""
    view["drain_deadline"] = proxy.steering.deadline_left(service, view["name"])
    return view


def _steered(proxy: Supervisor, service: str, view: dict[str, Any]) -> dict[str, Any]:
    for b in view["backends"]:
        _steered_backend(proxy, service, b)
    return view


# -- helpers ---------------------------------------------------------------------------------------------------------


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def _who(request: web.Request) -> str:
    return request.remote or "unknown"


async def _json_body(request: web.Request) -> Any:
    """The request's JSON body, or a 400/415 response raised as an exception."""
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(
            text=json.dumps({"error": "send a JSON body with Content-Type: application/json"}),
            content_type="application/json",
        )
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": f"body is not valid JSON: {exc}"}), content_type="application/json"
        ) from None


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


@web.middleware
async def _guard(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    token = request.app[TOKEN_KEY]
    path = request.path
    if token is not None and (path.startswith("/api") or path == "/metrics"):
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        # compare_digest: the time taken must not tell an attacker how much of a guess was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            return web.json_response(
                {"error": "a valid bearer token is required (Authorization: Bearer <token>)"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="rabbitproxy"'},
            )
    if token is None and not _host_is_loopback(request):
        # Without a token the API listens on loopback only, so any other Host is a DNS-rebinding page (evil.example
        # resolving to 127.0.0.1) whose Origin matches its own Host and would pass the check below.
        log.warning("admin request refused: foreign Host", host=request.host, who=_who(request))
        return _error(403, "requests must address the admin API by a loopback address or localhost")
    if request.method not in ("GET", "HEAD", "OPTIONS") and not _origin_ok(request):
        log.warning("admin request refused: foreign origin", origin=request.headers.get("Origin"), who=_who(request))
        return _error(403, "cross-origin requests are not accepted")
    return await handler(request)


# -- handlers --------------------------------------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    status = health_status(request.app[PROXY_KEY])
    return web.json_response({"status": status}, status=200 if status == "ok" else 503)


async def livez(request: web.Request) -> web.Response:
    # Liveness only: the loop answers. A proxy whose nodes are all down is not helped by a restart.
    return web.json_response({"status": "alive", "state": request.app[PROXY_KEY].state})


async def list_services(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    views = [_steered(proxy, s.name, service_view(s)) for s in proxy.services.values()]
    return web.json_response({"state": proxy.state, "services": views})


def _find(proxy: Supervisor, service_name: str, backend_name: str | None = None) -> tuple[Service, Backend | None]:
    service = proxy.services.get(service_name)
    if service is None:
        raise web.HTTPNotFound(
            text=json.dumps({"error": f"no service named {service_name!r}"}), content_type="application/json"
        )
    if backend_name is None:
        return service, None
    backend = service.pool.by_name.get(backend_name)
    if backend is None:
        raise web.HTTPNotFound(
            text=json.dumps({"error": f"service {service_name!r} has no backend named {backend_name!r}"}),
            content_type="application/json",
        )
    return service, backend


async def get_service(request: web.Request) -> web.Response:
    service, _ = _find(request.app[PROXY_KEY], request.match_info["service"])
    return web.json_response(_steered(request.app[PROXY_KEY], service.name, service_view(service)))


async def get_backend(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    service, backend = _find(proxy, request.match_info["service"], request.match_info["backend"])
    assert backend is not None
    return web.json_response(_steered_backend(proxy, service.name, backend_view(backend)))


@dataclass(frozen=True, slots=True)
class BackendPatch:
    """A checked PATCH body."""

    state: AdminState | None = None
    weight: int | None = None
    # Seconds until a drain closes what is still open (through the broker when [services.rabbitmq] is set).
    deadline: float | None = None
    # Skip the quorum guard.
    force: bool = False


def _validate_patch(body: Any) -> tuple[BackendPatch, list[str]]:
    """Check a PATCH body completely before anything is changed; return the patch and the errors."""
    if not isinstance(body, dict):
        return BackendPatch(), ['body must be a JSON object such as {"state": "drain"} or {"weight": 50}']
    errors: list[str] = []
    unknown = sorted(set(body) - {"state", "weight", "deadline", "force"})
    if unknown:
        errors.append(f"unknown field(s): {', '.join(unknown)} (only state, weight, deadline and force are accepted)")
    if "state" not in body and "weight" not in body:
        errors.append("give state and/or weight")
    state = body.get("state")
    if "state" in body and state not in ADMIN_STATES:
        errors.append(f"state must be one of {', '.join(ADMIN_STATES)}, not {state!r}")
    weight = body.get("weight")
    if "weight" in body and (isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 1000):
        errors.append(f"weight must be a whole number from 0 to 1000, not {weight!r}")
    deadline = body.get("deadline")
    if deadline is not None:
        if isinstance(deadline, bool) or not isinstance(deadline, int | float) or not 0 < deadline <= MAX_DEADLINE:
            errors.append(f"deadline must be a number of seconds above 0, at most {MAX_DEADLINE}, not {deadline!r}")
        elif state != "drain":
            errors.append('deadline goes with "state": "drain" only')
    force = body.get("force", False)
    if not isinstance(force, bool):
        errors.append(f"force must be true or false, not {force!r}")
    patch = BackendPatch(
        state=state if state in ADMIN_STATES else None,
        weight=weight if isinstance(weight, int) and not isinstance(weight, bool) else None,
        deadline=float(deadline) if isinstance(deadline, int | float) and not isinstance(deadline, bool) else None,
        force=force is True,
    )
    return patch, errors


async def patch_backend(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    names = request.match_info["service"], request.match_info["backend"]
    _find(proxy, *names)
    body = await _json_body(request)
    patch, errors = _validate_patch(body)
    if errors:
        return _error(400, "; ".join(errors), errors=errors)
    # Looked up again after the await: a reload may have swapped in new Backend objects meanwhile, and a change
    # made to the discarded one would be lost although answered with 200. From here on nothing awaits.
    service, backend = _find(proxy, *names)
    assert backend is not None
    who = _who(request)
    state = patch.state
    if state in ("drain", "maint") and backend.operator_state == "ready":
        # The guard is asked when a backend leaves service, not again when it moves from drain to maint.
        if patch.force:
            log.warning("quorum guard skipped (force)", service=service.name, backend=backend.name, who=who)
        else:
            refusal = await proxy.steering.quorum_guard(service, backend)
            if refusal is not None:
                log.warning(
                    "backend state refused by the quorum guard",
                    service=service.name,
                    backend=backend.name,
                    state=state,
                    status=refusal.status,
                    queues=list(refusal.queues),
                    who=who,
                )
                return _error(refusal.status, refusal.message, queues=list(refusal.queues))
            # The check awaited the broker: a reload may have replaced the service or the backend meanwhile.
            service, backend = _find(proxy, request.match_info["service"], request.match_info["backend"])
            assert backend is not None
    result: dict[str, Any] = {"closed_connections": 0}
    if patch.weight is not None:
        old_weight = backend.configured_weight
        backend.set_weight(patch.weight)
        log.info(
            "backend weight set",
            service=service.name,
            backend=backend.name,
            weight=patch.weight,
            previous=old_weight,
            who=who,
        )
    if state is not None:
        old_state = backend.operator_state
        result = proxy.steering.set_state(service, backend, state, patch.deadline)
        if state != "ready":
            # Clients still connecting to it go to another backend now; closed_connections counts the attached ones.
            service.cancel_connects_to(backend)
        log.info(
            "backend state set",
            service=service.name,
            backend=backend.name,
            state=state,
            previous=old_state,
            who=who,
            forced=patch.force,
            **result,
        )
    return web.json_response(_steered_backend(proxy, service.name, backend_view(backend)) | result)


async def reload(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    await _json_body(request)
    who = _who(request)
    log.info("reload requested", who=who, path=str(proxy.config_path) if proxy.config_path else None)
    try:
        result = await proxy.reload()
    except ReloadRefusedError as exc:
        # Not the file's fault: the proxy is stopping. 409, so a client does not "fix" a valid file.
        log.warning("reload refused", reason="; ".join(exc.errors), who=who)
        return _error(409, "; ".join(exc.errors), errors=exc.errors)
    except ConfigError as exc:
        log.error("reload refused, the running configuration stays", errors=exc.errors, who=who)
        return _error(400, "invalid configuration; nothing was changed", errors=exc.errors)
    return web.json_response({"status": "reloaded", **result.as_dict()})


def _live(proxy: Supervisor) -> Iterator[tuple[str, Connection]]:
    """Every open connection of the configured services, with its service's name.

    A service a reload removed is no longer listed while its last connections drain.
    """
    for name, service in proxy.services.items():
        for conn in service.connections:
            yield name, conn


def _find_connection(proxy: Supervisor, raw_id: str) -> tuple[Service, Connection]:
    conn_id = int(raw_id) if raw_id.isascii() and raw_id.isdigit() else None
    found = connections.find(_live(proxy), conn_id) if conn_id is not None else None
    if found is None:
        raise web.HTTPNotFound(
            text=json.dumps({"error": f"no open connection with id {raw_id!r}"}), content_type="application/json"
        )
    return proxy.services[found[0]], found[1]


async def list_connections(request: web.Request) -> web.Response:
    try:
        query = connections.ConnectionQuery.from_params(request.query)
    except connections.QueryError as exc:
        return _error(400, str(exc), errors=exc.errors)
    return web.json_response(connections.select(_live(request.app[PROXY_KEY]), query, time.monotonic()))


async def get_connection(request: web.Request) -> web.Response:
    service, conn = _find_connection(request.app[PROXY_KEY], request.match_info["id"])
    return web.json_response(connections.connection_view(service.name, conn, time.monotonic()))


async def delete_connection(request: web.Request) -> web.Response:
    """Close one connection: through the broker (320 and the reason) with [services.rabbitmq], else by TCP."""
    unknown = sorted(set(request.query) - {"reason"})
    if unknown:
        return _error(400, f"unknown parameter(s): {', '.join(unknown)} (only reason)")
    try:
        text = connections.reason_text(request.query.get("reason"))
    except ValueError as exc:
        return _error(400, str(exc))
    service, conn = _find_connection(request.app[PROXY_KEY], request.match_info["id"])
    view = connections.connection_view(service.name, conn, time.monotonic())
    outcome = await request.app[PROXY_KEY].steering.close_one(service, conn, CloseReason.OPERATOR_CLOSE, text)
    fields = {
        "id": view["id"],
        "service": service.name,
        "backend": view["backend"],
        "client": view["client"],
        "user": view["user"],
        "connection_name": view["connection_name"],
        "reason": text,
        "via": outcome.via,
        "detail": outcome.detail,
        "who": _who(request),
    }
    if outcome.via == "tcp" and service.config.rabbitmq is not None:
        # Configured to close through the broker and it could not: the client saw a reset, not our reason.
        log.warning("connection closed by TCP, not through the broker", **fields)
    else:
        log.info("connection closed by operator", **fields)
    return web.json_response(
        {"id": view["id"], "service": service.name, "reason": text, "via": outcome.via, "detail": outcome.detail}
    )


async def metrics(request: web.Request) -> web.Response:
    body, content_type = render(request.app[REGISTRY_KEY])
    # prometheus-client's content type carries a version parameter that aiohttp wants passed as a header.
    return web.Response(body=body, headers={"Content-Type": content_type})


async def overview(request: web.Request) -> web.Response:
    page = resources.files("rabbitproxy").joinpath("admin/static/overview.html").read_bytes()
    return web.Response(
        body=page,
        content_type="text/html",
        charset="utf-8",
        # The page embeds its own script; nothing may be loaded from elsewhere, and no other site may frame it.
        headers={
            "Content-Security-Policy": (
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                "connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'"
            ),
            "Cache-Control": "no-store",
        },
    )


# -- application -----------------------------------------------------------------------------------------------------


def make_app(proxy: Supervisor, token: str | None) -> web.Application:
    app = web.Application(middlewares=[_guard], client_max_size=MAX_BODY)
    app[PROXY_KEY] = proxy
    app[TOKEN_KEY] = token
    app[REGISTRY_KEY] = registry_for(proxy)
    app.router.add_get("/", overview)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/livez", livez)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/services", list_services)
    app.router.add_get("/api/services/{service}", get_service)
    app.router.add_get("/api/services/{service}/backends/{backend}", get_backend)
    app.router.add_patch("/api/services/{service}/backends/{backend}", patch_backend)
    app.router.add_post("/api/reload", reload)
    app.router.add_get("/api/connections", list_connections)
    app.router.add_get("/api/connections/{id}", get_connection)
    app.router.add_delete("/api/connections/{id}", delete_connection)
    return app


class AdminServer:
    """The running admin API; ``cleanup()`` closes its socket and open requests."""

    def __init__(self, runner: web.AppRunner, site: web.TCPSite) -> None:
        self.runner = runner
        self.site = site

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [(str(a[0]), int(a[1])) for a in self.runner.addresses]

    async def cleanup(self) -> None:
        await self.runner.cleanup()


async def start_admin(proxy: Supervisor) -> AdminServer:
    """Start the admin API on ``[admin] listen``; ConfigError if it cannot listen there."""
    cfg = proxy.config.admin
    token = admin_token(cfg)
    host, port = split_host_port(cfg.listen)
    runner = web.AppRunner(make_app(proxy, token), handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError([f"admin.listen: cannot listen on {cfg.listen}: {exc.strerror or exc}"]) from None
    server = AdminServer(runner, site)
    log.info("admin API listening", listen=cfg.listen, token=token is not None)
    return server
