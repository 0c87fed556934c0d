"""What a client says first: an upstream load balancer's PROXY header, the AMQP hello, the handshake's end.

Each runs until it is done and is then dropped, so the data path pays one ``is None`` check per reader afterwards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.protocols.amqp10 import Amqp10Reader
from rabbitproxy.protocols.amqp_handshake import AMQP10_GAVE_UP, HandshakeReader
from rabbitproxy.protocols.proxy_header import NEED_DATA, ProxyHeaderReader, ProxyProtocolError, looks_like_header
from rabbitproxy.relay.connecting import ConnectingLeg
from rabbitproxy.relay.tls import cert_subject

if TYPE_CHECKING:
    from rabbitproxy.protocols.amqp_handshake import HandshakeFollower

# The AMQP 0-9-1 protocol header ("AMQP" 0 0 9 1) is what every client sends first; client_hello_timeout waits for it.
HELLO_LENGTH = 8

# Stands in for the PROXY reader of a client outside proxy_protocol_from: it is a plain client, but its first bytes
# are looked at (never fed to a parser) so that a forged header is refused instead of passed on to the backend.
UNTRUSTED = ProxyHeaderReader()


class GreetingLeg(ConnectingLeg):
    """Reading the PROXY header and the hello of a client leg, and ending its handshake reader."""

    __slots__ = ()

    def _read_proxy_header(self, data: bytes) -> bytes:
        """Feed the PROXY reader; return the stream bytes after the header once it is complete, else b""."""
        reader = self.pp_reader
        assert reader is not None
        if reader is UNTRUSTED:
            return self._check_untrusted(data)
        try:
            reader.receive_data(data)
            event = reader.next_event()
        except ProxyProtocolError as exc:
            self._bad_proxy_header(exc)
            return b""
        if event is NEED_DATA:
            return b""
        self._header_done()
        if event.src is not None:
            # LOCAL and UNKNOWN headers carry no client; the socket's own addresses stand.
            self.client_src = event.src
            self.client_dst = event.dst
        self._connect_next()
        return event.rest

    def _check_untrusted(self, data: bytes) -> bytes:
        """A source outside proxy_protocol_from: refuse a PROXY header, else return its bytes so far."""
        pending = self.pending
        assert pending is not None
        # The bytes that were too few to decide on wait in pending (nothing is connected yet).
        start = pending + data if pending else data
        verdict = looks_like_header(start)
        if verdict is None:
            pending += data
            return b""
        self._header_done()
        if verdict:
            self.service.untrusted_proxy_header(self.client_addr)
            self.close(CloseReason.UNTRUSTED_PROXY_HEADER)
            return b""
        if pending:
            data = bytes(start)
            pending.clear()
        self._connect_next()
        return data

    def _header_done(self) -> None:
        self.pp_reader = None
        self.service.header_deadlines.discard(self)

    def _bad_proxy_header(self, exc: ProxyProtocolError) -> None:
        self._header_done()
        self.service.bad_proxy_header(self.client_addr, exc)
        self.close(CloseReason.BAD_PROXY_HEADER)

    # -- the AMQP handshake ----------------------------------------------------------------------------------------

    def handshake_done(self, reader: HandshakeFollower) -> None:
        """The reader has nothing more to learn (open, refused, the client closed, or it gave up): drop it.

        From here on each chunk costs the splice path one ``is None`` check for the reader. An AMQP 1.0 client
        (RabbitMQ 4 serves 1.0 on the AMQP port) is handed to the 1.0 reader instead, from its protocol header on.
        """
        if reader.gave_up == AMQP10_GAVE_UP and isinstance(reader, HandshakeReader):
            follower = self.hs_reader = Amqp10Reader()
            self.handshake = follower.handshake
            follower.client_data(reader.unread)
            if not follower.done:
                return
            reader = follower
        self.hs_reader = None
        hs = reader.handshake
        if hs.mechanism == "EXTERNAL" and hs.user is None and self.client_tls and self.transport is not None:
            # EXTERNAL logs in as the client certificate's subject, which only the TLS layer knows.
            hs.user = cert_subject(self.transport.get_extra_info("peercert"))
        self.service.handshake_finished(self, reader.gave_up)
