"""What reading the AMQP handshake costs: a real AMQP connection rate through the proxy, and the reader alone.

    .venv/bin/python bench/handshake_bench.py --base /tmp/rabbitproxy-before   # a checkout of the code before

Two measurements:

1. ``reader``: the sans-IO ``HandshakeReader`` fed one client's and one broker's handshake (the bytes aio-pika and
   RabbitMQ 3.x send, in the turns a real connection takes), microseconds per handshake.
2. ``connections``: a one-node RabbitMQ (``rabbitproxy.dev``) behind ``rabbitproxy serve`` (uvloop, log level
   warning, pinned to CPU 1); clients open an AMQP connection through it (protocol header, start-ok with PLAIN,
   tune-ok, open), wait for open-ok, close it (close, close-ok) and go again, ``--concurrency`` at a time. The
   proxy's CPU time (from /proc) per connection and connections per second are compared across targets, which run
   one after the other in each round, each round starting with the next (A B C, B C A, ...); medians of the rounds
   are reported. Targets: ``before`` (the code in ``--base``, if given), ``amqp`` (this code, ``protocol =
   "amqp"``) and ``tcp`` (this code, ``protocol = "tcp"``: no reader, no hello deadline). The broker does most of
   the work of a connection, so connections/s shows the broker's limit; the proxy's CPU per connection is the
   number to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
from common import fmt, median  # noqa: E402

from rabbitproxy.dev.cluster import DevCluster  # noqa: E402
from rabbitproxy.protocols.amqp_handshake import HandshakeReader  # noqa: E402

PROXY_CPU = {1}
HEADER = b"AMQP\x00\x00\x09\x01"


# -- AMQP 0-9-1 frames, just enough for a handshake ----------------------------------------------------------------


def _shortstr(text: str) -> bytes:
    raw = text.encode()
    return bytes([len(raw)]) + raw


def _longstr(raw: bytes) -> bytes:
    return struct.pack(">I", len(raw)) + raw


def _table(items: dict[str, str]) -> bytes:
    return _longstr(b"".join(_shortstr(k) + b"S" + _longstr(v.encode()) for k, v in items.items()))


def method(method_id: int, args: bytes) -> bytes:
    payload = struct.pack(">HH", 10, method_id) + args
    return struct.pack(">BHI", 1, 0, len(payload)) + payload + b"\xce"


PROPS = {"connection_name": "bench", "product": "aio-pika", "version": "9.4.1", "platform": "Python 3.11"}
START_OK = method(11, _table(PROPS) + _shortstr("PLAIN") + _longstr(b"\x00guest\x00guest") + _shortstr("en_US"))
TUNE_OK_OPEN = method(31, struct.pack(">HIH", 2047, 131072, 60)) + method(40, _shortstr("/") + _shortstr("") + b"\x00")
CLOSE = method(50, struct.pack(">H", 200) + _shortstr("bye") + struct.pack(">HH", 0, 0))
# What RabbitMQ 3.x sends: start (with its server properties), tune, open-ok.
SERVER_START = method(
    10,
    b"\x00\x09"
    + _table({"product": "RabbitMQ", "version": "3.10.8", "platform": "Erlang/OTP 25", "cluster_name": "rabbit@h"})
    + _longstr(b"AMQPLAIN PLAIN")
    + _longstr(b"en_US"),
)
SERVER_TUNE = method(30, struct.pack(">HIH", 2047, 131072, 60))
SERVER_OPEN_OK = method(41, _shortstr(""))


def reader_us(handshakes: int) -> float:
    """Microseconds per handshake for the reader alone, in the turns of a real connection."""
    turns = [(HEADER, SERVER_START), (START_OK, SERVER_TUNE), (TUNE_OK_OPEN, SERVER_OPEN_OK)]
    start = time.perf_counter()
    for _ in range(handshakes):
        reader = HandshakeReader()
        for client, server in turns:
            reader.client_data(client)
            reader.server_data(server)
        assert reader.done and reader.handshake.outcome == "open"
    return (time.perf_counter() - start) / handshakes * 1e6


# -- real connections through a proxy -------------------------------------------------------------------------------


async def _read_method(reader: asyncio.StreamReader) -> int:
    """The method id of the next connection-class method frame (heartbeats skipped)."""
    while True:
        kind, _channel, size = struct.unpack(">BHI", await reader.readexactly(7))
        payload = await reader.readexactly(size + 1)
        if kind == 1:
            return int(struct.unpack_from(">H", payload, 2)[0])


async def one_connection(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(HEADER)
        if await _read_method(reader) != 10:
            raise RuntimeError("no connection.start")
        writer.write(START_OK)
        if await _read_method(reader) != 30:
            raise RuntimeError("no connection.tune")
        writer.write(TUNE_OK_OPEN)
        if await _read_method(reader) != 41:
            raise RuntimeError("no connection.open-ok")
        writer.write(CLOSE)
        if await _read_method(reader) != 51:
            raise RuntimeError("no connection.close-ok")
    finally:
        writer.close()


async def connection_round(port: int, count: int, concurrency: int) -> float:
    """Open and close ``count`` connections, ``concurrency`` at a time; returns the seconds it took."""
    left = count

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await one_connection(port)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start


def proxy_config(listen: int, broker: int, protocol: str | None) -> str:
    # "amqp+client_hello_timeout=0": a protocol plus service keys, for a target that varies one setting.
    proto, *keys = (protocol or "").split("+")
    extra = f'protocol = "{proto}"\n' if proto else ""
    extra += "".join(f"{key}\n" for key in keys)
    return (
        '[admin]\nenabled = false\n\n[[services]]\nname = "amqp"\n'
        f'listen = "127.0.0.1:{listen}"\nmax_connections = 20000\n{extra}'
        '[services.health_check]\ntype = "none"\n\n'
        f'[[services.backends]]\nname = "rabbit1"\naddress = "127.0.0.1"\nport = {broker}\n'
    )


def start_proxy(name: str, code: Path, protocol: str | None, broker: int, workdir: Path) -> tuple[common.Proc, int]:
    port = common.free_port()
    cfg = workdir / f"{name}.toml"
    cfg.write_text(proxy_config(port, broker, protocol))
    argv = [os.path.abspath(sys.executable), "-m", "rabbitproxy", "serve", "--config", str(cfg), "--loop", "uvloop"]
    argv += ["--log-level", "warning"]
    # ``python -m`` puts the working directory first on sys.path: run each target from its own code's directory,
    # or every target would import the code of the directory the bench was started from.
    env = ["env", "-C", str(code), f"PYTHONPATH={code}"]
    where = subprocess.run(
        [*env, argv[0], "-c", "import rabbitproxy.relay.legs as m; print(m.__file__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    print(f"{name}: {where}", flush=True)
    proc = common.Proc(name, [*env, *argv], workdir / f"{name}.log", PROXY_CPU).start()
    common.wait_port(port, 60, proc.popen)
    return proc, port


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, help="a copy of the code before (its directory holds rabbitproxy/)")
    ap.add_argument("--connections", type=int, default=1000, help="connections per target per round")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        help='another target of this code, e.g. "amqp+client_hello_timeout=0" (protocol, then service keys)',
    )
    args = ap.parse_args()

    for _ in range(2):
        reader_us(2000)  # warm up
    micro = median([reader_us(20000) for _ in range(5)])
    print(f"reader: {fmt(micro, 2)} µs per handshake (both sides, {len(HEADER + START_OK + TUNE_OK_OPEN)} + "
          f"{len(SERVER_START + SERVER_TUNE + SERVER_OPEN_OK)} bytes)", flush=True)  # fmt: skip

    targets: list[tuple[str, Path, str | None]] = []
    if args.base is not None:
        targets.append(("before", args.base.resolve(), None))
    targets += [("amqp", ROOT, "amqp"), ("tcp", ROOT, "tcp")]
    targets += [(variant, ROOT, variant) for variant in args.variant]
    results: dict[str, dict[str, list[float]]] = {name: {"cps": [], "cpu_us": []} for name, _, _ in targets}
    with tempfile.TemporaryDirectory(prefix="hs-bench-") as tmp, DevCluster(1, management=False) as cluster:
        workdir = Path(tmp)
        broker = cluster.nodes[0].amqp_port
        procs = {name: start_proxy(name, code, proto, broker, workdir) for name, code, proto in targets}
        try:
            for _proc, port in procs.values():
                asyncio.run(connection_round(port, 100, args.concurrency))  # warm up each target
            names = list(procs)
            for rnd in range(args.rounds):
                # Each round starts with another target, so no target always runs first or last.
                for name in names[rnd % len(names) :] + names[: rnd % len(names)]:
                    proc, port = procs[name]
                    cpu0 = common.cpu_seconds(proc.pid)
                    took = asyncio.run(connection_round(port, args.connections, args.concurrency))
                    cpu = common.cpu_seconds(proc.pid) - cpu0
                    results[name]["cps"].append(args.connections / took)
                    results[name]["cpu_us"].append(cpu / args.connections * 1e6)
                    print(f"round {rnd + 1} {name}: {args.connections / took:.0f} conn/s, "
                          f"{cpu / args.connections * 1e6:.0f} µs proxy CPU per connection", flush=True)  # fmt: skip
        finally:
            for proc, _port in procs.values():
                proc.stop()
    print()
    print("| target | connections/s (median) | proxy CPU per connection, µs (median) | rounds |")
    print("| --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {fmt(median(r['cps']), 0)} | {fmt(median(r['cpu_us']), 0)} | {len(r['cps'])} |")
    print(f"\nload average at the end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
