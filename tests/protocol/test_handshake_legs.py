"""The AMQP handshake read on the data path, driven call by call over fake transports.

What the reader learns, that it is dropped once done, that it never costs a client its bytes, the failed-login and
given-up counters, the per-vhost gauge and its cap, and the heartbeat-aware idle timeout.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import pytest
from structlog.testing import capture_logs

from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.protocols.amqp import PROTOCOL_HEADER
from rabbitproxy.relay import leg_state, outcomes
from rabbitproxy.relay.legs import BackendLeg, ClientLeg
from tests.support import fakes
from tests.support.fakes import FakeService, FakeTransport, HandClientLeg
from tests.support.waiting import wait_for
from tests.unit.test_amqp_handshake import SECRET, client_steps, method, server_steps, shortstr

HEARTBEAT_FRAME = b"\x08\x00\x00\x00\x00\x00\x00\xce"


def make_pair(
    svc: FakeService | None = None, **service: Any
) -> tuple[FakeService, ClientLeg, FakeTransport, BackendLeg, FakeTransport]:
    return fakes.make_pair(svc, attach=True, **service)


def converse(client: ClientLeg, leg: BackendLeg, cs: list[bytes], ss: list[bytes], chunk: int = 1 << 20) -> None:
    """Take turns as a real connection does, each turn in ``chunk``-byte pieces."""
    for turn in range(max(len(cs), len(ss))):
        for feed, steps in ((client.data_received, cs), (leg.data_received, ss)):
            data = steps[turn] if turn < len(steps) else b""
            for i in range(0, len(data), chunk):
                feed(data[i : i + chunk])


@pytest.mark.asyncio
@pytest.mark.parametrize("chunk", [1, 5, 1 << 20])
async def test_handshake_is_read_both_ways_then_the_reader_is_dropped(chunk: int) -> None:
    svc, client, ct, leg, bt = make_pair()
    cs, ss = client_steps(), server_steps()
    converse(client, leg, cs, ss, chunk)
    hs = client.handshake
    assert hs is not None
    assert (hs.user, hs.vhost, hs.connection_name, hs.product, hs.heartbeat, hs.outcome) == (
        "alice",
        "/orders",
        "orders-writer",
        "aio-pika",
        5,
        "open",
    )
    # Done: the splice path is back to one `is None` check, and every byte went through untouched.
    assert client.hs_reader is None
    assert bytes(bt.buffer) == b"".join(cs) and bytes(ct.buffer) == b"".join(ss)
    assert svc.vhost_open == {"/orders": 1}
    assert (svc.failed_logins, svc.handshakes_given_up) == (0, 0)
    client.close(CloseReason.CLIENT_CLOSED)
    await wait_for(lambda: client.closed, what="connection closed")


@pytest.mark.asyncio
async def test_bytes_sent_before_the_backend_attached_are_read_too() -> None:
    svc = FakeService()
    client = HandClientLeg(svc)  # type: ignore[arg-type]
    ct = FakeTransport()
    ct.protocol = client
    client.connection_made(ct)  # type: ignore[arg-type]
    # A client that pipelines its whole side (RabbitMQ allows it) before we are connected.
    cs = client_steps()
    client.data_received(b"".join(cs))
    leg = BackendLeg(client)
    bt = FakeTransport(("127.0.0.1", 1))
    leg.connection_made(bt)  # type: ignore[arg-type]
    client._attach(svc.pool.backends[0], leg, bt)  # type: ignore[arg-type]
    for part in server_steps():
        leg.data_received(part)
    assert client.hs_reader is None and client.handshake is not None
    assert (client.handshake.vhost, client.handshake.outcome) == ("/orders", "open")
    assert bytes(bt.buffer) == b"".join(cs)


@pytest.mark.asyncio
async def test_a_tcp_service_reads_nothing_and_has_no_hello_deadline() -> None:
    svc, client, _ct, leg, _bt = make_pair(protocol="tcp")
    assert client.hs_reader is None and client.handshake is None
    assert client.hello_left == 0 and client not in svc.hello_deadlines
    converse(client, leg, client_steps(), server_steps())
    assert client.handshake is None and svc.vhost_open == {}


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        PROTOCOL_HEADER + b"\x01\x00\x00\xff\xff\xff\xff" + b"x" * 100,  # a frame far too large
        PROTOCOL_HEADER + b"\x01\x00\x00\x00\x00\x00\x02ab\x00",  # bad frame-end octet
        PROTOCOL_HEADER + method(60, b"") * 2,  # basic.* before connection.open
    ],
)
async def test_garbage_gives_up_and_the_bytes_flow_on(garbage: bytes) -> None:
    svc, client, ct, leg, bt = make_pair()
    client.data_received(garbage)
    assert client.hs_reader is None
    assert svc.handshakes_given_up == 1
    client.data_received(b"and more")
    leg.data_received(b"reply")
    assert bytes(bt.buffer) == garbage + b"and more" and bytes(ct.buffer) == b"reply"
    assert not ct.closing and not bt.closing


@pytest.mark.asyncio
async def test_more_than_64_kib_before_open_gives_up() -> None:
    svc, client, _ct, _leg, bt = make_pair()
    # Heartbeat frames are legal during the handshake, so only the byte budget stops the reader.
    flood = PROTOCOL_HEADER + HEARTBEAT_FRAME * (70 * 1024 // len(HEARTBEAT_FRAME))
    for i in range(0, len(flood), 4096):
        client.data_received(flood[i : i + 4096])
    assert client.hs_reader is None and svc.handshakes_given_up == 1
    assert bytes(bt.buffer) == flood


@pytest.mark.asyncio
@pytest.mark.parametrize(("code", "counted"), [(403, True), (530, True), (320, False)])
async def test_a_refused_login_is_counted_and_logged_without_the_password(code: int, counted: bool) -> None:
    with capture_logs() as logs:
        svc, client, _ct, leg, _bt = make_pair()
        converse(client, leg, client_steps(), server_steps(close=(code, f"REFUSED {code}")))
    hs = client.handshake
    assert hs is not None and (hs.outcome, hs.close_code) == ("refused", code)
    assert client.hs_reader is None and svc.vhost_open == {}
    assert svc.failed_logins == (1 if counted else 0)
    warnings = [e for e in logs if e["event"] == "login refused by the broker"]
    assert len(warnings) == (1 if counted else 0)
    if counted:
        assert (warnings[0]["client"], warnings[0]["user"], warnings[0]["code"]) == ("127.0.0.1:40000", "alice", code)
    assert SECRET not in repr(logs) and SECRET not in repr(hs)


@pytest.mark.asyncio
async def test_external_user_is_the_client_certificate_subject() -> None:
    svc = FakeService()
    client = HandClientLeg(svc)  # type: ignore[arg-type]
    ct = FakeTransport()
    ct.extra["peercert"] = {"subject": ((("commonName", "orders-writer"),),)}
    ct.protocol = client
    client.connection_made(ct)  # type: ignore[arg-type]
    client.client_tls = True  # as for a service with [services.tls]
    leg = BackendLeg(client)
    bt = FakeTransport(("127.0.0.1", 1))
    leg.connection_made(bt)  # type: ignore[arg-type]
    client._attach(svc.pool.backends[0], leg, bt)  # type: ignore[arg-type]
    start_ok = method(11, struct.pack(">I", 0) + shortstr("EXTERNAL") + struct.pack(">I", 0) + shortstr("en_US"))
    tune_ok = method(31, struct.pack(">HIH", 2047, 131072, 30))
    open_ = method(40, shortstr("/") + shortstr("") + b"\x00")
    converse(client, leg, [PROTOCOL_HEADER, start_ok, tune_ok + open_], server_steps())
    assert client.handshake is not None
    assert (client.handshake.mechanism, client.handshake.user) == ("EXTERNAL", "CN=orders-writer")


@pytest.mark.asyncio
async def test_vhost_labels_are_capped_with_an_other_bucket() -> None:
    svc = FakeService()
    pairs = []
    for i in range(outcomes.MAX_VHOST_LABELS + 5):
        pair = make_pair(svc)
        converse(pair[1], pair[3], client_steps(vhost=f"tenant-{i}"), server_steps())
        pairs.append(pair)
    assert len(svc.vhost_open) == outcomes.MAX_VHOST_LABELS + 1
    assert svc.vhost_open[outcomes.OTHER_VHOST] == 5
    assert svc.vhost_open["tenant-0"] == 1


@pytest.mark.asyncio
async def test_auto_waits_for_the_heartbeat_then_closes_a_silent_client(monkeypatch: pytest.MonkeyPatch) -> None:
    # 2.5 x 1 s would do too; a smaller factor keeps the test short, the logic is the same.
    monkeypatch.setattr(leg_state, "HEARTBEAT_FACTOR", 0.1)
    _svc, client, _ct, leg, bt = make_pair()
    assert client.idle_slot == 0, "no idle timeout before the heartbeat is known"
    converse(client, leg, client_steps(heartbeat=1), server_steps())
    assert client.idle_slot != 0 and client.idle_timeout == pytest.approx(0.1)
    # The broker keeps heartbeating to the frozen client: that must not keep the connection alive.
    loop = asyncio.get_running_loop()
    beat = loop.call_soon(lambda: None)

    def heartbeat() -> None:
        nonlocal beat
        if not bt.closing:
            leg.data_received(HEARTBEAT_FRAME)
            beat = loop.call_later(0.02, heartbeat)

    heartbeat()
    try:
        await wait_for(lambda: client.closed, timeout=10, what="the silent client closed")
    finally:
        beat.cancel()
    assert client.reason is CloseReason.HEARTBEAT_TIMEOUT


@pytest.mark.asyncio
async def test_a_heartbeating_client_is_not_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    # A 1-second watch, a beat every 50 ms for 2.5 s: a busy machine may delay a beat, never by 20 of them.
    monkeypatch.setattr(leg_state, "HEARTBEAT_FACTOR", 1.0)
    _svc, client, ct, leg, _bt = make_pair()
    converse(client, leg, client_steps(heartbeat=1), server_steps())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2.5
    while loop.time() < deadline:
        client.data_received(HEARTBEAT_FRAME)
        await asyncio.sleep(0.05)
    assert not client.closed and not ct.closing


@pytest.mark.asyncio
async def test_the_broker_giving_up_first_still_reports_the_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(leg_state, "HEARTBEAT_FACTOR", 0.1)
    _svc, client, ct, leg, _bt = make_pair()
    converse(client, leg, client_steps(heartbeat=1), server_steps())
    # RabbitMQ closes a client silent for 2 to 3 heartbeats; our half to the frozen client is what is left.
    leg.eof_received()
    assert client.reason is CloseReason.BACKEND_CLOSED
    await wait_for(lambda: ct.closing, timeout=10, what="the silent client closed")
    assert client.reason is CloseReason.HEARTBEAT_TIMEOUT


@pytest.mark.asyncio
async def test_no_heartbeat_under_a_fixed_idle_timeout_is_warned_once() -> None:
    with capture_logs() as logs:
        svc = FakeService(client_idle_timeout=30)
        for _ in range(3):
            _, client, *_rest, leg, _bt = make_pair(svc)
            converse(client, leg, client_steps(heartbeat=0), server_steps())
    warnings = [e for e in logs if e["event"].startswith("client negotiated no heartbeat")]
    assert len(warnings) == 1 and warnings[0]["client_idle_timeout"] == 30.0


@pytest.mark.asyncio
async def test_auto_with_heartbeat_0_watches_nothing() -> None:
    _svc, client, _ct, leg, _bt = make_pair()
    converse(client, leg, client_steps(heartbeat=0), server_steps())
    assert client.idle_slot == 0


def test_connection_ids_are_unique() -> None:
    assert len({leg_state._ids.__next__() for _ in range(3)}) == 3


@pytest.mark.asyncio
async def test_a_reload_that_turns_a_fixed_idle_timeout_off_stops_watching() -> None:
    # Before "auto", a reload to 0 made the next check compare with 0 and close the client at once.
    svc, client, ct, _leg, _bt = make_pair(client_idle_timeout=0.2)
    svc.config = svc.config.model_copy(update={"client_idle_timeout": 0.0})
    await wait_for(lambda: client.idle_slot == 0, timeout=10, what="the idle check ran and stopped")
    assert not ct.closing and client.reason is None


@pytest.mark.asyncio
async def test_a_closed_connection_leaves_the_idle_watch() -> None:
    # The watch holds its connections until their check is due (minutes, with a long heartbeat): a closed one must
    # go at once, or every short-lived AMQP connection would stay in memory for 2.5 of its heartbeats.
    svc, client, _ct, leg, _bt = make_pair()
    converse(client, leg, client_steps(heartbeat=60), server_steps())
    assert client.idle_slot != 0 and len(svc.idle_watch) == 1
    client.connection_lost(None)
    leg.connection_lost(None)
    assert client.closed
    assert client.idle_slot == 0 and len(svc.idle_watch) == 0
