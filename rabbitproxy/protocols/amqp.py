"""Sans-IO reading of what an AMQP 0-9-1 broker sends: frames, the protocol header, connection.start.

In the style of h11: feed received bytes with `receive_data()`, then call `next_event()` (or `result()`)
until it returns NEED_DATA. Nothing here touches sockets or the event loop, so the same code serves health
checks, the data path and tests. `AMQPProtocolError` is the only exception raised for anything the peer
sends.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

from rabbitproxy.protocols.sansio import NEED_DATA, NeedData

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "FRAME_BODY",
    "FRAME_END",
    "FRAME_HEADER",
    "FRAME_HEARTBEAT",
    "FRAME_METHOD",
    "NEED_DATA",
    "PROTOCOL_HEADER",
    "AMQPProtocolError",
    "ConnectionStart",
    "Frame",
    "FrameReader",
    "NeedData",
    "ProtocolHeader",
    "StartProbe",
    "parse_connection_start",
    "parse_method",
]

PROTOCOL_HEADER: Final = b"AMQP\x00\x00\x09\x01"

FRAME_METHOD: Final = 1
FRAME_HEADER: Final = 2
FRAME_BODY: Final = 3
FRAME_HEARTBEAT: Final = 8
FRAME_END: Final = 0xCE
_FRAME_TYPES: Final = frozenset({FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT})

# Type octet, channel short, payload-size long; then the payload and the frame-end octet.
_FRAME_HEADER = struct.Struct(">BHI")
_FRAME_OVERHEAD: Final = _FRAME_HEADER.size + 1

DEFAULT_MAX_FRAME_SIZE: Final = 1 << 20

# Before connection.tune no frame_max has been agreed; connection.start is a few hundred bytes in practice,
# so a probe has no reason to buffer more than this from something that merely looks like a frame header.
_PROBE_MAX_FRAME_SIZE: Final = 128 << 10

# Field tables nest (RabbitMQ's "capabilities" is a table inside server_properties). A bound keeps a hostile
# payload of nested empty arrays from exhausting the Python stack.
_MAX_NESTING: Final = 32

_CONNECTION_CLASS: Final = 10
_START_METHOD: Final = 10


class AMQPProtocolError(Exception):
    """The peer sent something that is not valid AMQP 0-9-1."""


@dataclass(frozen=True, slots=True)
class ProtocolHeader:
    """The broker answered with its own protocol header: it does not speak the version we asked for."""

    major: int
    minor: int
    revision: int
    protocol_id: int = 0

    @property
    def version(self) -> str:
        """The version in AMQP's usual spelling, such as "0-9-1"."""
        return f"{self.major}-{self.minor}-{self.revision}"


@dataclass(frozen=True, slots=True)
class Frame:
    """One complete, validated frame."""

    type: int
    channel: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class ConnectionStart:
    """The decoded arguments of connection.start (class 10, method 10)."""

    version_major: int
    version_minor: int
    server_properties: dict[str, object]
    mechanisms: str
    locales: str

    def _text_property(self, key: str) -> str | None:
        value = self.server_properties.get(key)
        return value if isinstance(value, str) else None

    @property
    def product(self) -> str | None:
        """server_properties["product"] when it is text (RabbitMQ sends "RabbitMQ")."""
        return self._text_property("product")

    @property
    def server_version(self) -> str | None:
        """server_properties["version"] when it is text, such as "3.10.8"."""
        return self._text_property("version")

    @property
    def cluster_name(self) -> str | None:
        """server_properties["cluster_name"] when it is text."""
        return self._text_property("cluster_name")


def _describe_bytes(data: bytes | bytearray) -> str:
    """Show the start of unexpected input so an operator can tell an HTTP server or SSH daemon at a glance."""
    head = bytes(data[:40])
    return repr(head) + ("..." if len(data) > 40 else "")


class FrameReader:
    """Splits the byte stream a broker sends into frames.

    The first event may instead be a `ProtocolHeader`: a broker that rejects the protocol version a client
    asked for writes its own header and closes. After that, any further byte is an error.

    `max_frame_size` bounds the whole frame (header, payload and frame-end octet, like AMQP's frame_max), so a
    bogus size field cannot make us buffer without limit. Feeding `b""` marks the end of the stream; a partial
    frame left over at that point is an error.
    """

    __slots__ = ("_buffer", "_eof", "_error", "_header_seen", "_max_frame_size", "_started")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        if max_frame_size < _FRAME_OVERHEAD:
            raise ValueError(f"max_frame_size must be at least {_FRAME_OVERHEAD}")
        self._buffer = bytearray()
        self._max_frame_size = max_frame_size
        self._started = False
        self._header_seen = False
        self._eof = False
        self._error: str | None = None

    def receive_data(self, data: bytes) -> None:
        """Add bytes received from the broker; `b""` means the broker closed the connection."""
        if not data:
            self._eof = True
        else:
            self._buffer += data

    def next_event(self) -> Frame | ProtocolHeader | NeedData:
        """Return the next frame (or the broker's protocol header), or NEED_DATA."""
        if self._error is not None:
            # Stay broken: once the stream is out of sync nothing after it can be trusted.
            raise AMQPProtocolError(self._error)
        try:
            event = self._next_event()
        except AMQPProtocolError as exc:
            self._error = str(exc)
            raise
        if event is NEED_DATA and self._eof and self._buffer:
            self._error = f"connection closed in the middle of a frame ({len(self._buffer)} bytes pending)"
            raise AMQPProtocolError(self._error)
        return event

    def _next_event(self) -> Frame | ProtocolHeader | NeedData:
        buffer = self._buffer
        if not buffer:
            return NEED_DATA
        if self._header_seen:
            raise AMQPProtocolError(f"data after the protocol header: {_describe_bytes(buffer)}")
        if not self._started:
            # 'A' (0x41) is not a frame type, so the first byte alone says which of the two we are reading.
            if buffer[0] == PROTOCOL_HEADER[0]:
                return self._read_protocol_header()
            self._started = True

        frame_type = buffer[0]
        if frame_type not in _FRAME_TYPES:
            raise AMQPProtocolError(f"expected an AMQP frame, got {_describe_bytes(buffer)}")
        if len(buffer) < _FRAME_HEADER.size:
            return NEED_DATA
        _, channel, size = _FRAME_HEADER.unpack_from(buffer)
        total = size + _FRAME_OVERHEAD
        if total > self._max_frame_size:
            raise AMQPProtocolError(
                f"frame of {total} bytes exceeds the limit of {self._max_frame_size} (type {frame_type}, "
                f"channel {channel}); the start of the data was {_describe_bytes(buffer)}"
            )
        if len(buffer) < total:
            return NEED_DATA
        if buffer[total - 1] != FRAME_END:
            raise AMQPProtocolError(
                f"frame-end octet is {buffer[total - 1]:#04x}, not {FRAME_END:#04x} (type {frame_type}, "
                f"channel {channel}, size {size})"
            )
        payload = bytes(buffer[_FRAME_HEADER.size : total - 1])
        del buffer[:total]
        return Frame(frame_type, channel, payload)

    def _read_protocol_header(self) -> ProtocolHeader | NeedData:
        buffer = self._buffer
        prefix = bytes(buffer[:4])
        if not PROTOCOL_HEADER.startswith(prefix):
            raise AMQPProtocolError(f"expected an AMQP frame or protocol header, got {_describe_bytes(buffer)}")
        if len(buffer) < len(PROTOCOL_HEADER):
            return NEED_DATA
        protocol_id, a, b, c = buffer[4:8]
        del buffer[:8]
        self._header_seen = True
        if protocol_id == 1 and a == 1:
            # AMQP 0-8 wrote "AMQP" 1 1 8 0: class and instance, then major 8 and minor 0 of version 0-8.
            return ProtocolHeader(0, b, c, protocol_id)
        return ProtocolHeader(a, b, c, protocol_id)


class _Cursor:
    """Bounds-checked reading of AMQP's primitive types out of a payload."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int, end: int) -> None:
        self.data = data
        self.pos = pos
        self.end = end

    def take(self, n: int, what: str) -> bytes:
        start = self.pos
        stop = start + n
        if stop > self.end:
            raise AMQPProtocolError(f"truncated {what}: need {n} bytes at offset {start}, have {self.end - start}")
        self.pos = stop
        return self.data[start:stop]

    def unpack(self, fmt: struct.Struct, what: str) -> tuple[Any, ...]:
        return fmt.unpack(self.take(fmt.size, what))

    def octet(self, what: str) -> int:
        return self.take(1, what)[0]

    def long(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), "big")

    def shortstr(self, what: str) -> str:
        raw = self.take(self.octet(what), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise AMQPProtocolError(f"{what} is not UTF-8: {raw!r}") from None

    def longstr(self, what: str) -> bytes:
        return self.take(self.long(what), what)


# Integer and float field types. Where RabbitMQ and the 0-9-1 specification disagree we follow RabbitMQ,
# since it is the peer we talk to: 's' is a signed short (not a short string) and 'l' a signed long-long.
_SCALARS: Final[dict[int, struct.Struct]] = {
    ord("b"): struct.Struct(">b"),
    ord("B"): struct.Struct(">B"),
    ord("U"): struct.Struct(">h"),
    ord("s"): struct.Struct(">h"),
    ord("u"): struct.Struct(">H"),
    ord("I"): struct.Struct(">i"),
    ord("i"): struct.Struct(">I"),
    ord("L"): struct.Struct(">q"),
    ord("l"): struct.Struct(">q"),
    ord("T"): struct.Struct(">Q"),
    ord("f"): struct.Struct(">f"),
    ord("d"): struct.Struct(">d"),
}
_DECIMAL = struct.Struct(">Bi")


def _field_value(cursor: _Cursor, depth: int) -> object:
    kind = cursor.octet("field type")
    scalar = _SCALARS.get(kind)
    if scalar is not None:
        return cursor.unpack(scalar, f"field value of type {chr(kind)!r}")[0]
    if kind == ord("t"):
        return cursor.octet("boolean field") != 0
    if kind == ord("S"):
        raw = cursor.longstr("long string field")
        # Long strings are byte strings on the wire; keep binary values as bytes rather than failing.
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw
    if kind == ord("x"):
        return cursor.longstr("byte array field")
    if kind == ord("F"):
        return _field_table(cursor, depth + 1)
    if kind == ord("A"):
        return _field_array(cursor, depth + 1)
    if kind == ord("D"):
        scale, value = cursor.unpack(_DECIMAL, "decimal field")
        return Decimal(value).scaleb(-scale)
    if kind == ord("V"):
        return None
    raise AMQPProtocolError(f"unknown field type {kind:#04x} at offset {cursor.pos - 1}")


def _nested(cursor: _Cursor, depth: int, what: str) -> _Cursor:
    if depth > _MAX_NESTING:
        raise AMQPProtocolError(f"{what} nested more than {_MAX_NESTING} levels deep")
    size = cursor.long(what)
    start = cursor.pos
    cursor.take(size, what)
    return _Cursor(cursor.data, start, start + size)


def _field_table(cursor: _Cursor, depth: int) -> dict[str, object]:
    inner = _nested(cursor, depth, "field table")
    table: dict[str, object] = {}
    while inner.pos < inner.end:
        name = inner.shortstr("field name")
        table[name] = _field_value(inner, depth)
    return table


def _field_array(cursor: _Cursor, depth: int) -> list[object]:
    inner = _nested(cursor, depth, "field array")
    values: list[object] = []
    while inner.pos < inner.end:
        values.append(_field_value(inner, depth))
    return values


def parse_method(payload: bytes) -> tuple[int, int]:
    """Return (class id, method id) of a method frame's payload."""
    if len(payload) < 4:
        raise AMQPProtocolError(f"method frame payload of {len(payload)} bytes is too short for a method id")
    class_id = int.from_bytes(payload[0:2], "big")
    method_id = int.from_bytes(payload[2:4], "big")
    return class_id, method_id


def parse_connection_start(payload: bytes) -> ConnectionStart:
    """Decode the payload of a connection.start method frame."""
    class_id, method_id = parse_method(payload)
    if (class_id, method_id) != (_CONNECTION_CLASS, _START_METHOD):
        raise AMQPProtocolError(f"expected connection.start (10, 10), got method ({class_id}, {method_id})")
    cursor = _Cursor(payload, 4, len(payload))
    major = cursor.octet("version-major")
    minor = cursor.octet("version-minor")
    properties = _field_table(cursor, 1)
    mechanisms = _text(cursor.longstr("mechanisms"), "mechanisms")
    locales = _text(cursor.longstr("locales"), "locales")
    if cursor.pos != cursor.end:
        raise AMQPProtocolError(f"{cursor.end - cursor.pos} unexpected bytes after connection.start")
    return ConnectionStart(major, minor, properties, mechanisms, locales)


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise AMQPProtocolError(f"{what} is not UTF-8: {raw!r}") from None


class StartProbe:
    """Checks that a peer is an AMQP 0-9-1 broker by reading its reply to PROTOCOL_HEADER.

    Feed everything received after sending PROTOCOL_HEADER to `receive_data()` (and `b""` when the peer
    closes), then call `result()`. It returns NEED_DATA until connection.start has arrived, then the decoded
    `ConnectionStart`. It raises AMQPProtocolError when the first frame is anything but connection.start on
    channel 0, when connection.start announces a version other than 0-9, when the broker answers with a
    protocol header (it wants another version; the message says which), or when the peer closes first.
    Bytes after connection.start are ignored: the probe has its answer.
    """

    __slots__ = ("_eof", "_reader", "_result")

    def __init__(self) -> None:
        self._reader = FrameReader(_PROBE_MAX_FRAME_SIZE)
        self._result: ConnectionStart | None = None
        self._eof = False

    def receive_data(self, data: bytes) -> None:
        """Add bytes received from the peer; `b""` means the peer closed the connection."""
        if self._result is not None:
            return
        if not data:
            self._eof = True
        self._reader.receive_data(data)

    def result(self) -> ConnectionStart | NeedData:
        """The broker's connection.start, NEED_DATA, or AMQPProtocolError."""
        if self._result is not None:
            return self._result
        event = self._reader.next_event()
        if event is NEED_DATA:
            if self._eof:
                raise AMQPProtocolError("the peer closed the connection before sending connection.start")
            return NEED_DATA
        if isinstance(event, ProtocolHeader):
            raise AMQPProtocolError(f"the broker does not accept AMQP 0-9-1 and asked for AMQP {event.version} instead")
        if event.type != FRAME_METHOD or event.channel != 0:
            raise AMQPProtocolError(
                f"expected connection.start, got a frame of type {event.type} on channel {event.channel}"
            )
        start = parse_connection_start(event.payload)
        if (start.version_major, start.version_minor) != (0, 9):
            raise AMQPProtocolError(
                f"connection.start announces AMQP {start.version_major}-{start.version_minor}, not 0-9"
            )
        self._result = start
        return start
