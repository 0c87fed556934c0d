"""Many idle AMQP connections that heartbeat, held through each target, with a small steady publish load on top.

    .venv/bin/python bench/idle_bench.py --quick --json out/idle.json
    .venv/bin/python bench/idle_bench.py --connections 5000 --hold 60 --brokers 10.0.0.1:5672,10.0.0.2:5672

Real clusters hold thousands of mostly idle connections. Each idle client here is a minimal AMQP 0-9-1 client on an
``asyncio.Protocol`` (protocol header, start-ok, tune-ok with a 5 s heartbeat, open, then a heartbeat frame every
half interval), so one worker process holds thousands; the proxy sees the same bytes aio-pika would send. While
they are held, one publisher and one consumer (aio-pika) exchange a steady trickle of time-stamped messages through
the same target, and the proxy's CPU over the hold and its RSS growth per connection are measured.

Every run starts a fresh proxy, so the RSS a previous run left behind (Python does not return freed memory to the
system) does not lower the next run's growth. Targets are interleaved within each repeat; medians are reported.
Without ``--brokers`` a local 3-node cluster is started with ``rabbitproxy.dev.cluster`` and stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing as mp
import os
import queue as queue_mod
import struct
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import common  # noqa: E402
import placement  # noqa: E402
from common import Route, Target, median, percentile  # noqa: E402
from rich.console import Console  # noqa: E402

ALL_TARGETS = ("direct", "rabbitproxy", "haproxy")
HEARTBEAT_FRAME = b"\x08\x00\x00\x00\x00\x00\x00\xce"
_FRAME_HEADER = struct.Struct(">BHI")
_STAMP = struct.Struct("!q")
STEADY_QUEUE = "rabbitproxy-bench-idle"
# Handshakes a worker has in flight at once: enough to keep the brokers busy, few enough not to time out.
CONCURRENT_OPENS = 32
# Descriptors kept for everything but the proxied connections (listeners, logs, the steady-load clients).
SPARE_FDS = 200

console = Console(stderr=True, width=170)


@dataclass(frozen=True)
class Settings:
    connections: int = 5000
    heartbeat: int = 5
    hold: float = 60.0
    rate: float = 50.0
    processes: int = 4
    user: str = "guest"
    password: str = "guest"


def usable_connections(requested: int, nofile: int) -> int:
    """How many proxied connections the descriptor limit allows: a proxy holds two descriptors for each (pure)."""
    return max(1, min(requested, (nofile - SPARE_FDS) // 2))


def shares(total: int, processes: int) -> list[int]:
    """Split ``total`` connections over at most ``processes`` workers as evenly as possible (pure)."""
    n = max(1, min(processes, total))
    return [total // n + (1 if i < total % n else 0) for i in range(n)]


def plain_response(user: str, password: str) -> str:
    return f"\0{user}\0{password}"


# -- the idle client -----------------------------------------------------------------------------------------------


class IdleClient(asyncio.Protocol):
    """One AMQP connection that opens, then only heartbeats; ``opened`` resolves once connection.open-ok arrives."""

    __slots__ = ("buf", "closing", "heartbeat", "lost", "opened", "response", "transport")

    def __init__(self, heartbeat: int, response: str, lost: list[int]) -> None:
        self.heartbeat = heartbeat
        self.response = response
        self.lost = lost
        self.buf = bytearray()
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, so this is a cast, not a check.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(placement.AMQP_HEADER)

    def data_received(self, data: bytes) -> None:
        if self.opened.done() and not self.closing:
            # Open and idle: only heartbeats arrive, and nothing needs reading from them.
            return
        self.buf += data
        while len(self.buf) >= _FRAME_HEADER.size:
            kind, _channel, size = _FRAME_HEADER.unpack_from(self.buf)
            end = _FRAME_HEADER.size + size + 1
            if len(self.buf) < end:
                return
            raw = bytes(self.buf[:end])
            del self.buf[:end]
            if kind == 1:
                self._method(raw)

    def _method(self, raw: bytes) -> None:
        from pamqp import commands, frame

        _used, _channel, value = frame.unmarshal(raw)
        assert self.transport is not None
        if isinstance(value, commands.Connection.Start):
            ok = commands.Connection.StartOk(
                client_properties={"connection_name": f"{placement.PREFIX}-idle", "product": "rabbitproxy idle bench"},
                response=self.response,
            )
            self.transport.write(frame.marshal(ok, 0))
        elif isinstance(value, commands.Connection.Tune):
            tune_ok = commands.Connection.TuneOk(
                channel_max=value.channel_max, frame_max=value.frame_max, heartbeat=self.heartbeat
            )
            self.transport.write(frame.marshal(tune_ok, 0) + frame.marshal(commands.Connection.Open("/"), 0))
        elif isinstance(value, commands.Connection.OpenOk):
            self.buf = bytearray()
            if not self.opened.done():
                self.opened.set_result(None)
        elif isinstance(value, commands.Connection.CloseOk):
            self.transport.close()
        elif isinstance(value, commands.Connection.Close):
            if not self.opened.done():
                self.opened.set_exception(ConnectionError(f"broker refused: {value.reply_text}"))
            self.transport.close()

    def close(self) -> None:
        """Close politely (connection.close, the broker answers close-ok), so brokers log no abrupt disconnects."""
        from pamqp import commands, frame

        if self.transport is None or self.transport.is_closing():
            return
        self.closing = True
        self.buf = bytearray()
        self.transport.write(frame.marshal(commands.Connection.Close(200, "bench done", 0, 0), 0))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed during the handshake"))
        elif not self.closing:
            self.lost[0] += 1


@dataclass(frozen=True)
class Job:
    urls: tuple[tuple[str, int], ...]
    first: int
    count: int
    settings: Settings


async def _hold(job: Job, opened: Any, failed: Any, stop: Any) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    s = job.settings
    lost = [0]
    clients: list[IdleClient] = []
    kinds: dict[str, int] = {}
    gate = asyncio.Semaphore(CONCURRENT_OPENS)
    response = plain_response(s.user, s.password)

    async def one(i: int) -> None:
        # Direct: the k-th connection goes to broker k % N, as a round-robin proxy would place it.
        host, port = job.urls[(job.first + i) % len(job.urls)]
        async with gate:
            try:
                async with asyncio.timeout(60):
                    _t, client = await loop.create_connection(
                        lambda: IdleClient(s.heartbeat, response, lost), host, port
                    )
                    await client.opened
                clients.append(client)
                with opened.get_lock():
                    opened.value += 1
            except (OSError, TimeoutError, ConnectionError) as exc:
                kinds[type(exc).__name__] = kinds.get(type(exc).__name__, 0) + 1
                with failed.get_lock():
                    failed.value += 1

    async def heartbeats() -> None:
        # Heartbeats every half interval, as AMQP clients send them, spread over the interval in slices so the
        # proxy sees a steady trickle rather than one burst per period. From the first open connection on, as a
        # real client starts heartbeating at open-ok: a worker opening its 1,250 connections can take longer than
        # the broker's (two heartbeats) or the proxy's (2.5 heartbeats) patience with a silent client.
        tick = 0.1
        slices = max(1, round(s.heartbeat / 2 / tick))
        k = 0
        while not stop.is_set():
            for client in clients[k % slices :: slices]:
                t = client.transport
                if t is not None and not t.is_closing():
                    t.write(HEARTBEAT_FRAME)
            k += 1
            await asyncio.sleep(tick)

    beating = asyncio.create_task(heartbeats())
    await asyncio.gather(*(one(i) for i in range(job.count)))
    await beating
    for client in clients:
        client.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(c.transport and not c.transport.is_closing() for c in clients):
        await asyncio.sleep(0.1)
    for client in clients:
        if client.transport is not None:
            client.transport.abort()
    return {"opened": len(clients), "lost": lost[0], "error_kinds": kinds}


def worker_main(job: Job, opened: Any, failed: Any, stop: Any, out: Any) -> None:
    import uvloop

    common.raise_nofile()
    try:
        out.put(uvloop.run(_hold(job, opened, failed, stop)))
    except BaseException as exc:  # noqa: BLE001 - any failure is reported to the driver, which counts it
        out.put({"opened": 0, "lost": 0, "error_kinds": {type(exc).__name__: 1}, "crashed": True})


# -- the driver -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Brokers:
    addresses: tuple[tuple[str, int], ...]
    management: placement.Management | None


async def _publish_for(channel: Any, rate: float, seconds: float) -> int:
    """Publish ``rate`` time-stamped messages a second for ``seconds``; returns how many were published."""
    import aio_pika

    start = time.monotonic()
    n = 0
    while (now := time.monotonic()) < start + seconds:
        # A fixed schedule, so a slow moment is followed by a catch-up rather than a lower rate.
        due = start + n / rate
        if due > now:
            await asyncio.sleep(due - now)
        await channel.default_exchange.publish(aio_pika.Message(_STAMP.pack(time.time_ns())), routing_key=STEADY_QUEUE)
        n += 1
    return n


async def run_once(target: Target, s: Settings, brokers: Brokers, tag: str) -> dict[str, Any]:
    """One run against one target: open the idle connections, hold them with the steady load on top, close."""
    import aio_pika

    if target.pid is None:
        urls = list(brokers.addresses)
    else:
        urls = [("127.0.0.1", next(iter(target.ports.values())))]
        if brokers.management is not None:
            # The steady load's publisher then lands on broker 0 and its consumer on broker 1, as in the direct run.
            host, port = urls[0]
            await placement.align(
                f"amqp://{s.user}:{s.password}@{host}:{port}/", urls[0], brokers.management, brokers.addresses, tag
            )

    def url(k: int) -> str:
        host, port = urls[k % len(urls)]
        return f"amqp://{s.user}:{s.password}@{host}:{port}/"

    latencies: list[float] = []
    pub = await aio_pika.connect(url(0), timeout=30, client_properties={"connection_name": f"{tag}-steady-pub"})
    con = await aio_pika.connect(url(1), timeout=30, client_properties={"connection_name": f"{tag}-steady-con"})
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    procs: list[Any] = []
    results: list[dict[str, Any]] = []
    try:
        cch = await con.channel()
        q = await cch.declare_queue(STEADY_QUEUE, durable=False, arguments={"x-max-length": 100000})
        await q.purge()
        measuring = [False]

        async def on_message(message: Any) -> None:
            if measuring[0]:
                sent: int = _STAMP.unpack_from(message.body)[0]
                latencies.append((time.time_ns() - sent) / 1000)

        await q.consume(on_message, no_ack=True)
        pch = await pub.channel(publisher_confirms=False)

        rss_before = common.rss_bytes(target.pid) if target.pid else 0
        out = ctx.Queue()
        opened = ctx.Value("i", 0)
        failed = ctx.Value("i", 0)
        # The idle connections continue the sequence after the steady pair: 2, 3, 4, ... % N.
        first = 2
        for count in shares(s.connections, s.processes):
            job = Job(tuple(urls), first, count, s)
            first += count
            procs.append(ctx.Process(target=worker_main, args=(job, opened, failed, stop, out), daemon=True))
        began = time.monotonic()
        for p in procs:
            p.start()
        deadline = began + 120 + s.connections / 20
        while opened.value + failed.value < s.connections and time.monotonic() < deadline:
            if not any(p.is_alive() for p in procs):
                break
            await asyncio.sleep(0.2)
        open_s = time.monotonic() - began
        # Let the last handshakes' garbage settle before the hold's measurements start.
        await asyncio.sleep(1.0)
        per_node: list[int] = []
        if brokers.management is not None:
            per_node = await asyncio.to_thread(count_per_broker, brokers, opened.value + 2)
        measuring[0] = True
        with common.measure(target.pid, interval=0.5) as usage:
            t0 = time.monotonic()
            published = await _publish_for(pch, s.rate, s.hold)
            held = time.monotonic() - t0
            rss_held = common.rss_bytes(target.pid) if target.pid else 0
        await asyncio.sleep(1.0)
        measuring[0] = False
    finally:
        stop.set()
        await pub.close()
        await con.close()
    deadline = time.monotonic() + 60
    while len(results) < len(procs) and time.monotonic() < deadline:
        try:
            results.append(await asyncio.to_thread(out.get, True, 1.0))
        except queue_mod.Empty:
            if all(not p.is_alive() for p in procs) and out.empty():
                break
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
    kinds: dict[str, int] = {}
    for r in results:
        for k, v in r.get("error_kinds", {}).items():
            kinds[k] = kinds.get(k, 0) + v
    held_conns = sum(r["opened"] for r in results)
    pid = target.pid
    grown = max(rss_held, usage.peak_rss) - rss_before
    return {
        "connections": float(held_conns),
        "failed": float(s.connections - held_conns),
        "lost_during_hold": float(sum(r["lost"] for r in results)),
        "open_s": open_s,
        "hold_s": held,
        "published": float(published),
        "received": float(len(latencies)),
        "latency_p50_us": percentile(latencies, 50),
        "latency_p99_us": percentile(latencies, 99),
        "proxy_cpu_share": usage.cpu / held if pid else math.nan,
        "proxy_rss_mib": max(rss_held, usage.peak_rss) / 2**20 if pid else math.nan,
        "proxy_kib_per_conn": grown / 1024 / held_conns if pid and held_conns else math.nan,
        "per_broker": per_node,
        "error_kinds": kinds,
    }


def count_per_broker(brokers: Brokers, expect: int, timeout: float = 30.0) -> list[int]:
    """Client connections per broker as the brokers list them (the idle ones and the steady pair).

    The management API lists a connection only after its next statistics round, so this polls until ``expect``
    connections are listed or the deadline passes, and returns the last count either way.
    """
    assert brokers.management is not None
    deadline = time.monotonic() + timeout
    counts: list[int] = []
    while True:
        try:
            rows = brokers.management.get("/api/connections?columns=port", timeout=60)
        except (OSError, ValueError):
            rows = []
        counts = [0] * len(brokers.addresses)
        for r in rows:
            i = placement.broker_index(r, brokers.addresses)
            if i is not None:
                counts[i] += 1
        if sum(counts) >= expect or time.monotonic() > deadline:
            return counts
        time.sleep(1.0)


KEYS = (
    "connections",
    "lost_during_hold",
    "open_s",
    "latency_p50_us",
    "latency_p99_us",
    "proxy_cpu_share",
    "proxy_rss_mib",
    "proxy_kib_per_conn",
)


def summarize(raw: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Medians per target; failed connections are summed, as any of them is worth a look (pure; unit-tested)."""
    out: dict[str, dict[str, float]] = {}
    for t, runs in raw.items():
        row = {k: median([float(r[k]) for r in runs if k in r]) for k in KEYS}
        row["failed"] = float(sum(r.get("failed", 0) for r in runs))
        row["lost_during_hold"] = float(sum(r.get("lost_during_hold", 0) for r in runs))
        out[t] = row
    return out


def print_table(summary: dict[str, dict[str, float]]) -> None:
    cols = [
        ("connections", "connections", 0),
        ("failed", "failed", 0),
        ("lost in hold", "lost_during_hold", 0),
        ("open s", "open_s", 1),
        ("latency p50 ms", "latency_p50_us", 2),
        ("latency p99 ms", "latency_p99_us", 2),
        ("proxy CPU share", "proxy_cpu_share", 3),
        ("proxy RSS MiB", "proxy_rss_mib", 1),
        ("proxy KiB / conn", "proxy_kib_per_conn", 1),
    ]
    common.print_medians("Idle AMQP connections (medians)", cols, summary, console)


def main(argv: Sequence[str] | None = None) -> int:
    common.exit_cleanly_on_sigterm()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1,000 connections held 15 s, 1 repeat")
    ap.add_argument("--connections", type=int, help="idle connections (default 5000, quick 1000; capped by nofile)")
    ap.add_argument("--hold", type=float, help="seconds the connections are held and measured (default 60, quick 15)")
    ap.add_argument("--heartbeat", type=int, default=5, help="heartbeat interval the idle clients negotiate, s")
    ap.add_argument("--rate", type=float, default=50.0, help="steady publish load, messages per second")
    ap.add_argument("--processes", type=int, default=4, help="worker processes the idle clients are spread over")
    ap.add_argument("--repeats", type=int, help="interleaved repeats (default 2, quick 1)")
    ap.add_argument("--brokers", help="existing brokers host:port,...; default: start a local 3-node cluster")
    ap.add_argument("--nodes", type=int, default=3, help="size of the local cluster")
    ap.add_argument(
        "--management",
        help="management API URL of one broker (default: the local cluster's first node, or "
        "http://<first broker>:15672/ with --brokers); 'none' skips placement and per-broker counts",
    )
    ap.add_argument("--user", default="guest")
    ap.add_argument("--password", default="guest")
    ap.add_argument("--targets", default=",".join(ALL_TARGETS))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    if set(targets) - set(ALL_TARGETS):
        ap.error(f"unknown targets: {', '.join(sorted(set(targets) - set(ALL_TARGETS)))}")
    common.raise_nofile()
    requested = args.connections or (1000 if args.quick else 5000)
    settings = Settings(
        connections=usable_connections(requested, common.nofile_limit()),
        heartbeat=args.heartbeat,
        hold=args.hold or (15.0 if args.quick else 60.0),
        rate=args.rate,
        processes=args.processes,
        user=args.user,
        password=args.password,
    )
    repeats = args.repeats or (1 if args.quick else 2)
    info = common.machine_info()
    started_at = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    cluster = None
    if args.brokers:
        from rabbitproxy.config import split_host_port

        addresses = [split_host_port(b, 5672) for b in args.brokers.split(",") if b.strip()]
        mgmt_url = args.management or f"http://{addresses[0][0]}:15672/"
    else:
        from rabbitproxy.dev.cluster import DevCluster

        cluster = DevCluster(args.nodes, log=lambda line: console.print(f"[dim][cluster] {line}"))
        cluster.start()
        addresses = [("127.0.0.1", n.amqp_port) for n in cluster.nodes]
        mgmt_url = args.management or cluster.management_url(cluster.nodes[0])
    mgmt = None if mgmt_url == "none" else placement.Management(mgmt_url, args.user, args.password)
    brokers = Brokers(tuple(addresses), mgmt)
    raw: dict[str, list[dict[str, Any]]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="rabbitproxy-idle-bench-") as tmp:
            route = Route("amqp", 0, tuple(addresses))
            for rep, t in common.interleave(targets, repeats):
                console.print(f"{time.strftime('%H:%M:%S')} [{rep + 1}/{repeats}] {t}: {settings.connections} idle")
                target = Target("direct", {})
                if t != "direct":
                    # A fresh proxy per run: RSS growth is then measured from the same start every time.
                    routes = common.target_routes([route], [t])[t]
                    target = common.start_target(t, routes, Path(tmp) / f"{t}-{rep}", None)
                try:
                    import uvloop

                    raw.setdefault(t, []).append(uvloop.run(run_once(target, settings, brokers, f"idle.{t}.{rep}")))
                finally:
                    if target.proc is not None:
                        target.proc.stop()
    finally:
        if cluster is not None:
            cluster.stop()
    summary = summarize(raw)
    print_table(summary)
    if args.json:
        common.write_json(
            args.json,
            {
                "bench": "idle",
                "started_at": started_at,
                "machine": info,
                "settings": {
                    **{k: v for k, v in asdict(settings).items() if k not in ("user", "password")},
                    "requested_connections": requested,
                    "nofile_hard_limit": common.nofile_limit(),
                    "repeats": repeats,
                    "targets": targets,
                    "brokers": len(addresses),
                    "local_cluster": cluster is not None,
                    "pinning": "none: brokers, clients and proxy share both cores",
                    "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
                },
                "raw": raw,
                "summary": summary,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
