"""The AMQP 1.0 identity reader: SASL PLAIN user and ``open`` hostname from a client's bytes, however they arrive."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from rabbitproxy.protocols.amqp10 import AMQP10_HEADER, AMQP10_SASL_HEADER, Amqp10Reader
from rabbitproxy.protocols.amqp_handshake import MAX_HANDSHAKE_BYTES, MAX_TEXT
from tests.support.chunks import chunked

# -- a minimal AMQP 1.0 encoder (part 1 of the spec), enough to write what clients send -------------------------------


def sym(text: str) -> bytes:
    raw = text.encode()
    return b"\xa3" + bytes([len(raw)]) + raw


def string(text: str, *, wide: bool = False) -> bytes:
    raw = text.encode()
    wide = wide or len(raw) > 255
    return b"\xb1" + struct.pack(">I", len(raw)) + raw if wide else b"\xa1" + bytes([len(raw)]) + raw


def binary(raw: bytes) -> bytes:
    return b"\xb0" + struct.pack(">I", len(raw)) + raw if len(raw) > 255 else b"\xa0" + bytes([len(raw)]) + raw


NULL = b"\x40"


def described_list(descriptor: bytes, fields: list[bytes], *, wide: bool = False) -> bytes:
    body = b"".join(fields)
    if wide or len(body) > 254:
        return b"\x00" + descriptor + b"\xd0" + struct.pack(">II", len(body) + 4, len(fields)) + body
    return b"\x00" + descriptor + b"\xc0" + bytes([len(body) + 1, len(fields)]) + body


def frame(kind: int, body: bytes, *, extended: bytes = b"") -> bytes:
    doff = 2 + len(extended) // 4
    return struct.pack(">IBBH", 8 + len(extended) + len(body), doff, kind, 0) + extended + body


def sasl_init(mechanism: str, response: bytes | None, hostname: str | None = None) -> bytes:
    fields = [sym(mechanism), binary(response) if response is not None else NULL]
    if hostname is not None:
        fields.append(string(hostname))
    return frame(0x01, described_list(b"\x53\x41", fields))


def open_frame(container: str, hostname: str | None, *, symbolic: bool = False, wide: bool = False) -> bytes:
    descriptor = sym("amqp:open:list") if symbolic else b"\x53\x10"
    fields = [string(container), string(hostname, wide=wide) if hostname is not None else NULL]
    # max-frame-size, channel-max, idle-time-out and properties (a map) follow; the reader must skip them.
    fields += [b"\x70\x00\x01\x00\x00", b"\x60\xff\xff", b"\x52\x00", b"\xc1\x03\x02\x40\x40"]
    return frame(0x00, described_list(descriptor, fields, wide=wide))


def client_bytes(user: str = "guest", vhost: str = "/") -> bytes:
    """What RabbitMQ's AMQP 1.0 clients send, the broker's frames left out."""
    return (
        AMQP10_SASL_HEADER
        + sasl_init("PLAIN", b"\x00" + user.encode() + b"\x00secret", "localhost")
        + AMQP10_HEADER
        + open_frame("container-1", f"vhost:{vhost}")
    )


def read(*pieces: bytes) -> Amqp10Reader:
    reader = Amqp10Reader()
    for piece in pieces:
        reader.client_data(piece)
    return reader


def test_sasl_plain_user_and_vhost_from_the_open_frame() -> None:
    reader = read(client_bytes("alice", "orders"))
    hs = reader.handshake
    assert (hs.protocol, hs.mechanism, hs.user, hs.vhost) == ("1.0", "PLAIN", "alice", "orders")
    assert reader.done and reader.gave_up is None


@given(st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_any_chunking_reads_the_same(cuts: list[int]) -> None:
    hs = read(*chunked(client_bytes("bob", "/"), cuts)).handshake
    assert (hs.user, hs.vhost) == ("bob", "/")


def test_without_sasl_the_open_frame_alone_names_the_vhost() -> None:
    reader = read(AMQP10_HEADER + open_frame("c", "vhost:v1"))
    assert (reader.handshake.user, reader.handshake.mechanism, reader.handshake.vhost) == (None, None, "v1")
    assert reader.done


def test_symbolic_descriptors_wide_encodings_and_extended_headers_are_read() -> None:
    opened = open_frame("c", "vhost:wide", symbolic=True, wide=True)
    # The same frame with a 4-byte extended header: the body starts at the data offset, not at byte 8.
    size, _doff, kind, channel = struct.unpack_from(">IBBH", opened)
    extended = struct.pack(">IBBH", size + 4, 3, kind, channel) + b"\x00\x00\x00\x00" + opened[8:]
    reader = read(AMQP10_HEADER, extended)
    assert reader.handshake.vhost == "wide"


def test_a_hostname_without_the_vhost_prefix_is_kept_apart_and_heartbeats_are_skipped() -> None:
    heartbeat = struct.pack(">IBBH", 8, 2, 0, 0)
    reader = read(AMQP10_HEADER + heartbeat + open_frame("c", "broker.example.com"))
    assert reader.handshake.vhost is None
    assert reader.handshake.extra == {"hostname": "broker.example.com"}


def test_other_mechanisms_name_no_user() -> None:
    data = AMQP10_SASL_HEADER + sasl_init("ANONYMOUS", None) + AMQP10_HEADER + open_frame("c", "vhost:/")
    hs = read(data).handshake
    assert (hs.mechanism, hs.user, hs.vhost) == ("ANONYMOUS", None, "/")


def test_long_text_is_cut() -> None:
    hs = read(client_bytes("u" * 1000, "v" * 300)).handshake
    assert hs.user == "u" * MAX_TEXT
    assert hs.vhost is not None and len(hs.vhost) == MAX_TEXT - len("vhost:")


def test_not_1_0_or_malformed_bytes_make_it_step_aside_never_raise() -> None:
    assert read(b"AMQP\x00\x00\x09\x01").gave_up == "not an AMQP 1.0 header: b'AMQP\\x00\\x00\\t\\x01'"
    bad_offset = AMQP10_HEADER + struct.pack(">IBBH", 8, 1, 0, 0)
    assert read(bad_offset).gave_up == "bad frame header"
    huge = AMQP10_HEADER + struct.pack(">IBBH", MAX_HANDSHAKE_BYTES + 1, 2, 0, 0)
    assert read(huge).gave_up == f"a {MAX_HANDSHAKE_BYTES + 1}-byte frame during the handshake"
    unknown_constructor = AMQP10_HEADER + frame(0x00, b"\x00\x53\x10\xc0\x03\x01\x3f\x00")
    assert read(unknown_constructor).gave_up == "constructor 0x3f"
    reader = read(b"AMQP\x00\x00\x09\x01")
    reader.client_data(client_bytes())  # done: ignored
    assert reader.handshake.user is None


@given(st.binary(max_size=300))
def test_arbitrary_bytes_after_the_header_never_raise(noise: bytes) -> None:
    reader = read(AMQP10_SASL_HEADER + noise)
    assert reader.handshake.protocol == "1.0"


def test_a_client_that_never_opens_is_given_up_on_at_the_handshake_limit() -> None:
    reader = read(AMQP10_HEADER)
    heartbeat = struct.pack(">IBBH", 8, 2, 0, 0)
    for _ in range(MAX_HANDSHAKE_BYTES // len(heartbeat) + 1):
        reader.client_data(heartbeat)
    assert reader.gave_up == "no open frame within the handshake limit"
