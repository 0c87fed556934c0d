"""Every parser of untrusted bytes, fed hostile input: only its declared error type may come out.

Two kinds of test per parser: hypothesis properties (arbitrary bytes, arbitrary chunking, mutated valid input,
round trips) and a plain mutation fuzz run with a fixed seed, which reaches far more inputs than hypothesis' example
budget in about a second and is reproducible by construction.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random
from collections.abc import Callable, Iterator

from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import commands
from pamqp import frame as pamqp_frame

from rabbitproxy.protocols import amqp
from rabbitproxy.protocols import proxy_header as proxyproto
from rabbitproxy.protocols.agent_reply import AgentReply, AgentReplyError, parse_agent_reply
from tests.support.chunks import chunked

# --- corpora: valid inputs the mutations start from -------------------------------------------------------------

PROXY_SEEDS = [
    proxyproto.build_v1(("192.0.2.1", 1234), ("198.51.100.2", 5672)),
    proxyproto.build_v1(("2001:db8::1", 65535), ("2001:db8::2", 1)),
    proxyproto.build_v1(None, None),
    proxyproto.build_v2(("192.0.2.1", 1234), ("198.51.100.2", 5672)),
    proxyproto.build_v2(("2001:db8::1", 65535), ("::ffff:10.0.0.1", 0)),
    proxyproto.build_v2(None, None),
    proxyproto.build_v2_local(),
    # v2 with a TLV after the addresses (length field covers it).
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x13" + bytes(12) + b"\x04\x00\x03abc",
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x31\x00\xd8" + bytes(216),
]

AGENT_SEEDS = [
    b"up 75%\n",
    b"drain",
    b"maint # patching",
    b"down#disk alarm\r\n",
    b"ready weight:50% maxconn:10",
    b"0%",
]


def _start_frame() -> bytes:
    start = commands.Connection.Start(
        server_properties={"product": "RabbitMQ", "version": "3.10.0", "capabilities": {"publisher_confirms": True}},
        mechanisms="PLAIN AMQPLAIN",
        locales="en_US",
    )
    return pamqp_frame.marshal(start, 0)


AMQP_SEEDS = [_start_frame(), b"AMQP\x00\x00\x09\x01", pamqp_frame.marshal(commands.Connection.CloseOk(), 0)]


# --- drivers: run one parser over chunks, let only the declared error out -----------------------------------------


def read_proxy(chunks: list[bytes]) -> proxyproto.ProxyHeader | None:
    """The header, or None for NEED_DATA at the end; ProxyProtocolError is the only exception allowed out."""
    reader = proxyproto.ProxyHeaderReader()
    for i, chunk in enumerate([*chunks, b""]):
        reader.receive_data(chunk)
        event = reader.next_event()
        if event is not proxyproto.NEED_DATA:
            assert isinstance(event, proxyproto.ProxyHeader)
            # The stream goes on after the header: what came with it, then what the caller would read next.
            return dataclasses.replace(event, rest=event.rest + b"".join(chunks[i + 1 :]))
    return None


def read_frames(chunks: list[bytes]) -> list[object]:
    reader = amqp.FrameReader(max_frame_size=4096)
    events: list[object] = []
    for chunk in [*chunks, b""]:
        reader.receive_data(chunk)
        while (event := reader.next_event()) is not amqp.NEED_DATA:
            assert isinstance(event, amqp.Frame | amqp.ProtocolHeader)
            events.append(event)
            if isinstance(event, amqp.ProtocolHeader):
                break
    return events


def probe(chunks: list[bytes]) -> object:
    p = amqp.StartProbe()
    for chunk in [*chunks, b""]:
        p.receive_data(chunk)
        result = p.result()
        if result is not amqp.NEED_DATA:
            assert isinstance(result, amqp.ConnectionStart)
            return result
    raise AssertionError("StartProbe returned NEED_DATA after EOF")


def outcome(fn: Callable[[list[bytes]], object], chunks: list[bytes], error: type[Exception]) -> object:
    """What ``fn`` made of ``chunks``: its value, or ("error", type) for the declared error; anything else fails."""
    try:
        return fn(chunks)
    except error as exc:
        assert str(exc), "errors must say what was wrong"
        return ("error", error)


# --- hypothesis properties ----------------------------------------------------------------------------------------

chunkings = st.lists(st.integers(min_value=0, max_value=400), max_size=6)


def mutated(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(0, 4))):
            kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
            pos = draw(st.integers(0, max(0, len(data))))
            if kind == "flip" and pos < len(data):
                data[pos] = draw(st.integers(0, 255))
            elif kind == "insert":
                data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
            elif kind == "delete" and pos < len(data):
                del data[pos]
            elif kind == "truncate":
                del data[pos:]
        return bytes(data) + draw(st.binary(max_size=16))

    return build()


@given(st.one_of(st.binary(max_size=300), mutated(PROXY_SEEDS)), chunkings)
@settings(max_examples=400)
def test_proxy_reader_raises_only_its_error_and_ignores_chunking(data: bytes, cuts: list[int]) -> None:
    whole = outcome(read_proxy, [data], proxyproto.ProxyProtocolError)
    assert outcome(read_proxy, chunked(data, cuts), proxyproto.ProxyProtocolError) == whole


ips = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)
ports = st.integers(0, 65535)


@given(ips, ports, ips, ports, st.sampled_from([proxyproto.build_v1, proxyproto.build_v2]), st.binary(max_size=20))
def test_built_headers_read_back_to_the_same_endpoints(
    src: str, sport: int, dst: str, dport: int, build: Callable[..., bytes], rest: bytes
) -> None:
    header = read_proxy([build((src, sport), (dst, dport)) + rest])
    assert header is not None and header.rest == rest and header.src is not None and header.dst is not None
    # A v4/v6 mix travels as v6 with the v4 side mapped; compare as addresses so both forms agree.
    for (host, port), (ohost, oport) in ((header.src, (src, sport)), (header.dst, (dst, dport))):
        got, want = ipaddress.ip_address(host), ipaddress.ip_address(ohost)
        if got.version != want.version:
            assert isinstance(got, ipaddress.IPv6Address) and got.ipv4_mapped == want
        else:
            assert got == want
        assert port == oport


@given(st.one_of(st.binary(max_size=300), mutated(AGENT_SEEDS)))
@settings(max_examples=400)
def test_agent_reply_parser_raises_only_its_error(data: bytes) -> None:
    result = outcome(lambda c: parse_agent_reply(c[0]), [data], AgentReplyError)
    assert isinstance(result, AgentReply) or result == ("error", AgentReplyError)


@given(st.one_of(st.binary(max_size=400), mutated(AMQP_SEEDS)), chunkings)
@settings(max_examples=400)
def test_amqp_frame_reader_raises_only_its_error_and_ignores_chunking(data: bytes, cuts: list[int]) -> None:
    whole = outcome(read_frames, [data], amqp.AMQPProtocolError)
    assert outcome(read_frames, chunked(data, cuts), amqp.AMQPProtocolError) == whole


@given(st.one_of(st.binary(max_size=400), mutated(AMQP_SEEDS)), chunkings)
@settings(max_examples=400)
def test_amqp_start_probe_raises_only_its_error(data: bytes, cuts: list[int]) -> None:
    whole = outcome(probe, [data], amqp.AMQPProtocolError)
    assert outcome(probe, chunked(data, cuts), amqp.AMQPProtocolError) == whole


# --- a plain mutation fuzz run ------------------------------------------------------------------------------------


def mutations(seeds: list[bytes], rng: random.Random, count: int) -> Iterator[bytes]:
    interesting = [0, 1, 0x7F, 0x80, 0xFF, 0x0D, 0x0A, 0x20, 0xCE]
    for _ in range(count):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 6)):
            op = rng.randrange(5)
            pos = rng.randrange(len(data) + 1)
            if op == 0 and data:
                data[pos % len(data)] = rng.choice(interesting) if rng.random() < 0.5 else rng.randrange(256)
            elif op == 1:
                data[pos:pos] = rng.randbytes(rng.randint(1, 4))
            elif op == 2 and data:
                del data[pos % len(data)]
            elif op == 3:
                del data[pos:]
            else:
                # Splice in a piece of another seed: headers inside headers, frames inside frames.
                other = rng.choice(seeds)
                start = rng.randrange(len(other))
                data[pos:pos] = other[start : start + rng.randint(1, 16)]
        yield bytes(data)


def test_fuzz_run_of_every_parser() -> None:
    rng = random.Random(0xAB1B17)
    accepted = {"proxy": 0, "agent": 0, "frames": 0, "probe": 0}
    runs: list[tuple[str, list[bytes], Callable[[list[bytes]], object], type[Exception]]] = [
        ("proxy", PROXY_SEEDS, read_proxy, proxyproto.ProxyProtocolError),
        ("agent", AGENT_SEEDS, lambda c: parse_agent_reply(b"".join(c)), AgentReplyError),
        ("frames", AMQP_SEEDS, read_frames, amqp.AMQPProtocolError),
        ("probe", AMQP_SEEDS, probe, amqp.AMQPProtocolError),
    ]
    for name, seeds, fn, error in runs:
        for data in mutations(seeds, rng, 3000):
            cuts = [rng.randrange(len(data) + 1) for _ in range(rng.randint(0, 3))]
            if outcome(fn, chunked(data, cuts), error) != ("error", error):
                accepted[name] += 1
    # The mutations must also produce valid input now and then, or the run only ever exercised the error paths.
    assert all(n > 0 for n in accepted.values()), accepted
