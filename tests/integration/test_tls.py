"""TLS termination (AMQPS in front of plain RabbitMQ), client certificates, backend TLS and certificate reload."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import ssl
from pathlib import Path

import aio_pika
import pytest

from rabbitproxy import config as config_mod
from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.dev.cluster import DevCluster
from tests.support.cluster import backends_for
from tests.support.net import echo_handler, free_port, tcp_server
from tests.support.process import ProxyProcess, open_fds
from tests.support.proxy import listen_addr, proxy_config, run_proxy, service_config
from tests.support.tls import CA, make_ca
from tests.support.waiting import wait_for

HELLO_BYTES = b"AMQP\x00\x00\x09\x01"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    good, other = make_ca(d, "good"), make_ca(d, "other")
    cert, key = good.issue("proxy")
    client_cert, client_key = good.issue("client", client=True)
    rogue_cert, rogue_key = other.issue("rogue", client=True)
    return {
        "ca": good.cert,
        "other_ca": other.cert,
        "cert": cert,
        "key": key,
        "client_cert": client_cert,
        "client_key": client_key,
        "rogue_cert": rogue_cert,
        "rogue_key": rogue_key,
    }


def client_ctx(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx


def tls_section(pki: dict[str, Path], **extra: object) -> dict[str, object]:
    return {"cert": str(pki["cert"]), "key": str(pki["key"]), **extra}


@pytest.mark.asyncio
async def test_amqps_client_through_the_proxy_to_plain_rabbitmq(cluster: DevCluster, pki: dict[str, Path]) -> None:
    svc = service_config(backends_for(cluster)[:1], tls=tls_section(pki, min_version="TLSv1.3"))
    async with run_proxy(svc) as p:
        host, port = listen_addr(p)
        conn = await aio_pika.connect(
            f"amqps://guest:guest@{host}:{port}/", ssl_context=client_ctx(pki["ca"]), timeout=30
        )
        try:
            ch = await conn.channel()
            queue = await ch.declare_queue(f"tls-{os.getpid()}-{id(p)}", auto_delete=True)
            await ch.default_exchange.publish(aio_pika.Message(b"over tls"), routing_key=queue.name)
            msg = await queue.get(timeout=30)
            assert msg is not None and msg.body == b"over tls"
            await msg.ack()
            leg = next(iter(p.services["amqp"].connections))
            assert leg.transport is not None
            assert leg.transport.get_extra_info("ssl_object").version() == "TLSv1.3"
        finally:
            await conn.close()


@pytest.mark.asyncio
async def test_a_client_trusting_another_ca_is_refused(cluster: DevCluster, pki: dict[str, Path]) -> None:
    svc = service_config(backends_for(cluster)[:1], tls=tls_section(pki))
    async with run_proxy(svc) as p:
        host, port = listen_addr(p)
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.open_connection(host, port, ssl=client_ctx(pki["other_ca"]), server_hostname="localhost")
        # The failed handshake never became a connection, so nothing reached a backend.
        assert p.services["amqp"].pool.backends[0].total == 0


@pytest.mark.asyncio
async def test_client_certificates_are_required_when_configured(cluster: DevCluster, pki: dict[str, Path]) -> None:
    svc = service_config(backends_for(cluster)[:1], tls=tls_section(pki, ca=str(pki["ca"]), verify_client="required"))
    async with run_proxy(svc) as p:
        host, port = listen_addr(p)
        url = f"amqps://guest:guest@{host}:{port}/"
        conn = await aio_pika.connect(
            url, ssl_context=client_ctx(pki["ca"], pki["client_cert"], pki["client_key"]), timeout=30
        )
        await conn.close()
        for ctx in (client_ctx(pki["ca"]), client_ctx(pki["ca"], pki["rogue_cert"], pki["rogue_key"])):
            # TLS 1.3 reports the server's refusal of the certificate on the first read, not in the handshake.
            reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname="localhost")
            writer.write(b"AMQP\x00\x00\x09\x01")
            try:
                reply = await asyncio.wait_for(reader.read(100), 30)
            except (ssl.SSLError, ConnectionResetError):
                reply = b""
            assert reply == b"", "a client without a valid certificate got an answer"
            writer.close()
        assert p.services["amqp"].pool.backends[0].total == 1


@pytest.mark.asyncio
async def test_backend_tls_checks_the_ca_and_the_server_name(tmp_path: Path, pki: dict[str, Path]) -> None:
    ca = CA(pki["ca"], pki["ca"].with_suffix(".key"))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(str(pki["cert"]), str(pki["key"]))
    srv = await asyncio.start_server(echo_handler, "127.0.0.1", 0, ssl=server)
    port = srv.sockets[0].getsockname()[1]
    assert ca.cert.exists()
    try:
        good = service_config(
            [{"name": "tls", "address": "127.0.0.1", "port": port}],
            backend_tls=True,
            backend_tls_ca=str(pki["ca"]),
            backend_tls_server_name="localhost",
        )
        wrong_name = dict(
            good, listen=f"127.0.0.1:{free_port()}", name="wrong", backend_tls_server_name="rabbit.example"
        )
        async with run_proxy(good, wrong_name) as p:
            reader, writer = await asyncio.open_connection(*listen_addr(p))
            writer.write(b"AMQP\x00\x00\x09\x01hello")
            assert await asyncio.wait_for(reader.readexactly(13), 30) == b"AMQP\x00\x00\x09\x01hello"
            # Half-close towards a TLS backend cannot be forwarded; the proxy closes both legs cleanly instead.
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 30) == b""
            writer.close()
            reader, writer = await asyncio.open_connection(*listen_addr(p, "wrong"))
            writer.write(b"AMQP\x00\x00\x09\x01")
            assert await asyncio.wait_for(reader.read(), 30) == b""
            writer.close()
            await wait_for(lambda: p.services["wrong"].ended[CloseReason.CONNECT_FAILED] == 1, what="refused backend")
            assert p.services["wrong"].pool.backends[0].connect_errors >= 1
            await wait_for(lambda: p.services["amqp"].ended[CloseReason.CLIENT_CLOSED] == 1, what="clean close")
    finally:
        srv.close()
        await srv.wait_closed()


async def served_cert(host: str, port: int, ca: Path) -> bytes:
    _, writer = await asyncio.open_connection(host, port, ssl=client_ctx(ca), server_hostname="localhost")
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return bytes(der)


@pytest.mark.asyncio
async def test_sighup_reloads_the_certificate_and_open_tls_connections_stay(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(pki["cert"], live / "cert.pem")
    shutil.copy(pki["key"], live / "key.pem")
    renewed_ca = make_ca(tmp_path / "renewed", "renewed")
    new_cert, new_key = renewed_ca.issue("proxy-renewed")
    async with tcp_server(echo_handler) as echo:
        cfg = proxy_config(
            service_config(
                [{"name": "echo", "address": "127.0.0.1", "port": echo}],
                tls={"cert": str(live / "cert.pem"), "key": str(live / "key.pem")},
            )
        )
        with ProxyProcess(cfg, tmp_path) as proc:
            host, port = proc.addr
            old = await served_cert(host, port, pki["ca"])
            reader, writer = await asyncio.open_connection(
                host, port, ssl=client_ctx(pki["ca"]), server_hostname="localhost"
            )
            writer.write(b"before")
            assert await reader.readexactly(6) == b"before"
            shutil.copy(new_cert, live / "cert.pem")
            shutil.copy(new_key, live / "key.pem")
            os.kill(proc.pid, signal.SIGHUP)
            renewed = await wait_for(
                lambda: _served_or_none(host, port, renewed_ca.cert), what="renewed certificate served"
            )
            assert renewed != old
            # The connection made with the old certificate is still relaying.
            writer.write(b"after")
            assert await reader.readexactly(5) == b"after"
            writer.close()
            assert "reload refused" not in proc.log()


async def _served_or_none(host: str, port: int, ca: Path) -> bytes | None:
    try:
        return await served_cert(host, port, ca)
    except ssl.SSLCertVerificationError:
        return None


@pytest.mark.asyncio
async def test_tls_churn_leaves_no_connection_or_descriptor_behind(pki: dict[str, Path]) -> None:
    async with (
        tcp_server(echo_handler) as echo,
        run_proxy(service_config([{"name": "echo", "address": "127.0.0.1", "port": echo}], tls=tls_section(pki))) as p,
    ):
        host, port = listen_addr(p)
        ctx = client_ctx(pki["ca"])
        await served_cert(host, port, pki["ca"])
        service = p.services["amqp"]
        await wait_for(lambda: service.active == 0, what="warm-up connection gone")
        baseline = open_fds()

        async def one(i: int) -> None:
            reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname="localhost")
            writer.write(b"AMQP\x00\x00\x09\x01")
            assert await reader.readexactly(8) == b"AMQP\x00\x00\x09\x01"
            if i % 3 == 0:
                # Vanish without a TLS close_notify.
                writer.transport.abort()
            else:
                writer.close()

        for _ in range(5):
            await asyncio.gather(*(one(i) for i in range(40)))
        await wait_for(lambda: service.active == 0, what="every TLS connection closed")
        await wait_for(lambda: open_fds() <= baseline, what=f"descriptors back to {baseline}")
        assert service.total == 201


@pytest.mark.asyncio
async def test_a_reload_can_switch_tls_on_without_closing_the_port(pki: dict[str, Path]) -> None:
    async with tcp_server(echo_handler) as echo:
        plain = service_config([{"name": "echo", "address": "127.0.0.1", "port": echo}])
        async with run_proxy(plain) as p:
            host, port = listen_addr(p)
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(HELLO_BYTES)
            assert await reader.readexactly(8) == HELLO_BYTES
            await p.reload(
                config_mod.validate(proxy_config(dict(plain, tls=tls_section(pki))))
            )
            assert listen_addr(p) == (host, port)
            r2, w2 = await asyncio.open_connection(host, port, ssl=client_ctx(pki["ca"]), server_hostname="localhost")
            w2.write(HELLO_BYTES)
            assert await r2.readexactly(8) == HELLO_BYTES
            # The plain connection from before the reload is still relaying.
            writer.write(b"plain")
            assert await reader.readexactly(5) == b"plain"
            for w in (writer, w2):
                w.close()


def _blocking_echo(
    host: str, port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> tuple[bytes, ssl.SSLSession | None, bool]:
    """One blocking TLS round trip (asyncio cannot offer a session to resume): (reply, session, resumed).

    The reply is b"" when the proxy refused the client, which TLS 1.3 reports only on the first read.
    """
    import socket

    with socket.create_connection((host, port), timeout=30) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
                resumed = tls.session_reused
                tls.sendall(HELLO_BYTES)
                reply = b""
                while len(reply) < len(HELLO_BYTES):
                    chunk = tls.recv(100)
                    if not chunk:
                        break
                    reply += chunk
                # By now the client has read the server's tickets (TLS 1.3 sends them after the handshake).
                return reply, tls.session, resumed
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            return b"", None, False


@pytest.mark.asyncio
@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
async def test_a_reload_that_tightens_client_verification_cannot_be_bypassed_by_resumption(
    pki: dict[str, Path], version: str
) -> None:
    async with tcp_server(echo_handler) as echo:
        loose = service_config(
            [{"name": "echo", "address": "127.0.0.1", "port": echo}],
            tls=tls_section(pki, ca=str(pki["ca"]), verify_client="optional"),
        )
        async with run_proxy(loose) as p:
            host, port = listen_addr(p)
            good = client_ctx(pki["ca"], pki["client_cert"], pki["client_key"])
            good.maximum_version = good.minimum_version = getattr(ssl.TLSVersion, version.replace(".", "_"))
            reply, session, _ = await asyncio.to_thread(_blocking_echo, host, port, good)
            assert reply == HELLO_BYTES and session is not None
            if version == "TLSv1.2":
                # Before the reload the same settings may resume (the session cache works within one configuration).
                reply, _, resumed = await asyncio.to_thread(_blocking_echo, host, port, good, session)
                assert reply == HELLO_BYTES and resumed
            # Only certificates of the other CA are accepted from now on: the client's certificate no longer is.
            strict = dict(loose, tls=tls_section(pki, ca=str(pki["other_ca"]), verify_client="required"))
            await p.reload(config_mod.validate({"admin": {"enabled": False}, "services": [strict]}))
            before = p.services["amqp"].total
            reply, _, resumed = await asyncio.to_thread(_blocking_echo, host, port, good, session)
            assert (reply, resumed) == (b"", False), "a session from before the reload skipped the new client check"
            assert p.services["amqp"].total == before
            # The proxy itself serves: a certificate of the now trusted CA gets through.
            rogue = client_ctx(pki["ca"], pki["rogue_cert"], pki["rogue_key"])
            reply, _, _ = await asyncio.to_thread(_blocking_echo, host, port, rogue)
            assert reply == HELLO_BYTES
