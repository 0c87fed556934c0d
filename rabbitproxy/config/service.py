"""A service (``[[services]]``) and its backends, and the whole file (:class:`Config`): the cross-key checks."""

from __future__ import annotations

import ipaddress
import os
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, ValidationInfo, field_validator

from rabbitproxy.addresses import DEFAULT_PORT, split_host_port
from rabbitproxy.config.base import (
    Port,
    PositiveSeconds,
    ProxyProtocolVersion,
    Seconds,
    WholeSeconds,
    _Model,
    check_host,
)
from rabbitproxy.config.files import ca_file
from rabbitproxy.config.rabbitmq import RabbitMQConfig, RebalanceConfig
from rabbitproxy.config.sections import AdminConfig, FeedbackConfig, HealthCheckConfig, LogConfig, TLSConfig
from rabbitproxy.durations import GRAMMAR, duration_seconds

# ``source_address = "client"``: transparent mode.
SOURCE_CLIENT = "client"


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
    # protocol = "stream": the proxy's own port for this node. Connections to it always go to this backend, and
    # the node's advertised stream address is rewritten to it (rabbitproxy.relay.stream).
    node_port: Port | None = None
    # New connections per second to this backend (0 = no limit of its own; the service's connect_rate still applies).
    connect_rate: Annotated[float, Field(ge=0)] = 0.0

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        # "[fd00::1]" is accepted as the IPv6 address it brackets: the form every host:port in the file uses.
        if v.startswith("[") and v.endswith("]"):
            try:
                return str(ipaddress.IPv6Address(v[1:-1]))
            except ValueError:
                raise ValueError(f"{v!r} is not a valid IPv6 address") from None
        return check_host(v)


Algorithm = Literal["weighted-round-robin", "least-connections", "source-hash"]


class KeepaliveConfig(_Model):
    """TCP keepalive probes on both legs of every connection (``tcp_keepalive = { idle, interval, count }``)."""

    # Linux takes whole seconds for TCP_KEEPIDLE/TCP_KEEPINTVL (at most 32767) and at most 127 probes.
    idle: Annotated[WholeSeconds, Field(ge=1, le=32767)] = 60
    interval: Annotated[WholeSeconds, Field(ge=1, le=32767)] = 10
    count: Annotated[int, Field(ge=1, le=127)] = 6


class ServiceConfig(_Model):
    name: str = Field(min_length=1, max_length=128)
    # "l7": this process relays each connection. "l4-nat": the kernel DNATs the listen address to the backends by
    # weight, from an nftables table this process programs (rabbitproxy.control.l4); see docs/configuration.md.
    mode: Literal["l7", "l4-nat"] = "l7"
    listen: str = f"0.0.0.0:{DEFAULT_PORT}"
    balance: Algorithm = "weighted-round-robin"
    connect_timeout: PositiveSeconds = 5.0
    retries: Annotated[int, Field(ge=0, le=100)] = 2
    max_connections: Annotated[int, Field(ge=1)] = 10000
    # Admission control (rabbitproxy.balancing.admission): new backend connections per second (0 = unpaced), how
    # many may go at once above the rate (0 = a tenth of the rate, at least 1), and how long a client over the rate
    # is held before it is closed ("admission timeout"). Held clients count against max_connections.
    connect_rate: Annotated[float, Field(ge=0)] = 0.0
    connect_burst: Annotated[int, Field(ge=0)] = 0
    connect_queue_timeout: PositiveSeconds = 30.0
    # "amqp": the AMQP 0-9-1 handshake is read as it passes (identity, failed logins, heartbeat); "tcp": bytes only;
    # "stream": RabbitMQ's stream protocol, whose nodes' advertised addresses are rewritten to the proxy's.
    protocol: Literal["amqp", "tcp", "stream"] = "amqp"
    # protocol = "stream": the host name or address stream clients are told to reach this proxy by; "" is the
    # address each client connected to.
    advertised_host: str = ""
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
    # validate_default: a file that lowers high_water alone below this default is checked too.
    low_water: int = Field(default=64 * 1024, ge=0, validate_default=True)
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
    health_check: HealthCheckConfig = Field(default_factory=HealthCheckConfig, validate_default=True)
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

    @field_validator("backend_tls_ca")
    @classmethod
    def _backend_ca(cls, v: str, info: ValidationInfo) -> str:
        if v and info.data.get("backend_tls") is False:
            raise ValueError("needs backend_tls = true")
        return ca_file(v)

    @field_validator("advertised_host")
    @classmethod
    def _advertised_host(cls, v: str) -> str:
        return check_host(v) if v else v

    @field_validator("health_check")
    @classmethod
    def _stream_check(cls, v: HealthCheckConfig, info: ValidationInfo) -> HealthCheckConfig:
        if info.data.get("protocol") != "stream":
            if v.type == "stream":
                raise ValueError('type = "stream" checks a stream listener: it needs protocol = "stream"')
            return v
        if v.type == "amqp":
            if "type" in v.model_fields_set:
                raise ValueError('an "amqp" check speaks AMQP 0-9-1, which a stream listener does not: use "stream"')
            # The default check of a stream service is the stream handshake, not AMQP's.
            return v.model_copy(update={"type": "stream"})
        return v

    @field_validator("client_idle_timeout", mode="before")
    @classmethod
    def _idle(cls, v: Any) -> Any:
        # One message for both forms, instead of pydantic's two-part union error.
        if v == "auto":
            return v
        try:
            return duration_seconds(v)
        except ValueError:
            raise ValueError(f'must be "auto" or a duration (0 = off): {GRAMMAR}; not {v!r}') from None

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
    def _server_name(cls, v: str, info: ValidationInfo) -> str:
        if v and info.data.get("backend_tls") is False:
            raise ValueError("needs backend_tls = true")
        return check_host(v) if v else v

    @field_validator("backend_tls")
    @classmethod
    def _tls_and_proxy_header(cls, v: bool, info: ValidationInfo) -> bool:
        if v and info.data.get("send_proxy_protocol") in ("v1", "v2"):
            # The header would have to go out in clear before the TLS handshake; not supported (yet).
            raise ValueError("cannot be combined with send_proxy_protocol")
        return v

    @field_validator("low_water")
    @classmethod
    def _low_water(cls, v: int, info: ValidationInfo) -> int:
        high = info.data.get("high_water")
        if high is not None and v > high:
            raise ValueError(f"{v} must not exceed high_water ({high})")
        return v

    @field_validator("rebalance")
    @classmethod
    def _rebalance(cls, v: RebalanceConfig, info: ValidationInfo) -> RebalanceConfig:
        # Only when rabbitmq itself is valid (absent from info.data otherwise) and missing.
        if v.enabled and "rabbitmq" in info.data and info.data["rabbitmq"] is None:
            raise ValueError("enabled = true needs [services.rabbitmq]: connections are closed through the broker")
        return v

    @field_validator("tcp_keepalive", mode="before")
    @classmethod
    def _keepalive(cls, v: Any) -> Any:
        # TOML has no null: the switch is a boolean, the settings a table. None is "off" too: it is what a
        # validated model dumps for ``false``, and serve validates the file's settings again after merging flags.
        if v is False or v is None:
            return None
        if v is True:
            return {}
        return v

    @property
    def node_listens(self) -> list[tuple[str, str, int]]:
        """(backend name, host, port) of every node_port listener: on the service's listen host."""
        host = self.listen_host
        return [(b.name, host, b.node_port) for b in self.backends if b.node_port is not None]

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


def _workers(v: Any) -> Any:
    # One message for both forms, instead of pydantic's two-part union error.
    if v == "auto" or (type(v) is int and 1 <= v <= 256):
        return v
    raise ValueError(f'must be "auto" or a number of processes from 1 to 256, not {v!r}')


Workers = Annotated[int | Literal["auto"], BeforeValidator(_workers)]


class Config(_Model):
    admin: AdminConfig = AdminConfig()
    log: LogConfig = LogConfig()
    # Data-path processes sharing each listener (SO_REUSEPORT); "auto" is one per core this process may run on.
    # 1 is the single-process proxy, with no worker code on its path. See docs/architecture.md, "Worker processes".
    workers: Workers = 1
    # The nftables table (family ip) that services with mode = "l4-nat" are programmed into; no other table is
    # touched. Two proxies in one network namespace need two names.
    nft_table: str = Field(default="rabbitproxy", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
    services: list[ServiceConfig] = Field(min_length=1)

    @property
    def worker_count(self) -> int:
        """``workers`` as a number: "auto" is the number of cores this process may run on."""
        if self.workers == "auto":
            return max(1, len(os.sched_getaffinity(0)))
        return self.workers

    def service(self, name: str) -> ServiceConfig:
        for s in self.services:
            if s.name == name:
                return s
        raise KeyError(name)
