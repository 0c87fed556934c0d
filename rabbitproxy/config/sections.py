"""The small sections of the configuration: logging, the admin API, health checks, feedback agents, TLS."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from rabbitproxy.addresses import DEFAULT_ADMIN_LISTEN, split_host_port
from rabbitproxy.config.base import Port, PositiveSeconds, TLSVersion, _existing_file, _Model, check_host


class LogConfig(_Model):
    format: Literal["console", "json"] = "console"
    level: Literal["debug", "info", "warning", "error"] = "info"


class AdminConfig(_Model):
    listen: str = DEFAULT_ADMIN_LISTEN
    token: str | None = None
    enabled: bool = True
    # A file that holds 0 while /healthz would answer ok and 1 otherwise, for keepalived's track_file ("" = none).
    health_file: str = ""

    @field_validator("health_file")
    @classmethod
    def _health_file(cls, v: str) -> str:
        if v and not Path(v).is_absolute():
            raise ValueError(f"{v!r} must be an absolute path")
        return v

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        check_host(split_host_port(v)[0])
        return v


class HealthCheckConfig(_Model):
    # "stream" (stream services): peer properties, SASL handshake, then login and open to learn the node's
    # advertised address (a failed login leaves the node up: its listener answered).
    type: Literal["tcp", "amqp", "http", "stream", "none"] = "amqp"
    # The virtual host a "stream" check opens.
    vhost: str = "/"
    interval: PositiveSeconds = 2.0
    timeout: PositiveSeconds = 1.0
    rise: Annotated[int, Field(ge=1, le=100)] = 2
    fall: Annotated[int, Field(ge=1, le=100)] = 3
    on_marked_down: Literal["close", "keep"] = "close"
    url: str = "http://{address}:15672/api/health/checks/protocol-listener/amqp"
    username: str = "guest"
    password: str = "guest"  # noqa: S105 - RabbitMQ's default, only valid from loopback

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        try:
            v.format(address="h", port=1)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"only {{address}} and {{port}} may be used in the template ({exc})") from None
        return v


class FeedbackConfig(_Model):
    type: Literal["agent", "http", "none"] = "none"
    port: Port = 3333
    interval: PositiveSeconds = 2.0
    timeout: PositiveSeconds = 1.0
    # The HTTP variant GETs this path on the agent port and reads the integer in the body.
    path: str = "/"


class TLSConfig(_Model):
    """TLS termination on a service's listener (AMQPS in front of plain AMQP backends)."""

    cert: str = Field(min_length=1)
    key: str = Field(min_length=1)
    # CA bundle for client certificates; with it, verify_client decides whether a certificate is required.
    ca: str = ""
    verify_client: Literal["none", "optional", "required"] = "none"
    min_version: TLSVersion = "TLSv1.2"

    _files = field_validator("cert", "key", "ca")(_existing_file)

    @model_validator(mode="after")
    def _client_ca(self) -> TLSConfig:
        if self.verify_client != "none" and not self.ca:
            raise ValueError(f"verify_client = {self.verify_client!r} needs ca (the CA that signs client certificates)")
        return self
