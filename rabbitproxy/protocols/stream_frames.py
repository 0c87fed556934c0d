"""The bodies of the stream protocol frames the proxy reads, rewrites or sends (its health check), sans-IO.

Layouts from rabbitmq-server's ``deps/rabbitmq_stream/docs/PROTOCOL.adoc`` (all version 1): strings are an int16
length and bytes (-1 is null), ``bytes`` an int32 length, arrays an int32 count; requests and responses carry a
uint32 correlation id; a response's key is the request's with the top bit set, and most responses carry a uint16
response code after the correlation id. Text from a peer is kept as the bytes it sent wherever a frame is written
again, so what the proxy does not change it passes on byte for byte. Every malformed body raises
:class:`~rabbitproxy.protocols.stream.StreamProtocolError`.
"""

from __future__ import annotations

import struct
from typing import Final

from rabbitproxy.protocols.stream import HEADER, StreamProtocolError

METADATA: Final = 0x000F
PEER_PROPERTIES: Final = 0x0011
SASL_HANDSHAKE: Final = 0x0012
SASL_AUTHENTICATE: Final = 0x0013
TUNE: Final = 0x0014
OPEN: Final = 0x0015
CLOSE: Final = 0x0016
HEARTBEAT: Final = 0x0017
RESPONSE: Final = 0x8000
RESPONSE_OK: Final = 1

# Response codes whose names an operator reads in the log (the rest are shown as numbers).
CODE_NAMES: Final = {
    1: "ok",
    7: "sasl mechanism not supported",
    8: "authentication failure",
    9: "sasl error",
    11: "authentication failure (loopback)",
    12: "virtual host access failure",
    14: "frame too large",
    15: "internal error",
    16: "access refused",
}

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_CORR_CODE = struct.Struct(">IH")
_TUNE = struct.Struct(">II")

# (key, value) pairs as sent; None is a null string.
Properties = list[tuple[bytes | None, bytes | None]]


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise StreamProtocolError(f"truncated {what}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u16(self, what: str) -> int:
        return int(_U16.unpack(self.take(2, what))[0])

    def u32(self, what: str) -> int:
        return int(_U32.unpack(self.take(4, what))[0])

    def string(self, what: str) -> bytes | None:
        (n,) = _I16.unpack(self.take(2, what))
        return None if n == -1 else self.take(n, what)

    def blob(self, what: str) -> bytes | None:
        (n,) = _I32.unpack(self.take(4, what))
        return None if n == -1 else self.take(n, what)

    def count(self, what: str, item_size: int) -> int:
        (n,) = _I32.unpack(self.take(4, what))
        # Each item takes at least item_size bytes: a count the body cannot hold is refused before any loop.
        if n < 0 or n * item_size > len(self.data) - self.pos:
            raise StreamProtocolError(f"bad {what} count {n}")
        return int(n)

    def rest(self) -> bytes:
        out = self.data[self.pos :]
        self.pos = len(self.data)
        return out


def text(value: bytes | None) -> str | None:
    """A peer's string as text for logs and the admin API."""
    return None if value is None else value.decode("utf-8", "replace")


def _string(value: bytes | None) -> bytes:
    if value is None:
        return _I16.pack(-1)
    if len(value) > 0x7FFF:
        raise StreamProtocolError("a string longer than 32767 bytes")
    return _I16.pack(len(value)) + value


def frame(key: int, body: bytes, version: int = 1) -> bytes:
    """A whole frame: size, key, version, body."""
    return HEADER.pack(len(body) + 4, key, version) + body


def _properties(props: Properties) -> bytes:
    return _I32.pack(len(props)) + b"".join(_string(k) + _string(v) for k, v in props)


def _read_properties(r: _Reader, what: str) -> Properties:
    return [(r.string(what), r.string(what)) for _ in range(r.count(what, 4))]


def correlation(body: bytes) -> int:
    """The correlation id that starts a request's or a response's body."""
    return _Reader(body).u32("correlation id")


def response_code(body: bytes) -> int:
    """The response code of a response that has one (after the correlation id)."""
    if len(body) < _CORR_CODE.size:
        raise StreamProtocolError("truncated response")
    return int(_CORR_CODE.unpack_from(body)[1])


# -- PeerProperties (client -> server) -----------------------------------------------------------------------------


def read_peer_properties(body: bytes) -> tuple[int, Properties]:
    r = _Reader(body)
    return r.u32("correlation id"), _read_properties(r, "peer properties")


def peer_properties(correlation_id: int, props: Properties) -> bytes:
    return frame(PEER_PROPERTIES, _U32.pack(correlation_id) + _properties(props))


def with_property(body: bytes, key: bytes, value: bytes) -> bytes:
    """A PeerProperties request's frame with ``key`` set to ``value`` (replacing any the client sent)."""
    corr, props = read_peer_properties(body)
    kept = [(k, v) for k, v in props if k != key]
    return peer_properties(corr, [*kept, (key, value)])


# -- SASL, Tune, Open, Close ---------------------------------------------------------------------------------------


def read_sasl_authenticate(body: bytes) -> tuple[str | None, bytes | None]:
    """(mechanism, the SASL response) of a SaslAuthenticate request."""
    r = _Reader(body)
    r.u32("correlation id")
    return text(r.string("mechanism")), r.blob("sasl data")


def plain_user(response: bytes | None) -> str | None:
    """The authentication identity of a PLAIN response (``authzid NUL authcid NUL password``), never the password."""
    if response is None:
        return None
    parts = response.split(b"\x00")
    return text(parts[1]) if len(parts) == 3 else None


def sasl_handshake(correlation_id: int) -> bytes:
    return frame(SASL_HANDSHAKE, _U32.pack(correlation_id))


def read_sasl_mechanisms(body: bytes) -> list[str]:
    r = _Reader(body)
    r.take(_CORR_CODE.size, "response")
    return [text(r.string("mechanism")) or "" for _ in range(r.count("mechanisms", 2))]


def sasl_authenticate(correlation_id: int, mechanism: str, response: bytes) -> bytes:
    body = _U32.pack(correlation_id) + _string(mechanism.encode()) + _I32.pack(len(response)) + response
    return frame(SASL_AUTHENTICATE, body)


def read_tune(body: bytes) -> tuple[int, int]:
    """(frame_max, heartbeat) of a Tune frame (the same layout both ways)."""
    if len(body) < _TUNE.size:
        raise StreamProtocolError("truncated tune")
    frame_max, heartbeat = _TUNE.unpack_from(body)
    return int(frame_max), int(heartbeat)


def tune(frame_max: int, heartbeat: int) -> bytes:
    return frame(TUNE, _TUNE.pack(frame_max, heartbeat))


def read_open(body: bytes) -> str | None:
    """The virtual host an Open request names."""
    r = _Reader(body)
    r.u32("correlation id")
    return text(r.string("virtual host"))


def open_request(correlation_id: int, vhost: str) -> bytes:
    return frame(OPEN, _U32.pack(correlation_id) + _string(vhost.encode()))


def read_open_response(body: bytes) -> tuple[int, int, Properties]:
    """(correlation id, response code, connection properties); a refusal may carry no properties."""
    r = _Reader(body)
    corr, code = r.u32("correlation id"), r.u16("response code")
    props = _read_properties(r, "connection properties") if r.pos < len(body) else []
    return corr, code, props


def open_response(correlation_id: int, code: int, props: Properties) -> bytes:
    return frame(OPEN | RESPONSE, _CORR_CODE.pack(correlation_id, code) + _properties(props))


def close_request(correlation_id: int, code: int, reason: str) -> bytes:
    return frame(CLOSE, _CORR_CODE.pack(correlation_id, code) + _string(reason.encode()))


# -- MetadataResponse (server -> client) ---------------------------------------------------------------------------

# (reference, host, port) of one broker entry.
Broker = tuple[int, bytes | None, int]


def read_metadata_response(body: bytes) -> tuple[int, list[Broker], bytes]:
    """(correlation id, the broker entries, the stream metadata that follows them, unread)."""
    r = _Reader(body)
    corr = r.u32("correlation id")
    brokers = [(r.u16("broker"), r.string("broker host"), r.u32("broker port")) for _ in range(r.count("brokers", 8))]
    return corr, brokers, r.rest()


def metadata_response(correlation_id: int, brokers: list[Broker], streams: bytes) -> bytes:
    entries = b"".join(_U16.pack(ref) + _string(host) + _U32.pack(port) for ref, host, port in brokers)
    return frame(METADATA | RESPONSE, _U32.pack(correlation_id) + _I32.pack(len(brokers)) + entries + streams)
