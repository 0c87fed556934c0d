"""A backend's steering state as plain data: what the supervising process pushes to its worker processes.

With ``workers > 1`` the health checks, agents, node monitors and the admin API run in one process and the data
path in others (docs/architecture.md, "Worker processes"). The workers' :class:`Backend` objects take no verdicts
of their own: they copy these fields from the supervisor's. Pure and JSON-ready, so a unit test can build, encode
and apply one without a process.

Times cross as they are: ``ramp_start`` is ``time.monotonic()``, which on Linux is CLOCK_MONOTONIC, one clock for
every process of the machine, so a worker computes the same slow-start weight at the same moment as its
supervisor, without a push per step of the ramp.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from rabbitproxy.balancing.backend import ADMIN_STATES, AdminState, Backend

# The fields copied, in the order of the encoded list (a list, not a dict: one snapshot holds every backend).
FIELDS = (
    "healthy",
    "check_drain",
    "operator_state",
    "agent_state",
    "agent_percent",
    "agent_down",
    "configured_weight",
    "weight_overridden",
    "ramp_start",
    "usable_before",
    "stream_advertised",
)
# Not ``rebalance_hold``: each worker's rebalancer balances its own connections and sets its own holds. Not
# ``health_time`` either: it changes with every check, verdict or not, and a worker only needs to know whether the
# backend was checked at all (Backend.observe); sending the time would make every check a change to push.


def backend_state(backend: Backend) -> list[Any]:
    """``backend``'s steering state: :data:`FIELDS`, whether it was checked, the node's maintenance and alarms."""
    out: list[Any] = [getattr(backend, f) for f in FIELDS]
    out.append(backend.health_time is not None)
    node = backend.rabbitmq
    out.append(None if node is None else [node.maintenance, list(node.alarms)])
    return out


def pool_state(backends: list[Backend]) -> dict[str, list[Any]]:
    return {b.name: backend_state(b) for b in backends}


States = dict[str, dict[str, list[Any]]]


def state_changes(old: States | None, new: States) -> States:
    """The backends of ``new`` (service name -> backend name -> state) whose state differs from ``old``'s."""
    if old is None:
        return new
    out: States = {}
    for sname, backends in new.items():
        before = old.get(sname, {})
        changed = {bname: state for bname, state in backends.items() if before.get(bname) != state}
        if changed:
            out[sname] = changed
    return out


@dataclass(frozen=True, slots=True)
class Change:
    """What an applied state means for a worker's connections to that backend."""

    entered_maint: bool = False
    marked_down: bool = False
    # No longer usable for new connections (drain, maint, down): connects in flight to it are sent on.
    unusable: bool = False


def _admin(value: Any) -> AdminState:
    if value not in ADMIN_STATES:
        raise ValueError(f"admin state {value!r} is not one of {', '.join(ADMIN_STATES)}")
    state: AdminState = value
    return state


def apply_backend_state(backend: Backend, state: list[Any]) -> Change:
    """Copy ``state`` onto ``backend`` in one step (no await can come between) and say what changed.

    Raises ValueError when ``state`` does not have the shape :func:`backend_state` gives, before changing anything.
    """
    if len(state) != len(FIELDS) + 2:
        raise ValueError(f"a backend state has {len(FIELDS) + 2} fields, not {len(state)}")
    values = dict(zip(FIELDS, state, strict=False))
    operator_state = _admin(values["operator_state"])
    agent_state = _admin(values["agent_state"])
    node = state[-1]
    was_usable = backend.usable
    was_maint = backend.admin_state == "maint"
    was_down = not backend.healthy or backend.agent_down is not None
    advertised = values.pop("stream_advertised")
    for name, value in values.items():
        if name not in ("operator_state", "agent_state"):
            setattr(backend, name, value)
    if isinstance(advertised, list | tuple) and len(advertised) == 2:
        # What the supervisor's check learnt; a worker that learnt it from a connection first keeps its own
        # until then (None never overwrites it).
        backend.stream_advertised = (str(advertised[0]), int(advertised[1]))
    backend.operator_state = operator_state
    backend.agent_state = agent_state
    # The worker's own health_time only says "checked"; the parent keeps, and reports, the real time.
    backend.health_time = (backend.health_time or 0.0) if state[-2] else None
    if node is not None and backend.rabbitmq is not None:
        maintenance, alarms = node
        backend.rabbitmq = dataclasses.replace(backend.rabbitmq, maintenance=bool(maintenance), alarms=tuple(alarms))
    down = not backend.healthy or backend.agent_down is not None
    return Change(
        entered_maint=backend.admin_state == "maint" and not was_maint,
        marked_down=down and not was_down,
        unusable=was_usable and not backend.usable,
    )
