"""Fault injection through rabbitproxy and HAProxy: does any confirmed message get lost, and how long is the dip?

    .venv/bin/python bench/faults.py --update-docs --json bench/results/faults.json
                        # every scenario on a quorum and on a classic queue, both targets
    .venv/bin/python bench/faults.py --quick               # four short scenarios (what the test suite runs)
    .venv/bin/python bench/faults.py --scenarios kill,maint --targets rabbitproxy --queues quorum --workers 2

Each run: a fresh proxy in front of a local 3-node cluster, a fresh queue, paced publishers with confirms and
de-duplicating consumers (bench/fault_clients.py) in worker processes through the proxy; a warm-up that sets the
baseline rate, the fault, its release, a recovery window, then the publishers stop and the consumers drain. The
confirmed ids are then compared with the delivered ones. ``--update-docs`` renders docs/reliability.md and the
chart (bench/fault_report.py). rabbitproxy runs once per ``--workers`` count (1 and 2 by default); HAProxy once.
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import multiprocessing as mp
import os
import queue as queue_mod
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import common  # noqa: E402
from fault_alarm import ALARM_WATERMARK, DEFAULT_WATERMARK, Bulk, BulkPublisher, heartbeat_for  # noqa: E402
from fault_clients import ClientLoad, Job, Signals, split, worker_main  # noqa: E402
from fault_targets import Agent, Checks, Cut, Proxy  # noqa: E402
from rich.console import Console  # noqa: E402

from rabbitproxy.dev.cluster import DevCluster  # noqa: E402

console = Console(stderr=True, width=160)
TARGETS = ("rabbitproxy", "haproxy")
QUEUE_TYPES = ("quorum", "classic")
# The node every node fault hits: the one the queues are declared on, so it holds the classic queue and (at first)
# the quorum queue's leader. The harsher case.
FAULTED = 0


def say(line: str) -> None:
    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {line}")


# -- scenarios --------------------------------------------------------------------------------------------------------


@dataclass
class Ctx:
    """What a scenario's steps act on."""

    cluster: DevCluster
    proxy: Proxy
    agents: list[Agent]
    hold: float
    cut: Cut
    # Where the load goes (the proxy's AMQP URL), for clients a scenario adds itself.
    url: str = ""
    queue: str = ""
    persistent: bool = False
    # Clients a scenario started (the memory alarm's bulk publisher), counted with the workers' results.
    side: list[BulkPublisher] = field(default_factory=list)

    @property
    def node(self) -> Any:
        return self.cluster.nodes[FAULTED]


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    inject: Callable[[Ctx], None]
    release: Callable[[Ctx], None]
    hold: float
    quick_hold: float
    # Whether the fault is on one node, whose client connections are then counted.
    node_fault: bool = True
    # Whether the node answers rabbitmqctl while the fault holds (not when killed or frozen).
    countable_during: bool = True
    # Whether the release takes long (a node boot), so the quick variant runs it during the recovery window.
    slow_release: bool = False


def _nothing(ctx: Ctx) -> None:
    return


def _reload_five(ctx: Ctx) -> None:
    for _ in range(5):
        ctx.proxy.reload()
        time.sleep(max(1.0, ctx.hold / 5))


def _restart_proxy(ctx: Ctx) -> None:
    ctx.proxy.start()


def _rolling_drain(ctx: Ctx) -> None:
    for node in ctx.cluster.nodes:
        say(f"  rabbitmq-upgrade drain {node.name}")
        try:
            ctx.cluster.drain(node)
            time.sleep(ctx.hold)
        finally:
            ctx.cluster.revive(node)
        # The next node goes only once the proxy takes this one again, as an operator's runbook says.
        ctx.proxy.wait_all_up()


def _cut(ctx: Ctx) -> None:
    ctx.cut.cut()


def _heal_cut(ctx: Ctx) -> None:
    ctx.cut.heal()


def _alarm_on(ctx: Ctx) -> None:
    # One node's alarm blocks every publisher of the cluster; the bulk publisher then fills the socket buffers.
    ctx.cluster.rabbitmqctl(ctx.node, "set_vm_memory_high_watermark", ALARM_WATERMARK)
    bulk = BulkPublisher(
        ctx.url, ctx.queue, ctx.persistent, replace(Bulk(), heartbeat=heartbeat_for(ctx.hold)), attempt=ctx.hold + 60
    )
    ctx.side.append(bulk)
    bulk.start()


def _alarm_off(ctx: Ctx) -> None:
    for bulk in ctx.side:
        bulk.released()
    ctx.cluster.rabbitmqctl(ctx.node, "set_vm_memory_high_watermark", DEFAULT_WATERMARK)


def _set_agent(reply: str) -> Callable[[Ctx], None]:
    def run(ctx: Ctx) -> None:
        ctx.agents[FAULTED].reply = reply

    return run


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "kill",
            "node SIGKILLed, restarted",
            lambda c: c.cluster.kill(c.node),
            lambda c: c.cluster.restart(c.node),
            5.0,
            # The node stays down for its whole restart anyway (seconds), which the quick variant overlaps.
            1.0,
            countable_during=False,
            slow_release=True,
        ),
        Scenario(
            "pause",
            "node frozen (SIGSTOP, then SIGCONT)",
            lambda c: c.cluster.pause(c.node),
            lambda c: c.cluster.resume(c.node),
            30.0,
            15.0,
            countable_during=False,
        ),
        Scenario("cut", "node cut off from the proxy (nftables drop)", _cut, _heal_cut, 30.0, 10.0),
        Scenario("reload", "proxy reloaded 5 times", _reload_five, _nothing, 10.0, 5.0, node_fault=False),
        Scenario(
            "restart",
            "proxy stopped gracefully, started",
            lambda c: c.proxy.stop_gracefully(),
            _restart_proxy,
            1.0,
            1.0,
            node_fault=False,
        ),
        Scenario(
            "maint",
            "backend put in maint (admin API / stats socket)",
            lambda c: c.proxy.set_maint(FAULTED, on=True),
            lambda c: c.proxy.set_maint(FAULTED, on=False),
            10.0,
            4.0,
        ),
        Scenario("agent", "feedback agent answers down", _set_agent("down"), _set_agent("up 100%"), 10.0, 6.0),
        Scenario("drain", "rolling rabbitmq-upgrade drain/revive", _rolling_drain, _nothing, 5.0, 3.0),
        # The bulk publisher's heartbeat is a third of the hold (fault_alarm.heartbeat_for): 10 s here, 3 s quick.
        Scenario("alarm", "memory alarm: publishers blocked, then released", _alarm_on, _alarm_off, 30.0, 10.0),
    )
}
QUICK = ("kill", "maint", "reload", "alarm")
NOT_DONE = {
    "cut-off by namespaces": "the cut-off scenario drops packets with nftables on the loopback interface instead of"
    " moving a node into a network namespace behind a veth pair; the effect for the proxy (a node that runs but"
    " cannot be reached) is the same",
}


# -- one run ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Seconds of each phase."""

    warmup: float = 8.0
    recover: float = 15.0
    ready_timeout: float = 90.0
    # Run a slow release (a killed node's restart) in the background, so the recovery window starts with it.
    release_in_background: bool = False
    # When, as a fraction of the hold, the connections on the faulted node are counted (the end, unless the
    # quick variant overlaps the count, a few seconds of rabbitmqctl on a busy machine, with the hold).
    count_during_at: float = 1.0
    # Record which node each client is on before the fault, and count the connections left on the faulted node
    # after the recovery window (rabbitmqctl, seconds of CPU each on a busy machine; the quick variant skips both).
    placement: bool = True
    count_after: bool = True


# The quick variant (each scenario under 30 s on a busy machine): shorter phases, the slow side jobs overlapped
# with the waits, and no placement. What it checks is unchanged: no confirmed message lost, the clients moved.
QUICK_TIMING = Timing(
    warmup=3.0, recover=3.0, release_in_background=True, count_during_at=0.25, placement=False, count_after=False
)
# The quick drain stops sooner: it ends only once the queue is settled anyway (fault_clients.drain_over). One worker
# process carries the same clients: one interpreter fewer to start and feed while a node boots on two busy cores.
QUICK_LOAD = replace(ClientLoad(), idle=2.0, processes=1)


def declare_queue(cluster: DevCluster, name: str, kind: str) -> None:
    """Declare ``name`` on the faulted node directly (so it lives there), durable, empty."""
    import uvloop

    async def run() -> None:
        import aio_pika

        conn = await aio_pika.connect(cluster.amqp_url(cluster.nodes[FAULTED]), timeout=30)
        try:
            ch = await conn.channel()
            args: dict[str, Any] = {"x-queue-type": kind}
            if kind == "quorum":
                args["x-quorum-initial-group-size"] = len(cluster.nodes)
            q = await ch.declare_queue(name, durable=True, arguments=args)
            await q.purge()
        finally:
            await conn.close()

    uvloop.run(run())


def queue_depth_and_delete(cluster: DevCluster, name: str) -> int:
    """Messages still in the queue after the consumers gave up (then the queue is deleted); -1 if unknown.

    Over AMQP, directly to the first node that answers: every client has closed by now, so nothing is unacked and
    the ready count is the whole queue. (Two rabbitmqctl runs cost seconds of CPU each on a busy machine.)
    """
    import uvloop

    async def run() -> int:
        import aio_pika
        import aiormq

        for node in cluster.nodes:
            try:
                conn = await aio_pika.connect(cluster.amqp_url(node), timeout=10)
            except (OSError, TimeoutError, aiormq.exceptions.AMQPError, aio_pika.exceptions.AMQPError):
                continue
            try:
                ch = await conn.channel()
                q = await ch.declare_queue(name, passive=True, timeout=10)
                left = q.declaration_result.message_count
                await q.delete(if_unused=False, if_empty=False, timeout=10)
                return -1 if left is None else int(left)
            except (OSError, TimeoutError, aiormq.exceptions.AMQPError, aio_pika.exceptions.AMQPError):
                return -1
            finally:
                with contextlib.suppress(OSError, TimeoutError, aiormq.exceptions.AMQPError):
                    await conn.close()
        return -1

    return uvloop.run(run())


def heal(cluster: DevCluster) -> None:
    """Leave every node running, whatever a failed run did (the drain scenario revives its nodes itself)."""
    for node in cluster.nodes:
        if cluster.beam_pid(node) is None:
            cluster.restart(node)
        else:
            # SIGCONT to a running VM does nothing; to one a failed run left frozen it is the cure.
            cluster.resume(node)


def client_placement(cluster: DevCluster) -> dict[str, str]:
    """Which node each of the harness's clients is connected to (by its connection name), just before the fault."""
    try:
        # list_connections has no node column; the server port of a connection is its node's own AMQP port.
        rows = cluster.list_connections("client_properties", "port")
    except (subprocess.SubprocessError, OSError, ValueError) as exc:
        return {"error": str(exc)[:200]}
    nodes = {str(n.amqp_port): n.name for n in cluster.nodes}
    out: dict[str, str] = {}
    for row in rows:
        props = row.get("client_properties", "")
        for role in ("pub", "con"):
            marker = f"faults-{role}-"
            at = props.find(marker)
            if at >= 0:
                name = marker + "".join(itertools.takewhile(str.isdigit, props[at + len(marker) :]))
                out[name] = nodes.get(row.get("port", ""), row.get("port", "?"))
    return dict(sorted(out.items()))


def faulted_connections(cluster: DevCluster) -> int | None:
    """Client connections the faulted node itself counts (0 when it is not running; None if it cannot answer).

    Only that node is asked: one rabbitmqctl run instead of one per node (DevCluster.connection_counts), each a VM
    start that takes seconds of CPU on a busy machine. Never called while the node is frozen.
    """
    node = cluster.nodes[FAULTED]
    if cluster.beam_pid(node) is None:
        return 0
    try:
        # The same registry list_connections reads, restricted to this node.
        out = cluster.rabbitmqctl(node, "eval", "length(rabbit_networking:local_connections()).", timeout=60)
        return int(out.strip())
    except (subprocess.SubprocessError, OSError, ValueError):
        return None


class Phases:
    """Wall-clock seconds of each phase of a run, in order: where a run's time goes (kept in its row)."""

    def __init__(self) -> None:
        self._last = time.monotonic()
        self.seconds: dict[str, float] = {}

    def done(self, name: str) -> None:
        now = time.monotonic()
        self.seconds[name] = round(now - self._last, 1)
        self._last = now


def run_one(
    cluster: DevCluster,
    kind: str,
    scenario: Scenario,
    queue_type: str,
    workdir: Path,
    load: ClientLoad,
    timing: Timing,
    checks: Checks,
    *,
    quick: bool = False,
    workers: int = 1,
) -> dict[str, Any]:
    """One scenario through one target on one queue type; the result is the row of the table (and a timeline)."""
    phases = Phases()
    agents = [Agent() for _ in cluster.nodes]
    proxy = Proxy(
        kind,
        workdir / f"{scenario.name}-{kind}-w{workers}-{queue_type}",
        [(n.amqp_port, a.port) for n, a in zip(cluster.nodes, agents, strict=True)],
        checks,
        workers=workers,
    )
    qname = f"faults-{scenario.name}-{kind}-w{workers}-{queue_type}-{os.getpid()}"
    url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
    ctx = Ctx(
        cluster,
        proxy,
        agents,
        scenario.quick_hold if quick else scenario.hold,
        Cut(cluster.nodes[FAULTED].amqp_port),
        url=url,
        queue=qname,
        persistent=queue_type == "classic",
    )
    ctxmp = mp.get_context("spawn")
    signals = Signals(go=ctxmp.Event(), stop=ctxmp.Event(), ready=ctxmp.Value("i", 0), finished=ctxmp.Value("i", 0))
    out: Any = ctxmp.Queue()
    procs: list[Any] = []
    marks: dict[str, float] = {}
    during: int | None = None
    after: int | None = None
    # Side jobs that overlap the run's waits: the placement query during the warm-up, a slow release (a node
    # restart) during the recovery window, the count of connections left on the node during the drain.
    side = ThreadPoolExecutor(max_workers=2, thread_name_prefix="faults-side")
    release_job: Future[None] | None = None
    try:
        # The workers first: spawning them and importing aio-pika takes seconds on a busy machine, which the queue
        # declaration and the proxy's start overlap. They connect only on ``go``.
        jobs = [Job(url, qname, queue_type == "classic", load, p, c) for p, c in split(load)]
        procs = [ctxmp.Process(target=worker_main, args=(j, signals, out), daemon=True) for j in jobs]
        for p in procs:
            p.start()
        declare_queue(cluster, qname, queue_type)
        proxy.start()
        proxy.wait_all_up()
        log_offset = 0
        phases.done("proxy start")
        signals.go.set()
        deadline = time.monotonic() + timing.ready_timeout
        while signals.ready.value < load.publishers:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {signals.ready.value} of {load.publishers} publishers got a confirm")
            time.sleep(0.2)
        phases.done("clients ready")
        marks["warm"] = time.time()
        # Where each client is does not change during a steady warm-up; asking meanwhile saves a CLI run.
        placement_job = side.submit(client_placement, cluster) if timing.placement else None
        time.sleep(timing.warmup)
        placement = placement_job.result() if placement_job is not None else {}
        phases.done("warm-up")
        marks["fault"] = time.time()
        say(f"  inject: {scenario.title}")
        scenario.inject(ctx)
        # The reload and the rolling drain take their time inside inject().
        held_until = marks["fault"] + (ctx.hold if scenario.name not in ("reload", "drain") else 0)
        if scenario.node_fault and scenario.countable_during:
            time.sleep(max(0.0, marks["fault"] + timing.count_during_at * (held_until - marks["fault"]) - time.time()))
            during = faulted_connections(cluster)
        time.sleep(max(0.0, held_until - time.time()))
        phases.done("fault")
        marks["release"] = time.time()
        if timing.release_in_background and scenario.slow_release:
            # The load runs on while the node restarts; what the run proves (no confirmed message lost, the clients
            # back on the other nodes) does not need the node back before the recovery window starts.
            release_job = side.submit(scenario.release, ctx)
        else:
            scenario.release(ctx)
        marks["released"] = time.time()
        phases.done("release")
        say(f"  released; recovering {timing.recover:.0f}s")
        time.sleep(timing.recover)
        # A scenario's own clients finish first (the bulk's last confirms), so the drain waits for their messages.
        for client in ctx.side:
            client.join(Bulk.settle)
        phases.done("recovery")
        unexpected_restarts = 0
        if not proxy.alive():
            # A proxy that died by itself is a finding; it is started again so the drain can still count.
            unexpected_restarts += 1
            proxy.start()
        released_in_time = release_job is None or release_job.done()
        marks["stop"] = time.time()
        signals.stop.set()
        # Counted while the consumers drain, on the same state as before (the clients keep their connections until
        # the drain ends). A node that was still restarting at the end of the recovery window is not counted.
        count_after = scenario.node_fault and timing.count_after and released_in_time
        after_job = side.submit(faulted_connections, cluster) if count_after else None
        say("  draining")
        results: list[dict[str, Any]] = []
        deadline = time.monotonic() + load.drain_limit + 60
        while len(results) < len(procs) and time.monotonic() < deadline:
            with contextlib.suppress(queue_mod.Empty):
                results.append(out.get(timeout=1.0))
        results += [client.result() for client in ctx.side]
        marks["drained"] = time.time()
        phases.done("drain")
        after = after_job.result() if after_job is not None else None
        if release_job is not None:
            release_job.result()
        errors = proxy.errors_since(log_offset)
        phases.done("counts")
    finally:
        signals.stop.set()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        out.close()
        out.join_thread()
        proxy.stop()
        ctx.cut.heal()
        if scenario.name == "alarm":
            # Whatever happened, the alarm must not outlive the run.
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                cluster.rabbitmqctl(ctx.node, "set_vm_memory_high_watermark", DEFAULT_WATERMARK)
        for a in agents:
            a.close()
        if release_job is not None:
            # A release that failed in the background is healed below like any other failed run.
            with contextlib.suppress(Exception):
                release_job.result()
        side.shutdown(wait=True)
        heal(cluster)
    left = queue_depth_and_delete(cluster, qname)
    phases.done("cleanup")
    say("  phases (s): " + ", ".join(f"{k} {v:g}" for k, v in phases.seconds.items()))
    return summarize_run(
        results,
        scenario=scenario.name,
        target=kind,
        queue_type=queue_type,
        marks=marks,
        workers=len(procs) + len(ctx.side),
        during=during,
        after=after,
        in_queue=left,
        placement=placement,
        proxy_errors=errors,
        restarts=unexpected_restarts,
    ) | {
        "phases": phases.seconds,
        "proxy_workers": workers,
        "bulk": ctx.side[0].summary() if ctx.side else None,
    }


# -- counting (pure; unit-tested) -------------------------------------------------------------------------------------


def recovery_seconds(
    timeline: dict[int, int], warm: float, fault: float, until: float, released: float | None = None
) -> float:
    """Seconds from the fault until this publisher's rate is back to 90 % of its baseline; 0 if it never dipped.

    The baseline is the median per-second rate of the warm-up. Rates are averaged over 3-second windows, because a
    paced publisher on a busy machine jitters from one second to the next. The dip is the first window below 90 %
    that holds a second below half the baseline (a stall, not a scheduling hiccup of a shared machine) and starts
    while the fault holds (up to 3 s after ``released``; a dip that starts later is the machine, not the fault);
    recovery is the start of the next window at 90 % or more. A publisher that never recovers before ``until``
    (the end of the load) counts ``until - fault``. NaN if there is no baseline.
    """
    baseline = common.median([float(timeline.get(s, 0)) for s in range(int(warm) + 1, int(fault))])
    if math.isnan(baseline) or baseline <= 0:
        return math.nan
    # The last whole second before the load stopped; the partial one after it would look like a dip.
    end = int(until) - 1
    last_start = end if released is None else min(end, int(released) + 3)

    def window(s: int) -> float:
        return sum(timeline.get(s + i, 0) for i in range(3)) / 3

    dipped = False
    for s in range(int(fault), end - 2):
        low = window(s) < 0.9 * baseline
        stall = min(timeline.get(s + i, 0) for i in range(3)) < 0.5 * baseline
        if low and stall and not dipped and s <= last_start:
            dipped = True
        elif dipped and not low:
            return max(0.0, s - fault)
    return until - fault if dipped else 0.0


def rescore(row: dict[str, Any]) -> dict[str, Any]:
    """The recovery columns of a stored row computed again from its per-publisher rates (seconds from the fault)."""
    marks = row.get("marks") or {}
    if not row.get("publisher_rates") or "stop" not in marks:
        return row
    recov = [
        recovery_seconds(
            {int(k): v for k, v in rates.items()}, marks["warm"], 0.0, marks["stop"], marks.get("released")
        )
        for rates in row["publisher_rates"]
    ]
    recov = [r for r in recov if not math.isnan(r)]
    return row | {
        "recovery_median_s": common.median(recov),
        "recovery_worst_s": max(recov) if recov else math.nan,
        "recovery_per_publisher_s": [round(r, 1) for r in recov],
    }


def summarize_run(results: Sequence[dict[str, Any]], **info: Any) -> dict[str, Any]:
    marks: dict[str, float] = info["marks"]
    failed = [r["failed"] for r in results if "failed" in r]
    good = [r for r in results if "failed" not in r]
    confirmed: set[int] = set()
    delivered: set[int] = set()
    deliveries = 0
    reconnects = 0
    errors: dict[str, int] = {}
    timelines: list[dict[int, int]] = []
    names: list[str] = []
    for r in good:
        confirmed.update(r["confirmed"])
        for ids in r["delivered"]:
            delivered.update(ids)
        deliveries += r["deliveries"]
        reconnects += r["reconnects"]
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
        timelines += [{int(k): v for k, v in t.items()} for t in r["timelines"]]
        names += [f"faults-pub-{i}" for i in r.get("publisher_ids", [None] * len(r["timelines"]))]
    lost = sorted(confirmed - delivered)
    recov = [
        recovery_seconds(t, marks["warm"], marks["fault"], marks["stop"], marks.get("released"))
        for t in timelines
        if "fault" in marks and "stop" in marks
    ]
    recov = [r for r in recov if not math.isnan(r)]
    total: dict[int, int] = {}
    for t in timelines:
        for s, n in t.items():
            total[s] = total.get(s, 0) + n
    fault = marks.get("fault", math.nan)
    return {
        "scenario": info["scenario"],
        "target": info["target"],
        "queue_type": info["queue_type"],
        "complete": not failed and len(good) == info["workers"] and bool(timelines),
        "worker_failures": failed,
        "confirmed": len(confirmed),
        "lost": len(lost),
        "lost_sample": lost[:20],
        "in_queue_at_end": info["in_queue"],
        "duplicates": deliveries - len(delivered),
        "unconfirmed_delivered": len(delivered - confirmed),
        "reconnects": reconnects,
        "recovery_median_s": common.median(recov),
        "recovery_worst_s": max(recov) if recov else math.nan,
        "conns_on_node_during": info["during"],
        "conns_on_node_after": info["after"],
        "proxy_errors": len(info["proxy_errors"]),
        "proxy_error_lines": info["proxy_errors"][:10],
        "proxy_restarts": info["restarts"],
        "client_errors": errors,
        "marks": {k: round(v - fault, 2) for k, v in marks.items()} if not math.isnan(fault) else {},
        # Confirms per second of all publishers, seconds relative to the fault: the chart.
        "rate": {str(int(s - fault)): n for s, n in sorted(total.items())} if not math.isnan(fault) else {},
        "recovery_per_publisher_s": [round(r, 1) for r in recov],
        "placement": info.get("placement", {}),
        "publishers": names,
        "publisher_rates": [
            {str(int(s - fault)): n for s, n in sorted(t.items())} for t in timelines if not math.isnan(fault)
        ],
    }


# -- the driver -------------------------------------------------------------------------------------------------------


def run_all(
    cluster: DevCluster,
    plan: Sequence[tuple[str, str]],
    targets: Sequence[tuple[str, int]],
    workdir: Path,
    *,
    load: ClientLoad,
    timing: Timing,
    checks: Checks,
    quick: bool = False,
    progress: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """``targets``: (kind, workers) pairs; ``workers`` is rabbitproxy's process count (1 for HAProxy).

    ``progress`` gets the rows so far after each run (the JSON is written as the run goes, so a run stopped
    half-way still leaves what it measured).
    """
    order = [(q, s, t, w) for q, s in plan for t, w in targets]
    rows: list[dict[str, Any]] = []
    for i, (q, s, t, w) in enumerate(order, 1):
        shown = t if w == 1 else f"{t} (workers = {w})"
        say(f"[bold][{i}/{len(order)}] {s} via {shown}, {q} queue[/bold] (load average {os.getloadavg()[0]:.1f})")
        began = time.monotonic()
        try:
            row = run_one(cluster, t, SCENARIOS[s], q, workdir, load, timing, checks, quick=quick, workers=w)
        except Exception as exc:  # noqa: BLE001 - one failed run is reported in its row; the others still run
            console.print_exception()
            row = {
                "scenario": s,
                "target": t,
                "proxy_workers": w,
                "queue_type": q,
                "complete": False,
                "worker_failures": [repr(exc)],
            }
        row["seconds"] = round(time.monotonic() - began, 1)
        rows.append(row)
        if progress is not None:
            progress(rows)
        say(
            f"  confirmed {row.get('confirmed', 'n/a')}, lost {row.get('lost', 'n/a')}, duplicates"
            f" {row.get('duplicates', 'n/a')}, reconnects {row.get('reconnects', 'n/a')}, recovery median/worst"
            f" {common.fmt(row.get('recovery_median_s', math.nan))}/{common.fmt(row.get('recovery_worst_s', math.nan))}"
            f" s ({row['seconds']:.0f} s)"
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    common.exit_cleanly_on_sigterm()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"scenarios {', '.join(QUICK)}, short holds, quorum only")
    ap.add_argument("--scenarios", help=f"comma-separated, from {', '.join(SCENARIOS)}")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--workers", default="1,2", help="rabbitproxy's worker process counts, each a run of its own")
    ap.add_argument("--queues", help="quorum,classic (quick: quorum)")
    ap.add_argument("--rate", type=float, default=ClientLoad.rate, help="messages/s per publisher")
    ap.add_argument("--publishers", type=int, default=ClientLoad.publishers)
    ap.add_argument("--consumers", type=int, default=ClientLoad.consumers)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--update-docs", action="store_true", help="render docs/reliability.md and its chart")
    ap.add_argument("--keep", type=Path, help="keep each run's proxy config and log in this directory")
    args = ap.parse_args(argv)
    scenarios = args.scenarios.split(",") if args.scenarios else list(QUICK if args.quick else SCENARIOS)
    if unknown := set(scenarios) - set(SCENARIOS):
        ap.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    kinds = [t for t in args.targets.split(",") if t]
    if unknown := set(kinds) - set(TARGETS):
        ap.error(f"unknown targets: {', '.join(sorted(unknown))}")
    try:
        counts = [int(w) for w in args.workers.split(",") if w]
    except ValueError:
        ap.error(f"--workers: comma-separated whole numbers, not {args.workers!r}")
    if not counts or min(counts) < 1:
        ap.error("--workers: at least one count, each 1 or more")
    targets = [(t, w) for t in kinds for w in (counts if t == "rabbitproxy" else [1])]
    queue_types = args.queues.split(",") if args.queues else (["quorum"] if args.quick else list(QUEUE_TYPES))
    if unknown := set(queue_types) - set(QUEUE_TYPES):
        ap.error(f"unknown queue types: {', '.join(sorted(unknown))}")
    # Every scenario on every queue type: an operator wants the classic queue's row too, also where the proxy is the
    # one faulted (its clients reconnect while the queue stays on one node) or the node is drained.
    plan = [(q, s) for q in queue_types for s in scenarios]
    base_load = QUICK_LOAD if args.quick else ClientLoad()
    load = replace(base_load, rate=args.rate, publishers=args.publishers, consumers=args.consumers)
    timing = QUICK_TIMING if args.quick else Timing()
    checks = Checks()
    info = common.machine_info()
    started_at = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    began = time.monotonic()
    workdir: contextlib.AbstractContextManager[str]
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        workdir = contextlib.nullcontext(str(args.keep))
    else:
        workdir = tempfile.TemporaryDirectory(prefix="rabbitproxy-faults-")

    def document(rows: list[dict[str, Any]], done: bool) -> dict[str, Any]:
        return {
            "bench": "faults",
            "started_at": started_at,
            "minutes": round((time.monotonic() - began) / 60, 1),
            "machine": info,
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "mode": "quick" if args.quick else "full",
            "settings": {
                "load": asdict(load),
                "timing": asdict(timing),
                "checks": asdict(checks),
                "faulted_node": FAULTED + 1,
                "scenarios": {s: SCENARIOS[s].title for s in scenarios},
                "proxy_workers": counts,
                "bulk": asdict(Bulk()),
                "plan": plan,
                "hold": {s: SCENARIOS[s].quick_hold if args.quick else SCENARIOS[s].hold for s in scenarios},
                "not_done": NOT_DONE,
            },
            "rows": rows,
            "complete_plan": done,
        }

    def progress(rows: list[dict[str, Any]]) -> None:
        if args.json:
            common.write_json(args.json, document(rows, done=False))

    with workdir as tmp:
        cluster = DevCluster(3, log=lambda line: say(f"[dim][cluster] {line}"))
        cluster.start()
        try:
            rows = run_all(
                cluster,
                plan,
                targets,
                Path(tmp),
                load=load,
                timing=timing,
                checks=checks,
                quick=args.quick,
                progress=progress,
            )
        finally:
            cluster.stop()
    data = document(rows, done=True)
    if args.json:
        common.write_json(args.json, data)
    if args.update_docs:
        import fault_report

        fault_report.write(data, common.ROOT / "docs" / "reliability.md", common.ROOT / "docs" / "reliability.png")
    lost = sum(r.get("lost", 0) for r in rows if r["target"] == "rabbitproxy")
    incomplete = [
        f"{r['scenario']}/{r['target']}/w{r.get('proxy_workers', 1)}/{r['queue_type']}"
        for r in rows
        if not r.get("complete")
    ]
    say(f"done: rabbitproxy lost {lost} confirmed message(s); incomplete runs: {', '.join(incomplete) or 'none'}")
    return 1 if lost or incomplete else 0


if __name__ == "__main__":
    sys.exit(main())
