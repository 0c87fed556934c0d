"""The stream relay (``protocol = "stream"``): RabbitMQ's stream protocol, with the nodes' addresses made the proxy's.

A stream client asks any node where a stream's leader and replicas are (``MetadataResponse``: each broker's host and
port, as the node *advertises* them) and then connects there. Behind a proxy those addresses are wrong, so this
relay rewrites them, in the server-to-client direction only: the ``Open`` response's ``advertised_host`` and
``advertised_port`` and every broker entry of a ``MetadataResponse`` become the proxy's host (the service's
``advertised_host``, else the address the client connected to) and the node's ``node_port``, a listener of the
proxy that always reaches that node. The node behind an entry is found by what each node advertises, learnt from
its ``Open`` response (its own check's, or any relayed connection's), or else by its configured address and port;
an entry that matches no node is left as it is and logged once per service.

The client's direction is read only until its ``Open`` request (who it is, its vhost, its ``frame_max``; its peer
properties get a ``client_address``, as the stream plugin takes no PROXY header), then spliced as before. The
broker's direction is scanned frame by frame for the whole connection, but only ``MetadataResponse`` (and, during
the handshake, the SASL outcome and ``Open`` response) is read whole; everything else is written on untouched,
usually as the very chunk that arrived. Only stream services pay for any of this: AMQP and TCP services use
:mod:`rabbitproxy.relay.legs` unchanged.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final

import structlog

from rabbitproxy.protocols import stream_frames as sf
from rabbitproxy.protocols.amqp_handshake import MAX_TEXT, Handshake
from rabbitproxy.protocols.sansio import NEED_DATA
from rabbitproxy.protocols.stream import Frame, FrameScanner, StreamProtocolError, StreamSession
from rabbitproxy.relay.legs import BackendLeg, ClientLeg

log = structlog.get_logger("rabbitproxy.stream")

_SERVER_KEYS: Final = frozenset({sf.METADATA | sf.RESPONSE})
# The frames read whole: the client's handshake; the broker's SASL outcome, Open response and metadata.
CLIENT_KEYS: Final = frozenset({sf.PEER_PROPERTIES, sf.SASL_AUTHENTICATE, sf.TUNE, sf.OPEN})
SERVER_HANDSHAKE_KEYS: Final = frozenset(
    {sf.SASL_AUTHENTICATE | sf.RESPONSE, sf.OPEN | sf.RESPONSE, sf.METADATA | sf.RESPONSE}
)
# The peer property the proxy adds, so the broker's management UI shows who the client is.
CLIENT_ADDRESS: Final = b"client_address"
# Before Tune no frame_max is agreed; the peer properties with the address added are kept within this (or within
# what the client sent, if that was longer already), which any broker accepts before login.
PRE_TUNE_FRAME_MAX: Final = 4096
# SASL outcomes that are not a refusal: ok, and a challenge (the exchange goes on).
_SASL_GOING_ON: Final = frozenset({sf.RESPONSE_OK, 10})
# Entries that matched no node are logged once per service; past this many the rest go unlogged.
MAX_UNMAPPED_LOGGED: Final = 64


def _host_of(sockname: object) -> str:
    return str(sockname[0]) if isinstance(sockname, tuple) and sockname else ""


class StreamClientLeg(ClientLeg):
    """A stream client: its handshake is read (and its peer properties amended) until its Open request."""

    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        advertised = self.service.config.advertised_host
        host = advertised or _host_of(transport.get_extra_info("sockname"))
        self.stream = StreamSession(host.encode(), CLIENT_KEYS, SERVER_HANDSHAKE_KEYS)
        self.handshake = Handshake(protocol="stream")
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.pp_reader is not None:
            # An upstream load balancer's PROXY header comes before any stream frame.
            data = self._read_proxy_header(data)
            if not data:
                return
        session = self.stream
        if session is None or session.to_server is None:
            # Past the client's Open request: spliced as on any service.
            super().data_received(data)
            return
        reader = session.to_server
        if self.hello_left > 0:
            # The hello deadline wants any 8 bytes; a stream client's first frame (peer properties) is longer.
            self.hello_left -= len(data)
            if self.hello_left <= 0:
                self.service.hello_deadlines.discard(self)
        self.bytes_in += len(data)
        if self.idle_slot:
            self.last_activity = self.client_activity = time.monotonic()
        reader.receive_data(data)
        try:
            while True:
                event = reader.next_event()
                if event is NEED_DATA:
                    return
                if isinstance(event, Frame):
                    frame = event
                    try:
                        event = self._client_frame(frame)
                    except StreamProtocolError as exc:
                        # A frame of the kind read but not of its layout: it goes on as it came, and the rest too.
                        self._forward(frame.data)
                        self._stop_reading_client(reader, exc)
                        return
                self._forward(event)
                if session.to_server is None:
                    # The Open request went by: the rest of this chunk, and everything after, is spliced.
                    self._forward(reader.rest())
                    return
        except StreamProtocolError as exc:
            self._stop_reading_client(reader, exc)

    def _forward(self, data: bytes) -> None:
        if not data:
            return
        pending = self.pending
        if pending is None:
            self.backend_write(data)
            return
        pending += data
        if len(pending) > self.service.config.high_water:
            self.pause_client_reading()

    def _stop_reading_client(self, reader: FrameScanner, exc: StreamProtocolError) -> None:
        assert self.stream is not None
        self.stream.to_server = None
        self._forward(reader.rest())
        self.service.handshakes_given_up += 1
        log.debug("stream handshake not followed", service=self.service.name, client=self.client_addr, why=str(exc))

    def _client_frame(self, frame: Frame) -> bytes:
        """Read one of the client's handshake frames; return what goes to the broker in its place."""
        session = self.stream
        hs = self.handshake
        assert session is not None and hs is not None
        key = frame.key
        if key == sf.PEER_PROPERTIES and frame.version == 1 and self.client_src is not None:
            amended = sf.with_property(frame.body, CLIENT_ADDRESS, self.client_addr.encode())
            if len(amended) <= max(PRE_TUNE_FRAME_MAX, len(frame.data)):
                return amended
        elif key == sf.SASL_AUTHENTICATE:
            mechanism, response = sf.read_sasl_authenticate(frame.body)
            hs.mechanism = mechanism[:MAX_TEXT] if mechanism else None
            if mechanism == "PLAIN":
                user = sf.plain_user(response)
                hs.user = user[:MAX_TEXT] if user else None
        elif key == sf.TUNE:
            frame_max, heartbeat = sf.read_tune(frame.body)
            session.frame_max = frame_max
            hs.frame_max, hs.heartbeat = frame_max, heartbeat
        elif key == sf.OPEN:
            vhost = sf.read_open(frame.body)
            hs.vhost = vhost[:MAX_TEXT] if vhost is not None else None
            session.to_server = None
        return frame.data


class StreamBackendLeg(BackendLeg):
    """The broker's side of a stream connection: scanned, with advertised addresses rewritten."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        session = conn.stream
        reader = session.to_client if session is not None else None
        if reader is None:
            super().data_received(data)
            return
        conn.bytes_out += len(data)
        if conn.idle_slot:
            conn.last_activity = time.monotonic()
        write = conn.client_write
        reader.receive_data(data)
        try:
            while True:
                event = reader.next_event()
                if event is NEED_DATA:
                    return
                write(server_frame(conn, event) if isinstance(event, Frame) else event)
        except StreamProtocolError as exc:
            # Not stream frames after all: the broker will judge; from here on its bytes are only spliced.
            assert session is not None
            session.to_client = None
            write(reader.rest())
            log.debug("stream frames not followed", service=conn.service.name, client=conn.client_addr, why=str(exc))


def server_frame(conn: ClientLeg, frame: Frame) -> bytes:
    """One of the broker's frames the relay reads; what goes to the client in its place."""
    try:
        if frame.key == sf.METADATA | sf.RESPONSE:
            return _metadata(conn, frame)
        if frame.key == sf.OPEN | sf.RESPONSE:
            return _opened(conn, frame)
        _sasl_outcome(conn, frame)
    except StreamProtocolError as exc:
        log.debug("stream frame not understood", service=conn.service.name, key=hex(frame.key), why=str(exc))
    return frame.data


def _finish_handshake(conn: ClientLeg) -> None:
    session = conn.stream
    if session is not None and session.to_client is not None:
        session.to_client.capture = _SERVER_KEYS
    conn.service.handshake_finished(conn, None)


def _sasl_outcome(conn: ClientLeg, frame: Frame) -> None:
    code = sf.response_code(frame.body)
    hs = conn.handshake
    if code in _SASL_GOING_ON or hs is None or hs.outcome is not None:
        return
    hs.outcome = "refused"
    hs.close_code = code
    hs.close_text = sf.CODE_NAMES.get(code)
    _finish_handshake(conn)


def _opened(conn: ClientLeg, frame: Frame) -> bytes:
    corr, code, props = sf.read_open_response(frame.body)
    hs = conn.handshake
    if hs is not None and hs.outcome is None:
        hs.outcome = "open" if code == sf.RESPONSE_OK else "refused"
        if code != sf.RESPONSE_OK:
            hs.close_code, hs.close_text = code, sf.CODE_NAMES.get(code)
        _finish_handshake(conn)
    backend = conn.backend
    if backend is None or code != sf.RESPONSE_OK or frame.version != 1:
        return frame.data
    found = advertised(props)
    if found is not None:
        backend.stream_advertised = found
    node_port = backend.config.node_port
    session = conn.stream
    if node_port is None or session is None or found is None:
        return frame.data
    port = str(node_port).encode()
    new = [(k, session.host if k == b"advertised_host" else port if k == b"advertised_port" else v) for k, v in props]
    return _within(conn, sf.open_response(corr, code, new), frame)


def advertised(props: sf.Properties) -> tuple[str, int] | None:
    """The (advertised_host, advertised_port) of an Open response's connection properties, if both are sound."""
    values = dict(props)
    host, port = sf.text(values.get(b"advertised_host")), sf.text(values.get(b"advertised_port"))
    if not host or port is None or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


def _metadata(conn: ClientLeg, frame: Frame) -> bytes:
    session = conn.stream
    if session is None or frame.version != 1:
        return frame.data
    corr, brokers, streams = sf.read_metadata_response(frame.body)
    service = conn.service
    nodes = service.pool.backends
    out: list[sf.Broker] = []
    changed = False
    for ref, raw_host, port in brokers:
        host = sf.text(raw_host) or ""
        node = next((b for b in nodes if b.stream_advertised == (host, port)), None)
        if node is None:
            node = next((b for b in nodes if (b.address, b.port) == (host, port)), None)
        if node is None:
            _unmapped(conn, host, port)
        elif node.config.node_port is not None:
            out.append((ref, session.host, node.config.node_port))
            changed = True
            continue
        out.append((ref, raw_host, port))
    if not changed:
        return frame.data
    return _within(conn, sf.metadata_response(corr, out, streams), frame)


def _within(conn: ClientLeg, new: bytes, frame: Frame) -> bytes:
    """``new`` in place of ``frame``, unless it would break the frame_max the client agreed to."""
    session = conn.stream
    limit = session.frame_max if session is not None else 0
    if limit and len(new) > limit >= len(frame.data):
        log.warning(
            "stream frame left as the broker sent it: rewritten it would exceed the client's frame_max",
            service=conn.service.name,
            client=conn.client_addr,
            frame_max=limit,
        )
        return frame.data
    return new


def _unmapped(conn: ClientLeg, host: str, port: int) -> None:
    seen = conn.service.stream_unmapped
    if (host, port) in seen or len(seen) >= MAX_UNMAPPED_LOGGED:
        return
    seen.add((host, port))
    log.warning(
        "a stream broker entry matches no backend of the service: passed on unchanged (is the node's advertised"
        " address learnt yet? does a stream health check run?)",
        service=conn.service.name,
        host=host,
        port=port,
    )


StreamClientLeg.backend_leg_type = StreamBackendLeg
