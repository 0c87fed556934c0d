"""Reconnect storms: N AMQP clients through each target, a cold start of all of them at once, then a node killed.

What it measures, per target and client count:

- **cold start**: all N clients connect at once (a proxy restart, a fleet deploy); seconds until every one has
  reached ``connection.open-ok``, and the handshake failures (closed or reset before open-ok, refused) and timeouts
  (no open-ok within ``--handshake-timeout``) on the way;
- **node failure**: one of the three nodes is killed (SIGKILL) with the clients spread over all three; the third on it
  reconnect after their back-off; seconds from the kill until all N are open again, the failures and timeouts, and
  the surviving brokers' CPU (cores) during that storm.

Targets: ``direct`` (each client has the three node addresses and moves on to the next after a failure, as client
libraries with an address list do), ``rabbitproxy``, ``rabbitproxy-rate`` (``connect_rate = --rate``), ``haproxy``
and ``haproxy-rate`` (``rate-limit sessions --rate``). Both proxies run the health checks an operator would (every
2 s, down after 3 failures) and redispatch a failed connect to another node.

    .venv/bin/python bench/storm_bench.py --quick --json /tmp/storm.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import common  # noqa: E402
from common import Proc, free_port, markdown_table, wait_port  # noqa: E402
from idle_bench import IdleClient, plain_response  # noqa: E402

ALL_TARGETS = ("direct", "rabbitproxy", "rabbitproxy-rate", "haproxy", "haproxy-rate")
DEFAULT_TARGETS = ("direct", "rabbitproxy", "rabbitproxy-rate", "haproxy-rate")
RABBITPROXY = [sys.executable, "-m", "rabbitproxy"]


@dataclass(frozen=True)
class Settings:
    clients: int
    rate: float
    backoff: float
    handshake_timeout: float
    processes: int


# -- the proxies' configurations -----------------------------------------------------------------------------------


def rabbitproxy_toml(listen: int, nodes: Sequence[tuple[str, int]], rate: float) -> str:
    """A service with the operator's usual health check and, for ``rate > 0``, admission control."""
    lines = ["[admin]", "enabled = false", "", "[log]", 'level = "warning"', "", "[[services]]", 'name = "amqp"']
    lines += [f'listen = "127.0.0.1:{listen}"', "max_connections = 20000", "backlog = 4096", "retries = 2"]
    if rate > 0:
        lines += [f"connect_rate = {rate}", "connect_queue_timeout = 120"]
    lines += ["[services.health_check]", 'type = "amqp"', "interval = 2.0", "fall = 3", "rise = 2"]
    for i, (host, port) in enumerate(nodes):
        lines += ["[[services.backends]]", f'name = "rabbit{i + 1}"', f'address = "{host}"', f"port = {port}"]
    return "\n".join(lines) + "\n"


def haproxy_cfg(listen: int, nodes: Sequence[tuple[str, int]], rate: float) -> str:
    """What an operator writes for AMQP from the Loadbalancer.org guide, with checks, redispatch and a session rate."""
    # Two descriptors a connection, within this machine's limit (HAProxy refuses to start otherwise).
    maxconn = (common.nofile_limit() - 200) // 2
    lines = [
        "global",
        f"    maxconn {maxconn}",
        "    log stderr format raw local0 err",
        "",
        "defaults",
        "    mode tcp",
        "    timeout connect 5s",
        "    timeout client 3h",
        "    timeout server 3h",
        "    retries 2",
        "    option redispatch",
        f"    maxconn {maxconn}",
        "",
        "listen amqp",
        f"    bind 127.0.0.1:{listen}",
        "    balance roundrobin",
        "    default-server check inter 2s fall 3 rise 2",
    ]
    if rate > 0:
        lines.append(f"    rate-limit sessions {int(rate)}")
    lines += [f"    server rabbit{i + 1} {host}:{port}" for i, (host, port) in enumerate(nodes)]
    return "\n".join(lines) + "\n"


def start_proxy(kind: str, nodes: Sequence[tuple[str, int]], rate: float, workdir: Path) -> tuple[Proc, int]:
    listen = free_port()
    d = workdir / f"target-{kind}"
    d.mkdir(parents=True, exist_ok=True)
    paced = rate if kind.endswith("-rate") else 0.0
    if kind.startswith("rabbitproxy"):
        (d / "rabbitproxy.toml").write_text(rabbitproxy_toml(listen, nodes, paced))
        argv = [*RABBITPROXY, "serve", "--config", str(d / "rabbitproxy.toml"), "--loop", "uvloop"]
    else:
        (d / "haproxy.cfg").write_text(haproxy_cfg(listen, nodes, paced))
        argv = ["haproxy", "-W", "-db", "-f", str(d / "haproxy.cfg")]
    proc = Proc(kind, argv, d / "out.log", cpus=None).start()
    assert proc.popen is not None
    try:
        wait_port(listen, proc=proc.popen)
    except (RuntimeError, TimeoutError) as exc:
        proc.stop()
        raise RuntimeError(f"{kind} did not start: {exc}\n{proc.log_tail()}") from None
    return proc, listen


# -- the clients ---------------------------------------------------------------------------------------------------


class StormClient(IdleClient):
    """An idle AMQP client that also says when its connection is gone (``gone``)."""

    __slots__ = ("gone",)

    def __init__(self, response: str) -> None:
        super().__init__(0, response, [0])
        self.gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self.gone.done():
            self.gone.set_result(None)


@dataclass(frozen=True)
class Job:
    addresses: tuple[tuple[str, int], ...]
    first: int
    count: int
    settings: Settings


async def _client(job: Job, k: int, counters: dict[str, Any], stop: asyncio.Event) -> None:
    """One client for as long as the run lasts: connect, stay open, reconnect after its back-off when it is cut."""
    loop = asyncio.get_running_loop()
    s = job.settings
    response = plain_response("guest", "guest")
    addrs = job.addresses
    i = k
    while not stop.is_set():
        host, port = addrs[i % len(addrs)]
        client: StormClient | None = None
        try:
            _t, client = await asyncio.wait_for(
                loop.create_connection(lambda: StormClient(response), host, port), s.handshake_timeout
            )
            await asyncio.wait_for(asyncio.shield(client.opened), s.handshake_timeout)
        except TimeoutError:
            _count(counters, "timeouts")
            if client is not None and client.transport is not None:
                client.transport.abort()
        except (OSError, ConnectionError):
            _count(counters, "failures")
        else:
            _count(counters, "open", 1)
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({client.gone, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            _count(counters, "open", -1)
            if stop.is_set():
                client.close()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(client.gone), 10)
                if client.transport is not None:
                    client.transport.abort()
                return
        # The next address for a client with several (direct); the back-off with jitter, as client libraries do.
        i += 1
        await asyncio.sleep(s.backoff * (1.0 + random.random()))


def _count(counters: dict[str, Any], name: str, delta: int = 1) -> None:
    value = counters[name]
    with value.get_lock():
        value.value += delta


async def _run_job(job: Job, counters: dict[str, Any], stop_flag: Any) -> None:
    stop = asyncio.Event()

    async def watch() -> None:
        while not stop_flag.is_set():
            await asyncio.sleep(0.1)
        stop.set()

    watcher = asyncio.ensure_future(watch())
    await asyncio.gather(*(_client(job, job.first + k, counters, stop) for k in range(job.count)))
    watcher.cancel()


def client_main(job: Job, counters: dict[str, Any], stop_flag: Any) -> None:
    import uvloop

    common.raise_nofile()
    uvloop.run(_run_job(job, counters, stop_flag))


# -- one run -------------------------------------------------------------------------------------------------------


def _wait(predicate: Any, timeout: float, step: float = 0.05) -> float | None:
    """Seconds until ``predicate()`` held, or None if it did not within ``timeout``."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if predicate():
            return time.monotonic() - began
        time.sleep(step)
    return None


def run_once(target: str, cluster: Any, s: Settings, workdir: Path) -> dict[str, Any]:
    nodes = [("127.0.0.1", n.amqp_port) for n in cluster.nodes]
    proc: Proc | None = None
    if target == "direct":
        addresses = tuple(nodes)
    else:
        proc, listen = start_proxy(target, nodes, s.rate, workdir)
        addresses = (("127.0.0.1", listen),)
        # The proxies' first checks must have passed before the clients come.
        time.sleep(3.0)
    ctx = mp.get_context("spawn")
    counters = {name: ctx.Value("i", 0) for name in ("open", "failures", "timeouts")}
    stop = ctx.Event()
    per = [s.clients // s.processes + (1 if i < s.clients % s.processes else 0) for i in range(s.processes)]
    procs, first = [], 0
    for count in per:
        job = Job(addresses, first, count, s)
        first += count
        procs.append(ctx.Process(target=client_main, args=(job, counters, stop), daemon=True))
    out: dict[str, Any] = {"target": target, "clients": s.clients}
    try:
        for p in procs:
            p.start()
        cold = _wait(lambda: counters["open"].value >= s.clients, timeout=300)
        out["cold_s"] = cold
        out["cold_failures"] = counters["failures"].value
        out["cold_timeouts"] = counters["timeouts"].value
        if cold is None:
            return out
        time.sleep(2.0)
        victim = cluster.nodes[0]
        survivors = [cluster.beam_pid(n) for n in cluster.nodes[1:]]
        cpu_before = sum(common.cpu_seconds(pid) for pid in survivors if pid)
        failures0, timeouts0 = counters["failures"].value, counters["timeouts"].value
        began = time.monotonic()
        cluster.kill(victim)
        lowest = [s.clients]

        def recovered() -> bool:
            now = counters["open"].value
            lowest[0] = min(lowest[0], now)
            return now >= s.clients and lowest[0] < s.clients

        back = _wait(recovered, timeout=300, step=0.01)
        # The most clients down at once: those the kill cut, less any already back by then.
        out["most_down"] = s.clients - lowest[0]
        out["recover_s"] = None if back is None else time.monotonic() - began
        took = time.monotonic() - began
        out["storm_failures"] = counters["failures"].value - failures0
        out["storm_timeouts"] = counters["timeouts"].value - timeouts0
        cpu_after = sum(common.cpu_seconds(pid) for pid in survivors if pid)
        out["broker_cpu_cores"] = (cpu_after - cpu_before) / took if took > 0 else None
    finally:
        stop.set()
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
        if proc is not None:
            proc.stop()
        if cluster.beam_pid(cluster.nodes[0]) is None:
            cluster.restart(cluster.nodes[0])
    return out


# -- report --------------------------------------------------------------------------------------------------------


def _cell(value: Any, digits: int = 1) -> str:
    return "n/a" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))


def table(rows: list[dict[str, Any]]) -> str:
    header = [
        "target", "clients", "cold start s", "cold fail / timeout", "node killed: most down at once",
        "all back after s", "storm fail / timeout", "survivors' CPU, cores",
    ]  # fmt: skip
    body = [
        [
            r["target"],
            str(r["clients"]),
            _cell(r.get("cold_s")),
            f"{r.get('cold_failures', 'n/a')} / {r.get('cold_timeouts', 'n/a')}",
            str(r.get("most_down", "n/a")),
            _cell(r.get("recover_s")),
            f"{r.get('storm_failures', 'n/a')} / {r.get('storm_timeouts', 'n/a')}",
            _cell(r.get("broker_cpu_cores"), 2),
        ]
        for r in rows
    ]
    return markdown_table(header, body)


def render_section(doc: dict[str, Any]) -> str:
    """The "Reconnect storms" section of docs/benchmarks.md, from the JSON this bench writes."""
    st = doc["settings"]
    rows = doc["rows"]
    load = ", ".join(f"{x:.2f}" for x in st.get("load_average_at_end", []))
    verdicts = []
    for n in sorted({r["clients"] for r in rows}):
        by = {r["target"]: r for r in rows if r["clients"] == n}
        failures = {t: r.get("cold_failures", 0) + r.get("storm_failures", 0) for t, r in by.items()}
        if "direct" in by and any(t.startswith("rabbitproxy") for t in by):
            ours = {t: f for t, f in failures.items() if t.startswith("rabbitproxy")}
            verdicts.append(
                f"{n:,} clients: handshake failures direct {failures['direct']}, "
                + ", ".join(f"{t} {f}" for t, f in ours.items())
            )
        haproxy = [r.get("recover_s") for t, r in by.items() if t.startswith("haproxy") and r.get("recover_s")]
        ours_back = [r.get("recover_s") for t, r in by.items() if t.startswith("rabbitproxy") and r.get("recover_s")]
        if haproxy and ours_back:
            verdicts.append(
                f"{n:,} clients: all back after a node kill in {max(ours_back):.1f} s at worst through rabbitproxy, "
                f"{min(haproxy):.1f} s at best through HAProxy"
            )
    return "\n".join(
        [
            "## Reconnect storms",
            "",
            f"bench/storm_bench.py (started {doc['started_at']}; load average at the end {load}: brokers, clients and "
            "proxy share the machine's cores). A local 3-node RabbitMQ cluster; each client completes the AMQP "
            f"handshake and reconnects after {st['backoff_s']:g} s plus up to as much jitter, giving up a handshake "
            f"after {st['handshake_timeout_s']:g} s (a timeout). The `-rate` targets pace new connections at "
            f"{st['rate']:g} a second (`connect_rate`, HAProxy's `rate-limit sessions`); both proxies check every 2 s "
            "and redispatch a failed connect. Cold start: all clients at once. Node killed: SIGKILL of one node with "
            "the clients spread over all three; survivors' CPU is over the storm, from the kill until all are back.",
            "",
            table(rows),
            "",
            *(f"- {v}" for v in verdicts),
            "",
            "![Reconnect storm chart](benchmarks-storm.png)",
            "",
        ]
    )


def chart(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted({r["clients"] for r in rows})
    targets = list(dict.fromkeys(r["target"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, title in ((axes[0], "cold_s", "cold start: all open after (s)"),
                           (axes[1], "recover_s", "node killed: all back after (s)")):  # fmt: skip
        width = 0.8 / max(1, len(targets))
        for j, t in enumerate(targets):
            values = [next((r.get(key) or 0.0 for r in rows if r["target"] == t and r["clients"] == n), 0.0)
                      for n in counts]  # fmt: skip
            ax.bar([i + j * width for i in range(len(counts))], values, width, label=t)
        middle = width * (len(targets) - 1) / 2
        ax.set_xticks([i + middle for i in range(len(counts))], [f"{n} clients" for n in counts])
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> int:
    common.exit_cleanly_on_sigterm()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1,000 clients only")
    ap.add_argument("--clients", default="", help="client counts, comma-separated (default 1000,3000; quick 1000)")
    ap.add_argument("--rate", type=float, default=200.0, help="connect_rate / rate-limit sessions of the -rate targets")
    ap.add_argument("--backoff", type=float, default=1.0, help="reconnect back-off, s (plus up to as much jitter)")
    ap.add_argument("--handshake-timeout", type=float, default=30.0, help="a client gives up a handshake after this, s")
    ap.add_argument("--processes", type=int, default=4, help="client processes")
    ap.add_argument("--targets", default=",".join(DEFAULT_TARGETS))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--png", type=Path)
    args = ap.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    if set(targets) - set(ALL_TARGETS):
        ap.error(f"unknown targets: {', '.join(sorted(set(targets) - set(ALL_TARGETS)))}")
    counts = [int(c) for c in args.clients.split(",") if c] or ([1000] if args.quick else [1000, 3000])
    common.raise_nofile()
    from rabbitproxy.dev.cluster import DevCluster

    info = common.machine_info()
    started_at = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    rows: list[dict[str, Any]] = []
    cluster = DevCluster(3, management=False)
    cluster.start()
    try:
        with tempfile.TemporaryDirectory(prefix="rabbitproxy-storm-bench-") as tmp:
            for n in counts:
                for t in targets:
                    s = Settings(n, args.rate, args.backoff, args.handshake_timeout, args.processes)
                    print(f"{time.strftime('%H:%M:%S')} {t}: {n} clients", flush=True)
                    rows.append(run_once(t, cluster, s, Path(tmp) / f"{t}-{n}"))
                    print(f"    {rows[-1]}", flush=True)
    finally:
        cluster.stop()
    print(table(rows))
    if args.json:
        common.write_json(
            args.json,
            {
                "bench": "storm",
                "started_at": started_at,
                "machine": info,
                "settings": {
                    "clients": counts,
                    "rate": args.rate,
                    "backoff_s": args.backoff,
                    "handshake_timeout_s": args.handshake_timeout,
                    "client_processes": args.processes,
                    "targets": targets,
                    "pinning": "none: brokers, clients and proxy share both cores",
                    "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
                },
                "rows": rows,
            },
        )
    # Last: the figures are saved even where matplotlib is missing (it comes with the [bench] extra).
    if args.png:
        chart(rows, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
