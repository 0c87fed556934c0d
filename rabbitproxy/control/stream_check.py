"""The ``stream`` health check: does a node's stream listener serve, and what address does the node advertise?

The check speaks the stream protocol's handshake: PeerProperties, then SaslHandshake. A node whose stream listener
answers both is up. It then logs in (PLAIN, the check's ``username``/``password``), answers the node's Tune, and
opens the check's ``vhost``: the Open response carries the node's ``advertised_host`` and ``advertised_port``, which
the stream relay needs to map metadata entries to nodes (:mod:`rabbitproxy.relay.stream`). A refused login does
not make the node down (its listener answered); the check's detail says the address could not be learnt. The
connection is closed with a Close request.
"""

from __future__ import annotations

import asyncio
from ssl import SSLContext

from rabbitproxy.protocols import stream_frames as sf
from rabbitproxy.protocols.sansio import NEED_DATA
from rabbitproxy.protocols.stream import Frame, FrameScanner, StreamProtocolError
from rabbitproxy.relay.stream import advertised

_READ_CHUNK = 4096
# The frames the check reads: every response, and the node's Tune (its only request during the handshake).
_WANTED = frozenset(
    {
        sf.PEER_PROPERTIES | sf.RESPONSE,
        sf.SASL_HANDSHAKE | sf.RESPONSE,
        sf.SASL_AUTHENTICATE | sf.RESPONSE,
        sf.TUNE,
        sf.OPEN | sf.RESPONSE,
        sf.CLOSE | sf.RESPONSE,
    }
)
_MAX_FRAME = 64 * 1024


class StreamCheckError(Exception):
    """The peer answered, but not as a stream listener does."""


class _Conversation:
    __slots__ = ("reader", "scanner", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.scanner = FrameScanner(_WANTED, _MAX_FRAME)

    async def expect(self, key: int) -> Frame:
        """The next frame with ``key``; frames the check does not read are skipped."""
        while True:
            event = self.scanner.next_event()
            if event is NEED_DATA:
                data = await self.reader.read(_READ_CHUNK)
                if not data:
                    raise StreamCheckError("connection closed by the node")
                self.scanner.receive_data(data)
                continue
            if isinstance(event, Frame):
                if event.key != key:
                    raise StreamCheckError(f"frame 0x{event.key:04x} instead of 0x{key:04x}")
                return event


async def probe_stream(
    host: str,
    port: int,
    within: float,
    *,
    username: str,
    password: str,
    vhost: str,
    ssl: SSLContext | None = None,
    server_hostname: str = "",
) -> tuple[bool, str, tuple[str, int] | None]:
    """(up, detail, the node's advertised address or None). Raises TimeoutError and OSError as connects do."""
    async with asyncio.timeout(within):
        reader, writer = await asyncio.open_connection(
            host, port, ssl=ssl, server_hostname=(server_hostname or host) if ssl is not None else None
        )
        try:
            return await _converse(_Conversation(reader, writer), username, password, vhost)
        except (StreamCheckError, StreamProtocolError) as exc:
            return False, f"bad reply: {exc}", None
        finally:
            writer.close()


async def _converse(
    c: _Conversation, username: str, password: str, vhost: str
) -> tuple[bool, str, tuple[str, int] | None]:
    w = c.writer
    w.write(sf.peer_properties(1, [(b"product", b"rabbitproxy health check")]))
    await c.expect(sf.PEER_PROPERTIES | sf.RESPONSE)
    w.write(sf.sasl_handshake(2))
    mechanisms = sf.read_sasl_mechanisms((await c.expect(sf.SASL_HANDSHAKE | sf.RESPONSE)).body)
    # The listener serves: from here on a failure is a detail, not a down node.
    if "PLAIN" not in mechanisms:
        offered = ", ".join(mechanisms)
        return True, f"stream listener ok; PLAIN not offered ({offered}): advertised address unknown", None
    w.write(sf.sasl_authenticate(3, "PLAIN", b"\x00" + username.encode() + b"\x00" + password.encode()))
    code = sf.response_code((await c.expect(sf.SASL_AUTHENTICATE | sf.RESPONSE)).body)
    if code != sf.RESPONSE_OK:
        name = sf.CODE_NAMES.get(code, str(code))
        return True, f"stream listener ok; login as {username!r} refused ({name}): advertised address unknown", None
    frame_max, heartbeat = sf.read_tune((await c.expect(sf.TUNE)).body)
    w.write(sf.tune(frame_max, heartbeat))
    w.write(sf.open_request(4, vhost))
    _corr, code, props = sf.read_open_response((await c.expect(sf.OPEN | sf.RESPONSE)).body)
    if code != sf.RESPONSE_OK:
        name = sf.CODE_NAMES.get(code, str(code))
        return True, f"stream listener ok; vhost {vhost!r} not opened ({name}): advertised address unknown", None
    found = advertised(props)
    w.write(sf.close_request(5, sf.RESPONSE_OK, "health check"))
    await c.expect(sf.CLOSE | sf.RESPONSE)
    where = f"advertises {found[0]}:{found[1]}" if found else "advertises no address"
    return True, f"stream listener ok, {where}", found
