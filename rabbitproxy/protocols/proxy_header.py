"""PROXY protocol v1 and v2: building headers to send to backends, and sans-IO reading of received ones.

Written from HAProxy's proxy-protocol specification. Only TCP over IPv4/IPv6 carries addresses here; other
families are read (so the stream stays in sync) but reported without addresses. v2 TLVs are skipped.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

from rabbitproxy.protocols.sansio import NEED_DATA, NeedData

__all__ = [
    "DEFAULT_MAX_V2_LENGTH",
    "NEED_DATA",
    "V1_MAX_LENGTH",
    "V2_SIGNATURE",
    "Address",
    "NeedData",
    "ProxyHeader",
    "ProxyHeaderReader",
    "ProxyProtocolError",
    "build_v1",
    "build_v2",
    "build_v2_local",
    "check_header",
    "header_for",
    "looks_like_header",
    "source_trusted",
]

Address: TypeAlias = tuple[str, int]

V1_PREFIX: Final = b"PROXY "
# The longest possible v1 line ("PROXY TCP6" with two full-length IPv6 addresses and ports), CRLF included.
V1_MAX_LENGTH: Final = 107

V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED = struct.Struct(">12sBBH")  # signature, version/command, family/transport, address block length
_V2_VERSION: Final = 0x2
_V2_LOCAL: Final = 0x0
_V2_PROXY: Final = 0x1
_AF_UNSPEC: Final = 0x0
_AF_INET: Final = 0x1
_AF_INET6: Final = 0x2
_AF_UNIX: Final = 0x3
_STREAM: Final = 0x1
_V2_INET = struct.Struct(">4s4sHH")
_V2_INET6 = struct.Struct(">16s16sHH")
_V2_UNIX_LENGTH: Final = 216
_V2_ADDRESS_LENGTHS: Final = {_AF_INET: _V2_INET.size, _AF_INET6: _V2_INET6.size, _AF_UNIX: _V2_UNIX_LENGTH}

# The specification allows up to 65535 bytes of addresses and TLVs; a load balancer in front of us has no
# reason to send more than a few hundred, so we refuse to buffer much more than that from an unknown peer.
DEFAULT_MAX_V2_LENGTH: Final = 2048

_V1_ALLOWED: Final = frozenset(range(0x20, 0x7F))


class ProxyProtocolError(ValueError):
    """The peer sent something that is not a valid PROXY protocol header."""


_IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A complete PROXY header and the stream bytes that followed it.

    `src`/`dst` are None for the LOCAL command (a health check by the proxy itself), for v1 UNKNOWN and for
    families other than IPv4/IPv6: the receiver then uses the connection's real addresses. `rest` is the start
    of the real stream, received together with the header; it must be processed as such.
    """

    version: int
    command: Literal["proxy", "local"]
    src: Address | None
    dst: Address | None
    rest: bytes


# --- building ------------------------------------------------------------------------------------------


def _endpoint(address: Address, role: str) -> tuple[_IPAddress, int]:
    host, port = address
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{role} address {host!r} is not an IP address") from None
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"{role} port {port!r} is not in 0..65535")
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        # A zone index is meaningful only on this host; neither header format can carry it.
        ip = ipaddress.IPv6Address(ip.packed)
    return ip, port


def _endpoints(src: Address, dst: Address) -> tuple[tuple[_IPAddress, int], tuple[_IPAddress, int]]:
    (src_ip, src_port), (dst_ip, dst_port) = _endpoint(src, "source"), _endpoint(dst, "destination")
    if src_ip.version != dst_ip.version:
        # Both headers carry one family for both ends; IPv4-mapped IPv6 is the lossless common form.
        if isinstance(src_ip, ipaddress.IPv4Address):
            src_ip = ipaddress.IPv6Address(f"::ffff:{src_ip}")
        else:
            dst_ip = ipaddress.IPv6Address(f"::ffff:{dst_ip}")
    return (src_ip, src_port), (dst_ip, dst_port)


def build_v1(src: Address | None, dst: Address | None) -> bytes:
    """The v1 (text) header for a TCP connection from `src` to `dst`, as (host, port) pairs.

    Either address None gives "PROXY UNKNOWN". Hosts must be IP addresses; an IPv6 zone index is dropped and a
    mix of IPv4 and IPv6 is sent as IPv6 with the IPv4 side mapped (::ffff:a.b.c.d). Invalid input (our own
    bug, not a peer's) raises ValueError.
    """
    if src is None or dst is None:
        return b"PROXY UNKNOWN\r\n"
    (src_ip, src_port), (dst_ip, dst_port) = _endpoints(src, dst)
    family = "TCP4" if src_ip.version == 4 else "TCP6"
    return f"PROXY {family} {src_ip} {dst_ip} {src_port} {dst_port}\r\n".encode("ascii")


def build_v2(src: Address | None, dst: Address | None) -> bytes:
    """The v2 (binary) PROXY-command header for a TCP connection from `src` to `dst`.

    Either address None gives an AF_UNSPEC header without addresses. Address handling is as for build_v1.
    """
    command = (_V2_VERSION << 4) | _V2_PROXY
    if src is None or dst is None:
        return _V2_FIXED.pack(V2_SIGNATURE, command, (_AF_UNSPEC << 4) | _AF_UNSPEC, 0)
    (src_ip, src_port), (dst_ip, dst_port) = _endpoints(src, dst)
    if src_ip.version == 4:
        family, block = _AF_INET, _V2_INET
    else:
        family, block = _AF_INET6, _V2_INET6
    addresses = block.pack(src_ip.packed, dst_ip.packed, src_port, dst_port)
    return _V2_FIXED.pack(V2_SIGNATURE, command, (family << 4) | _STREAM, len(addresses)) + addresses


def build_v2_local() -> bytes:
    """The v2 LOCAL-command header: a connection made by the proxy itself, such as a health check."""
    return _V2_FIXED.pack(V2_SIGNATURE, (_V2_VERSION << 4) | _V2_LOCAL, (_AF_UNSPEC << 4) | _AF_UNSPEC, 0)


def header_for(version: Literal["v1", "v2"], src: Address | None, dst: Address | None) -> bytes:
    """The header a proxy sends first on a backend connection for the client ``src`` that connected to ``dst``.

    Addresses that cannot be carried (not IP literals, such as a Unix socket's path) give the address-less form
    (v1 UNKNOWN, v2 AF_UNSPEC), which tells the backend to use the connection's own endpoints.
    """
    build = build_v1 if version == "v1" else build_v2
    try:
        return build(src, dst)
    except ValueError:
        return build(None, None)


def check_header(version: Literal["v1", "v2"], local: Address, peer: Address) -> bytes:
    """The header a health check sends on its own connection from ``local`` to ``peer``.

    A real PROXY header with the check's own endpoints, not LOCAL or UNKNOWN: RabbitMQ (3.10 at least) resets a
    connection whose header is v2 LOCAL, v2 AF_UNSPEC or v1 UNKNOWN, so those would fail every check.
    """
    return header_for(version, local, peer)


# --- reading -------------------------------------------------------------------------------------------


Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


def source_trusted(host: str, networks: tuple[Network, ...]) -> bool:
    """True when ``host`` (a peer's IP address as text) lies in one of ``networks``.

    An IPv4-mapped IPv6 peer (``::ffff:10.0.0.5``, what a dual-stack listener reports for an IPv4 client) is
    matched as the IPv4 address it is, so ``10.0.0.0/8`` covers it. Anything that is not an IP address is not
    trusted.
    """
    try:
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    # An address is never "in" a network of the other version (False, not an error).
    return any(addr in net for net in networks)


def looks_like_header(data: bytes | bytearray) -> bool | None:
    """Whether a stream starting with ``data`` starts with a PROXY header: True, False, or None (too early to say).

    Only the fixed start is compared ("PROXY " or the 12-byte v2 signature), so the answer for an AMQP client
    ("AMQP...") is False from its first byte.
    """
    for start in (V1_PREFIX, V2_SIGNATURE):
        n = min(len(data), len(start))
        if data[:n] == start[:n]:
            return True if n == len(start) else None
    return False


def _short(data: bytes | bytearray, limit: int = 40) -> str:
    return repr(bytes(data[:limit])) + ("..." if len(data) > limit else "")


class ProxyHeaderReader:
    """Reads one PROXY header (v1 or v2, detected from the first byte) from the start of a stream.

    Feed bytes with `receive_data()` (`b""` when the peer closed) and call `next_event()`: it returns
    NEED_DATA until the header is complete, then the `ProxyHeader`, whose `rest` holds the stream bytes that
    followed. The reader is then finished; feeding or asking it for more is a programming error
    (RuntimeError). Anything that cannot be a valid header raises ProxyProtocolError as soon as the bytes
    received show it.
    """

    __slots__ = ("_buffer", "_done", "_eof", "_error", "_max_v2_length")

    def __init__(self, max_v2_length: int = DEFAULT_MAX_V2_LENGTH) -> None:
        if not 0 <= max_v2_length <= 0xFFFF:
            raise ValueError("max_v2_length must be in 0..65535")
        self._buffer = bytearray()
        self._max_v2_length = max_v2_length
        self._eof = False
        self._done = False
        self._error: str | None = None

    def receive_data(self, data: bytes) -> None:
        """Add bytes received from the peer; `b""` means the peer closed the connection."""
        if self._done:
            raise RuntimeError("the PROXY header has been read; pass later bytes to the stream itself")
        if not data:
            self._eof = True
        else:
            self._buffer += data

    def next_event(self) -> ProxyHeader | NeedData:
        """The header once complete, else NEED_DATA; raises ProxyProtocolError for invalid input."""
        if self._done:
            raise RuntimeError("the PROXY header has already been returned")
        if self._error is not None:
            raise ProxyProtocolError(self._error)
        try:
            event = self._parse()
            if event is NEED_DATA and self._eof:
                raise ProxyProtocolError(
                    f"connection closed before the PROXY header was complete: {_short(self._buffer)}"
                )
        except ProxyProtocolError as exc:
            self._error = str(exc)
            raise
        if event is not NEED_DATA:
            self._done = True
            self._buffer = bytearray()
        return event

    def _parse(self) -> ProxyHeader | NeedData:
        buffer = self._buffer
        if not buffer:
            return NEED_DATA
        # Compare only what has arrived, so a wrong first byte is refused at once.
        if buffer[0] == V1_PREFIX[0]:
            if not V1_PREFIX.startswith(bytes(buffer[: len(V1_PREFIX)])):
                raise ProxyProtocolError(f"not a PROXY header: {_short(buffer)}")
            return self._parse_v1()
        if buffer[0] == V2_SIGNATURE[0]:
            if not V2_SIGNATURE.startswith(bytes(buffer[: len(V2_SIGNATURE)])):
                raise ProxyProtocolError(f"not a PROXY header: {_short(buffer)}")
            return self._parse_v2()
        raise ProxyProtocolError(f"not a PROXY header: {_short(buffer)}")

    def _parse_v1(self) -> ProxyHeader | NeedData:
        buffer = self._buffer
        end = buffer.find(b"\r\n", 0, V1_MAX_LENGTH)
        if end < 0 and len(buffer) >= V1_MAX_LENGTH:
            raise ProxyProtocolError(f"PROXY v1 header not ended within {V1_MAX_LENGTH} bytes")
        line = buffer if end < 0 else buffer[:end]
        for index, byte in enumerate(line):
            # A lone CR can only be valid as the very last byte received so far (its LF still to come).
            if byte not in _V1_ALLOWED and not (byte == 0x0D and end < 0 and index == len(buffer) - 1):
                raise ProxyProtocolError(f"invalid byte {byte:#04x} in PROXY v1 header: {_short(line)}")
        if end < 0:
            return NEED_DATA
        rest = bytes(buffer[end + 2 :])
        parts = line.decode("ascii").split(" ")
        if len(parts) >= 2 and parts[1] == "UNKNOWN":
            # The specification lets the sender put anything after UNKNOWN; the receiver ignores it.
            return ProxyHeader(1, "proxy", None, None, rest)
        if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
            raise ProxyProtocolError(f"malformed PROXY v1 header: {_short(line)}")
        version = 4 if parts[1] == "TCP4" else 6
        src = (_v1_ip(parts[2], version), _v1_port(parts[4]))
        dst = (_v1_ip(parts[3], version), _v1_port(parts[5]))
        return ProxyHeader(1, "proxy", src, dst, rest)

    def _parse_v2(self) -> ProxyHeader | NeedData:
        buffer = self._buffer
        if len(buffer) < _V2_FIXED.size:
            return NEED_DATA
        _, version_command, family_transport, length = _V2_FIXED.unpack_from(buffer)
        version, command = version_command >> 4, version_command & 0x0F
        family, transport = family_transport >> 4, family_transport & 0x0F
        if version != _V2_VERSION:
            raise ProxyProtocolError(f"unsupported PROXY v2 version {version}")
        if command not in (_V2_LOCAL, _V2_PROXY):
            raise ProxyProtocolError(f"unknown PROXY v2 command {command:#x}")
        if family > _AF_UNIX or transport > 0x2:
            raise ProxyProtocolError(f"unknown PROXY v2 family/transport {family_transport:#04x}")
        if length > self._max_v2_length:
            raise ProxyProtocolError(
                f"PROXY v2 address block of {length} bytes exceeds the limit of {self._max_v2_length}"
            )
        needed = _V2_ADDRESS_LENGTHS.get(family, 0)
        if command == _V2_PROXY and length < needed:
            raise ProxyProtocolError(f"PROXY v2 address block of {length} bytes is too short for its family")
        total = _V2_FIXED.size + length
        if len(buffer) < total:
            return NEED_DATA
        rest = bytes(buffer[total:])
        if command == _V2_LOCAL:
            # LOCAL: the receiver must ignore any addresses and use the real connection endpoints.
            return ProxyHeader(2, "local", None, None, rest)
        src: Address | None = None
        dst: Address | None = None
        if family in (_AF_INET, _AF_INET6):
            block = _V2_INET if family == _AF_INET else _V2_INET6
            src_raw, dst_raw, src_port, dst_port = block.unpack_from(buffer, _V2_FIXED.size)
            src = (str(ipaddress.ip_address(src_raw)), src_port)
            dst = (str(ipaddress.ip_address(dst_raw)), dst_port)
        return ProxyHeader(2, "proxy", src, dst, rest)


def _v1_ip(text: str, version: int) -> str:
    try:
        ip = ipaddress.IPv4Address(text) if version == 4 else ipaddress.IPv6Address(text)
    except ValueError:
        raise ProxyProtocolError(f"invalid IPv{version} address {text!r} in PROXY v1 header") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        raise ProxyProtocolError(f"IPv6 zone index in PROXY v1 header: {text!r}")
    return str(ip)


def _v1_port(text: str) -> int:
    # Decimal without sign or leading zeroes, as the specification writes them; int() alone would take
    # "+80", " 80" or "8_0".
    if not text.isdigit() or (len(text) > 1 and text[0] == "0") or len(text) > 5 or int(text) > 65535:
        raise ProxyProtocolError(f"invalid port {text!r} in PROXY v1 header")
    return int(text)
