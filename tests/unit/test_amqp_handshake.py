"""The handshake reader: identity from both sides of a 0-9-1 handshake, no password kept, never raises."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from rabbitproxy.protocols.amqp import PROTOCOL_HEADER
from rabbitproxy.protocols.amqp_handshake import (
    AMQP10_SASL_HEADER,
    MAX_HANDSHAKE_BYTES,
    HandshakeReader,
    amqplain_user,
    plain_user,
)


def shortstr(text: str) -> bytes:
    raw = text.encode()
    return bytes([len(raw)]) + raw


def longstr(raw: bytes) -> bytes:
    return struct.pack(">I", len(raw)) + raw


def table(items: dict[str, str]) -> bytes:
    body = b"".join(shortstr(k) + b"S" + longstr(v.encode()) for k, v in items.items())
    return longstr(body)


def method(method_id: int, args: bytes, channel: int = 0) -> bytes:
    payload = struct.pack(">HH", 10, method_id) + args
    return struct.pack(">BHI", 1, channel, len(payload)) + payload + b"\xce"


PROPS = {"connection_name": "orders-writer", "product": "aio-pika", "version": "9.4.1", "platform": "Python 3.11"}
SECRET = "s3cr3t-password"


def client_steps(mechanism: str = "PLAIN", vhost: str = "/orders", heartbeat: int = 5) -> list[bytes]:
    """What the client sends, one entry per turn of the conversation."""
    if mechanism == "PLAIN":
        response = b"\x00alice\x00" + SECRET.encode()
    else:
        response = shortstr("LOGIN") + b"S" + longstr(b"alice") + shortstr("PASSWORD") + b"S" + longstr(SECRET.encode())
    start_ok = method(11, table(PROPS) + shortstr(mechanism) + longstr(response) + shortstr("en_US"))
    tune_ok = method(31, struct.pack(">HIH", 2047, 131072, heartbeat))
    open_ = method(40, shortstr(vhost) + shortstr("") + b"\x00")
    return [PROTOCOL_HEADER, start_ok, tune_ok + open_]


def client_bytes(mechanism: str = "PLAIN") -> bytes:
    return b"".join(client_steps(mechanism))


def server_steps(close: tuple[int, str] | None = None) -> list[bytes]:
    """What the broker answers, one entry per turn: start, then tune (or close), then open-ok."""
    start = method(10, b"\x00\x09" + table({"product": "RabbitMQ"}) + longstr(b"PLAIN AMQPLAIN") + longstr(b"en_US"))
    if close is not None:
        code, text = close
        return [start, method(50, struct.pack(">H", code) + shortstr(text) + struct.pack(">HH", 10, 11))]
    tune = method(30, struct.pack(">HIH", 2047, 131072, 60))
    return [start, tune, method(41, shortstr(""))]


def server_bytes() -> bytes:
    return b"".join(server_steps())


def run(client: list[bytes], server: list[bytes], chunk: int = 1 << 20) -> HandshakeReader:
    """Take turns as a real connection does (client header, broker start, ...), each turn in ``chunk``s."""
    reader = HandshakeReader()
    for turn in range(max(len(client), len(server))):
        for feed, steps in ((reader.client_data, client), (reader.server_data, server)):
            data = steps[turn] if turn < len(steps) else b""
            for i in range(0, len(data), chunk):
                feed(data[i : i + chunk])
    return reader


def test_plain_handshake_gives_identity_and_tuning() -> None:
    reader = run(client_steps(), server_steps())
    hs = reader.handshake
    assert reader.done and reader.gave_up is None
    assert (hs.protocol, hs.mechanism, hs.user, hs.vhost) == ("0-9-1", "PLAIN", "alice", "/orders")
    assert (hs.connection_name, hs.product, hs.version, hs.platform) == (
        "orders-writer",
        "aio-pika",
        "9.4.1",
        "Python 3.11",
    )
    assert (hs.channel_max, hs.frame_max, hs.heartbeat) == (2047, 131072, 5)
    assert hs.outcome == "open"


def test_amqplain_user_is_the_login() -> None:
    reader = run(client_steps("AMQPLAIN"), server_steps())
    assert reader.handshake.user == "alice"
    assert reader.handshake.mechanism == "AMQPLAIN"


def test_the_password_is_kept_nowhere() -> None:
    for mechanism in ("PLAIN", "AMQPLAIN"):
        reader = run(client_steps(mechanism), server_steps(), chunk=7)
        assert SECRET not in repr(reader.handshake)
        assert SECRET.encode() not in bytes(reader._client.buffer) + bytes(reader._server.buffer)


def test_refused_login_is_the_outcome() -> None:
    reader = run(client_steps(), server_steps(close=(403, "ACCESS_REFUSED - Login was refused")))
    hs = reader.handshake
    assert reader.done
    assert (hs.outcome, hs.close_code) == ("refused", 403)
    assert hs.close_text is not None and hs.close_text.startswith("ACCESS_REFUSED")
    assert hs.user == "alice"


def test_byte_by_byte_gives_the_same_result() -> None:
    whole = run(client_steps(), server_steps()).handshake
    assert run(client_steps(), server_steps(), chunk=1).handshake == whole


def test_amqp_1_0_steps_aside() -> None:
    reader = HandshakeReader()
    reader.client_data(AMQP10_SASL_HEADER + b"\x00\x00\x00\x10")
    assert reader.done
    assert reader.handshake.protocol == "1.0"
    assert reader.gave_up == "AMQP 1.0"


def test_not_amqp_gives_up_at_once() -> None:
    reader = HandshakeReader()
    reader.client_data(b"GET / HTTP/1.1\r\n")
    assert reader.done and reader.gave_up is not None


def test_a_client_that_never_opens_is_given_up_after_the_cap() -> None:
    reader = HandshakeReader()
    reader.client_data(PROTOCOL_HEADER)
    heartbeat = struct.pack(">BHI", 8, 0, 0) + b"\xce"
    for _ in range(MAX_HANDSHAKE_BYTES // len(heartbeat) + 2):
        reader.client_data(heartbeat)
    assert reader.done
    assert reader.gave_up is not None and "more than" in reader.gave_up
    assert not reader._client.buffer


def test_nothing_after_open_is_read() -> None:
    reader = HandshakeReader()
    reader.client_data(client_bytes())
    reader.client_data(b"garbage that is not a frame")
    assert reader.gave_up is None
    reader.server_data(server_bytes())
    assert reader.done and reader.gave_up is None


def test_sasl_helpers_tolerate_odd_responses() -> None:
    assert plain_user(b"no separators") is None
    assert plain_user(b"\x00bob\x00pw") == "bob"
    assert amqplain_user(shortstr("PASSWORD") + b"S" + longstr(b"x")) is None


@given(st.binary(max_size=512), st.binary(max_size=512), st.integers(min_value=1, max_value=64))
def test_garbage_never_raises(client: bytes, server: bytes, chunk: int) -> None:
    reader = run([PROTOCOL_HEADER + client], [server], chunk)
    if reader.gave_up is not None:
        # Once it has given up it holds nothing and reads nothing more.
        assert reader.done
        assert not reader._client.buffer and not reader._server.buffer


@given(st.integers(min_value=0, max_value=len(client_bytes()) - 1), st.integers(min_value=1, max_value=40))
def test_every_truncation_is_safe(cut: int, chunk: int) -> None:
    reader = run([client_bytes()[:cut]], server_steps(), chunk)
    # A handshake cut short never claims an open connection for the client's side it did not see.
    assert reader.handshake.vhost is None
