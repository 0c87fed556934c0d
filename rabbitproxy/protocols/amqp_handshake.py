"""Sans-IO reading of an AMQP 0-9-1 connection's handshake as it passes through the proxy, both directions.

The client's side is read until ``connection.open``, the broker's until ``connection.open-ok`` or
``connection.close``. What is learnt lands in one :class:`Handshake`: who the client says it is
(``client_properties``), the SASL mechanism and the user name, the vhost, the tuned ``channel_max``,
``frame_max`` and ``heartbeat``, and the outcome (opened, or refused with the broker's reply code and text).

Only the user name is taken from a SASL response, never the password: PLAIN's ``authzid NUL authcid NUL
password`` keeps ``authcid``; AMQPLAIN's table keeps ``LOGIN``. A frame is decoded and dropped as soon as it is
complete, so nothing the reader keeps holds the password once ``connection.start-ok`` has been read.

The reader never raises for what a peer sends. Anything unexpected, or more than :data:`MAX_HANDSHAKE_BYTES` on
either side before the handshake ends, makes it give up (``gave_up`` says why); the proxy then stops feeding it
and the bytes flow on untouched. Nothing after ``connection.open``/``open-ok`` is ever looked at.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

from rabbitproxy.protocols.amqp import (
    FRAME_END,
    FRAME_HEARTBEAT,
    FRAME_METHOD,
    PROTOCOL_HEADER,
    AMQPProtocolError,
    _Cursor,
    _field_table,
)

# A client's handshake is a few hundred bytes; RabbitMQ itself refuses frames over 128 KiB before tune. Past this
# much on one side without reaching the end of the handshake, the reader steps aside.
MAX_HANDSHAKE_BYTES: Final = 64 * 1024

# The AMQP 1.0 protocol headers: SASL ("AMQP" 3 1 0 0) and plain ("AMQP" 0 1 0 0). Such a connection is not
# 0-9-1 and is left alone.
AMQP10_SASL_HEADER: Final = b"AMQP\x03\x01\x00\x00"
AMQP10_HEADER: Final = b"AMQP\x00\x01\x00\x00"

# Why the 0-9-1 reader stepped aside for an AMQP 1.0 client (the relay then hands it to the 1.0 reader).
AMQP10_GAVE_UP: Final = "AMQP 1.0"


class HandshakeFollower(Protocol):
    """What the relay feeds during a connection's handshake: the 0-9-1 reader, or the 1.0 reader after it."""

    done: bool
    gave_up: str | None

    @property
    def handshake(self) -> Handshake: ...

    def client_data(self, data: bytes) -> None: ...

    def server_data(self, data: bytes) -> None: ...


_FRAME_HEADER = struct.Struct(">BHI")
_SHORT = struct.Struct(">H")
_TUNE = struct.Struct(">HIH")
_METHOD = struct.Struct(">HH")

_CONNECTION: Final = 10
_START, _START_OK = 10, 11
_TUNE_M, _TUNE_OK = 30, 31
_OPEN, _OPEN_OK = 40, 41
_CLOSE = 50

# client_properties keys that are copied, as text, into the Handshake; anything else is not kept.
_CLIENT_TEXT = ("connection_name", "product", "version", "platform")
# Text from the peer is cut to this length: it ends up in logs and the admin API, never in metric labels.
MAX_TEXT: Final = 256


@dataclass(slots=True)
class Handshake:
    """What the handshake said about a connection; fields stay None until seen."""

    protocol: str | None = None
    connection_name: str | None = None
    product: str | None = None
    version: str | None = None
    platform: str | None = None
    mechanism: str | None = None
    user: str | None = None
    vhost: str | None = None
    channel_max: int | None = None
    frame_max: int | None = None
    heartbeat: int | None = None
    # "open" once the broker sent open-ok; "refused" when it closed the connection during the handshake.
    outcome: str | None = None
    close_code: int | None = None
    close_text: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    return value[:MAX_TEXT]


def plain_user(response: bytes) -> str | None:
    """The authentication identity of a SASL PLAIN response (``authzid NUL authcid NUL password``)."""
    parts = response.split(b"\x00")
    if len(parts) != 3:
        return None
    return _text(parts[1])


def amqplain_user(response: bytes) -> str | None:
    """``LOGIN`` of an AMQPLAIN response: a field table's contents without its length prefix."""
    framed = len(response).to_bytes(4, "big") + response
    table = _field_table(_Cursor(framed, 0, len(framed)), 0)
    return _text(table.get("LOGIN"))


class _Side:
    """One direction's state: a partial frame carried over between chunks, and the bytes seen so far."""

    __slots__ = ("buffer", "fed", "header_left")

    def __init__(self, header: bool) -> None:
        # Only ever holds the tail of a chunk that ended inside a frame; whole frames are read in place.
        self.buffer = bytearray()
        self.fed = 0
        # Bytes of the 8-byte protocol header still to come (the client sends one, the broker does not).
        self.header_left = len(PROTOCOL_HEADER) if header else 0


# Field types of a field table whose value has a fixed size (bytes after the type octet), as RabbitMQ reads them;
# the types in _SIZED carry a 4-byte length first. Used to step over client properties that are not kept.
_FIXED_SIZE: Final[dict[int, int]] = {
    **{ord(c): 1 for c in "tbB"},
    **{ord(c): 2 for c in "Usu"},
    **{ord(c): 4 for c in "Iif"},
    **{ord(c): 8 for c in "LlTd"},
    ord("D"): 5,
    ord("V"): 0,
}
_SIZED: Final = frozenset(b"SxFA")
_TEXT_TYPES: Final = frozenset(b"Sx")
_WANTED: Final = {key.encode(): key for key in _CLIENT_TEXT}


def _truncated(what: str) -> AMQPProtocolError:
    return AMQPProtocolError(f"truncated {what}")


def _client_properties(data: bytes, pos: int, end: int, hs: Handshake) -> int:
    """Copy the wanted text fields of the client-properties table at ``pos`` into ``hs``; return the offset after it.

    The other entries (``capabilities``, ``information``...) are stepped over by their sizes, not decoded: the
    handshake is on every connection's path, and building the whole table was most of the reader's cost.
    """
    if pos + 4 > end:
        raise _truncated("client properties")
    stop = pos + 4 + int.from_bytes(data[pos : pos + 4], "big")
    pos += 4
    if stop > end:
        raise _truncated("client properties")
    while pos < stop:
        name_end = pos + 1 + data[pos]
        if name_end >= stop:
            raise _truncated("client property")
        name = data[pos + 1 : name_end]
        kind = data[name_end]
        pos = name_end + 1
        size = _FIXED_SIZE.get(kind)
        if size is None:
            if kind not in _SIZED:
                raise AMQPProtocolError(f"unknown field type {kind:#04x} in the client properties")
            if pos + 4 > stop:
                raise _truncated("client property")
            size = int.from_bytes(data[pos : pos + 4], "big")
            pos += 4
            key = _WANTED.get(name)
            if key is not None and kind in _TEXT_TYPES and pos + size <= stop:
                setattr(hs, key, data[pos : pos + size].decode("utf-8", "replace")[:MAX_TEXT])
        pos += size
    if pos != stop:
        raise _truncated("client property")
    return stop


class HandshakeReader:
    """Follows one connection's handshake; feed each side's bytes, read :attr:`handshake` at any time.

    ``done`` turns True when there is nothing more to learn (the connection is open, was refused, or the reader
    gave up); from then on the caller should stop feeding it, which is also what keeps its cost to the first
    few frames of a connection.
    """

    __slots__ = ("_client", "_client_open", "_server", "done", "gave_up", "handshake", "unread")

    def __init__(self) -> None:
        self.handshake = Handshake()
        self.done = False
        self.gave_up: str | None = None
        # An AMQP 1.0 client's bytes from its protocol header on, for the 1.0 reader that takes over (amqp10.py).
        self.unread = b""
        self._client = _Side(header=True)
        self._server = _Side(header=False)
        self._client_open = False

    # -- feeding -----------------------------------------------------------------------------------------------

    def client_data(self, data: bytes) -> None:
        """Bytes the client sent (in order, as they pass)."""
        if self.done or self._client_open:
            return
        side = self._client
        if side.header_left:
            data = self._client_header(data)
            if self.done or not data:
                return
        self._feed(side, data, self._client_frame)

    def server_data(self, data: bytes) -> None:
        """Bytes the broker sent (in order, as they pass)."""
        if self.done:
            return
        self._feed(self._server, data, self._server_frame)

    # -- internals ---------------------------------------------------------------------------------------------

    def _give_up(self, why: str) -> None:
        self.gave_up = why
        self.done = True
        # Nothing buffered is needed any more; a frame with a password in it is not kept around.
        self._client.buffer.clear()
        self._server.buffer.clear()

    def _client_header(self, data: bytes) -> bytes:
        """Collect the client's 8-byte protocol header; return what follows it (b"" while incomplete)."""
        side = self._client
        take = data[: side.header_left]
        side.buffer += take
        side.header_left -= len(take)
        side.fed += len(take)
        if side.header_left:
            if not PROTOCOL_HEADER.startswith(bytes(side.buffer[:4])):
                self._give_up("not an AMQP protocol header")
            return b""
        header = bytes(side.buffer)
        side.buffer.clear()
        if header == PROTOCOL_HEADER:
            self.handshake.protocol = "0-9-1"
            return data[len(take) :]
        if header in (AMQP10_SASL_HEADER, AMQP10_HEADER):
            self.handshake.protocol = "1.0"
            self.unread = header + data[len(take) :]
            self._give_up(AMQP10_GAVE_UP)
        else:
            self._give_up(f"protocol header {header!r}")
        return b""

    def _feed(self, side: _Side, data: bytes, on_frame: Callable[[int, bytes, int, int], None]) -> None:
        side.fed += len(data)
        if side.fed > MAX_HANDSHAKE_BYTES:
            self._give_up(f"more than {MAX_HANDSHAKE_BYTES} bytes before the handshake ended")
            return
        buf = side.buffer
        if buf:
            # The rest of a frame that began in an earlier chunk (rare: a handshake frame is small).
            data = bytes(buf) + data
            buf.clear()
        pos, end = 0, len(data)
        try:
            # Frames are read where they lie in the chunk (offsets, no copies), usually the whole chunk at once.
            while end - pos >= _FRAME_HEADER.size:
                kind, _channel, size = _FRAME_HEADER.unpack_from(data, pos)
                total = _FRAME_HEADER.size + size + 1
                if total > MAX_HANDSHAKE_BYTES:
                    raise AMQPProtocolError(f"a {total}-byte frame during the handshake")
                if end - pos < total:
                    break
                if data[pos + total - 1] != FRAME_END:
                    raise AMQPProtocolError("bad frame-end octet")
                on_frame(kind, data, pos + _FRAME_HEADER.size, pos + total - 1)
                pos += total
                if self.done or (side is self._client and self._client_open):
                    return
        except (AMQPProtocolError, UnicodeDecodeError, struct.error, ValueError, IndexError) as exc:
            self._give_up(str(exc) or type(exc).__name__)
            return
        if pos < end:
            buf += data[pos:] if pos else data

    def _client_frame(self, kind: int, data: bytes, start: int, stop: int) -> None:
        if kind == FRAME_HEARTBEAT:
            return
        if kind != FRAME_METHOD:
            raise AMQPProtocolError(f"frame type {kind} during the handshake")
        if stop - start < 4:
            raise AMQPProtocolError("method frame too short")
        class_id, method_id = _METHOD.unpack_from(data, start)
        if class_id != _CONNECTION:
            raise AMQPProtocolError(f"method ({class_id}, {method_id}) before connection.open")
        hs = self.handshake
        if method_id == _START_OK:
            cur = _Cursor(data, _client_properties(data, start + 4, stop, hs), stop)
            hs.mechanism = _text(cur.shortstr("mechanism"))
            response = cur.longstr("response")
            if hs.mechanism == "PLAIN":
                hs.user = plain_user(response)
            elif hs.mechanism == "AMQPLAIN":
                hs.user = amqplain_user(response)
            # EXTERNAL names no user in the response; the proxy fills it from the client certificate.
        elif method_id == _TUNE_OK:
            if stop - start < 4 + _TUNE.size:
                raise _truncated("connection.tune-ok")
            hs.channel_max, hs.frame_max, hs.heartbeat = _TUNE.unpack_from(data, start + 4)
        elif method_id == _OPEN:
            hs.vhost = _text(_Cursor(data, start + 4, stop).shortstr("virtual host"))
            self._client_open = True
        elif method_id == _CLOSE:
            self.done = True
        else:
            raise AMQPProtocolError(f"client method (10, {method_id}) during the handshake")

    def _server_frame(self, kind: int, data: bytes, start: int, stop: int) -> None:
        if kind == FRAME_HEARTBEAT:
            return
        if kind != FRAME_METHOD:
            raise AMQPProtocolError(f"frame type {kind} during the handshake")
        if stop - start < 4:
            raise AMQPProtocolError("method frame too short")
        class_id, method_id = _METHOD.unpack_from(data, start)
        if class_id != _CONNECTION:
            raise AMQPProtocolError(f"broker method ({class_id}, {method_id}) before connection.open-ok")
        if method_id in (_START, _TUNE_M):
            # Nothing in them is kept (the client's tune-ok has the negotiated values): not even decoded.
            return
        hs = self.handshake
        if method_id == _OPEN_OK:
            hs.outcome = "open"
            self.done = True
        elif method_id == _CLOSE:
            cur = _Cursor(data, start + 4, stop)
            (code,) = _SHORT.unpack(cur.take(2, "reply code"))
            hs.outcome = "refused"
            hs.close_code = code
            hs.close_text = _text(cur.shortstr("reply text"))
            self.done = True
        else:
            raise AMQPProtocolError(f"broker method (10, {method_id}) during the handshake")
