"""Unit tests for rabbitproxy.protocols.proxy_header (PROXY protocol v1/v2)."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rabbitproxy.protocols.proxy_header import (
    NEED_DATA,
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    Address,
    ProxyHeader,
    ProxyHeaderReader,
    ProxyProtocolError,
    build_v1,
    build_v2,
    build_v2_local,
    looks_like_header,
    source_trusted,
)
from tests.support.chunks import chunked

AMQP_HEADER = b"AMQP\x00\x00\x09\x01"


def read_whole(data: bytes) -> ProxyHeader:
    reader = ProxyHeaderReader()
    reader.receive_data(data)
    event = reader.next_event()
    assert isinstance(event, ProxyHeader)
    return event


def read_bytewise(data: bytes) -> ProxyHeader:
    reader = ProxyHeaderReader()
    for i in range(len(data)):
        reader.receive_data(data[i : i + 1])
        event = reader.next_event()
        if event is not NEED_DATA:
            # Whatever was fed after the header is in rest; hand over the remainder as the stream would.
            assert isinstance(event, ProxyHeader)
            return ProxyHeader(event.version, event.command, event.src, event.dst, event.rest + data[i + 1 :])
    raise AssertionError("header never completed")


def refuse(data: bytes, match: str | None = None) -> None:
    reader = ProxyHeaderReader()
    reader.receive_data(data)
    with pytest.raises(ProxyProtocolError, match=match):
        reader.next_event()


# --- building ------------------------------------------------------------------------------------------


def test_build_v1_ipv4() -> None:
    header = build_v1(("192.168.0.1", 56324), ("192.168.0.11", 443))
    assert header == b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"


def test_build_v1_ipv6_is_compressed() -> None:
    header = build_v1(("2001:db8:0:0::1", 1), ("::1", 5672))
    assert header == b"PROXY TCP6 2001:db8::1 ::1 1 5672\r\n"


def test_build_v1_longest_fits() -> None:
    full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    header = build_v1((full, 65535), (full, 65535))
    assert len(header) <= V1_MAX_LENGTH


def test_build_v1_unknown() -> None:
    assert build_v1(None, None) == b"PROXY UNKNOWN\r\n"
    assert build_v1(("10.0.0.1", 1), None) == b"PROXY UNKNOWN\r\n"


def test_build_v1_mixed_families_maps_ipv4() -> None:
    header = build_v1(("10.0.0.1", 1000), ("2001:db8::5", 5672))
    assert header == b"PROXY TCP6 ::ffff:a00:1 2001:db8::5 1000 5672\r\n"
    parsed = read_whole(header)
    assert parsed.src is not None
    assert ipaddress.IPv6Address(parsed.src[0]).ipv4_mapped == ipaddress.IPv4Address("10.0.0.1")


def test_build_drops_ipv6_zone_index() -> None:
    assert build_v1(("fe80::1%eth0", 1), ("fe80::2", 2)) == b"PROXY TCP6 fe80::1 fe80::2 1 2\r\n"
    assert read_whole(build_v2(("fe80::1%eth0", 1), ("fe80::2", 2))).src == ("fe80::1", 1)


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (("localhost", 1), ("10.0.0.1", 2)),
        (("10.0.0.1", -1), ("10.0.0.1", 2)),
        (("10.0.0.1", 1), ("10.0.0.1", 65536)),
        (("10.0.0.1", True), ("10.0.0.1", 2)),
        (("010.0.0.1", 1), ("10.0.0.1", 2)),
    ],
)
def test_build_rejects_bad_addresses(src: Address, dst: Address) -> None:
    with pytest.raises(ValueError, match=r"address|port") as info:
        build_v1(src, dst)
    # Building is our side: a bad address is our bug, not a peer's protocol error.
    assert not isinstance(info.value, ProxyProtocolError)
    with pytest.raises(ValueError, match=r"address|port"):
        build_v2(src, dst)


def test_build_v2_ipv4_bytes() -> None:
    header = build_v2(("192.168.0.1", 56324), ("192.168.0.11", 443))
    expected = (
        V2_SIGNATURE
        + b"\x21\x11\x00\x0c"
        + bytes([192, 168, 0, 1, 192, 168, 0, 11])
        + struct.pack(">HH", 56324, 443)
    )
    assert header == expected


def test_build_v2_ipv6_bytes() -> None:
    header = build_v2(("2001:db8::1", 1), ("::1", 5672))
    expected = (
        V2_SIGNATURE
        + b"\x21\x21\x00\x24"
        + ipaddress.IPv6Address("2001:db8::1").packed
        + ipaddress.IPv6Address("::1").packed
        + struct.pack(">HH", 1, 5672)
    )
    assert header == expected


def test_build_v2_unspec_and_local() -> None:
    assert build_v2(None, None) == V2_SIGNATURE + b"\x21\x00\x00\x00"
    assert build_v2_local() == V2_SIGNATURE + b"\x20\x00\x00\x00"
    assert V2_SIGNATURE == bytes.fromhex("0d0a0d0a000d0a515549540a")


# --- reading: round trips ------------------------------------------------------------------------------

ROUND_TRIPS = [
    (("192.168.0.1", 56324), ("192.168.0.11", 443)),
    (("0.0.0.0", 0), ("255.255.255.255", 65535)),
    (("2001:db8::1", 40000), ("2001:db8::2", 5672)),
    (("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535), ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535)),
    (("::", 0), ("::1", 1)),
]


@pytest.mark.parametrize(("src", "dst"), ROUND_TRIPS)
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("reader", [read_whole, read_bytewise])
def test_round_trip(src: Address, dst: Address, version: int, reader: object) -> None:
    build = build_v1 if version == 1 else build_v2
    assert callable(reader)
    parsed = reader(build(src, dst) + AMQP_HEADER)
    assert parsed == ProxyHeader(version, "proxy", src, dst, AMQP_HEADER)


@pytest.mark.parametrize("header", [build_v1(None, None), build_v2(None, None), build_v2_local()])
def test_round_trip_without_addresses(header: bytes) -> None:
    parsed = read_bytewise(header + AMQP_HEADER)
    assert parsed.src is None and parsed.dst is None
    assert parsed.rest == AMQP_HEADER
    assert parsed.command == ("local" if header == build_v2_local() else "proxy")
    assert parsed.version == (1 if header.startswith(b"PROXY") else 2)


def test_rest_is_empty_when_nothing_followed() -> None:
    assert read_whole(build_v1(("10.0.0.1", 1), ("10.0.0.2", 2))).rest == b""


def test_rest_keeps_a_large_stream_start() -> None:
    stream = bytes(range(256)) * 40
    assert read_whole(build_v2(("10.0.0.1", 1), ("10.0.0.2", 2)) + stream).rest == stream


def test_v1_canonicalises_ipv6_text() -> None:
    parsed = read_whole(b"PROXY TCP6 2001:DB8:0::1 ::FFFF:10.0.0.1 1 2\r\n")
    assert parsed.src == ("2001:db8::1", 1)
    assert parsed.dst == ("::ffff:a00:1", 2)


def test_v1_unknown_with_addresses_ignores_them() -> None:
    line = b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n"
    assert read_whole(line + b"x") == ProxyHeader(1, "proxy", None, None, b"x")


def test_v1_longest_line_accepted_and_one_more_refused() -> None:
    line = b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 16) + b"\r\n"
    assert len(line) == V1_MAX_LENGTH
    assert read_whole(line).src is None
    too_long = b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 15) + b"\r\n"
    refuse(too_long, "not ended within 107")


def test_v1_overlong_refused_without_waiting_for_more() -> None:
    reader = ProxyHeaderReader()
    reader.receive_data(b"PROXY " + b"1" * 200)
    with pytest.raises(ProxyProtocolError, match="107"):
        reader.next_event()


def test_v2_skips_tlvs() -> None:
    addresses = bytes([10, 0, 0, 1, 10, 0, 0, 2]) + struct.pack(">HH", 1000, 5672)
    tlv = b"\x04" + struct.pack(">H", 3) + b"abc"  # PP2_TYPE_NOOP with three bytes
    header = V2_SIGNATURE + b"\x21\x11" + struct.pack(">H", len(addresses + tlv)) + addresses + tlv
    assert read_bytewise(header + AMQP_HEADER) == ProxyHeader(
        2, "proxy", ("10.0.0.1", 1000), ("10.0.0.2", 5672), AMQP_HEADER
    )


def test_v2_local_ignores_addresses() -> None:
    addresses = bytes([10, 0, 0, 1, 10, 0, 0, 2]) + struct.pack(">HH", 1, 2)
    header = V2_SIGNATURE + b"\x20\x11" + struct.pack(">H", len(addresses)) + addresses
    assert read_whole(header) == ProxyHeader(2, "local", None, None, b"")


def test_v2_unix_family_has_no_addresses() -> None:
    header = V2_SIGNATURE + b"\x21\x31" + struct.pack(">H", 216) + b"/tmp/a".ljust(108, b"\0") * 2
    assert read_whole(header + b"z") == ProxyHeader(2, "proxy", None, None, b"z")


def test_v2_dgram_ipv4_still_reads_addresses() -> None:
    addresses = bytes([10, 0, 0, 1, 10, 0, 0, 2]) + struct.pack(">HH", 1, 2)
    header = V2_SIGNATURE + b"\x21\x12" + struct.pack(">H", len(addresses)) + addresses
    assert read_whole(header).src == ("10.0.0.1", 1)


# --- reading: refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("first", [b"G", b"A", b"\x16", b"\x00", b"p", b"\n"])
def test_refuses_from_the_first_byte(first: bytes) -> None:
    refuse(first, "not a PROXY header")


@pytest.mark.parametrize("start", [b"PROXX", b"PROXY\t", b"\r\n\r\n\x01", b"\r\r", b"PR0"])
def test_refuses_a_wrong_signature_as_soon_as_it_differs(start: bytes) -> None:
    refuse(start, "not a PROXY header")


def test_needs_data_for_a_correct_partial_signature() -> None:
    for partial in (b"P", b"PROXY", b"PROXY TCP4 1.2", V2_SIGNATURE[:7], V2_SIGNATURE + b"\x21\x11\x00"):
        reader = ProxyHeaderReader()
        reader.receive_data(partial)
        assert reader.next_event() is NEED_DATA


@pytest.mark.parametrize(
    "data",
    [
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",  # LF without CR
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r2\r\n",
        b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
        b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n",
        b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 999999\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1_0 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
        b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
        b"PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \xff\r\n",
        b"PROXY UNKNOWNX\r\n",
        b"PROXY \r\n",
        b"PROXY\r\n",
    ],
)
def test_v1_malformed(data: bytes) -> None:
    refuse(data)


def test_v1_invalid_byte_refused_before_line_end() -> None:
    refuse(b"PROXY TCP4 1.2.3.4\x00", "invalid byte")
    refuse(b"PROXY TCP4 1.2.3.4\n", "invalid byte")


def test_v2_length_limit_checked_from_the_fixed_header() -> None:
    reader = ProxyHeaderReader(max_v2_length=100)
    reader.receive_data(V2_SIGNATURE + b"\x21\x11" + struct.pack(">H", 101))
    with pytest.raises(ProxyProtocolError, match="exceeds the limit"):
        reader.next_event()
    with pytest.raises(ValueError, match="max_v2_length"):
        ProxyHeaderReader(max_v2_length=70000)


@pytest.mark.parametrize(
    ("fixed", "match"),
    [
        (b"\x11\x11\x00\x0c", "version"),
        (b"\x31\x11\x00\x0c", "version"),
        (b"\x22\x11\x00\x0c", "command"),
        (b"\x21\x41\x00\x0c", "family"),
        (b"\x21\x13\x00\x0c", "family"),
        (b"\x21\x11\x00\x0b", "too short"),
        (b"\x21\x21\x00\x0c", "too short"),
        (b"\x21\x31\x00\x24", "too short"),
    ],
)
def test_v2_malformed_fixed_header(fixed: bytes, match: str) -> None:
    refuse(V2_SIGNATURE + fixed + b"\x00" * 300, match)


def test_eof_before_header_complete() -> None:
    reader = ProxyHeaderReader()
    reader.receive_data(b"PROXY TCP4 ")
    assert reader.next_event() is NEED_DATA
    reader.receive_data(b"")
    with pytest.raises(ProxyProtocolError, match="closed before"):
        reader.next_event()


def test_eof_with_nothing_received() -> None:
    reader = ProxyHeaderReader()
    reader.receive_data(b"")
    with pytest.raises(ProxyProtocolError, match="closed before"):
        reader.next_event()


def test_errors_are_sticky() -> None:
    reader = ProxyHeaderReader()
    reader.receive_data(b"GET / HTTP/1.1\r\n")
    with pytest.raises(ProxyProtocolError):
        reader.next_event()
    with pytest.raises(ProxyProtocolError):
        reader.next_event()


def test_reader_is_single_use() -> None:
    reader = ProxyHeaderReader()
    reader.receive_data(build_v1(None, None))
    assert isinstance(reader.next_event(), ProxyHeader)
    with pytest.raises(RuntimeError):
        reader.next_event()
    with pytest.raises(RuntimeError):
        reader.receive_data(b"more")


def test_error_is_a_value_error() -> None:
    assert issubclass(ProxyProtocolError, ValueError)


# --- properties ----------------------------------------------------------------------------------------
# Arbitrary bytes in arbitrary chunks are covered once, in test_fuzz.py; these start from valid prefixes.


def feed_all(data: bytes, cuts: list[int], eof: bool) -> None:
    reader = ProxyHeaderReader(max_v2_length=256)
    try:
        for piece in chunked(data, cuts):
            reader.receive_data(piece)
            event = reader.next_event()
            if event is not NEED_DATA:
                assert isinstance(event, ProxyHeader)
                assert data.endswith(event.rest)
                return
        if eof:
            reader.receive_data(b"")
            reader.next_event()
    except ProxyProtocolError:
        pass


CUTS = st.lists(st.integers(min_value=0, max_value=400), max_size=20)


@given(
    st.sampled_from([b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", V2_SIGNATURE]),
    st.binary(max_size=300),
    CUTS,
)
def test_garbage_after_a_valid_start(start: bytes, tail: bytes, cuts: list[int]) -> None:
    feed_all(start + tail, cuts, True)


@given(
    st.text(alphabet="0123456789abcdefABCDEF.:%TCP46UNKOWX ", max_size=100),
    CUTS,
)
def test_plausible_v1_lines(body: str, cuts: list[int]) -> None:
    feed_all(b"PROXY " + body.encode() + b"\r\n", cuts, True)


ipv4 = st.builds(lambda n: str(ipaddress.IPv4Address(n)), st.integers(min_value=0, max_value=2**32 - 1))
ipv6 = st.builds(lambda n: str(ipaddress.IPv6Address(n)), st.integers(min_value=0, max_value=2**128 - 1))
ports = st.integers(min_value=0, max_value=65535)


@given(
    st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6)),
    ports,
    ports,
    st.sampled_from([1, 2]),
    st.binary(max_size=50),
    CUTS,
)
def test_round_trip_property(
    hosts: tuple[str, str], sport: int, dport: int, version: int, tail: bytes, cuts: list[int]
) -> None:
    src, dst = (hosts[0], sport), (hosts[1], dport)
    data = (build_v1 if version == 1 else build_v2)(src, dst) + tail
    reader = ProxyHeaderReader()
    fed = 0
    for piece in chunked(data, cuts):
        reader.receive_data(piece)
        fed += len(piece)
        event = reader.next_event()
        if event is not NEED_DATA:
            assert isinstance(event, ProxyHeader)
            assert (event.version, event.command, event.src, event.dst) == (version, "proxy", src, dst)
            assert event.rest + data[fed:] == tail
            return
    raise AssertionError("header never completed")


@pytest.mark.parametrize(
    ("data", "verdict"),
    [
        (b"AMQP\x00\x00\x09\x01", False),
        (b"A", False),
        (b"P", None),
        (b"PROXY", None),
        (b"PROXY ", True),
        (b"PROXY TCP4 1.2.3.4", True),
        (b"PING", False),
        (b"\r\n\r\n\x00\r\nQUI", None),
        (b"\r\n\r\n\x00\r\nQUIT\n", True),
        (b"\r\n\r\n\x00\r\nQUIX", False),
    ],
)
def test_looks_like_header(data: bytes, verdict: bool | None) -> None:
    assert looks_like_header(data) is verdict


@pytest.mark.parametrize(
    ("host", "trusted"),
    [
        ("10.1.2.3", True),
        ("::ffff:10.1.2.3", True),  # an IPv4 client on a dual-stack listener
        ("11.0.0.1", False),
        ("2001:db8::7", True),
        ("2001:db9::7", False),
        ("::1", False),
        ("unknown", False),
    ],
)
def test_source_trusted(host: str, trusted: bool) -> None:
    networks = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"))
    assert source_trusted(host, networks) is trusted
