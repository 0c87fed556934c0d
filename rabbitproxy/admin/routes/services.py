"""``/api/services``: every service and backend, and an operator's PATCH of a backend's state or weight."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from rabbitproxy.admin.common import PROXY_KEY, error, json_body, who
from rabbitproxy.admin.views import backend_view, service_view, steered, steered_backend
from rabbitproxy.balancing.backend import ADMIN_STATES, AdminState, Backend

if TYPE_CHECKING:
    from rabbitproxy.control.supervisor import Supervisor
    from rabbitproxy.relay.service import Service

log = structlog.get_logger("rabbitproxy.admin")

# A drain deadline longer than a week is a typo, not a plan.
MAX_DEADLINE = 7 * 24 * 3600


async def list_services(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    views = [steered(proxy, s.name, service_view(s)) for s in proxy.services.values()]
    return web.json_response({"state": proxy.state, "services": views})


def find(proxy: Supervisor, service_name: str, backend_name: str | None = None) -> tuple[Service, Backend | None]:
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
    service, _ = find(request.app[PROXY_KEY], request.match_info["service"])
    return web.json_response(steered(request.app[PROXY_KEY], service.name, service_view(service)))


async def get_backend(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    service, backend = find(proxy, request.match_info["service"], request.match_info["backend"])
    assert backend is not None
    return web.json_response(steered_backend(proxy, service.name, backend_view(backend)))


@dataclass(frozen=True, slots=True)
class BackendPatch:
    """A checked PATCH body."""

    state: AdminState | None = None
    weight: int | None = None
    # Seconds until a drain closes what is still open (through the broker when [services.rabbitmq] is set).
    deadline: float | None = None
    # Skip the quorum guard.
    force: bool = False


def validate_patch(body: Any) -> tuple[BackendPatch, list[str]]:
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
    find(proxy, *names)
    body = await json_body(request)
    patch, errors = validate_patch(body)
    if errors:
        return error(400, "; ".join(errors), errors=errors)
    # Looked up again after the await: a reload may have swapped in new Backend objects meanwhile, and a change
    # made to the discarded one would be lost although answered with 200. From here on nothing awaits.
    service, backend = find(proxy, *names)
    assert backend is not None
    caller = who(request)
    state = patch.state
    if state in ("drain", "maint") and backend.operator_state == "ready":
        # The guard is asked when a backend leaves service, not again when it moves from drain to maint.
        if patch.force:
            log.warning("quorum guard skipped (force)", service=service.name, backend=backend.name, who=caller)
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
                    who=caller,
                )
                return error(refusal.status, refusal.message, queues=list(refusal.queues))
            # The check awaited the broker: a reload may have replaced the service or the backend meanwhile.
            service, backend = find(proxy, request.match_info["service"], request.match_info["backend"])
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
            who=caller,
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
            who=caller,
            forced=patch.force,
            **result,
        )
    # With workers = N the workers copy the new state now, not at the next poll.
    proxy.state_changed()
    return web.json_response(steered_backend(proxy, service.name, backend_view(backend)) | result)


async def reset_backend(request: web.Request) -> web.Response:
    """Drop a backend's runtime weight: the configuration's weight applies again (and the state file forgets it)."""
    proxy = request.app[PROXY_KEY]
    await json_body(request)
    service, backend = find(proxy, request.match_info["service"], request.match_info["backend"])
    assert backend is not None
    previous = backend.configured_weight if backend.weight_overridden else None
    backend.clear_weight_override()
    log.info(
        "backend weight override reset",
        service=service.name,
        backend=backend.name,
        previous=previous,
        weight=backend.configured_weight,
        who=who(request),
    )
    proxy.state_changed()
    return web.json_response(steered_backend(proxy, service.name, backend_view(backend)))
