"""The stream relay against a scripted stream node: what it rewrites, adds and leaves alone, and its bounds.

The node answers a client's handshake frames in order and then a Metadata request with brokers the proxy knows (by
what they advertise, or by their configured address) and one it does not.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from rabbitproxy import config as config_mod
from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.config import ConfigError
from rabbitproxy.control.stream_check import probe_stream
from rabbitproxy.protocols import stream_frames as sf
from rabbitproxy.protocols.stream import NEED_DATA, Frame, FrameScanner
from tests.support.net import free_port, tcp_server
from tests.support.proxy import listen_addr, proxy_config, run_proxy, service_config
from tests.support.tls import make_ca
from tests.support.waiting import wait_for

pytestmark = pytest.mark.asyncio

ADVERTISED = ("node-a.internal", 5552)
ALL_KEYS = frozenset(range(0x10000))


class Node:
    """A scripted stream node: records the client's frames, answers Open advertising ``ADVERTISED``."""

    def __init__(self, metadata: Callable[[int], bytes]) -> None:
        self.received: list[Frame] = []
        self.metadata = metadata

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        scanner = FrameScanner(ALL_KEYS)
        while data := await reader.read(65536):
            scanner.receive_data(data)
            while (event := scanner.next_event()) is not NEED_DATA:
                assert isinstance(event, Frame)
                self.received.append(event)
                writer.write(self.answer(event))

    def answer(self, frame: Frame) -> bytes:
        corr = sf.correlation(frame.body) if frame.key != sf.TUNE else 0
        if frame.key == sf.SASL_AUTHENTICATE:
            return sf.frame(sf.SASL_AUTHENTICATE | sf.RESPONSE, struct.pack(">IH", corr, 1)) + sf.tune(1 << 20, 60)
        if frame.key == sf.OPEN:
            props = [(b"advertised_host", ADVERTISED[0].encode()), (b"advertised_port", str(ADVERTISED[1]).encode())]
            return sf.open_response(corr, 1, props)
        if frame.key == sf.METADATA:
            return self.metadata(corr)
        if frame.key == sf.SASL_HANDSHAKE:
            return sf.frame(sf.SASL_HANDSHAKE | sf.RESPONSE, struct.pack(">IHih", corr, 1, 1, 5) + b"PLAIN")
        if frame.key == sf.TUNE:
            return b""
        return sf.frame(frame.key | sf.RESPONSE, struct.pack(">IH", corr, 1))


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.scanner = FrameScanner(ALL_KEYS)

    async def frame(self) -> Frame:
        while True:
            event = self.scanner.next_event()
            if isinstance(event, Frame):
                return event
            self.scanner.receive_data(await asyncio.wait_for(self.reader.read(65536), 10))

    async def handshake(self, frame_max: int = 1 << 20) -> Frame:
        w = self.writer
        w.write(sf.peer_properties(1, [(b"product", b"test")]) + sf.sasl_handshake(2))
        w.write(sf.sasl_authenticate(3, "PLAIN", b"\x00alice\x00secret"))
        for _ in range(4):  # peer properties, sasl handshake, sasl authenticate, tune
            await self.frame()
        w.write(sf.tune(frame_max, 60) + sf.open_request(4, "orders"))
        return await self.frame()


def _metadata(corr: int, brokers: list[sf.Broker]) -> bytes:
    return sf.metadata_response(corr, brokers, struct.pack(">i", 0))


async def test_advertised_addresses_become_the_proxys_and_unknown_ones_stay() -> None:
    node_port = free_port()
    node = Node(lambda corr: b"")
    async with tcp_server(node.serve) as port:
        node.metadata = lambda corr: _metadata(
            corr, [(0, ADVERTISED[0].encode(), ADVERTISED[1]), (1, b"127.0.0.1", port), (2, b"elsewhere", 1)]
        )
        backends = [{"name": "a", "address": "127.0.0.1", "port": port, "node_port": node_port}]
        async with run_proxy(service_config(backends, name="streams", protocol="stream")) as proxy:
            reader, writer = await asyncio.open_connection(*listen_addr(proxy, "streams"))
            client = Client(reader, writer)
            opened = await client.handshake()
            _corr, code, props = sf.read_open_response(opened.body)
            assert code == 1
            assert dict(props)[b"advertised_host"] == b"127.0.0.1"
            assert dict(props)[b"advertised_port"] == str(node_port).encode()
            backend = proxy.services["streams"].pool.backends[0]
            assert backend.stream_advertised == ADVERTISED
            writer.write(sf.frame(sf.METADATA, struct.pack(">Ii", 5, 0)))
            _corr, brokers, _streams = sf.read_metadata_response((await client.frame()).body)
            # The node by what it advertises, then by its configured address; the third matches nothing.
            assert brokers == [(0, b"127.0.0.1", node_port), (1, b"127.0.0.1", node_port), (2, b"elsewhere", 1)]
            assert proxy.services["streams"].stream_unmapped == {("elsewhere", 1)}
            # The broker saw the client's address in its peer properties, and the identity was read.
            _c, sent = sf.read_peer_properties(node.received[0].body)
            client_addr = "{}:{}".format(*writer.get_extra_info("sockname")[:2])
            assert dict(sent)[b"client_address"] == client_addr.encode()
            (conn,) = proxy.services["streams"].connections
            assert conn.handshake is not None
            assert (conn.handshake.protocol, conn.handshake.user, conn.handshake.vhost) == ("stream", "alice", "orders")
            assert conn.stream is not None and conn.stream.to_server is None, "the client's side is spliced now"
            writer.close()


async def test_a_rewrite_that_would_break_the_clients_frame_max_is_not_made() -> None:
    long_name = b"h" * 40
    node = Node(lambda corr: _metadata(corr, [(0, ADVERTISED[0].encode(), ADVERTISED[1])]))
    async with tcp_server(node.serve) as port:
        backends = [{"name": "a", "address": "127.0.0.1", "port": port, "node_port": free_port()}]
        svc = service_config(backends, name="streams", protocol="stream", advertised_host=long_name.decode())
        async with run_proxy(svc) as proxy:
            reader, writer = await asyncio.open_connection(*listen_addr(proxy, "streams"))
            client = Client(reader, writer)
            original = _metadata(5, [(0, ADVERTISED[0].encode(), ADVERTISED[1])])
            await client.handshake(frame_max=len(original))
            writer.write(sf.frame(sf.METADATA, struct.pack(">Ii", 5, 0)))
            assert (await client.frame()).data == original
            writer.close()


async def test_the_stream_check_learns_what_a_node_advertises_and_fails_on_other_bytes() -> None:
    node = Node(lambda corr: b"")
    async with tcp_server(node.serve) as port:
        ok, detail, found = await probe_stream("127.0.0.1", port, 5.0, username="u", password="p", vhost="/")
        assert (ok, found) == (True, ADVERTISED)
        assert detail == "stream listener ok, advertises node-a.internal:5552"
        assert sf.plain_user(sf.read_sasl_authenticate(node.received[2].body)[1]) == "u"
        assert node.received[-1].key == sf.CLOSE

    async def not_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Frames, but not the answer a stream listener gives to peer properties.
        writer.write(sf.open_response(1, 1, []))
        await reader.read()

    async with tcp_server(not_stream) as port:
        ok, detail, found = await probe_stream("127.0.0.1", port, 5.0, username="u", password="p", vhost="/")
        assert (ok, found) == (False, None)
        assert detail == "bad reply: frame 0x8015 instead of 0x8011"


async def test_a_refused_login_leaves_the_node_up_without_an_address() -> None:
    node = Node(lambda corr: b"")
    refuse = node.answer

    def answer(frame: Frame) -> bytes:
        if frame.key == sf.SASL_AUTHENTICATE:
            return sf.frame(sf.SASL_AUTHENTICATE | sf.RESPONSE, struct.pack(">IH", sf.correlation(frame.body), 8))
        return refuse(frame)

    node.answer = answer  # type: ignore[method-assign]
    async with tcp_server(node.serve) as port:
        ok, detail, found = await probe_stream("127.0.0.1", port, 5.0, username="u", password="p", vhost="/")
    assert (ok, found) == (True, None)
    assert "login as 'u' refused (authentication failure)" in detail


async def test_node_ports_cannot_change_by_reload() -> None:
    node = Node(lambda corr: b"")
    async with tcp_server(node.serve) as port:
        backends = [{"name": "a", "address": "127.0.0.1", "port": port, "node_port": free_port()}]
        svc = service_config(backends, name="streams", protocol="stream")
        async with run_proxy(svc) as proxy:
            moved = dict(svc, backends=[dict(backends[0], node_port=free_port())])
            with pytest.raises(ConfigError, match="node_port listeners cannot change by reload"):
                await proxy.reload(config_mod.validate(proxy_config(moved), "test"))
            # The same node ports with another setting changed reload fine.
            result = await proxy.reload(config_mod.validate(proxy_config(dict(svc, retries=3)), "test"))
            assert result.changed == ["streams"]


async def test_the_hello_deadline_closes_a_silent_stream_client_and_spares_one_that_spoke() -> None:
    node = Node(lambda corr: _metadata(corr, []))
    async with tcp_server(node.serve) as port:
        backends = [{"name": "a", "address": "127.0.0.1", "port": port}]
        svc = service_config(backends, name="streams", protocol="stream", client_hello_timeout=0.5)
        async with run_proxy(svc) as proxy:
            addr = listen_addr(proxy, "streams")
            reader, writer = await asyncio.open_connection(*addr)
            client = Client(reader, writer)
            await client.handshake()
            silent_reader, silent_writer = await asyncio.open_connection(*addr)
            # The silent one connected later, so once it is cut the talker's deadline has passed too.
            assert await asyncio.wait_for(silent_reader.read(), 10) == b""
            assert proxy.services["streams"].ended[CloseReason.HELLO_TIMEOUT] == 1
            writer.write(sf.frame(sf.METADATA, struct.pack(">Ii", 5, 0)))
            assert (await client.frame()).key == sf.METADATA | sf.RESPONSE
            writer.close()
            silent_writer.close()


async def test_a_client_frame_the_relay_cannot_read_goes_on_as_it_came() -> None:
    node = Node(lambda corr: b"")
    async with tcp_server(node.serve) as port:
        backends = [{"name": "a", "address": "127.0.0.1", "port": port}]
        async with run_proxy(service_config(backends, name="streams", protocol="stream")) as proxy:
            reader, writer = await asyncio.open_connection(*listen_addr(proxy, "streams"))
            # Peer properties that claim more entries than the frame holds, then a well-formed frame.
            bad = sf.frame(sf.PEER_PROPERTIES, struct.pack(">Ii", 1, 1000))
            writer.write(bad + sf.sasl_handshake(2))

            async def both_arrived() -> bool:
                return len(node.received) == 2

            await wait_for(both_arrived, timeout=10, what="both frames at the node")
            assert [f.data for f in node.received] == [bad, sf.sasl_handshake(2)]
            assert proxy.services["streams"].handshakes_given_up == 1
            writer.close()
            del reader


async def test_a_stream_service_terminates_tls_on_its_port_and_on_the_node_ports(tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "stream")
    cert, key = ca.issue("proxy")
    client_ctx = ssl.create_default_context(cafile=str(ca.cert))
    node = Node(lambda corr: _metadata(corr, [(0, ADVERTISED[0].encode(), ADVERTISED[1])]))
    async with tcp_server(node.serve) as port:
        node_port = free_port()
        backends = [{"name": "a", "address": "127.0.0.1", "port": port, "node_port": node_port}]
        svc = service_config(backends, name="streams", protocol="stream", tls={"cert": str(cert), "key": str(key)})
        async with run_proxy(svc) as proxy:
            host, service_port = listen_addr(proxy, "streams")
            for target in (service_port, node_port):
                reader, writer = await asyncio.open_connection(host, target, ssl=client_ctx)
                client = Client(reader, writer)
                _corr, code, props = sf.read_open_response((await client.handshake()).body)
                assert (code, dict(props)[b"advertised_port"]) == (1, str(node_port).encode())
                writer.write(sf.frame(sf.METADATA, struct.pack(">Ii", 5, 0)))
                _corr, brokers, _streams = sf.read_metadata_response((await client.frame()).body)
                assert brokers == [(0, b"127.0.0.1", node_port)]
                writer.close()


async def test_a_reload_gives_the_node_ports_the_new_certificate(tmp_path: Path) -> None:
    old_ca, new_ca = make_ca(tmp_path / "old", "old"), make_ca(tmp_path / "new", "new")
    old_cert, old_key = old_ca.issue("proxy")
    new_cert, new_key = new_ca.issue("proxy")
    node = Node(lambda corr: b"")
    async with tcp_server(node.serve) as port:
        node_port = free_port()
        backends = [{"name": "a", "address": "127.0.0.1", "port": port, "node_port": node_port}]
        svc = service_config(
            backends, name="streams", protocol="stream", tls={"cert": str(old_cert), "key": str(old_key)}
        )
        async with run_proxy(svc) as proxy:
            host = listen_addr(proxy, "streams")[0]
            renewed = dict(svc, tls={"cert": str(new_cert), "key": str(new_key)})
            await proxy.reload(config_mod.validate(proxy_config(renewed), "test"))
            trusting_new = ssl.create_default_context(cafile=str(new_ca.cert))
            reader, writer = await asyncio.open_connection(host, node_port, ssl=trusting_new)
            assert sf.read_open_response((await Client(reader, writer).handshake()).body)[1] == 1
            writer.close()
            with pytest.raises(ssl.SSLError):
                await asyncio.open_connection(host, node_port, ssl=ssl.create_default_context(cafile=str(old_ca.cert)))
