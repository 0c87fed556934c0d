"""Who an AMQP 1.0 client says it is: the SASL PLAIN user name and the ``open`` frame's ``hostname``, sans-IO.

RabbitMQ 4.x serves AMQP 1.0 on the AMQP port. A 1.0 client sends ``AMQP`` 3 1 0 0 and a ``sasl-init`` frame (the
mechanism, and for PLAIN ``authzid NUL authcid NUL password``), then, once the broker accepted it, ``AMQP`` 0 1 0 0
and an ``open`` frame whose ``hostname`` names the vhost as ``vhost:NAME``. :class:`Amqp10Reader` reads those from the
client's bytes only, fills the same :class:`~rabbitproxy.protocols.amqp_handshake.Handshake` fields as the 0-9-1
reader (protocol ``"1.0"``, mechanism, user, vhost) and is done after ``open``, or as soon as something does not fit
(it never raises on a peer's bytes: it gives up and leaves the bytes to the broker, which judges them).

A ``hostname`` without the ``vhost:`` prefix means the broker's default vhost, which the proxy cannot know: ``vhost``
stays None and the hostname is kept in ``extra``. RabbitMQ's own Python client sends the host it dialled for the
default vhost of its URI (seen in tests/integration/test_amqp10.py).

The encoding (AMQP 1.0 part 1): every value starts with a constructor octet whose high nibble gives its width (0x4_
none, 0x5_ 1 byte, 0x6_ 2, 0x7_ 4, 0x8_ 8, 0x9_ 16, 0xa_/0xc_/0xe_ a 1-byte size, 0xb_/0xd_/0xf_ a 4-byte size);
0x00 starts a described value (descriptor, then value). So fields this reader does not need are skipped by width.
"""

from __future__ import annotations

import struct
from typing import Final

from rabbitproxy.protocols.amqp_handshake import MAX_HANDSHAKE_BYTES, MAX_TEXT, Handshake

AMQP10_SASL_HEADER: Final = b"AMQP\x03\x01\x00\x00"
AMQP10_HEADER: Final = b"AMQP\x00\x01\x00\x00"

# Descriptor codes of the performatives read here (part 2.7 and 5.3).
_OPEN: Final = 0x10
_SASL_INIT: Final = 0x41
_SYMBOLIC: Final = {b"amqp:open:list": _OPEN, b"amqp:sasl-init:list": _SASL_INIT}

_FRAME: Final = struct.Struct(">IBBH")  # size, data offset (in 4-byte words), type, channel / type-specific
_U32: Final = struct.Struct(">I")
_FIXED_WIDTH: Final = {0x4: 0, 0x5: 1, 0x6: 2, 0x7: 4, 0x8: 8, 0x9: 16}
_VHOST_PREFIX: Final = "vhost:"


class _MalformedError(Exception):
    """The client's bytes are not what this reader expects; it steps aside."""


class _Cursor:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise _MalformedError("value runs past its frame")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def octet(self) -> int:
        return self.take(1)[0]


def _size(cursor: _Cursor, code: int) -> int:
    """The size that follows a variable-width or compound constructor (1 or 4 bytes by the code's high nibble)."""
    wide = (code >> 4) in (0xB, 0xD, 0xF)
    return int(_U32.unpack(cursor.take(4))[0]) if wide else cursor.octet()


def _value(cursor: _Cursor) -> object:
    """Decode a string, symbol, binary or ulong; skip anything else (returned as None)."""
    code = cursor.octet()
    if code == 0x00:  # a described value inside a field: not used by the fields read here
        _value(cursor)
        _value(cursor)
        return None
    nibble = code >> 4
    if nibble in _FIXED_WIDTH:
        raw = cursor.take(_FIXED_WIDTH[nibble])
        if code in (0x53, 0x80):  # smallulong, ulong: descriptors
            return int.from_bytes(raw, "big")
        return None
    if nibble in (0xA, 0xB):
        raw = cursor.take(_size(cursor, code))
        if code in (0xA1, 0xB1):  # str8-utf8, str32-utf8
            return raw.decode("utf-8", "replace")
        return raw  # vbin8/vbin32, sym8/sym32: bytes
    if nibble in (0xC, 0xD, 0xE, 0xF):
        cursor.take(_size(cursor, code))  # compound and array: size then the rest (count included)
        return None
    raise _MalformedError(f"constructor 0x{code:02x}")


def _performative(body: bytes) -> tuple[int | None, list[object]]:
    """A frame body's descriptor code and the leading fields of its list (those this reader may need)."""
    cursor = _Cursor(body)
    if cursor.octet() != 0x00:
        raise _MalformedError("frame body is not a described performative")
    descriptor = _value(cursor)
    code = _SYMBOLIC.get(descriptor) if isinstance(descriptor, bytes) else descriptor
    if not isinstance(code, int):
        return None, []
    kind = cursor.octet()
    if kind == 0x45:  # list0
        return code, []
    if kind not in (0xC0, 0xD0):
        raise _MalformedError(f"performative is not a list (0x{kind:02x})")
    size = _size(cursor, kind)
    end = cursor.pos + size
    count = cursor.octet() if kind == 0xC0 else int(_U32.unpack(cursor.take(4))[0])
    fields: list[object] = []
    for _ in range(min(count, 3)):
        if cursor.pos >= end:
            break
        fields.append(_value(cursor))
    return code, fields


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value[:MAX_TEXT] if isinstance(value, str) else None


def _plain_user(response: object) -> str | None:
    if not isinstance(response, bytes):
        return None
    parts = response.split(b"\x00")
    return _text(parts[1]) if len(parts) == 3 else None


class Amqp10Reader:
    """Reads a 1.0 client's identity from the bytes it sends; feed with :meth:`client_data`, read :attr:`handshake`.

    ``done`` turns True after the ``open`` frame or once the reader gave up (``gave_up`` says why); feeding it more
    is then a no-op, which keeps its cost to the first frames of a connection.
    """

    __slots__ = ("_buffer", "_fed", "_want_header", "done", "gave_up", "handshake")

    def __init__(self) -> None:
        self.handshake = Handshake(protocol="1.0")
        self.done = False
        self.gave_up: str | None = None
        self._buffer = bytearray()
        self._fed = 0
        self._want_header = True

    def client_data(self, data: bytes) -> None:
        if self.done:
            return
        self._fed += len(data)
        if self._fed > MAX_HANDSHAKE_BYTES:
            self._give_up("no open frame within the handshake limit")
            return
        self._buffer += data
        try:
            self._read()
        except _MalformedError as exc:
            self._give_up(str(exc))

    def server_data(self, data: bytes) -> None:
        """The broker's bytes: nothing in them is read (the identity is the client's to state)."""

    def _give_up(self, why: str) -> None:
        self.done = True
        self.gave_up = why
        self._buffer.clear()

    def _read(self) -> None:
        buf = self._buffer
        while not self.done:
            if self._want_header:
                if len(buf) < 8:
                    return
                header = bytes(buf[:8])
                if header not in (AMQP10_SASL_HEADER, AMQP10_HEADER):
                    raise _MalformedError(f"not an AMQP 1.0 header: {header!r}")
                del buf[:8]
                self._want_header = False
                continue
            if len(buf) < _FRAME.size:
                return
            size, doff, kind, _channel = _FRAME.unpack_from(buf)
            if size < _FRAME.size or doff < 2 or doff * 4 > size:
                raise _MalformedError("bad frame header")
            if size > MAX_HANDSHAKE_BYTES:
                raise _MalformedError(f"a {size}-byte frame during the handshake")
            if len(buf) < size:
                return
            body = bytes(buf[doff * 4 : size])
            del buf[:size]
            if body:  # an empty frame is a heartbeat
                self._frame(kind, body)

    def _frame(self, kind: int, body: bytes) -> None:
        code, fields = _performative(body)
        hs = self.handshake
        if kind == 0x01 and code == _SASL_INIT:
            mechanism = _text(fields[0]) if fields else None
            hs.mechanism = mechanism
            if mechanism == "PLAIN" and len(fields) > 1:
                hs.user = _plain_user(fields[1])
            # The broker answers with sasl-outcome, then the client starts over with the plain 1.0 header.
            self._want_header = True
        elif kind == 0x00 and code == _OPEN:
            hostname = _text(fields[1]) if len(fields) > 1 else None
            if hostname is not None and hostname.startswith(_VHOST_PREFIX):
                hs.vhost = hostname[len(_VHOST_PREFIX) :]
            elif hostname is not None:
                hs.extra["hostname"] = hostname
            self.done = True
