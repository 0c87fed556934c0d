"""The channel between the supervising process and one worker process: framed JSON over an AF_UNIX socketpair.

A frame is a 4-byte big-endian length and that many bytes of UTF-8 JSON, one object. :func:`encode` and
:class:`Decoder` are the codec (sans-IO, tested without a socket); :class:`Channel` runs it on a stream with two
kinds of message: notifications (no ``id``; handled synchronously and in order, so state snapshots apply in the
order they were sent) and requests (an ``id``; answered by a message with ``re`` = that id, within a deadline).

Both directions are bounded (house rule 11): a frame longer than :data:`MAX_FRAME` ends the channel, and a peer
that stops reading makes :meth:`Channel.send` raise :class:`ChannelFullError` once :data:`MAX_BUFFERED` bytes wait
for it, rather than growing this process's memory: the supervisor then restarts that worker.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import struct
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import structlog

from rabbitproxy.tasks import OwnedTasks

log = structlog.get_logger("rabbitproxy.workers")

_HEADER = struct.Struct(">I")
# A connection listing of a busy worker is the largest message: ~300 bytes a connection, tens of thousands of them.
MAX_FRAME = 64 * 1024 * 1024
MAX_BUFFERED = 64 * 1024 * 1024
# Seconds a request waits for its answer: a stuck worker must not freeze the admin API.
REQUEST_TIMEOUT = 5.0

Message = dict[str, Any]


class ChannelError(Exception):
    """The peer sent something that is not a frame of this protocol, or the channel is closed."""


class ChannelFullError(ChannelError):
    """The peer stopped reading: more than MAX_BUFFERED bytes wait for it."""


def encode(message: Message) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ChannelError(f"message of {len(body)} bytes is over the {MAX_FRAME}-byte frame limit")
    return _HEADER.pack(len(body)) + body


class Decoder:
    """Bytes in, messages out."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[Message]:
        """Add ``data`` and yield every complete message; raises ChannelError on a bad frame."""
        buf = self._buffer
        buf += data
        while len(buf) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buf)
            if size > MAX_FRAME:
                raise ChannelError(f"frame of {size} bytes is over the {MAX_FRAME}-byte limit")
            end = _HEADER.size + size
            if len(buf) < end:
                return
            body = bytes(buf[_HEADER.size : end])
            del buf[:end]
            try:
                message = json.loads(body)
            except ValueError as exc:
                raise ChannelError(f"frame is not JSON: {exc}") from None
            if not isinstance(message, dict):
                raise ChannelError("frame is not a JSON object")
            yield message


Notify = Callable[[Message], None]
Answer = Callable[[Message], Awaitable[Message]]


class Channel:
    """One end of a socketpair: send notifications, send requests and await answers, serve the peer's."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, max_buffered: int = MAX_BUFFERED
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.max_buffered = max_buffered
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._answers = OwnedTasks()
        self.closed = False

    @classmethod
    async def open(cls, sock: Any, *, max_buffered: int = MAX_BUFFERED) -> Channel:
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        return cls(reader, writer, max_buffered=max_buffered)

    def send(self, message: Message) -> None:
        if self.closed:
            raise ChannelError("channel closed")
        if self.writer.transport.get_write_buffer_size() > self.max_buffered:
            raise ChannelFullError(f"the peer has not read {self.max_buffered} bytes")
        self.writer.write(encode(message))

    async def request(self, message: Message, deadline: float = REQUEST_TIMEOUT) -> Message:
        """Send ``message`` as a request and return the answer; TimeoutError after ``deadline`` seconds."""
        rid = next(self._ids)
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        try:
            self.send({**message, "id": rid})
            async with asyncio.timeout(deadline):
                return await future
        finally:
            self._pending.pop(rid, None)

    async def serve(self, notify: Notify, answer: Answer) -> None:
        """Read until the peer closes: answers resolve requests, the rest go to ``notify`` or ``answer``."""
        decoder = Decoder()
        try:
            while True:
                data = await self.reader.read(256 * 1024)
                if not data:
                    return
                for message in decoder.feed(data):
                    self._dispatch(message, notify, answer)
        finally:
            self.closed = True
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(ChannelError("channel closed"))
            await self._answers.cancel_all()

    def _dispatch(self, message: Message, notify: Notify, answer: Answer) -> None:
        re = message.get("re")
        if re is not None:
            future = self._pending.get(re)
            if future is not None and not future.done():
                future.set_result(message)
            return
        rid = message.get("id")
        if rid is None:
            notify(message)
        else:
            self._answers.spawn(self._answer(rid, message, answer), name=f"answer {message.get('t')}")

    async def _answer(self, rid: int, message: Message, answer: Answer) -> None:
        try:
            reply = await answer(message)
        except Exception as exc:
            log.exception("request failed", request=message.get("t"))
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        if not self.closed:
            self.send({**reply, "re": rid})

    def close(self) -> None:
        self.closed = True
        self.writer.close()
