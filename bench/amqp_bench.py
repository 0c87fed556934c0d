"""AMQP load through the brokers directly, through rabbitproxy and through HAProxy in TCP mode, in one run.

    .venv/bin/python bench/amqp_bench.py --quick --json out/amqp.json
    .venv/bin/python bench/amqp_bench.py --brokers 10.0.0.1:5672,10.0.0.2:5672 --duration 30

Publishers and consumers (aio-pika, one connection each) are spread over several worker processes, because a
single Python client process saturates long before a broker or a proxy does. Every target places them alike: they
connect one at a time in one plan order, the k-th on broker k % N, direct clients by choice and proxied ones because
each proxy's round-robin pointer is moved to broker 0 first (``placement.py``); where each one landed is read back
from the management API and recorded. ``--nodes 1`` (or one ``--brokers`` entry) is the single-broker variant.

Every message carries its send time (``time.time_ns()``; all processes share one clock) so consumers measure
end-to-end latency. Targets are interleaved (direct, rabbitproxy, haproxy, direct, ...) and the medians of the
repeats are reported.

Without ``--brokers`` a local 3-node cluster is started with ``rabbitproxy.dev.cluster`` and stopped at the end.
Nothing is pinned here: the brokers need both cores, and the proxy's own CPU time is measured, not inferred.
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
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import common  # noqa: E402
import placement  # noqa: E402
from common import Route, Target, median, percentile  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402

ALL_TARGETS = ("direct", "rabbitproxy", "haproxy")
_STAMP = struct.Struct("!q")
# Latency samples each consumer sends back; more would only slow the hand-over, not sharpen p99.
MAX_SAMPLES = 20000

console = Console(stderr=True, width=170)


@dataclass(frozen=True)
class Load:
    size: int = 1024
    publishers: int = 4
    consumers: int = 4
    queues: int = 2
    duration: float = 10.0
    confirms: bool = True
    processes: int = 4
    # Confirms outstanding per publisher: enough to keep the pipe full, few enough to bound memory.
    window: int = 64
    prefetch: int = 256


@dataclass(frozen=True)
class Job:
    """What one worker process runs: its share of the plan's clients, against the target's URLs."""

    load: Load
    # Direct: one URL per broker, and each client uses its planned broker's; through a proxy: the proxy's only.
    urls: tuple[str, ...]
    clients: tuple[placement.Client, ...]
    # Seconds the whole plan may take to connect (the connections are opened one at a time).
    connect_budget: float


def split_clients(clients: Sequence[placement.Client], processes: int) -> list[tuple[placement.Client, ...]]:
    """Deal the plan's clients out to ``processes`` workers, round robin (pure; unit-tested)."""
    n = max(1, min(processes, len(clients)))
    return [tuple(clients[i::n]) for i in range(n) if clients[i::n]]


def connect_budget(clients: int) -> float:
    """How long the one-at-a-time connects may take: generous, as a busy 2-core machine is slow to handshake."""
    return 60.0 + 2.0 * clients


def queue_name(i: int) -> str:
    return f"rabbitproxy-bench-{i}"


def stamp(size: int) -> bytes:
    """A message body of ``size`` bytes (at least 8) that starts with the send time."""
    return _STAMP.pack(time.time_ns()) + b"\0" * max(0, size - _STAMP.size)


def latency_us(body: bytes, now_ns: int) -> float:
    sent: int = _STAMP.unpack_from(body)[0]
    return (now_ns - sent) / 1000


# -- the worker process -----------------------------------------------------------------------------------------


async def _work(job: Job, turn: Any, window: Any) -> dict[str, Any]:
    """Run the job's clients. ``turn`` (shared) is the plan position whose turn it is to connect; ``window``
    (shared) is the start of the measured window, 0 until the driver opens it once every client is connected."""
    import aio_pika

    load = job.load
    result: dict[str, Any] = {"published": 0, "consumed": 0, "errors": 0, "error_kinds": {}, "latencies_us": []}
    samples: list[float] = result["latencies_us"]
    seen = 0

    def error(exc: BaseException) -> None:
        result["errors"] += 1
        kind = type(exc).__name__
        result["error_kinds"][kind] = result["error_kinds"].get(kind, 0) + 1

    connections: list[Any] = []
    # The window as this process knows it, copied once from the shared value: reading that takes a lock, too
    # much for every message.
    bounds = [math.inf, math.inf]

    def measuring(now: float) -> bool:
        return bounds[0] <= now < bounds[1]

    async def opened() -> float:
        """Wait for the driver to open the window; return its end."""
        while not window.value:
            await asyncio.sleep(0.01)
        bounds[0] = float(window.value)
        bounds[1] = bounds[0] + load.duration
        while time.time() < bounds[0]:
            await asyncio.sleep(0.005)
        return bounds[1]

    async def connect(c: placement.Client) -> Any:
        # One connection at a time, in plan order across all workers, so a round-robin proxy sees the same sequence
        # the direct run follows by hand.
        while turn.value != c.seq:
            await asyncio.sleep(0.002)
        try:
            url = job.urls[c.node % len(job.urls)]
            conn = await aio_pika.connect(url, timeout=30, client_properties={"connection_name": c.name})
            connections.append(conn)
            return conn
        finally:
            with turn.get_lock():
                turn.value += 1

    async def consumer(c: placement.Client) -> None:
        nonlocal seen
        conn = await connect(c)
        channel = await conn.channel()
        await channel.set_qos(prefetch_count=load.prefetch)
        queue = await channel.get_queue(queue_name(c.index % load.queues), ensure=False)
        unacked = 0

        async def on_message(message: Any) -> None:
            nonlocal seen, unacked
            if measuring(time.time()):
                result["consumed"] += 1
                seen += 1
                # Keep every sample until the cap, then every 16th: enough for a p99 without a huge hand-over.
                if len(samples) < MAX_SAMPLES or seen % 16 == 0:
                    samples.append(latency_us(message.body, time.time_ns()))
            unacked += 1
            # Acknowledging in batches is what a throughput-minded consumer does; per-message acks would make the
            # client, not the path under test, the bottleneck.
            if unacked >= 32:
                unacked = 0
                await message.ack(multiple=True)

        tag = await queue.consume(on_message)
        stop_at = await opened()
        await asyncio.sleep(max(0.0, stop_at - time.time()))
        await queue.cancel(tag)

    async def publisher(c: placement.Client) -> None:
        conn = await connect(c)
        channel = await conn.channel(publisher_confirms=load.confirms)
        exchange = channel.default_exchange
        key = queue_name(c.index % load.queues)
        stop_at = await opened()
        while time.time() < stop_at:
            batch = [
                exchange.publish(aio_pika.Message(stamp(load.size)), routing_key=key)
                for _ in range(load.window if load.confirms else 1)
            ]
            outcomes = await asyncio.gather(*batch, return_exceptions=True)
            ok = 0
            for o in outcomes:
                if isinstance(o, BaseException):
                    error(o)
                else:
                    ok += 1
            result["published"] += ok

    async def guarded(coro: Any) -> None:
        try:
            # Every role ends by itself at the window's end; the margin only catches a stalled connection.
            async with asyncio.timeout(job.connect_budget + load.duration + 30):
                await coro
        except (TimeoutError, OSError, aio_pika.exceptions.AMQPError, ConnectionError) as exc:
            error(exc)

    try:
        await asyncio.gather(*(guarded(consumer(c) if c.role == "con" else publisher(c)) for c in job.clients))
    finally:
        for conn in connections:
            try:
                await asyncio.wait_for(conn.close(), 10)
            except (TimeoutError, OSError, aio_pika.exceptions.AMQPError, ConnectionError) as exc:
                error(exc)
    if len(samples) > MAX_SAMPLES:
        result["latencies_us"] = samples[:: math.ceil(len(samples) / MAX_SAMPLES)]
    return result


def worker_main(job: Job, turn: Any, window: Any, out: Any) -> None:
    import uvloop

    try:
        out.put(uvloop.run(_work(job, turn, window)))
    except BaseException as exc:  # noqa: BLE001 - any failure is reported to the driver, which counts it
        out.put({"published": 0, "consumed": 0, "errors": 1, "error_kinds": {type(exc).__name__: 1}})


# -- the driver -----------------------------------------------------------------------------------------------------


async def _prepare_queues(urls: Sequence[str], load: Load) -> None:
    """Declare (or purge) the queues, queue ``i`` through broker ``i % N``: its leader lives there for every target."""
    import aio_pika

    for i in range(load.queues):
        conn = await aio_pika.connect(urls[i % len(urls)], timeout=30)
        try:
            ch = await conn.channel()
            # Bounded queues: if publishers outrun consumers the broker drops the oldest instead of paging.
            q = await ch.declare_queue(
                queue_name(i), durable=False, arguments={"x-max-length": 200000, "x-overflow": "drop-head"}
            )
            await q.purge()
        finally:
            await conn.close()


@dataclass(frozen=True)
class Brokers:
    """The brokers behind every target, and the management API the placement is read from (None: not read)."""

    addresses: tuple[tuple[str, int], ...]
    urls: tuple[str, ...]
    management: placement.Management | None


def run_load(target: Target, urls: Sequence[str], load: Load, brokers: Brokers, tag: str) -> dict[str, Any]:
    """One repeat of the load against one target; the proxy's CPU and peak RSS are measured around it."""
    import uvloop

    uvloop.run(_prepare_queues(brokers.urls, load))
    nodes = len(brokers.addresses)
    clients = placement.plan(load.publishers, load.consumers, nodes, tag)
    aligned: int | None = None
    if target.pid is not None and brokers.management is not None:
        # Move the proxy's round-robin pointer to broker 0, where the plan starts.
        port = next(iter(target.ports.values()))
        aligned = uvloop.run(placement.align(urls[0], ("127.0.0.1", port), brokers.management, brokers.addresses, tag))
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    turn = ctx.Value("i", 0)
    window = ctx.Value("d", 0.0)
    budget = connect_budget(len(clients))
    jobs = [Job(load, tuple(urls), share, budget) for share in split_clients(clients, load.processes)]
    procs = [ctx.Process(target=worker_main, args=(j, turn, window, out), daemon=True) for j in jobs]
    results: list[dict[str, Any]] = []
    where: dict[str, int] = {}
    with common.measure(target.pid) as usage:
        for p in procs:
            p.start()
        deadline = time.time() + budget
        while turn.value < len(clients) and time.time() < deadline and any(p.is_alive() for p in procs):
            time.sleep(0.05)
        if brokers.management is not None:
            # Read before the window opens, so the listing costs the brokers nothing that is measured.
            where = placement.wait_landed(
                brokers.management, brokers.addresses, f"{placement.PREFIX}-{tag}-", len(clients)
            )
        # Workers need no more than a moment to notice; the window opens for all of them at once.
        window.value = time.time() + 0.5
        deadline = window.value + load.duration + 60
        while len(results) < len(procs) and time.time() < deadline:
            try:
                results.append(out.get(timeout=1.0))
            except queue_mod.Empty:
                if all(not p.is_alive() for p in procs) and out.empty():
                    break
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
    missing = len(procs) - len(results)
    latencies = [x for r in results for x in r.get("latencies_us", [])]
    kinds: dict[str, int] = {}
    for r in results:
        for k, v in r.get("error_kinds", {}).items():
            kinds[k] = kinds.get(k, 0) + v
    published = sum(r["published"] for r in results)
    consumed = sum(r["consumed"] for r in results)
    placed = placement.summarize(clients, where, nodes) if brokers.management is not None else {}
    if placed:
        placed["align_probe_landed"] = aligned
    # The whole run (connects, warm-up, drain) is in the CPU time; the messages counted are the window's only,
    # so this slightly overstates CPU per message, and equally for every proxy.
    return {
        "published_per_s": published / load.duration,
        "consumed_per_s": consumed / load.duration,
        "latency_p50_us": percentile(latencies, 50),
        "latency_p99_us": percentile(latencies, 99),
        "errors": sum(r["errors"] for r in results) + missing,
        "error_kinds": kinds,
        "proxy_cpu_s": usage.cpu if target.pid else math.nan,
        "proxy_cpu_s_per_million": (usage.cpu / (consumed / 1e6)) if target.pid and consumed else math.nan,
        "proxy_peak_rss_mib": usage.peak_rss / 2**20 if target.pid else math.nan,
        "placement": placed,
    }


KEYS = (
    "published_per_s",
    "consumed_per_s",
    "latency_p50_us",
    "latency_p99_us",
    "proxy_cpu_s_per_million",
    "proxy_peak_rss_mib",
)


def summarize(raw: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for t, runs in raw.items():
        row = {k: median([r[k] for r in runs if k in r]) for k in KEYS}
        row["errors"] = float(sum(r.get("errors", 0) for r in runs))
        row["placement_runs_as_planned"] = float(sum(bool(r.get("placement", {}).get("as_planned")) for r in runs))
        row["runs"] = float(len(runs))
        out[t] = row
    return out


def print_table(summary: dict[str, dict[str, float]], load: Load) -> None:
    cols = [
        ("published msg/s", "published_per_s", 0),
        ("consumed msg/s", "consumed_per_s", 0),
        ("latency p50 ms", "latency_p50_us", 2),
        ("latency p99 ms", "latency_p99_us", 2),
        ("proxy CPU s / M msgs", "proxy_cpu_s_per_million", 1),
        ("proxy peak RSS MiB", "proxy_peak_rss_mib", 1),
        ("errors", "errors", 0),
    ]
    title = f"AMQP load (medians; {load.size} B, confirms {'on' if load.confirms else 'off'})"
    common.print_medians(title, cols, summary, console)


def main(argv: Sequence[str] | None = None) -> int:
    common.exit_cleanly_on_sigterm()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5 s per run, 2 repeats")
    ap.add_argument("--size", type=int, default=1024, help="message size in bytes (at least 8)")
    ap.add_argument("--publishers", type=int, default=4)
    ap.add_argument("--consumers", type=int, default=4)
    ap.add_argument("--queues", type=int, default=2)
    ap.add_argument("--processes", type=int, default=4, help="worker processes the clients are spread over")
    ap.add_argument("--duration", type=float, help="measured seconds per run (default 20, quick 5)")
    ap.add_argument("--repeats", type=int, help="interleaved repeats (default 3, quick 2)")
    ap.add_argument("--confirms", action=argparse.BooleanOptionalAction, default=True, help="publisher confirms")
    ap.add_argument("--brokers", help="existing brokers host:port,...; default: start a local 3-node cluster")
    ap.add_argument("--nodes", type=int, default=3, help="size of the local cluster")
    ap.add_argument(
        "--management",
        help="management API URL of one broker, to read placement from (default: the local cluster's first node, "
        "or http://<first broker>:15672/ with --brokers); 'none' skips it",
    )
    ap.add_argument("--user", default="guest")
    ap.add_argument("--password", default="guest")
    ap.add_argument("--targets", default=",".join(ALL_TARGETS))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--png", type=Path, help="write a chart of the medians here")
    args = ap.parse_args(argv)
    if args.size < _STAMP.size:
        ap.error(f"--size must be at least {_STAMP.size} (the timestamp)")
    load = Load(
        size=args.size,
        publishers=args.publishers,
        consumers=args.consumers,
        queues=args.queues,
        duration=args.duration or (5.0 if args.quick else 20.0),
        confirms=args.confirms,
        processes=args.processes,
    )
    repeats = args.repeats or (2 if args.quick else 3)
    targets = [t for t in args.targets.split(",") if t]
    if set(targets) - set(ALL_TARGETS):
        ap.error(f"unknown targets: {', '.join(sorted(set(targets) - set(ALL_TARGETS)))}")
    common.raise_nofile()
    info = common.machine_info()
    started_at = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    cluster = None
    if args.brokers:
        from rabbitproxy.config import split_host_port

        brokers = [split_host_port(b, 5672) for b in args.brokers.split(",") if b.strip()]
        mgmt_url = args.management or f"http://{brokers[0][0]}:15672/"
    else:
        from rabbitproxy.dev.cluster import DevCluster

        cluster = DevCluster(args.nodes, log=lambda line: console.print(f"[dim][cluster] {line}"))
        cluster.start()
        brokers = [("127.0.0.1", n.amqp_port) for n in cluster.nodes]
        mgmt_url = args.management or cluster.management_url(cluster.nodes[0])
    mgmt = None if mgmt_url == "none" else placement.Management(mgmt_url, args.user, args.password)
    creds = f"{args.user}:{args.password}"
    running: list[Target] = []
    raw: dict[str, list[dict[str, Any]]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="rabbitproxy-amqp-bench-") as tmp:
            route = Route("amqp", 0, tuple(brokers))
            kinds = [t for t in targets if t != "direct"]
            per_kind = common.target_routes([route], kinds)
            urls: dict[str, list[str]] = {"direct": [f"amqp://{creds}@{h}:{p}/" for h, p in brokers]}
            by_name: dict[str, Target] = {"direct": Target("direct", {})}
            for kind in kinds:
                # Unpinned, like the brokers: they need both cores.
                by_name[kind] = common.start_target(kind, per_kind[kind], Path(tmp), None)
                running.append(by_name[kind])
                urls[kind] = [f"amqp://{creds}@127.0.0.1:{by_name[kind].ports['amqp']}/"]
            behind = Brokers(tuple(brokers), tuple(urls["direct"]), mgmt)
            order = common.interleave(targets, repeats)
            with Progress(console=console) as progress:
                task = progress.add_task("amqp bench", total=len(order))
                for rep, t in order:
                    progress.update(task, description=f"[{rep + 1}/{repeats}] {t}")
                    if not console.is_terminal:
                        # Rich draws no bar into a log file; a line per step shows progress there.
                        console.print(f"{time.strftime('%H:%M:%S')} " + progress.tasks[0].description)
                    raw.setdefault(t, []).append(run_load(by_name[t], urls[t], load, behind, f"{t}.{rep}"))
                    progress.advance(task)
    finally:
        for target in running:
            if target.proc is not None:
                target.proc.stop()
        if cluster is not None:
            cluster.stop()
    summary = summarize(raw)
    print_table(summary, load)
    if args.png:
        import charts

        charts.amqp_chart(summary, args.png)
    if args.json:
        common.write_json(
            args.json,
            {
                "bench": "amqp",
                "started_at": started_at,
                "machine": info,
                "settings": {
                    **asdict(load),
                    "repeats": repeats,
                    "targets": targets,
                    "brokers": len(brokers),
                    "placement": "connections opened one at a time in plan order (publishers and consumers "
                    "alternating), the k-th on broker k % N: direct clients pick it, each proxy's round-robin "
                    "pointer is moved to broker 0 before the run; queue i is declared through broker i % N",
                    "placement_read": mgmt is not None,
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
