"""Client properties as real clients send them: the kept text fields are found among tables, flags and numbers."""

from __future__ import annotations

import struct

from rabbitproxy.protocols.amqp import PROTOCOL_HEADER
from rabbitproxy.protocols.amqp_handshake import MAX_TEXT, HandshakeReader
from tests.unit.test_amqp_handshake import longstr, method, server_steps, shortstr


def entry(name: str, kind: str, value: bytes) -> bytes:
    return shortstr(name) + kind.encode() + value


CAPABILITIES = longstr(
    entry("authentication_failure_close", "t", b"\x01")
    + entry("basic.nack", "t", b"\x01")
    + entry("consumer_cancel_notify", "t", b"\x01")
)
# Every fixed-size type, a nested table, an array and a byte array around the four kept fields.
PROPERTIES = longstr(
    entry("capabilities", "F", CAPABILITIES)
    + entry("product", "S", longstr(b"pika-like"))
    + entry("a-short", "s", struct.pack(">h", -2))
    + entry("an-int", "I", struct.pack(">i", 7))
    + entry("a-long", "l", struct.pack(">q", 1 << 40))
    + entry("a-decimal", "D", b"\x02" + struct.pack(">i", 314))
    + entry("a-double", "d", struct.pack(">d", 1.5))
    + entry("a-timestamp", "T", struct.pack(">Q", 1_700_000_000))
    + entry("a-void", "V", b"")
    + entry("an-array", "A", longstr(b"I" + struct.pack(">i", 1) + b"S" + longstr(b"x")))
    + entry("version", "x", longstr(b"1.2.3"))
    + entry("platform", "S", longstr(("\u00e9" * (MAX_TEXT + 10)).encode()))
    + entry("connection_name", "S", longstr(b"billing \xff"))
    + entry("information", "S", longstr(b"See the docs"))
)


def handshake(properties: bytes) -> HandshakeReader:
    start_ok = method(11, properties + shortstr("PLAIN") + longstr(b"\x00bob\x00pw") + shortstr("en_US"))
    tune_ok = method(31, struct.pack(">HIH", 2047, 131072, 10))
    open_ = method(40, shortstr("/") + shortstr("") + b"\x00")
    reader = HandshakeReader()
    server = server_steps()
    for client, broker in zip([PROTOCOL_HEADER, start_ok, tune_ok + open_], server, strict=True):
        reader.client_data(client)
        reader.server_data(broker)
    return reader


def test_kept_fields_are_found_among_every_field_type() -> None:
    reader = handshake(PROPERTIES)
    hs = reader.handshake
    assert reader.gave_up is None and hs.outcome == "open"
    assert (hs.product, hs.version, hs.user, hs.heartbeat) == ("pika-like", "1.2.3", "bob", 10)
    # Not UTF-8: replaced, not refused; too long: cut.
    assert hs.connection_name == "billing \ufffd"
    assert hs.platform == "\u00e9" * MAX_TEXT


def test_an_unknown_field_type_or_an_overrun_gives_up() -> None:
    unknown = longstr(entry("product", "S", longstr(b"p")) + entry("odd", "Z", b"\x00"))
    assert handshake(unknown).gave_up is not None
    # A fixed-size value that runs past the end of the table.
    overrun = longstr(entry("product", "S", longstr(b"p")) + shortstr("n") + b"l" + b"\x00\x00")
    assert handshake(overrun).gave_up is not None
    # A text value whose length points past the table: nothing of it is kept.
    past = longstr(shortstr("product") + b"S" + struct.pack(">I", 1000) + b"abc")
    reader = handshake(past)
    assert reader.gave_up is not None and reader.handshake.product is None
