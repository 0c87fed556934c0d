"""PROXY headers, the hello timeout and TLS half-close on the relay legs, driven call by call over fake transports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rabbitproxy.balancing.backend import Backend
from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.protocols.proxy_header import ProxyHeaderReader, build_v1, build_v2, source_trusted
from rabbitproxy.relay.deadlines import Deadlines
from rabbitproxy.relay.legs import BackendLeg, ClientLeg
from tests.support.fakes import FakeService, FakeTransport, HandClientLeg
from tests.support.tls import make_ca
from tests.support.waiting import wait_for

CLIENT = ("192.0.2.7", 40000)
LISTENER = ("127.0.0.1", 5672)


class Service(FakeService):
    """The fake service plus what the PROXY and limit code paths ask of a service."""

    def __init__(self, header_timeout: float = 30.0, **service: Any) -> None:
        service.setdefault("client_hello_timeout", 0)
        if service.get("accept_proxy_protocol"):
            # CLIENT's network: the load balancer in front of us.
            service.setdefault("proxy_protocol_from", ["192.0.2.0/24"])
        super().__init__(**service)
        self.bad_headers: list[str] = []
        self.untrusted: list[str] = []
        self.backend_ssl = None
        self.proxy_networks = self.config.proxy_networks
        self.header_deadlines = Deadlines(self.loop, header_timeout, ClientLeg.header_expired)

    def bad_proxy_header(self, client: str, exc: BaseException) -> None:
        self.bad_headers.append(f"{client}: {exc}")

    def proxy_trusted(self, host: str) -> bool:
        return source_trusted(host, self.proxy_networks)

    def untrusted_proxy_header(self, client: str) -> None:
        self.untrusted.append(client)

    def full_backends(self) -> list[Backend]:
        return []


class NoEofTransport(FakeTransport):
    """Like an SSL transport: no half-close."""

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("SSL transports cannot write EOF")


def client_leg(
    svc: Service, transport: FakeTransport | None = None, peer: tuple[str, int] = CLIENT
) -> tuple[ClientLeg, FakeTransport]:
    client = HandClientLeg(svc)  # type: ignore[arg-type]
    ct = transport or FakeTransport(peer)
    ct.extra["peername"] = peer
    ct.extra["sockname"] = LISTENER
    ct.protocol = client
    client.connection_made(ct)  # type: ignore[arg-type]
    return client, ct


def attach(svc: Service, client: ClientLeg, bt: FakeTransport | None = None) -> tuple[BackendLeg, FakeTransport]:
    leg = BackendLeg(client)
    bt = bt or FakeTransport(("127.0.0.1", 1))
    bt.protocol = leg
    leg.connection_made(bt)  # type: ignore[arg-type]
    client._attach(svc.pool.backends[0], leg, bt)  # type: ignore[arg-type]
    return leg, bt


def read_header(data: bytes) -> Any:
    reader = ProxyHeaderReader()
    reader.receive_data(data)
    return reader.next_event()


@pytest.mark.asyncio
@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_send_proxy_protocol_writes_the_client_header_first_and_once(version: str) -> None:
    svc = Service(send_proxy_protocol=version)
    client, _ = client_leg(svc)
    client.data_received(b"AMQP\x00\x00\x09\x01")
    _, bt = attach(svc, client)
    client.data_received(b"frames")
    header = read_header(bytes(bt.buffer))
    assert header.version == int(version[1])
    assert (header.src, header.dst) == (CLIENT, LISTENER)
    assert header.rest == b"AMQP\x00\x00\x09\x01frames"


@pytest.mark.asyncio
async def test_a_backend_can_override_the_services_proxy_protocol() -> None:
    svc = Service(
        send_proxy_protocol="v2",
        backends=[{"name": "b1", "address": "127.0.0.1", "port": 1, "send_proxy_protocol": "off"}],
    )
    client, _ = client_leg(svc)
    client.data_received(b"AMQP")
    _, bt = attach(svc, client)
    assert bt.buffer == b"AMQP"


@pytest.mark.asyncio
async def test_accepted_header_gives_the_address_and_is_not_forwarded() -> None:
    svc = Service(accept_proxy_protocol=True)
    client, _ = client_leg(svc)
    # Nothing is connected until the header says who the client is (source hash needs it).
    assert svc.connects_started == 0
    header = build_v1(("203.0.113.9", 5555), ("198.51.100.1", 5672))
    client.data_received(header[:10])
    assert svc.connects_started == 0
    client.data_received(header[10:] + b"AMQP")
    assert svc.connects_started == 1
    assert client.client_addr == "203.0.113.9:5555"
    assert client.peer_key == b"203.0.113.9"
    assert client.pp_reader is None
    _, bt = attach(svc, client)
    assert bt.buffer == b"AMQP"
    assert client.bytes_in == 4


@pytest.mark.asyncio
async def test_accepted_header_is_passed_on_when_sending_one_too() -> None:
    svc = Service(accept_proxy_protocol=True, send_proxy_protocol="v1")
    client, _ = client_leg(svc)
    client.data_received(build_v2(("2001:db8::5", 6000), ("2001:db8::1", 5672)) + b"AMQP")
    _, bt = attach(svc, client)
    header = read_header(bytes(bt.buffer))
    assert (header.src, header.dst, header.rest) == (("2001:db8::5", 6000), ("2001:db8::1", 5672), b"AMQP")


@pytest.mark.asyncio
async def test_local_header_keeps_the_socket_address() -> None:
    svc = Service(accept_proxy_protocol=True)
    client, _ = client_leg(svc)
    client.data_received(b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00AMQP")
    assert client.client_addr == "192.0.2.7:40000"
    assert client.pending == b"AMQP"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "garbage", [b"AMQP\x00\x00\x09\x01", b"PROXY TCP4 1.2.3.4\x00", b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x0c"]
)
async def test_a_connection_without_a_valid_header_is_closed_and_counted(garbage: bytes) -> None:
    svc = Service(accept_proxy_protocol=True)
    client, ct = client_leg(svc)
    client.data_received(garbage)
    assert ct.closing and svc.connects_started == 0
    assert len(svc.bad_headers) == 1 and svc.bad_headers[0].startswith("192.0.2.7:40000: ")
    await wait_for(lambda: svc.ended[CloseReason.BAD_PROXY_HEADER] == 1, what="bad header counted")
    assert ct.buffer == b""


@pytest.mark.asyncio
async def test_eof_inside_the_header_is_a_bad_header() -> None:
    svc = Service(accept_proxy_protocol=True)
    client, ct = client_leg(svc)
    client.data_received(b"PROXY TCP4 ")
    assert client.eof_received() is False
    assert ct.closing
    await wait_for(lambda: svc.ended[CloseReason.BAD_PROXY_HEADER] == 1, what="bad header counted")


@pytest.mark.asyncio
async def test_hello_timeout_closes_a_client_that_sends_too_little() -> None:
    svc = Service(client_hello_timeout=0.05)
    client, ct = client_leg(svc)
    client.data_received(b"AMQ")
    await wait_for(lambda: svc.ended[CloseReason.HELLO_TIMEOUT] == 1, what="hello timeout")
    assert ct.closing


@pytest.mark.asyncio
async def test_a_complete_hello_cancels_the_timer() -> None:
    svc = Service(client_hello_timeout=0.05)
    client, ct = client_leg(svc)
    client.data_received(b"AMQP")
    client.data_received(b"\x00\x00\x09\x01")
    # The timer is cancelled (not merely outlived), so nothing is left that could close the connection.
    assert client not in svc.hello_deadlines
    assert not ct.closing


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, str]:
    ca = make_ca(tmp_path, "legs")
    cert, key = ca.issue("server")
    return {"cert": str(cert), "key": str(key)}


@pytest.mark.asyncio
async def test_tls_client_eof_closes_both_legs_instead_of_half_closing(tls_files: dict[str, str]) -> None:
    svc = Service(tls=tls_files)
    client, ct = client_leg(svc, NoEofTransport(CLIENT))
    client.data_received(b"AMQP\x00\x00\x09\x01")
    _, bt = attach(svc, client)
    assert client.eof_received() is False
    assert ct.closing and bt.closing and not bt.eof_written
    await wait_for(lambda: svc.ended[CloseReason.CLIENT_CLOSED] == 1, what="closed as client closed")


@pytest.mark.asyncio
async def test_backend_eof_towards_a_tls_client_closes_both(tls_files: dict[str, str]) -> None:
    svc = Service(tls=tls_files)
    client, ct = client_leg(svc, NoEofTransport(CLIENT))
    leg, bt = attach(svc, client)
    leg.data_received(b"last words")
    assert leg.eof_received() is False
    assert ct.closing and bt.closing and ct.buffer == b"last words"
    await wait_for(lambda: svc.ended[CloseReason.BACKEND_CLOSED] == 1, what="closed as backend closed")


@pytest.mark.asyncio
async def test_tls_backend_eof_closes_both_and_never_calls_write_eof(tls_files: dict[str, str]) -> None:
    svc = Service(backend_tls=True, backend_tls_verify=False)
    client, ct = client_leg(svc)
    leg, bt = attach(svc, client, NoEofTransport(("127.0.0.1", 1)))
    assert leg.eof_received() is False
    assert ct.closing and bt.closing and not ct.eof_written
    # And the client's EOF towards a TLS backend: no write_eof on it either.
    svc2 = Service(backend_tls=True, backend_tls_verify=False)
    client2, ct2 = client_leg(svc2)
    client2.data_received(b"x")
    assert client2.eof_received() is True  # not connected yet: forwarded after the buffer
    _, bt2 = attach(svc2, client2, NoEofTransport(("127.0.0.1", 1)))
    assert bt2.buffer == b"x" and bt2.closing and ct2.closing


# -- proxy_protocol_from: whose headers are believed ---------------------------------------------------------------

UNTRUSTED_PEER = ("198.51.100.20", 41000)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "chunks",
    [
        [build_v1(("203.0.113.9", 5555), ("198.51.100.1", 5672)) + b"AMQP"],
        [build_v2(("203.0.113.9", 5555), ("198.51.100.1", 5672)) + b"AMQP"],
        # Split before the start is recognisable: nothing is passed on or connected while undecided.
        [b"PRO", b"XY TCP4 203.0.113.9 198.51.100.1 5555 5672\r\n"],
        [b"\r\n\r\n", b"\x00\r\nQUIT\n\x21\x11\x00\x0c"],
    ],
)
async def test_a_header_from_an_untrusted_source_is_refused(chunks: list[bytes]) -> None:
    svc = Service(accept_proxy_protocol=True)
    client, ct = client_leg(svc, peer=UNTRUSTED_PEER)
    for chunk in chunks:
        client.data_received(chunk)
    assert ct.closing and svc.connects_started == 0
    assert svc.untrusted == ["198.51.100.20:41000"]
    assert client.client_addr == "198.51.100.20:41000"  # the forged address was never taken
    await wait_for(lambda: svc.ended[CloseReason.UNTRUSTED_PROXY_HEADER] == 1, what="untrusted header counted")
    assert client not in svc.header_deadlines


@pytest.mark.asyncio
@pytest.mark.parametrize("chunks", [[b"AMQP\x00\x00\x09\x01"], [b"P", b"ING"], [b"\r\n", b"hello"]])
async def test_an_untrusted_source_without_a_header_is_a_plain_client(chunks: list[bytes]) -> None:
    svc = Service(accept_proxy_protocol=True)
    client, ct = client_leg(svc, peer=UNTRUSTED_PEER)
    assert svc.connects_started == 0
    for chunk in chunks:
        client.data_received(chunk)
    sent = b"".join(chunks)
    assert svc.connects_started == 1 and not ct.closing
    assert client.client_addr == "198.51.100.20:41000" and client.pp_reader is None
    assert client not in svc.header_deadlines
    _, bt = attach(svc, client)
    assert bt.buffer == sent and client.bytes_in == len(sent)


@pytest.mark.asyncio
async def test_an_ipv4_mapped_peer_matches_an_ipv4_network() -> None:
    svc = Service(accept_proxy_protocol=True)
    client, _ = client_leg(svc, peer=("::ffff:192.0.2.7", 40000))
    client.data_received(build_v1(("203.0.113.9", 5555), ("198.51.100.1", 5672)))
    assert svc.connects_started == 1 and client.client_addr == "203.0.113.9:5555"


@pytest.mark.asyncio
@pytest.mark.parametrize("peer", [CLIENT, UNTRUSTED_PEER])
async def test_the_header_has_a_deadline_without_a_hello_timeout(peer: tuple[str, int]) -> None:
    svc = Service(accept_proxy_protocol=True, client_hello_timeout=0, header_timeout=0.05)
    client, ct = client_leg(svc, peer=peer)
    client.data_received(b"PROX")  # and nothing more: a slowloris on the header (or on telling it from AMQP)
    await wait_for(lambda: svc.ended[CloseReason.HELLO_TIMEOUT] == 1, what="header deadline")
    assert ct.closing and svc.connects_started == 0


@pytest.mark.asyncio
async def test_a_complete_header_stops_its_deadline() -> None:
    svc = Service(accept_proxy_protocol=True, client_hello_timeout=0, header_timeout=0.05)
    client, ct = client_leg(svc)
    client.data_received(build_v1(("203.0.113.9", 5555), ("198.51.100.1", 5672)))
    # Off the deadline list, so its timer can no longer fire for this connection.
    assert client not in svc.header_deadlines
    attach(svc, client)
    assert not ct.closing and not svc.closed
