"""Configuration: frozen, validated data and nothing else.

Phase one of the two-phase config (uvicorn's ``Config`` / ``Config.load()``): this module turns a TOML file, or
the handful of values a command line gives, into immutable pydantic models. Sockets, tasks and SSL contexts are
built from these models later, by the server. Every error names the key path that is wrong and why, so an
operator can fix the file without reading our code.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

# Re-exported: callers have always found these here; the one copy lives in the stdlib-only addresses module.
from rabbitproxy.addresses import DEFAULT_ADMIN_LISTEN as DEFAULT_ADMIN_LISTEN
from rabbitproxy.addresses import DEFAULT_PORT as DEFAULT_PORT
from rabbitproxy.addresses import format_host_port as format_host_port
from rabbitproxy.addresses import split_host_port as split_host_port

# ``source_address = "client"``: transparent mode.
SOURCE_CLIENT = "client"


class ConfigError(Exception):
    """The configuration is invalid; ``errors`` holds one ``"key.path: reason"`` line per problem."""

    def __init__(self, errors: list[str], source: str = "") -> None:
        self.errors = errors
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(where + "invalid configuration:\n" + "\n".join(f"  {e}" for e in errors))


# Letters, digits and hyphens per label (RFC 1123), plus the underscore: Docker Compose v1 container names and
# other local names carry one, and the system resolver looks them up without complaint.
_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


def check_host(host: str) -> str:
    """Return ``host`` if it is an IP literal or could be a DNS name, else raise ``ValueError`` saying why.

    Only the shape is checked, nothing is looked up. A name that fails here would fail every connect and every
    check (getaddrinfo raises ``UnicodeError`` for an empty or over-long label, before any lookup), so it is
    refused when the configuration is read. Non-ASCII names are refused too: write them in their ``xn--`` form.
    """
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    # One trailing dot is the fully qualified form of the same name.
    name = host.removesuffix(".")
    if not name:
        raise ValueError(f"{host!r} is not a host name or IP address")
    if len(name) > 253:
        raise ValueError(f"{host[:40]!r}...: a host name has at most 253 characters, this one {len(name)}")
    for label in name.split("."):
        if not label:
            raise ValueError(f"{host!r} is not a valid host name: empty label (two dots in a row, or a leading dot)")
        if len(label) > 63:
            raise ValueError(f"{host!r} is not a valid host name: label {label[:20]!r}... is longer than 63 characters")
        if not _LABEL_CHARS.issuperset(label):
            bad = next(c for c in label if c not in _LABEL_CHARS)
            raise ValueError(
                f"{host!r} is not a valid host name: {bad!r} (only letters, digits, '-', '_' and '.' are allowed;"
                " write an international name in its xn-- form)"
            )
        if label.startswith("-") or label.endswith("-"):
            raise ValueError(f"{host!r} is not a valid host name: label {label!r} starts or ends with '-'")
    return host


class _Model(BaseModel):
    # Unknown keys are errors: a misspelt option that is silently ignored is worse than a refusal to start.
    model_config = ConfigDict(extra="forbid", frozen=True)


Seconds = Annotated[float, Field(ge=0)]
PositiveSeconds = Annotated[float, Field(gt=0)]
Port = Annotated[int, Field(gt=0, lt=65536)]


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
    type: Literal["tcp", "amqp", "http", "none"] = "amqp"
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


ProxyProtocolVersion = Literal["off", "v1", "v2"]
TLSVersion = Literal["TLSv1.2", "TLSv1.3"]


def _existing_file(v: str) -> str:
    # Phase one checks that the file is there, so a typo is reported with its key; reading it is phase two's job.
    if v and not Path(v).is_file():
        raise ValueError(f"{v!r} does not exist or is not a file")
    return v


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

    _ca = field_validator("ca")(_existing_file)

    @model_validator(mode="after")
    def _ca_needs_https(self) -> RabbitMQConfig:
        if self.ca and self.scheme != "https":
            raise ValueError('ca needs scheme = "https"')
        return self


class RebalanceConfig(_Model):
    """``[services.rebalance]``: close connections on a node holding more than its share, through the broker."""

    enabled: bool = False
    # Act when a backend holds more than (1 + tolerance) x its fair share of the service's connections ...
    tolerance: Annotated[float, Field(gt=0)] = 0.25
    # ... for this many seconds.
    after: Seconds = 30.0


class BackendConfig(_Model):
    name: str = Field(min_length=1, max_length=128)
    address: str = Field(min_length=1)
    port: Port | None = None
    weight: Annotated[int, Field(ge=0, le=1000)] = 100
    backup: bool = False
    check_port: Port | None = None
    agent_port: Port | None = None
    # 0 = no limit; a backend at its limit is skipped by the balancer.
    max_connections: Annotated[int, Field(ge=0)] = 0
    # Overrides the service's send_proxy_protocol for this backend only.
    send_proxy_protocol: ProxyProtocolVersion | None = None
    # This node's management API port, when it differs from [services.rabbitmq] management_port.
    management_port: Port | None = None

    _address = field_validator("address")(check_host)


Algorithm = Literal["weighted-round-robin", "least-connections", "source-hash"]


class KeepaliveConfig(_Model):
    """TCP keepalive probes on both legs of every connection (``tcp_keepalive = { idle, interval, count }``)."""

    # Linux takes whole seconds for TCP_KEEPIDLE/TCP_KEEPINTVL (at most 32767) and at most 127 probes.
    idle: Annotated[int, Field(ge=1, le=32767)] = 60
    interval: Annotated[int, Field(ge=1, le=32767)] = 10
    count: Annotated[int, Field(ge=1, le=127)] = 6


class ServiceConfig(_Model):
    name: str = Field(min_length=1, max_length=128)
    listen: str = f"0.0.0.0:{DEFAULT_PORT}"
    balance: Algorithm = "weighted-round-robin"
    connect_timeout: PositiveSeconds = 5.0
    retries: Annotated[int, Field(ge=0, le=100)] = 2
    max_connections: Annotated[int, Field(ge=1)] = 10000
    # "amqp": the AMQP 0-9-1 handshake is read as it passes (identity, failed logins, heartbeat); "tcp": bytes only.
    protocol: Literal["amqp", "tcp"] = "amqp"
    # "auto": 2.5 x the heartbeat the client negotiated (AMQP services; off for "tcp"); a number: seconds; 0 = off.
    client_idle_timeout: float | Literal["auto"] = "auto"
    # The address backend connections come from: "" (the kernel's choice), an IP of this host, or "client" for
    # transparent mode (each backend connection comes from its client's own address; rabbitproxy.relay.transparent).
    source_address: str = ""
    shutdown_timeout: Seconds = 30.0
    # Seconds a close may spend flushing to a peer that does not read before both legs are aborted. Not 0: a
    # close that drops what is buffered at once would cut every AMQP Connection.Close in flight.
    close_timeout: PositiveSeconds = 10.0
    # None (written ``tcp_keepalive = false``) turns keepalive off; ``true`` means the defaults.
    tcp_keepalive: KeepaliveConfig | None = KeepaliveConfig()
    # Write-buffer limits per leg: above high_water the other leg stops reading until we drop below low_water.
    high_water: Annotated[int, Field(ge=1024)] = 256 * 1024
    low_water: Annotated[int, Field(ge=0)] = 64 * 1024
    backlog: Annotated[int, Field(ge=1)] = 1024
    # Bind the listen address even when this host does not own it (yet): the standby of a keepalived pair listens
    # on the VIP before the VIP arrives (IP_FREEBIND; Linux only).
    freebind: bool = False
    # A client must send the 8-byte AMQP protocol header within this many seconds (0 = no limit).
    client_hello_timeout: Seconds = 10.0
    send_proxy_protocol: ProxyProtocolVersion = "off"
    accept_proxy_protocol: bool = False
    # The sources (CIDRs or addresses) whose PROXY headers are believed: the load balancers in front of us.
    proxy_protocol_from: list[str] = Field(default_factory=list, validate_default=True)
    tls: TLSConfig | None = None
    backend_tls: bool = False
    backend_tls_ca: str = ""
    backend_tls_server_name: str = ""
    backend_tls_verify: bool = True
    health_check: HealthCheckConfig = HealthCheckConfig()
    feedback: FeedbackConfig = FeedbackConfig()
    # Seconds over which a backend that becomes usable ramps from about 10 % to its full weight; 0 = off.
    slow_start: Seconds = 0.0
    rabbitmq: RabbitMQConfig | None = None
    rebalance: RebalanceConfig = RebalanceConfig()
    backends: list[BackendConfig] = Field(min_length=1)

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        check_host(split_host_port(v, DEFAULT_PORT)[0])
        return v

    @field_validator("source_address")
    @classmethod
    def _source(cls, v: str) -> str:
        if v and v != SOURCE_CLIENT:
            try:
                ipaddress.ip_address(v)
            except ValueError:
                raise ValueError(
                    f"{v!r} is not an IP address (or {SOURCE_CLIENT!r} for transparent mode, or empty)"
                ) from None
        return v

    _backend_ca = field_validator("backend_tls_ca")(_existing_file)

    @field_validator("client_idle_timeout", mode="before")
    @classmethod
    def _idle(cls, v: Any) -> Any:
        # One message for both forms, instead of pydantic's two-part union error.
        if v == "auto":
            return v
        if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
            raise ValueError(f'must be "auto" or a number of seconds >= 0 (0 = off), not {v!r}')
        return float(v)

    @field_validator("proxy_protocol_from")
    @classmethod
    def _proxy_from(cls, v: list[str], info: ValidationInfo) -> list[str]:
        for text in v:
            try:
                ipaddress.ip_network(text, strict=True)
            except ValueError as exc:
                # ip_network's own words say what is wrong ("has host bits set", "does not appear to be ...").
                raise ValueError(f"{text!r} is not a network (CIDR) or IP address: {exc}") from None
        if info.data.get("accept_proxy_protocol") and not v:
            # Without it anyone who reaches the port could send a header and pick the address we log, hash and
            # pass on to RabbitMQ.
            raise ValueError(
                "required with accept_proxy_protocol = true: the addresses or CIDRs of the load balancers whose"
                ' PROXY headers are trusted, e.g. ["10.0.0.0/8"]'
            )
        return v

    @field_validator("backend_tls_server_name")
    @classmethod
    def _server_name(cls, v: str) -> str:
        return check_host(v) if v else v

    @field_validator("tcp_keepalive", mode="before")
    @classmethod
    def _keepalive(cls, v: Any) -> Any:
        # TOML has no null: the switch is a boolean, the settings a table.
        if v is False:
            return None
        if v is True:
            return {}
        if v is None:
            raise ValueError("must be false, true or a table { idle, interval, count }")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ServiceConfig:
        if not self.backend_tls and (self.backend_tls_ca or self.backend_tls_server_name):
            raise ValueError("backend_tls_ca and backend_tls_server_name need backend_tls = true")
        if self.backend_tls and any(self.proxy_protocol_for(b) != "off" for b in self.backends):
            # The header would have to go out in clear before the TLS handshake; not supported (yet).
            raise ValueError("send_proxy_protocol cannot be combined with backend_tls")
        if self.low_water > self.high_water:
            raise ValueError(f"low_water ({self.low_water}) must not exceed high_water ({self.high_water})")
        if self.rebalance.enabled and self.rabbitmq is None:
            raise ValueError("rebalance.enabled needs [services.rabbitmq]: connections are closed through the broker")
        seen: set[str] = set()
        for b in self.backends:
            if b.name in seen:
                raise ValueError(f"backend name {b.name!r} is used twice")
            seen.add(b.name)
        return self

    @property
    def heartbeat_idle(self) -> bool:
        """Whether idle clients are timed by their negotiated heartbeat (``client_idle_timeout = "auto"``)."""
        return self.client_idle_timeout == "auto" and self.protocol == "amqp"

    @property
    def idle_seconds(self) -> float:
        """The fixed idle timeout in seconds; 0 when off or when it follows the heartbeat ("auto")."""
        v = self.client_idle_timeout
        return 0.0 if v == "auto" else v

    @property
    def listen_host(self) -> str:
        return split_host_port(self.listen, DEFAULT_PORT)[0]

    @property
    def listen_port(self) -> int:
        return split_host_port(self.listen, DEFAULT_PORT)[1]

    @property
    def proxy_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """``proxy_protocol_from`` parsed (parsed on every call: the running service keeps its own copy)."""
        return tuple(ipaddress.ip_network(text) for text in self.proxy_protocol_from)

    def backend_port(self, backend: BackendConfig) -> int:
        """A backend without a port uses the service's listen port (no port translation)."""
        return backend.port if backend.port is not None else self.listen_port

    def management_port_for(self, backend: BackendConfig) -> int | None:
        """The port of ``backend``'s management API, or None when [services.rabbitmq] is not configured."""
        if self.rabbitmq is None:
            return None
        return backend.management_port or self.rabbitmq.management_port

    def proxy_protocol_for(self, backend: BackendConfig) -> ProxyProtocolVersion:
        """The PROXY protocol version sent to ``backend``: its own setting, else the service's."""
        return backend.send_proxy_protocol or self.send_proxy_protocol


class Config(_Model):
    admin: AdminConfig = AdminConfig()
    log: LogConfig = LogConfig()
    services: list[ServiceConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> Config:
        names: set[str] = set()
        listens: dict[tuple[str, int], str] = {}
        for s in self.services:
            if s.name in names:
                raise ValueError(f"service name {s.name!r} is used twice")
            names.add(s.name)
            key = (s.listen_host, s.listen_port)
            if key in listens:
                raise ValueError(f"services {listens[key]!r} and {s.name!r} both listen on {s.listen}")
            listens[key] = s.name
        return self

    def service(self, name: str) -> ServiceConfig:
        for s in self.services:
            if s.name == name:
                return s
        raise KeyError(name)


def _loc(config: Mapping[str, Any], loc: Iterable[int | str]) -> str:
    """Render a pydantic error location with service and backend names instead of bare list indexes."""
    parts: list[str] = []
    node: Any = config
    for item in loc:
        if isinstance(item, int):
            name = None
            if isinstance(node, list) and 0 <= item < len(node) and isinstance(node[item], Mapping):
                name = node[item].get("name")
            parts[-1] += f"[{name!r}]" if isinstance(name, str) else f"[{item}]"
            node = node[item] if isinstance(node, list) and 0 <= item < len(node) else None
        else:
            parts.append(item)
            node = node.get(item) if isinstance(node, Mapping) else None
    return ".".join(parts) or "(top level)"


def _errors(exc: ValidationError, data: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[str]:
    """One ``"key.path: reason"`` line per pydantic error; ``prefix`` places a sub-model's errors in the file."""
    errors = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        errors.append(f"{_loc(data, (*prefix, *err['loc']))}: {msg}")
    return errors


def validate(data: Mapping[str, Any], source: str = "") -> Config:
    """Validate a parsed mapping; raise :class:`ConfigError` naming every bad key."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_errors(exc, data), source) from None


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and parse a TOML file, unvalidated; raise :class:`ConfigError` if it cannot be read or parsed."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read the file: {exc.strerror or exc}"], str(p)) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"TOML syntax: {exc}"], str(p)) from None


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML configuration file."""
    return validate(read_toml(path), str(Path(path)))


def load_admin(path: str | os.PathLike[str]) -> AdminConfig:
    """Read a configuration file's ``[admin]`` table, validated exactly as :func:`load` validates it.

    ``rabbitproxy healthcheck`` comes here when its own stdlib reading finds anything unusual in that table, so
    its error messages (and any coercion, such as ``enabled = "false"``) are the ones ``serve`` would give.
    The rest of the file is not checked: the probe asks the running proxy, ``check-config`` judges the file.
    """
    data = read_toml(path)
    try:
        return AdminConfig.model_validate(data.get("admin", {}))
    except ValidationError as exc:
        raise ConfigError(_errors(exc, data, ("admin",)), str(Path(path))) from None


def parse_backend_spec(spec: str, index: int) -> dict[str, Any]:
    """Parse a command-line backend: ``host``, ``host:port``, ``[v6]:port``, each optionally ``=weight``."""
    address, sep, weight = spec.partition("=")
    host, port = split_host_port(address, default_port=0)
    out: dict[str, Any] = {"name": f"backend{index + 1}", "address": host}
    if port:
        out["port"] = port
    if sep:
        if not weight.strip().isdigit():
            raise ValueError(f"{spec!r}: weight after '=' must be a whole number")
        out["weight"] = int(weight)
    return out


def from_env(env: Mapping[str, str]) -> dict[str, Any] | None:
    """Build a one-service config mapping from ``RABBITPROXY_BACKENDS`` (and friends), or None if unset.

    This is what a container without a config file runs on: ``RABBITPROXY_BACKENDS="rabbit1:5672,rabbit2:5672"``,
    optional ``RABBITPROXY_LISTEN``, ``RABBITPROXY_ADMIN_LISTEN`` and ``RABBITPROXY_HEALTH_CHECK``.
    """
    backends = env.get("RABBITPROXY_BACKENDS", "").strip()
    if not backends:
        return None
    specs = [s.strip() for s in backends.split(",") if s.strip()]
    service: dict[str, Any] = {
        "name": env.get("RABBITPROXY_SERVICE_NAME", "amqp"),
        "listen": env.get("RABBITPROXY_LISTEN", f"0.0.0.0:{DEFAULT_PORT}"),
        "backends": [parse_backend_spec(s, i) for i, s in enumerate(specs)],
    }
    if "RABBITPROXY_HEALTH_CHECK" in env:
        service["health_check"] = {"type": env["RABBITPROXY_HEALTH_CHECK"]}
    data: dict[str, Any] = {"services": [service]}
    if "RABBITPROXY_ADMIN_LISTEN" in env:
        data["admin"] = {"listen": env["RABBITPROXY_ADMIN_LISTEN"]}
    return data


def with_overrides(data: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of ``data`` with dotted-key overrides applied (``"log.level": "debug"``).

    Only options the user actually passed reach here, so a flag never resets a file value to a default
    (hypercorn's ``__main__`` rule).
    """
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    for key, value in overrides.items():
        section, _, leaf = key.partition(".")
        if not leaf:
            out[section] = value
            continue
        sub = out.setdefault(section, {})
        sub[leaf] = value
    return out
