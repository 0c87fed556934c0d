"""The relay itself, no broker: direct vs rabbitproxy vs HAProxy (default and tuned) vs nginx stream.

    .venv/bin/python bench/tcp_bench.py --quick --json out/tcp.json

Backends (all on loopback): an iperf3 server (bulk throughput), a sockperf server (ping-pong latency) and
``bench/echo_server.py`` (short connections closed from either side, idle connections). Every proxy under test
runs at once, each on its own ports, so the targets can be interleaved within each repeat (A B C A B C ...);
medians of the repeats are reported.

CPU pinning on a 2-core machine: the proxy under test runs alone on CPU 1; this driver, the load generators
(iperf3/sockperf clients, the short- and idle-connection clients) and the backends share CPU 0. Direct runs have
the client and the backend on CPU 0 only, which is the price of keeping the proxy's core to itself.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
import uvloop  # noqa: E402
from common import Proc, Route, Target, fmt, median  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402

PROXY_CPU = {1}
LOAD_CPU = {0}
ALL_TARGETS = ("direct", "rabbitproxy", "haproxy", "haproxy-tuned", "nginx")
# Connection logs at info cost something per connection, so that variant is only measured where it shows.
CONNRATE_EXTRA = ("rabbitproxy-info",)
TESTS = ("bulk1", "bulk8", "lat64", "lat1k", "conn_client_close", "conn_server_close")
# Worker processes against HAProxy's threads (issue 17), short connections only. These run on both cores, unpinned:
# N processes or threads need N cores, and this machine has two, which the driver and the echo backend share.
SCALING = ("rabbitproxy-w1", "rabbitproxy-w2", "haproxy-nbthread1", "haproxy-nbthread2")
CONN_TESTS = ("conn_client_close", "conn_server_close")

console = Console(stderr=True, width=170)


# -- parsers (pure; unit-tested) ------------------------------------------------------------------------------------

_PCT = re.compile(r"percentile\s+([\d.]+)\s*=\s*([\d.]+)")
_MIN_MAX = re.compile(r"<(MIN|MAX)> observation\s*=\s*([\d.]+)")


def parse_sockperf(text: str) -> dict[str, float]:
    """Round-trip percentiles in microseconds from ``sockperf ping-pong --full-rtt`` output."""
    out: dict[str, float] = {}
    for pct, value in _PCT.findall(text):
        out[f"p{float(pct):g}"] = float(value)
    for which, value in _MIN_MAX.findall(text):
        out[which.lower()] = float(value)
    if "p50" not in out:
        raise ValueError("no percentiles in sockperf output:\n" + text[-2000:])
    return out


def parse_iperf3(text: str) -> dict[str, float]:
    """Received bytes and Gbit/s from ``iperf3 -J`` output."""
    data = json.loads(text)
    if "error" in data:
        raise ValueError(f"iperf3: {data['error']}")
    received = data["end"]["sum_received"]
    return {"bytes": float(received["bytes"]), "gbit_s": received["bits_per_second"] / 1e9}


# -- the individual measurements ------------------------------------------------------------------------------------


def run_iperf(port: int, streams: int, duration: float, pid: int | None) -> dict[str, float]:
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(duration), "-P", str(streams), "-J"]
    # The first second (slow start, buffer growth) is omitted from the rate but not from the CPU time.
    argv += ["-O", "1"]
    with common.measure(pid) as usage:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    result = parse_iperf3(out.stdout)
    gb = result["bytes"] / 1e9
    # CPU over the whole run (omitted second included) divided by all bytes moved in the run is what the
    # proxy spends per GB; iperf reports bytes of the measured part only, so scale by the run length.
    moved_gb = gb * (duration + 1) / duration
    result["cpu_s"] = usage.cpu
    result["cpu_s_per_gb"] = usage.cpu / moved_gb if pid is not None and moved_gb > 0 else math.nan
    return result


def run_sockperf(port: int, size: int, duration: float) -> dict[str, float]:
    argv = ["sockperf", "ping-pong", "--tcp", "-i", "127.0.0.1", "-p", str(port), "-m", str(size)]
    argv += ["-t", str(int(duration)), "--full-rtt"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    return parse_sockperf(out.stdout + out.stderr)


class _Short(asyncio.Protocol):
    """One short connection: send a byte, read the answer, then either close (client side) or wait for EOF."""

    __slots__ = ("client_closes", "done", "transport")

    def __init__(self, done: asyncio.Future[None], client_closes: bool) -> None:
        self.done = done
        self.client_closes = client_closes
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(b"x")  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.client_closes and self.transport is not None:
            self.transport.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def _connrate(port: int, client_closes: bool, duration: float, concurrency: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    ok = 0
    errors = 0
    deadline = time.monotonic() + duration

    async def worker() -> None:
        nonlocal ok, errors
        while time.monotonic() < deadline:
            done: asyncio.Future[None] = loop.create_future()
            try:
                async with asyncio.timeout(5):
                    await loop.create_connection(functools.partial(_Short, done, client_closes), "127.0.0.1", port)
                    await done
                ok += 1
            except (OSError, TimeoutError):
                errors += 1

    began = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.monotonic() - began
    return {"conn_s": ok / elapsed, "ok": ok, "errors": errors}


def run_connrate(port: int, client_closes: bool, duration: float, pid: int | None) -> dict[str, float]:
    with common.measure(pid) as usage:
        result = uvloop.run(_connrate(port, client_closes, duration, concurrency=32))
    result["cpu_s"] = usage.cpu
    return result


class _Idle(asyncio.Protocol):
    __slots__ = ("echoed", "transport")

    def __init__(self, echoed: asyncio.Future[None]) -> None:
        self.echoed = echoed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(b"x")  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if not self.echoed.done():
            self.echoed.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.echoed.done():
            self.echoed.set_exception(ConnectionError("closed before the echo"))


async def _idle(port: int, count: int, pid: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    before = common.rss_bytes(pid)
    transports: list[asyncio.BaseTransport] = []
    failed = 0
    sem = asyncio.Semaphore(256)

    async def one() -> None:
        nonlocal failed
        async with sem:
            echoed: asyncio.Future[None] = loop.create_future()
            try:
                async with asyncio.timeout(30):
                    t, _ = await loop.create_connection(lambda: _Idle(echoed), "127.0.0.1", port)
                    transports.append(t)
                    # The echo proves the proxy's backend leg exists too, so both legs are in the measurement.
                    await echoed
            except (OSError, TimeoutError, ConnectionError):
                failed += 1

    await asyncio.gather(*(one() for _ in range(count)))
    # Let the proxy settle (buffers released after the first echo) before reading its RSS.
    await asyncio.sleep(1.0)
    after = common.rss_bytes(pid)
    held = count - failed
    for t in transports:
        t.close()
    await asyncio.sleep(0.5)
    return {
        "connections": held,
        "failed": failed,
        "rss_before": before,
        "rss_after": after,
        "kib_per_conn": (after - before) / 1024 / held if held else math.nan,
    }


def run_idle(port: int, count: int, pid: int) -> dict[str, float]:
    return uvloop.run(_idle(port, count, pid))


# -- orchestration --------------------------------------------------------------------------------------------------


def summarize(
    raw: dict[str, dict[str, list[dict[str, float]]]], targets: Sequence[str], duration: float = math.nan
) -> dict[str, dict[str, float]]:
    """Medians per target of every metric, plus latency added over direct (same-run medians)."""
    out: dict[str, dict[str, float]] = {}
    for t in [*targets, *CONNRATE_EXTRA, *SCALING]:
        if t in SCALING and not any(t in runs for runs in raw.values()):
            # Measured only with --scaling.
            continue
        row: dict[str, float] = {}

        def med(test: str, key: str, t: str = t) -> float:
            return median([r[key] for r in raw.get(test, {}).get(t, []) if key in r])

        row["bulk1_gbit_s"] = med("bulk1", "gbit_s")
        row["bulk8_gbit_s"] = med("bulk8", "gbit_s")
        row["bulk1_cpu_s_per_gb"] = med("bulk1", "cpu_s_per_gb")
        row["bulk8_cpu_s_per_gb"] = med("bulk8", "cpu_s_per_gb")
        for size in ("64", "1k"):
            for p in ("p50", "p99", "p99.9"):
                row[f"lat{size}_{p}_us"] = med(f"lat{size}", p)
        row["conn_client_close_s"] = med("conn_client_close", "conn_s")
        row["conn_server_close_s"] = med("conn_server_close", "conn_s")
        conn_runs = [r for test in ("conn_client_close", "conn_server_close") for r in raw.get(test, {}).get(t, [])]
        row["conn_errors"] = sum(r.get("errors", 0) for r in conn_runs)
        cc = common.conn_cpu(raw, t, duration)
        row["conn_cpu_us"] = cc.us_per_conn
        row["conn_core_share"] = cc.core_share
        row["idle_kib_per_conn"] = med("idle", "kib_per_conn")
        row["idle_connections"] = med("idle", "connections")
        out[t] = row
    direct = out.get("direct", {})
    for row in out.values():
        for size in ("64", "1k"):
            for p in ("p50", "p99", "p99.9"):
                key = f"lat{size}_{p}_us"
                row[f"lat{size}_{p}_added_us"] = row.get(key, math.nan) - direct.get(key, math.nan)
    return out


def print_table(summary: dict[str, dict[str, float]]) -> None:
    table = Table(title="TCP relay (medians)")
    cols = [
        ("bulk 1 Gbit/s", "bulk1_gbit_s", 2),
        ("bulk 8 Gbit/s", "bulk8_gbit_s", 2),
        ("CPU s/GB (1)", "bulk1_cpu_s_per_gb", 2),
        ("+p50 64B us", "lat64_p50_added_us", 1),
        ("+p99 64B us", "lat64_p99_added_us", 1),
        ("+p99.9 64B us", "lat64_p99.9_added_us", 1),
        ("+p50 1K us", "lat1k_p50_added_us", 1),
        ("conn/s cli-close", "conn_client_close_s", 0),
        ("conn/s srv-close", "conn_server_close_s", 0),
        ("CPU us/conn", "conn_cpu_us", 0),
        ("KiB/idle conn", "idle_kib_per_conn", 1),
    ]
    table.add_column("target")
    for title, _, _ in cols:
        table.add_column(title, justify="right")
    for name, row in summary.items():
        table.add_row(name, *(fmt(row.get(key, math.nan), d) for _, key, d in cols))
    console.print(table)


def main(argv: Sequence[str] | None = None) -> int:
    common.exit_cleanly_on_sigterm()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 s per measurement, 2 repeats")
    ap.add_argument("--duration", type=float, help="seconds per measurement (default 10, quick 2)")
    ap.add_argument("--repeats", type=int, help="interleaved repeats (default 3, quick 2)")
    ap.add_argument(
        "--targets", default=",".join(ALL_TARGETS), help="comma-separated subset of " + ",".join(ALL_TARGETS)
    )
    ap.add_argument(
        "--scaling",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure short connections through " + ", ".join(SCALING) + " (unpinned, both cores)",
    )
    ap.add_argument("--idle-connections", type=int, default=10000)
    ap.add_argument("--json", type=Path, help="write raw results and medians here")
    ap.add_argument("--png", type=Path, help="write a chart of the medians here")
    args = ap.parse_args(argv)
    duration = args.duration or (2.0 if args.quick else 10.0)
    repeats = args.repeats or (2 if args.quick else 3)
    targets = [t for t in args.targets.split(",") if t]
    unknown = set(targets) - set(ALL_TARGETS)
    if unknown:
        ap.error(f"unknown targets: {', '.join(sorted(unknown))}")
    for tool in ("iperf3", "sockperf", "haproxy", "nginx"):
        if not common.have(tool):
            ap.error(f"{tool} is not installed; bench/run_all installs it")

    common.raise_nofile()
    # A proxy holds two descriptors per connection and the hard limit here cannot be raised, so the idle test
    # holds as many as fit under it.
    idle_count = min(args.idle_connections, (common.nofile_limit() - 200) // 2)
    os.sched_setaffinity(0, LOAD_CPU)
    info = common.machine_info()
    started_at = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    with tempfile.TemporaryDirectory(prefix="rabbitproxy-tcp-bench-") as tmp:
        work = Path(tmp)
        ports = {name: common.free_port() for name in ("iperf", "sockperf", "echo", "close")}
        helpers = [
            Proc("iperf3-server", ["iperf3", "-s", "-p", str(ports["iperf"])], work / "iperf3.log", LOAD_CPU),
            Proc(
                "sockperf-server",
                ["sockperf", "server", "--tcp", "-i", "127.0.0.1", "-p", str(ports["sockperf"])],
                work / "sockperf.log",
                LOAD_CPU,
            ),
            Proc(
                "echo-server",
                [sys.executable, str(HERE / "echo_server.py"), str(ports["echo"]), str(ports["close"])],
                work / "echo.log",
                LOAD_CPU,
            ),
        ]
        running: list[Target] = []
        try:
            for h in helpers:
                h.start()
            for port in ports.values():
                common.wait_port(port)
            routes = [Route(name, 0, (("127.0.0.1", port),), protocol="tcp") for name, port in ports.items()]
            kinds = [t for t in targets if t != "direct"] + list(CONNRATE_EXTRA)
            per_kind = common.target_routes(routes, kinds)
            by_name: dict[str, Target] = {}
            if "direct" in targets:
                by_name["direct"] = Target("direct", dict(ports))
            for kind in kinds:
                by_name[kind] = common.start_target(kind, per_kind[kind], work, PROXY_CPU)
                running.append(by_name[kind])
            scaling = list(SCALING) if args.scaling else []
            scaling_routes = common.target_routes(routes, scaling)
            for kind in scaling:
                by_name[kind] = common.start_target(kind, scaling_routes[kind], work, None)
                running.append(by_name[kind])
            raw: dict[str, dict[str, list[dict[str, float]]]] = {}

            def record(test: str, target: str, result: dict[str, float]) -> None:
                raw.setdefault(test, {}).setdefault(target, []).append(result)

            order = common.interleave(targets, repeats)
            plan: list[tuple[str, str, int]] = []
            for rep, t in order:
                plan += [(test, t, rep) for test in TESTS]
                if t == "rabbitproxy":
                    plan += [(test, x, rep) for x in CONNRATE_EXTRA for test in TESTS if test.startswith("conn")]
            for rep, t in common.interleave(scaling, repeats):
                plan += [(test, t, rep) for test in CONN_TESTS]
            # RSS per idle connection barely varies; one pass per proxy, after the repeats.
            plan += [("idle", t, 0) for t in targets if t != "direct"]
            with Progress(console=console, transient=False) as progress:
                task = progress.add_task("tcp bench", total=len(plan))
                for test, t, rep in plan:
                    target = by_name[t]
                    progress.update(task, description=f"[{rep + 1}/{repeats}] {test:<18} {t}")
                    if not console.is_terminal:
                        # Rich draws no bar into a log file; a line per step shows progress there.
                        console.print(f"{time.strftime('%H:%M:%S')} " + progress.tasks[0].description)
                    pid = target.pid
                    try:
                        if test.startswith("bulk"):
                            res = run_iperf(target.ports["iperf"], 1 if test == "bulk1" else 8, duration, pid)
                        elif test.startswith("lat"):
                            res = run_sockperf(target.ports["sockperf"], 64 if test == "lat64" else 1024, duration)
                        elif test == "conn_client_close":
                            res = run_connrate(target.ports["echo"], True, duration, pid)
                        elif test == "conn_server_close":
                            res = run_connrate(target.ports["close"], False, duration, pid)
                        else:
                            assert pid is not None
                            res = run_idle(target.ports["echo"], idle_count, pid)
                    except (ValueError, KeyError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
                        progress.console.print(f"[red]{test} {t}: {exc}")
                        res = {"failed": 1.0}
                    record(test, t, res)
                    progress.advance(task)
            for target in running:
                if target.proc is not None and target.proc.popen is not None and target.proc.popen.poll() is not None:
                    console.print(f"[red]{target.name} exited during the run:\n{target.proc.log_tail()}")
        finally:
            for target in running:
                if target.proc is not None:
                    target.proc.stop()
            for h in helpers:
                h.stop()
    summary = summarize(raw, targets, duration)
    print_table(summary)
    if args.png:
        import charts

        charts.tcp_chart(summary, args.png)
    result = {
        "bench": "tcp",
        "started_at": started_at,
        "machine": info,
        "settings": {
            "duration_s": duration,
            "repeats": repeats,
            "targets": targets,
            "idle_connections": idle_count,
            "scaling": {
                "targets": scaling,
                "note": "worker processes and HAProxy threads run unpinned on both cores, which the driver (one "
                "uvloop process), the echo backend and the other idle proxies share: a rate there is what the "
                "proxy gets with a busy neighbour, not what two free cores give",
            },
            "pinning": {
                "proxy_under_test": sorted(PROXY_CPU),
                "driver_clients_and_backends": sorted(LOAD_CPU),
                "note": "the proxy has CPU 1 to itself; iperf3/sockperf clients and servers, the echo backend "
                "and the short/idle-connection clients (this driver) share CPU 0",
            },
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "raw": raw,
        "summary": summary,
    }
    if args.json:
        common.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
