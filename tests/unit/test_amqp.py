"""Unit tests for rabbitproxy.protocols.amqp (sans-IO AMQP 0-9-1 reading)."""

from __future__ import annotations

import struct
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rabbitproxy.protocols.amqp import (
    FRAME_BODY,
    FRAME_HEARTBEAT,
    FRAME_METHOD,
    NEED_DATA,
    PROTOCOL_HEADER,
    AMQPProtocolError,
    ConnectionStart,
    Frame,
    FrameReader,
    ProtocolHeader,
    StartProbe,
    parse_connection_start,
    parse_method,
)

# --- a tiny encoder, written for the tests, to build what a broker sends ---------------------------------


def shortstr(text: str) -> bytes:
    raw = text.encode()
    return bytes([len(raw)]) + raw


def longstr(raw: bytes | str) -> bytes:
    if isinstance(raw, str):
        raw = raw.encode()
    return struct.pack(">I", len(raw)) + raw


def value(v: object) -> bytes:
    if isinstance(v, bool):
        return b"t" + bytes([v])
    if isinstance(v, int):
        return b"l" + struct.pack(">q", v)
    if isinstance(v, str | bytes):
        return b"S" + longstr(v)
    if isinstance(v, dict):
        return b"F" + table(v)
    raise TypeError(v)


def table(items: dict[str, object]) -> bytes:
    body = b"".join(shortstr(k) + value(v) for k, v in items.items())
    return struct.pack(">I", len(body)) + body


def frame(frame_type: int, channel: int, payload: bytes, end: int = 0xCE) -> bytes:
    return struct.pack(">BHI", frame_type, channel, len(payload)) + payload + bytes([end])


RABBITMQ_3_10_PROPERTIES: dict[str, object] = {
    "capabilities": {
        "publisher_confirms": True,
        "exchange_exchange_bindings": True,
        "basic.nack": True,
        "consumer_cancel_notify": True,
        "connection.blocked": True,
        "consumer_priorities": True,
        "authentication_failure_close": True,
        "per_consumer_qos": True,
        "direct_reply_to": True,
    },
    "cluster_name": "rabbit@node-1",
    "copyright": "Copyright (c) 2007-2022 VMware, Inc. or its affiliates.",
    "information": "Licensed under the MPL 2.0. Website: https://rabbitmq.com",
    "platform": "Erlang/OTP 25.0.4",
    "product": "RabbitMQ",
    "version": "3.10.8",
}


def start_payload(
    major: int = 0,
    minor: int = 9,
    properties: bytes | None = None,
    mechanisms: bytes = b"PLAIN AMQPLAIN",
    locales: bytes = b"en_US",
) -> bytes:
    if properties is None:
        properties = table(RABBITMQ_3_10_PROPERTIES)
    return struct.pack(">HHBB", 10, 10, major, minor) + properties + longstr(mechanisms) + longstr(locales)


START_FRAME = frame(FRAME_METHOD, 0, start_payload())
HEARTBEAT = frame(FRAME_HEARTBEAT, 0, b"")


def check_rabbitmq_start(start: ConnectionStart) -> None:
    assert (start.version_major, start.version_minor) == (0, 9)
    assert start.server_properties == RABBITMQ_3_10_PROPERTIES
    assert start.mechanisms == "PLAIN AMQPLAIN"
    assert start.locales == "en_US"
    assert start.product == "RabbitMQ"
    assert start.server_version == "3.10.8"
    assert start.cluster_name == "rabbit@node-1"


# --- FrameReader ---------------------------------------------------------------------------------------


def test_protocol_header_constant() -> None:
    assert PROTOCOL_HEADER == bytes.fromhex("414d515000000901")


def test_reader_needs_data_when_empty() -> None:
    assert FrameReader().next_event() is NEED_DATA


def test_reader_whole_frame() -> None:
    reader = FrameReader()
    reader.receive_data(START_FRAME)
    event = reader.next_event()
    assert event == Frame(FRAME_METHOD, 0, start_payload())
    assert reader.next_event() is NEED_DATA


def test_reader_byte_by_byte() -> None:
    reader = FrameReader()
    events = []
    for i in range(len(START_FRAME)):
        reader.receive_data(START_FRAME[i : i + 1])
        event = reader.next_event()
        if event is not NEED_DATA:
            events.append(event)
    assert events == [Frame(FRAME_METHOD, 0, start_payload())]


def test_reader_several_frames_in_one_chunk() -> None:
    body = frame(3, 5, b"hello")
    reader = FrameReader()
    reader.receive_data(START_FRAME + HEARTBEAT + body + body[:3])
    assert isinstance(reader.next_event(), Frame)
    assert reader.next_event() == Frame(FRAME_HEARTBEAT, 0, b"")
    assert reader.next_event() == Frame(3, 5, b"hello")
    assert reader.next_event() is NEED_DATA
    reader.receive_data(body[3:])
    assert reader.next_event() == Frame(3, 5, b"hello")


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (b"AMQP\x00\x00\x09\x01", ProtocolHeader(0, 9, 1, 0)),
        (b"AMQP\x00\x01\x00\x00", ProtocolHeader(1, 0, 0, 0)),
        (b"AMQP\x01\x01\x08\x00", ProtocolHeader(0, 8, 0, 1)),
    ],
)
def test_reader_protocol_header(reply: bytes, expected: ProtocolHeader) -> None:
    reader = FrameReader()
    for i in range(len(reply) - 1):
        reader.receive_data(reply[i : i + 1])
        assert reader.next_event() is NEED_DATA
    reader.receive_data(reply[-1:])
    assert reader.next_event() == expected


def test_protocol_header_version_text() -> None:
    assert ProtocolHeader(0, 9, 1).version == "0-9-1"


def test_reader_data_after_protocol_header_is_an_error() -> None:
    reader = FrameReader()
    reader.receive_data(PROTOCOL_HEADER + b"\x01")
    assert isinstance(reader.next_event(), ProtocolHeader)
    with pytest.raises(AMQPProtocolError, match="after the protocol header"):
        reader.next_event()


def test_reader_header_only_at_stream_start() -> None:
    reader = FrameReader()
    reader.receive_data(HEARTBEAT + b"AMQP\x00\x00\x09\x01")
    assert reader.next_event() == Frame(FRAME_HEARTBEAT, 0, b"")
    with pytest.raises(AMQPProtocolError, match="expected an AMQP frame"):
        reader.next_event()


def test_reader_rejects_wrong_prefix_early() -> None:
    reader = FrameReader()
    reader.receive_data(b"AMX")
    with pytest.raises(AMQPProtocolError):
        reader.next_event()


@pytest.mark.parametrize("first", [0, 4, 5, 7, 9, 0x48, 0x53, 0xFF])
def test_reader_rejects_unknown_frame_type_from_first_byte(first: int) -> None:
    reader = FrameReader()
    reader.receive_data(bytes([first]))
    with pytest.raises(AMQPProtocolError):
        reader.next_event()


def test_reader_bad_frame_end() -> None:
    reader = FrameReader()
    reader.receive_data(frame(FRAME_METHOD, 0, b"\x00\x0a\x00\x0a", end=0x00))
    with pytest.raises(AMQPProtocolError, match="frame-end"):
        reader.next_event()


def test_reader_frame_size_limit_is_checked_from_the_header() -> None:
    reader = FrameReader()
    # Only the 7-byte frame header: the error must come before any payload is buffered.
    reader.receive_data(struct.pack(">BHI", FRAME_BODY, 1, 1 << 20))
    with pytest.raises(AMQPProtocolError, match="exceeds the limit"):
        reader.next_event()


def test_reader_frame_size_limit_is_configurable_and_inclusive() -> None:
    payload = b"x" * 100
    exact = FrameReader(max_frame_size=len(payload) + 8)
    exact.receive_data(frame(3, 1, payload))
    assert exact.next_event() == Frame(3, 1, payload)
    small = FrameReader(max_frame_size=len(payload) + 7)
    small.receive_data(frame(3, 1, payload))
    with pytest.raises(AMQPProtocolError):
        small.next_event()
    with pytest.raises(ValueError, match="max_frame_size"):
        FrameReader(max_frame_size=7)


def test_reader_errors_are_sticky() -> None:
    reader = FrameReader()
    reader.receive_data(b"\x00")
    with pytest.raises(AMQPProtocolError):
        reader.next_event()
    reader.receive_data(HEARTBEAT)
    with pytest.raises(AMQPProtocolError):
        reader.next_event()


def test_reader_eof_mid_frame() -> None:
    reader = FrameReader()
    reader.receive_data(START_FRAME[:20])
    assert reader.next_event() is NEED_DATA
    reader.receive_data(b"")
    with pytest.raises(AMQPProtocolError, match="closed in the middle of a frame"):
        reader.next_event()


def test_reader_clean_eof() -> None:
    reader = FrameReader()
    reader.receive_data(HEARTBEAT)
    reader.receive_data(b"")
    assert reader.next_event() == Frame(FRAME_HEARTBEAT, 0, b"")
    assert reader.next_event() is NEED_DATA


# --- parse_method / parse_connection_start -------------------------------------------------------------


def test_parse_method() -> None:
    assert parse_method(b"\x00\x0a\x00\x32rest") == (10, 50)
    with pytest.raises(AMQPProtocolError):
        parse_method(b"\x00\x0a\x00")


def test_parse_connection_start_rabbitmq_3_10() -> None:
    check_rabbitmq_start(parse_connection_start(start_payload()))


def test_parse_connection_start_rejects_other_methods() -> None:
    with pytest.raises(AMQPProtocolError, match=r"\(10, 50\)"):
        parse_connection_start(b"\x00\x0a\x00\x32" + b"\x00" * 20)


def test_parse_connection_start_every_truncation_is_an_error() -> None:
    payload = start_payload()
    for cut in range(len(payload)):
        with pytest.raises(AMQPProtocolError):
            parse_connection_start(payload[:cut])


def test_parse_connection_start_rejects_trailing_bytes() -> None:
    with pytest.raises(AMQPProtocolError, match="unexpected bytes"):
        parse_connection_start(start_payload() + b"\x00")


def test_parse_connection_start_every_field_type() -> None:
    entries = [
        ("t", b"t\x01", True),
        ("f0", b"t\x00", False),
        ("b", b"b\xff", -1),
        ("B", b"B\xff", 255),
        ("U", b"U\xff\xfe", -2),
        ("u", b"u\xff\xfe", 65534),
        ("s", b"s\x80\x00", -32768),
        ("I", b"I\xff\xff\xff\xfd", -3),
        ("i", b"i\xff\xff\xff\xfd", 4294967293),
        ("L", b"L" + struct.pack(">q", -(2**62)), -(2**62)),
        ("l", b"l" + struct.pack(">q", 2**62), 2**62),
        ("f", b"f" + struct.pack(">f", 1.5), 1.5),
        ("d", b"d" + struct.pack(">d", -2.25), -2.25),
        ("D", b"D\x02" + struct.pack(">i", 12345), Decimal("123.45")),
        ("S", b"S" + longstr("caf\u00e9"), "caf\u00e9"),
        ("Sbin", b"S" + longstr(b"\xff\xfe"), b"\xff\xfe"),
        ("A", b"A" + longstr(b"I\x00\x00\x00\x01S" + longstr("x") + b"V"), [1, "x", None]),
        ("T", b"T" + struct.pack(">Q", 1_700_000_000), 1_700_000_000),
        ("F", b"F" + table({"k": True}), {"k": True}),
        ("V", b"V", None),
        ("x", b"x" + longstr(b"\x00\x01"), b"\x00\x01"),
    ]
    body = b"".join(shortstr(name) + encoded for name, encoded, _ in entries)
    props = struct.pack(">I", len(body)) + body
    start = parse_connection_start(start_payload(properties=props))
    assert start.server_properties == {name: expected for name, _, expected in entries}
    # Non-text values are not reported as product or version.
    assert start.product is None


def test_parse_connection_start_unknown_field_type() -> None:
    body = shortstr("k") + b"Z\x00"
    with pytest.raises(AMQPProtocolError, match="unknown field type"):
        parse_connection_start(start_payload(properties=struct.pack(">I", len(body)) + body))


def test_parse_connection_start_table_overrunning_its_size() -> None:
    # The inner value claims more bytes than the table's own size allows.
    body = shortstr("k") + b"S" + struct.pack(">I", 50) + b"abc"
    with pytest.raises(AMQPProtocolError, match="truncated"):
        parse_connection_start(start_payload(properties=struct.pack(">I", len(body)) + body))


def test_parse_connection_start_bad_utf8_name() -> None:
    body = b"\x02\xff\xfe" + b"V"
    with pytest.raises(AMQPProtocolError, match="not UTF-8"):
        parse_connection_start(start_payload(properties=struct.pack(">I", len(body)) + body))


def test_parse_connection_start_bad_utf8_mechanisms() -> None:
    with pytest.raises(AMQPProtocolError, match="mechanisms"):
        parse_connection_start(start_payload(mechanisms=b"\xff"))


def test_parse_connection_start_deep_nesting_is_refused() -> None:
    nested = b""
    for _ in range(5000):
        nested = b"A" + longstr(nested)
    body = shortstr("deep") + nested
    with pytest.raises(AMQPProtocolError, match="nested"):
        parse_connection_start(start_payload(properties=struct.pack(">I", len(body)) + body))


# --- StartProbe ----------------------------------------------------------------------------------------


def test_probe_in_one_piece() -> None:
    probe = StartProbe()
    assert probe.result() is NEED_DATA
    probe.receive_data(START_FRAME)
    result = probe.result()
    assert isinstance(result, ConnectionStart)
    check_rabbitmq_start(result)
    # The answer is kept; later bytes are ignored.
    probe.receive_data(b"garbage")
    assert probe.result() is result


def test_probe_byte_by_byte() -> None:
    probe = StartProbe()
    for i in range(len(START_FRAME) - 1):
        probe.receive_data(START_FRAME[i : i + 1])
        assert probe.result() is NEED_DATA
    probe.receive_data(START_FRAME[-1:])
    result = probe.result()
    assert isinstance(result, ConnectionStart)
    check_rabbitmq_start(result)


def test_probe_http_reply() -> None:
    probe = StartProbe()
    probe.receive_data(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    with pytest.raises(AMQPProtocolError, match=r"HTTP/1\.1 400"):
        probe.result()


def test_probe_ssh_banner() -> None:
    probe = StartProbe()
    probe.receive_data(b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\r\n")
    with pytest.raises(AMQPProtocolError, match=r"SSH-2\.0"):
        probe.result()


@pytest.mark.parametrize(
    ("reply", "version"),
    [
        (b"AMQP\x00\x01\x00\x00", "1-0-0"),
        (b"AMQP\x01\x01\x08\x00", "0-8-0"),
        (b"AMQP\x00\x00\x09\x01", "0-9-1"),
    ],
)
def test_probe_header_reply_names_the_version(reply: bytes, version: str) -> None:
    probe = StartProbe()
    probe.receive_data(reply)
    with pytest.raises(AMQPProtocolError, match=f"asked for AMQP {version}"):
        probe.result()


def test_probe_header_reply_then_close() -> None:
    probe = StartProbe()
    probe.receive_data(b"AMQP\x00\x01\x00\x00")
    probe.receive_data(b"")
    with pytest.raises(AMQPProtocolError, match="asked for AMQP 1-0-0"):
        probe.result()


def test_probe_closed_before_start() -> None:
    probe = StartProbe()
    probe.receive_data(b"")
    with pytest.raises(AMQPProtocolError, match="closed the connection"):
        probe.result()


def test_probe_closed_mid_frame() -> None:
    probe = StartProbe()
    probe.receive_data(START_FRAME[:30])
    assert probe.result() is NEED_DATA
    probe.receive_data(b"")
    with pytest.raises(AMQPProtocolError, match="middle of a frame"):
        probe.result()


@pytest.mark.parametrize(
    "first_frame",
    [
        HEARTBEAT,
        frame(FRAME_METHOD, 1, start_payload()),
        frame(3, 0, b"body"),
        frame(FRAME_METHOD, 0, b"\x00\x0a\x00\x32" + b"\x00" * 8),
    ],
)
def test_probe_rejects_other_first_frames(first_frame: bytes) -> None:
    probe = StartProbe()
    probe.receive_data(first_frame)
    with pytest.raises(AMQPProtocolError):
        probe.result()


def test_probe_rejects_other_start_versions() -> None:
    probe = StartProbe()
    probe.receive_data(frame(FRAME_METHOD, 0, start_payload(major=8, minor=0)))
    with pytest.raises(AMQPProtocolError, match="8-0"):
        probe.result()


def test_probe_refuses_a_huge_first_frame_early() -> None:
    probe = StartProbe()
    probe.receive_data(struct.pack(">BHI", FRAME_METHOD, 0, 10 << 20))
    with pytest.raises(AMQPProtocolError, match="exceeds the limit"):
        probe.result()


# --- properties: nothing but AMQPProtocolError, whatever arrives ---------------------------------------
# Arbitrary bytes in arbitrary chunks are covered once, in test_fuzz.py; these aim at the decoders behind valid
# framing, which random bytes rarely reach.


@given(st.binary(max_size=300))
def test_probe_with_valid_framing_and_arbitrary_start_arguments(arguments: bytes) -> None:
    # Valid frame and method id around arbitrary arguments, so the field-table decoder itself is exercised.
    probe = StartProbe()
    probe.receive_data(frame(FRAME_METHOD, 0, b"\x00\x0a\x00\x0a" + arguments))
    try:
        probe.result()
    except AMQPProtocolError:
        pass


@given(
    st.lists(
        st.tuples(st.text(max_size=8), st.sampled_from(b"tbBUuIiLlfdDsSATFVxZ"), st.binary(max_size=12)),
        max_size=8,
    )
)
def test_field_tables_from_plausible_pieces(entries: list[tuple[str, int, bytes]]) -> None:
    body = b"".join(shortstr(name) + bytes([kind]) + raw for name, kind, raw in entries)
    payload = start_payload(properties=struct.pack(">I", len(body)) + body)
    try:
        parse_connection_start(payload)
    except AMQPProtocolError:
        pass
