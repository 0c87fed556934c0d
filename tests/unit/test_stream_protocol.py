"""The stream protocol's frame scanner and frame bodies (rabbitproxy.protocols.stream, stream_frames).

The scanner's properties, whatever the chunking: the bytes it hands out, in order, are exactly the bytes fed (asked-
for frames included, as they came); asked-for frames come whole; nothing else is buffered; a peer's bytes raise
only StreamProtocolError, after which rest() gives back everything not yet handed out. Hypothesis checks them on
arbitrary and mutated input, like tests/unit/test_fuzz.py does for the other parsers.
"""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rabbitproxy.protocols import stream_frames as sf
from rabbitproxy.protocols.stream import NEED_DATA, Frame, FrameScanner, StreamProtocolError
from tests.support.chunks import chunked

CAPTURE = frozenset({sf.OPEN | sf.RESPONSE, sf.METADATA | sf.RESPONSE})


def _deliver(size: int) -> bytes:
    return sf.frame(0x0008, bytes(range(256)) * (size // 256) + bytes(size % 256))


OPEN_OK = sf.open_response(7, 1, [(b"advertised_host", b"10.0.0.11"), (b"advertised_port", b"5552")])
METADATA = sf.metadata_response(9, [(0, b"10.0.0.11", 5552), (1, b"10.0.0.12", 5552)], struct.pack(">i", 0))
SEEDS = [
    OPEN_OK + _deliver(3000) + METADATA,
    _deliver(10) + sf.frame(sf.HEARTBEAT, b"") + METADATA + _deliver(70000),
    sf.peer_properties(1, [(b"product", b"x")]) + sf.tune(1 << 20, 60) + sf.open_request(3, "/"),
    METADATA * 3,
]


def scan(chunks: list[bytes], capture: frozenset[int] = CAPTURE, max_frame: int = 1 << 20) -> tuple[bytes, list[Frame]]:
    """(every byte handed out, in order, with frames as they came; the frames) — or StreamProtocolError."""
    scanner = FrameScanner(capture, max_frame)
    out = bytearray()
    frames: list[Frame] = []
    for chunk in chunks:
        scanner.receive_data(chunk)
        while (event := scanner.next_event()) is not NEED_DATA:
            if isinstance(event, Frame):
                frames.append(event)
                out += event.data
            else:
                assert isinstance(event, bytes) and event
                out += event
    return bytes(out), frames


def scan_or_rest(chunks: list[bytes]) -> bytes:
    """What a relay passes on: the scanner's output, or after an error its output so far plus rest() and the rest."""
    scanner = FrameScanner(CAPTURE)
    out = bytearray()
    for i, chunk in enumerate(chunks):
        scanner.receive_data(chunk)
        try:
            while (event := scanner.next_event()) is not NEED_DATA:
                out += event.data if isinstance(event, Frame) else event
        except StreamProtocolError as exc:
            assert str(exc)
            return bytes(out) + scanner.rest() + b"".join(chunks[i + 1 :])
    return bytes(out) + scanner.rest()


def test_a_chunk_inside_a_spliced_frame_is_handed_out_as_the_same_object() -> None:
    big = _deliver(100_000)
    scanner = FrameScanner(CAPTURE)
    scanner.receive_data(big[:50])
    assert scanner.next_event() == big[:50]
    tail = big[50:]
    scanner.receive_data(tail)
    assert scanner.next_event() is tail
    assert scanner.next_event() is NEED_DATA


def test_asked_for_frames_come_whole_and_the_rest_as_it_came() -> None:
    data = _deliver(100) + OPEN_OK + _deliver(5)
    for cut in range(1, len(data)):
        out, frames = scan([data[:cut], data[cut:]])
        assert out == data
        assert [f.data for f in frames] == [OPEN_OK]


def test_a_frame_too_large_to_capture_passes_through_unread() -> None:
    scanner = FrameScanner(CAPTURE, max_frame=32)
    scanner.receive_data(METADATA)
    assert scanner.next_event() == METADATA
    assert scanner.too_large == 1


def test_a_frame_shorter_than_its_key_raises_and_rest_gives_everything_back() -> None:
    bad = _deliver(10) + struct.pack(">I", 2) + b"wxyz"
    assert scan_or_rest([bad]) == bad
    with pytest.raises(StreamProtocolError, match="no room"):
        scan([bad])


def test_capture_can_shrink_between_chunks() -> None:
    scanner = FrameScanner(CAPTURE)
    scanner.receive_data(OPEN_OK)
    assert isinstance(scanner.next_event(), Frame)
    scanner.capture = frozenset({sf.METADATA | sf.RESPONSE})
    scanner.receive_data(OPEN_OK)
    assert scanner.next_event() == OPEN_OK


def test_bodies_round_trip() -> None:
    corr, code, props = sf.read_open_response(Frame(0, 1, OPEN_OK).body)
    assert (corr, code, dict(props)) == (7, 1, {b"advertised_host": b"10.0.0.11", b"advertised_port": b"5552"})
    corr, brokers, streams = sf.read_metadata_response(Frame(0, 1, METADATA).body)
    assert (corr, brokers, streams) == (9, [(0, b"10.0.0.11", 5552), (1, b"10.0.0.12", 5552)], struct.pack(">i", 0))
    assert sf.metadata_response(corr, brokers, streams) == METADATA
    amended = sf.with_property(
        Frame(0, 1, sf.peer_properties(1, [(b"a", b"b"), (b"client_address", b"x")])).body,
        b"client_address",
        b"10.1.1.1:5",
    )
    assert sf.read_peer_properties(Frame(0, 1, amended).body) == (1, [(b"a", b"b"), (b"client_address", b"10.1.1.1:5")])
    assert struct.unpack_from(">I", amended)[0] == len(amended) - 4
    assert sf.read_tune(Frame(0, 1, sf.tune(4096, 30)).body) == (4096, 30)
    assert sf.read_open(Frame(0, 1, sf.open_request(3, "orders")).body) == "orders"
    auth = sf.sasl_authenticate(2, "PLAIN", b"\x00alice\x00secret")
    mechanism, response = sf.read_sasl_authenticate(Frame(0, 1, auth).body)
    assert (mechanism, sf.plain_user(response)) == ("PLAIN", "alice")


def test_a_count_the_body_cannot_hold_is_refused_before_any_loop() -> None:
    body = struct.pack(">Ii", 1, 2**31 - 1)
    with pytest.raises(StreamProtocolError, match="count"):
        sf.read_metadata_response(body)


# --- hostile input ------------------------------------------------------------------------------------------------

chunkings = st.lists(st.integers(min_value=0, max_value=80_000), max_size=6)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 4))):
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        kind = draw(st.sampled_from(["flip", "insert", "truncate"]))
        if kind == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[pos:]
    return bytes(data)


@given(st.one_of(st.binary(max_size=400), mutated()), chunkings)
@settings(max_examples=300, deadline=None)
def test_the_scanner_hands_out_exactly_what_it_was_fed_whatever_the_chunking(data: bytes, cuts: list[int]) -> None:
    assert scan_or_rest(chunked(data, cuts)) == data


@given(st.one_of(st.binary(max_size=400), mutated()), chunkings)
@settings(max_examples=300, deadline=None)
def test_the_scanner_finds_the_same_frames_whatever_the_chunking(data: bytes, cuts: list[int]) -> None:
    def frames(chunks: list[bytes]) -> object:
        try:
            return [f.data for f in scan(chunks)[1]]
        except StreamProtocolError:
            return "error"

    assert frames(chunked(data, cuts)) == frames([data])


@given(st.binary(max_size=300))
@settings(max_examples=400)
def test_frame_bodies_raise_only_their_error(body: bytes) -> None:
    for read in (
        sf.read_peer_properties,
        sf.read_sasl_authenticate,
        sf.read_sasl_mechanisms,
        sf.read_tune,
        sf.read_open,
        sf.read_open_response,
        sf.read_metadata_response,
        sf.response_code,
        sf.correlation,
    ):
        try:
            read(body)
        except StreamProtocolError as exc:
            assert str(exc)


def test_mutation_fuzz_of_the_scanner_with_a_fixed_seed() -> None:
    rng = random.Random(28)
    for _ in range(3000):
        data = bytearray(rng.choice(SEEDS))
        for _ in range(rng.randint(1, 6)):
            pos = rng.randrange(len(data)) if data else 0
            if data:
                data[pos] = rng.randrange(256)
        cuts = [rng.randrange(len(data) + 1) for _ in range(rng.randint(0, 5))]
        assert scan_or_rest(chunked(bytes(data), cuts)) == bytes(data)
