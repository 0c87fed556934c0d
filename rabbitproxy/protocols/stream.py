"""Sans-IO reading of the RabbitMQ stream protocol's frames, as far as the proxy needs them.

A stream frame is a uint32 size (not counting itself), then a uint16 key and a uint16 version, then the body
(rabbitmq-server's ``deps/rabbitmq_stream/docs/PROTOCOL.adoc``). The proxy reads whole only the few frames it
learns from or rewrites (the handshake, the ``Open`` response, ``MetadataResponse``); everything else passes through
as it came. :class:`FrameScanner` does both in the h11 shape: ``receive_data(bytes)``, then ``next_event()`` until
it returns :data:`NEED_DATA`. An event is either ``bytes`` (to pass on untouched; the very chunk that was fed when a
chunk holds no frame the caller asked for, so splicing costs no copy) or a :class:`Frame` that the caller asked for
(by key), whole.

A frame the caller asked for is held in memory until complete, so it is bounded (:data:`MAX_CAPTURED_FRAME`): a
longer one passes through untouched like any other, and is counted in ``too_large``. A frame the caller did not ask
for is never buffered, whatever its size. :class:`StreamProtocolError` is the only exception a peer's bytes raise;
after it the scanner's ``rest()`` hands back whatever it still holds, so the caller can pass it on and stop.
The bodies of the frames are read and written by :mod:`rabbitproxy.protocols.stream_frames`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from rabbitproxy.protocols.sansio import NEED_DATA, NeedData

__all__ = [
    "HEADER",
    "MAX_CAPTURED_FRAME",
    "NEED_DATA",
    "Frame",
    "FrameScanner",
    "StreamProtocolError",
    "StreamSession",
]

# size (uint32), key (uint16), version (uint16): what the scanner must see of a frame to decide about it.
HEADER: Final = struct.Struct(">IHH")
# The size field does not count itself; a frame's size covers at least its key and version.
_MIN_SIZE: Final = 4
# Handshake frames are a few hundred bytes and a MetadataResponse a few KiB; RabbitMQ's own default frame_max is
# 1 MiB, so nothing the proxy reads whole can legitimately be longer.
MAX_CAPTURED_FRAME: Final = 1 << 20


class StreamProtocolError(Exception):
    """A peer's bytes are not stream protocol frames (a frame shorter than its own key and version)."""


@dataclass(frozen=True, slots=True)
class Frame:
    """A whole frame the caller asked for: ``data`` is all of it, size field included, as it came."""

    key: int
    version: int
    data: bytes

    @property
    def body(self) -> bytes:
        """What follows the key and version."""
        return self.data[HEADER.size :]


class FrameScanner:
    """Finds frame boundaries in a byte stream; hands back asked-for frames whole and the rest as it came.

    ``capture`` (the keys read whole) may be replaced between chunks: a connection past its handshake asks for
    fewer frames.
    """

    __slots__ = ("_data", "_frame", "_frame_left", "_head", "_pos", "_skip", "capture", "max_frame", "too_large")

    def __init__(self, capture: frozenset[int], max_frame: int = MAX_CAPTURED_FRAME) -> None:
        self.capture = capture
        self.max_frame = max_frame
        # Frames asked for that were longer than max_frame and so passed through unread.
        self.too_large = 0
        self._data = b""
        self._pos = 0
        # Bytes of the current (not asked-for) frame still to pass through.
        self._skip = 0
        # The start of a frame header that a chunk ended inside (fewer than HEADER.size bytes).
        self._head = bytearray()
        # An asked-for frame being collected over chunks, and how many of its bytes are still to come.
        self._frame = bytearray()
        self._frame_left = 0

    def receive_data(self, data: bytes) -> None:
        """The next bytes, in order. The previous ones must have been read to NEED_DATA first."""
        if self._pos < len(self._data):
            raise RuntimeError("receive_data() before next_event() returned NEED_DATA")
        self._data = data
        self._pos = 0

    def rest(self) -> bytes:
        """Everything held and not yet handed out (a partial header or frame, the chunk's unread tail), once."""
        out = bytes(self._head) + bytes(self._frame) + self._data[self._pos :]
        self._head.clear()
        self._frame.clear()
        self._frame_left = 0
        self._data = b""
        self._pos = 0
        return out

    def next_event(self) -> bytes | Frame | NeedData:
        """The next event: bytes to pass on, a whole asked-for frame, or NEED_DATA."""
        data = self._data
        pos = self._pos
        end = len(data)
        if pos >= end:
            return NEED_DATA
        if self._frame_left:
            return self._collect(data, pos, end)
        if self._head:
            return self._finish_head(data, pos, end)
        start = pos
        skip = self._skip
        capture = self.capture
        while True:
            if skip:
                if skip >= end - pos:
                    self._skip = skip - (end - pos)
                    self._pos = end
                    # The common case on a busy connection: the whole chunk is inside one frame.
                    return data if start == 0 else data[start:]
                pos += skip
                skip = 0
            if end - pos < HEADER.size:
                self._skip = 0
                self._head += data[pos:]
                self._pos = end
                return self._out(data, start, pos)
            size, key, version = HEADER.unpack_from(data, pos)
            if size < _MIN_SIZE:
                # Nothing from ``start`` on was handed out: rest() gives it all back.
                self._skip = 0
                self._pos = start
                raise StreamProtocolError(f"a frame of {size} bytes has no room for its key and version")
            if key in capture:
                if size + 4 <= self.max_frame:
                    if pos > start:
                        # Hand out what comes before it first; the next call starts at the frame.
                        self._skip = 0
                        self._pos = pos
                        return data[start:pos]
                    return self._capture(data, pos, end, key, version, size + 4)
                self.too_large += 1
            skip = size + 4

    def _out(self, data: bytes, start: int, stop: int) -> bytes | NeedData:
        if stop == start:
            return NEED_DATA
        return data if start == 0 and stop == len(data) else data[start:stop]

    def _capture(self, data: bytes, pos: int, end: int, key: int, version: int, total: int) -> Frame | NeedData:
        if end - pos >= total:
            self._pos = pos + total
            return Frame(key, version, data[pos : pos + total])
        self._frame += data[pos:]
        self._frame_left = total - (end - pos)
        self._pos = end
        return NEED_DATA

    def _collect(self, data: bytes, pos: int, end: int) -> Frame | NeedData:
        take = min(self._frame_left, end - pos)
        self._frame += data[pos : pos + take]
        self._frame_left -= take
        self._pos = pos + take
        if self._frame_left:
            return NEED_DATA
        whole = bytes(self._frame)
        self._frame.clear()
        _size, key, version = HEADER.unpack_from(whole)
        return Frame(key, version, whole)

    def _finish_head(self, data: bytes, pos: int, end: int) -> bytes | Frame | NeedData:
        """A header that began in an earlier chunk: complete it, then capture its frame or pass it on."""
        head = self._head
        take = min(HEADER.size - len(head), end - pos)
        head += data[pos : pos + take]
        self._pos = pos + take
        if len(head) < HEADER.size:
            return NEED_DATA
        size, key, version = HEADER.unpack_from(head)
        if size < _MIN_SIZE:
            raise StreamProtocolError(f"a frame of {size} bytes has no room for its key and version")
        total = size + 4
        first = bytes(head)
        head.clear()
        if key in self.capture:
            if total <= self.max_frame:
                self._frame += first
                self._frame_left = total - HEADER.size
                if not self._frame_left:
                    self._frame.clear()
                    return Frame(key, version, first)
                return self._collect(data, self._pos, end) if self._pos < end else NEED_DATA
            self.too_large += 1
        self._skip = total - HEADER.size
        return first


class StreamSession:
    """One relayed stream connection's two scanners and what the relay keeps between frames.

    ``to_server`` reads the client's handshake and is dropped (None) after its Open request; ``to_client`` reads
    the broker's frames for as long as the connection lives, or until they turn out not to be stream frames.
    """

    __slots__ = ("frame_max", "host", "to_client", "to_server")

    def __init__(self, host: bytes, client_keys: frozenset[int], server_keys: frozenset[int]) -> None:
        self.to_server: FrameScanner | None = FrameScanner(client_keys)
        self.to_client: FrameScanner | None = FrameScanner(server_keys)
        # The frame_max the client agreed to in its Tune (0: no limit): a rewritten frame must stay within it.
        self.frame_max = 0
        # The host the client is told to reach the proxy by.
        self.host = host
