"""``[services.rabbitmq]`` and ``[services.rebalance]``: what the proxy reads from and does through the brokers."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator

from rabbitproxy.config.base import Port, PositiveSeconds, Seconds, _Model
from rabbitproxy.config.files import ca_file


class RabbitMQConfig(_Model):
    """``[services.rabbitmq]``: read each node's state from its management API and act on it.

    Without this table nothing below is active and no management API is ever asked.
    """

    # Each backend's management API is on this port of its address, unless the backend sets management_port.
    management_port: Port = 15672
    scheme: Literal["http", "https"] = "http"
    # CA bundle for an https management API; empty = the system's trust store.
    ca: str = ""
    # Reading node state needs the "monitoring" tag; closing other users' connections needs "administrator"
    # (see docs/configuration.md for the least privilege).
    username: str = "guest"
    password: str = "guest"  # noqa: S105 - RabbitMQ's default, only valid from loopback
    interval: PositiveSeconds = 5.0
    timeout: PositiveSeconds = 2.0
    # Percent of its weight a node keeps for new connections while it has a local memory or disk alarm.
    alarm_weight: Annotated[int, Field(ge=0, le=100)] = 0
    # At most this many connections per second closed by drains and the rebalancer (through the broker).
    close_rate: Annotated[float, Field(gt=0)] = 20.0
    # Refuse drain/maint of a node that quorum queues need for their majority, unless forced.
    quorum_guard: bool = True

    @field_validator("ca")
    @classmethod
    def _ca(cls, v: str, info: ValidationInfo) -> str:
        if v and info.data.get("scheme") == "http":
            raise ValueError('needs scheme = "https"')
        return ca_file(v)


class RebalanceConfig(_Model):
    """``[services.rebalance]``: close connections on a node holding more than its share, through the broker."""

    enabled: bool = False
    # Act when a backend holds more than (1 + tolerance) x its fair share of the service's connections ...
    tolerance: Annotated[float, Field(gt=0)] = 0.25
    # ... for this many seconds.
    after: Seconds = 30.0
