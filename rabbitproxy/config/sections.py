"""The small sections of the configuration: logging, the admin API, health checks, feedback agents, TLS."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator

from rabbitproxy.addresses import DEFAULT_ADMIN_LISTEN, split_host_port
from rabbitproxy.config.base import Port, PositiveSeconds, TLSVersion, _Model, check_host
from rabbitproxy.config.files import ca_file, certificate_file, key_file


class LogConfig(_Model):
    # "auto": coloured console output at a terminal, JSON lines anywhere else.
    format: Literal["auto", "console", "json"] = "auto"
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

    # Scoped access (docs/operations.md, "Access levels"): token may do everything, read_token only GET.
    read_token: str | None = None
    # A unix socket for the API beside listen ("" = none); whoever may open it is an operator, as with HAProxy's
    # stats socket, so its owner, group and mode are the access control.
    socket: str = ""
    socket_mode: str = "0660"
    socket_owner: str = ""
    socket_group: str = ""
    # Operator changes (state, weight overrides) are kept here across restarts ("" = not kept).
    state_file: str = ""

    @field_validator("socket", "state_file")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if v and not Path(v).is_absolute():
            raise ValueError(f"{v!r} must be an absolute path")
        return v

    @field_validator("socket_mode", mode="before")
    @classmethod
    def _mode(cls, v: object) -> str:
        # TOML has octal integers (0o660) as well as strings ("0660"); a decimal 660 is almost surely meant as octal.
        if isinstance(v, int) and not isinstance(v, bool):
            if not 0 <= v <= 0o777:
                raise ValueError(f'{v} is not a file mode: write it in octal, as "0660" or 0o660')
            return f"{v:04o}"
        if not isinstance(v, str):
            raise ValueError(f'{v!r} is not an octal file mode such as "0660"')
        try:
            mode = int(v, 8)
        except ValueError:
            raise ValueError(f'{v!r} is not an octal file mode such as "0660"') from None
        if not 0 <= mode <= 0o777:
            raise ValueError(f"{v!r} is not a file mode from 0000 to 0777")
        return v

    @field_validator("read_token")
    @classmethod
    def _read_token(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and v == info.data.get("token"):
            raise ValueError("must differ from token, or a reader could do everything")
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

    _cert = field_validator("cert")(certificate_file)
    _key = field_validator("key")(key_file)
    _ca = field_validator("ca")(ca_file)

    @field_validator("verify_client")
    @classmethod
    def _client_ca(cls, v: str, info: ValidationInfo) -> str:
        # A field validator rather than a model one, so it is reported along with any other error of the table.
        if v != "none" and info.data.get("ca") == "":
            raise ValueError(f"{v!r} needs ca (the CA that signs client certificates)")
        return v
