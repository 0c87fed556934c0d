"""The load and the backend of ``bench/l4_bench.py``, run inside its network namespaces (stdlib + uvloop only).

    python l4_load.py serve ADDRESS ECHO_PORT SINK_PORT       # a backend: echo port and a sink that counts bytes
    python l4_load.py connrate HOST PORT SECONDS CONCURRENCY  # short connections: 1 byte there and back, client closes
    python l4_load.py bulk HOST SINK_PORT MEGABYTES           # one connection pushes MEGABYTES to the sink
    python l4_load.py pingpong HOST PORT SECONDS SIZE         # one connection, SIZE bytes there and back, in turn

Each load prints one JSON line. The sink answers the byte count when the client has shut its side, so ``bulk``
times the whole transfer, the last byte delivered included.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from typing import Any

import uvloop


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport; they have write() all the same.
        self.transport: Any = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class Sink(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        self.count = 0

    def data_received(self, data: bytes) -> None:
        self.count += len(data)

    def eof_received(self) -> bool:
        self.transport.write(f"{self.count}\n".encode())
        self.transport.close()
        return True


async def serve(address: str, echo_port: int, sink_port: int) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_server(Echo, address, echo_port, backlog=4096, reuse_address=True)
    await loop.create_server(Sink, address, sink_port, backlog=64, reuse_address=True)
    print("listening", flush=True)
    await asyncio.Event().wait()


async def connrate(host: str, port: int, seconds: float, concurrency: int) -> dict[str, float]:
    done = failed = 0
    stop = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done, failed
        while time.monotonic() < stop:
            try:
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(b"x")
                await reader.readexactly(1)
                writer.close()
                done += 1
            except (OSError, asyncio.IncompleteReadError):
                failed += 1

    began = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"conn_s": done / (time.monotonic() - began), "failed": failed}


async def bulk(host: str, port: int, megabytes: int) -> dict[str, float]:
    chunk = b"x" * (1 << 20)
    reader, writer = await asyncio.open_connection(host, port)
    began = time.monotonic()
    for _ in range(megabytes):
        writer.write(chunk)
        await writer.drain()
    writer.write_eof()
    got = int((await reader.readline()).decode())
    elapsed = time.monotonic() - began
    writer.close()
    return {"gbit_s": got * 8 / elapsed / 1e9, "bytes": got}


async def pingpong(host: str, port: int, seconds: float, size: int) -> dict[str, float]:
    reader, writer = await asyncio.open_connection(host, port)
    payload = b"p" * size
    rtts: list[float] = []
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        t0 = time.perf_counter()
        writer.write(payload)
        await reader.readexactly(size)
        rtts.append((time.perf_counter() - t0) * 1e6)
    writer.close()
    q = statistics.quantiles(rtts, n=100)
    return {"p50_us": q[49], "p99_us": q[98], "round_trips": len(rtts)}


def main(argv: list[str]) -> None:
    kind, *args = argv
    if kind == "serve":
        uvloop.run(serve(args[0], int(args[1]), int(args[2])))
        return
    if kind == "connrate":
        result = uvloop.run(connrate(args[0], int(args[1]), float(args[2]), int(args[3])))
    elif kind == "bulk":
        result = uvloop.run(bulk(args[0], int(args[1]), int(args[2])))
    elif kind == "pingpong":
        result = uvloop.run(pingpong(args[0], int(args[1]), float(args[2]), int(args[3])))
    else:
        raise SystemExit(f"unknown load {kind!r}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
