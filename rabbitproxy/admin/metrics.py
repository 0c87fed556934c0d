"""Prometheus metrics, read from the live proxy state at scrape time.

Nothing here runs on the data path: a custom collector walks the services and backends when Prometheus scrapes,
so a connection costs no extra work for metrics and a reload cannot leave stale label sets behind (a removed
backend simply stops being reported).

Every label value comes from a fixed set: service and backend names from the config, statuses, admin states, close
reasons and agent statuses from closed enumerations. Text from outside (an agent's reply, a check's detail) goes to
the admin API and the log only; as a label it would start a new time series with every new wording. The one
exception is the vhost of ``service_vhost_connections``: only vhosts the broker opened, at most
``MAX_VHOST_LABELS`` per service, the rest counted under ``other``.
"""

from __future__ import annotations

import asyncio
import itertools
import platform
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import psutil
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from rabbitproxy import __version__
from rabbitproxy.balancing.admission import WAIT_BUCKETS
from rabbitproxy.balancing.backend import ADMIN_STATES, AgentStatus
from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.balancing.views import ALARM_KINDS, ManagementStatus, NodeStats
from rabbitproxy.control.closer import CAUSES, VIAS
from rabbitproxy.control.rebalancer import service_balance
from rabbitproxy.control.workers import RESTART_CAUSES

if TYPE_CHECKING:
    from rabbitproxy.control.supervisor import Supervisor
    from rabbitproxy.control.workers import WorkerSet
    from rabbitproxy.relay.service import Service

PREFIX = "rabbitproxy"
STATUSES = ("up", "down", "drain", "maint", "maintenance")
# The node's figures as gauges: (metric name part, unit suffix, help, the NodeStats fields for used and limit).
# Named as RabbitMQ's own exporter names them (``..._limit``, the unit last): ``_total`` is for counters.
NODE_FIGURES = (
    ("fds", "", "File descriptors", "fd_used", "fd_total"),
    ("sockets", "", "Sockets", "sockets_used", "sockets_total"),
    ("memory", "_bytes", "Memory in bytes (the limit: the memory high watermark)", "mem_used", "mem_limit"),
    ("processes", "", "Erlang processes", "proc_used", "proc_total"),
)
# Every agent status but "none" (not polled yet), each reported as 0 or 1 like backend_status.
AGENT_STATUSES = tuple(s for s in AgentStatus if s is not AgentStatus.NONE)
SB = ["service", "backend"]


class ProxyCollector(Collector):
    """Yields every rabbitproxy metric from the proxy as it is right now."""

    def __init__(self, proxy: Supervisor) -> None:
        self.proxy = proxy

    def collect(self) -> Iterator[Metric]:
        def gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)

        def counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
            return CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)

        s_accepting = gauge("service_accepting", "1 while the service's listener accepts connections.", ["service"])
        s_active = gauge("service_active_connections", "Client connections open now.", ["service"])
        s_max = gauge(
            "service_max_connections", "The service's max_connections: clients over it are refused.", ["service"]
        )
        s_total = counter("service_connections", "Client connections accepted.", ["service"])
        s_ended = counter(
            "service_connections_ended", "Client connections ended, by reason (errors included).", ["service", "reason"]
        )
        s_close_timeouts = counter(
            "service_close_timeouts",
            "Closes aborted because the peer did not take the buffered bytes within close_timeout.",
            ["service"],
        )
        s_failed_logins = counter(
            "service_failed_logins",
            "Logins the broker refused during the AMQP handshake (403 ACCESS_REFUSED, 530 NOT_ALLOWED).",
            ["service"],
        )
        s_given_up = counter(
            "service_handshakes_given_up",
            "AMQP handshakes the proxy could not follow (unexpected bytes, over 64 KiB); the bytes flowed on.",
            ["service"],
        )
        s_vhost = gauge(
            "service_vhost_connections",
            'Open AMQP connections per vhost (at most 50 vhosts per service, the rest under vhost="other").',
            ["service", "vhost"],
        )
        s_usable = gauge("service_usable_backends", "Backends that may take a new connection now.", ["service"])
        b_up = gauge("backend_up", "1 when the last health verdict is up.", SB)
        b_status = gauge(
            "backend_status",
            "1 for the backend's status (0 for the others): up, down, drain, maint or maintenance (RabbitMQ's own).",
            [*SB, "status"],
        )
        b_admin = gauge("backend_admin_state", "1 for the backend's effective admin state.", [*SB, "state"])
        b_weight = gauge("backend_weight", "Configured weight (or the weight set through the admin API).", SB)
        b_eweight = gauge(
            "backend_effective_weight",
            "Weight for new connections: the weight (configured or set through the API) x the feedback agent's "
            "percentage (capped at 1000) x alarm_weight % during a local RabbitMQ alarm x the slow-start ramp.",
            SB,
        )
        b_agent = gauge("backend_agent_percent", "Last capacity percentage the feedback agent reported.", SB)
        b_agent_ok = gauge(
            "backend_agent_status",
            "1 for the feedback agent's last result: ok, unreachable, bad reply or error.",
            [*SB, "status"],
        )
        b_active = gauge("backend_active_connections", "Connections open through this backend now.", SB)
        b_total = counter("backend_connections", "Connections made through this backend.", SB)
        b_errors = counter("backend_connect_errors", "Failed connection attempts to this backend.", SB)
        b_in = counter("backend_bytes_in", "Bytes from clients to this backend.", SB)
        b_out = counter("backend_bytes_out", "Bytes from this backend to clients.", SB)
        b_check_time = gauge("backend_last_check_timestamp_seconds", "When the last health check finished.", SB)
        b_check_dur = gauge("backend_health_check_duration_seconds", "How long the last health check took.", SB)
        b_agent_dur = gauge("backend_agent_duration_seconds", "How long the last feedback agent poll took.", SB)
        r_alarm = gauge(
            "backend_rabbitmq_alarm",
            "1 while the backend's RabbitMQ node has a local alarm of this kind.",
            [*SB, "kind"],
        )
        r_maint = gauge(
            "backend_rabbitmq_maintenance", "1 while the backend's RabbitMQ node is in maintenance mode.", SB
        )
        r_mgmt = gauge(
            "backend_rabbitmq_management_up", "1 when the node's own management API answered the last poll.", SB
        )
        r_figures = [
            (
                gauge(f"backend_rabbitmq_{name}_used{unit}", f"{doc} in use on the backend's RabbitMQ node.", SB),
                gauge(f"backend_rabbitmq_{name}_limit{unit}", f"{doc} available to the backend's RabbitMQ node.", SB),
                used,
                total,
            )
            for name, unit, doc, used, total in NODE_FIGURES
        ]
        b_share = gauge(
            "backend_connection_share",
            "Fraction of the service's connections on this backend (regular backends taking new connections).",
            SB,
        )
        b_fair = gauge("backend_fair_share", "Fraction of the service's effective weight: its fair share.", SB)
        b_hold = gauge(
            "backend_rebalance_hold",
            "1 while the rebalancer steers new connections away from it (workers = N: how many workers do).",
            SB,
        )
        s_closed = counter(
            "service_closed_by_proxy",
            "Connections the proxy closed, by cause (drain, maint, rebalance) and how (through the broker, or tcp).",
            ["service", "cause", "via"],
        )
        yield from self._process_level()
        steering = self.proxy.steering

        for service in list(self.proxy.services.values()):
            sn = service.name
            s_accepting.add_metric([sn], 1.0 if service.accepting else 0.0)
            s_active.add_metric([sn], service.active)
            s_max.add_metric([sn], service.config.max_connections)
            s_total.add_metric([sn], service.total)
            # Every reason is reported, zeros included, so rate() works from the first occurrence on.
            for reason in CloseReason:
                s_ended.add_metric([sn, reason], service.ended.get(reason, 0))
            s_close_timeouts.add_metric([sn], service.close_timeouts)
            s_failed_logins.add_metric([sn], service.failed_logins)
            s_given_up.add_metric([sn], service.handshakes_given_up)
            for vhost, count in list(service.vhost_open.items()):
                s_vhost.add_metric([sn, vhost], count)
            s_usable.add_metric([sn], service.pool.usable_count())
            stats = steering.stats.get(sn)
            for cause in CAUSES:
                for via in VIAS:
                    s_closed.add_metric([sn, cause, via], stats.counts.get((cause, via), 0) if stats else 0)
            # Shown whether or not the rebalancer is on: the imbalance is what tells an operator to turn it on.
            for bal in service_balance(service):
                b_share.add_metric([sn, bal.name], bal.share)
                b_fair.add_metric([sn, bal.name], bal.fair)
            for b in list(service.pool.backends):
                labels = [sn, b.name]
                b_up.add_metric(labels, 1.0 if b.healthy else 0.0)
                status = b.status
                for st in STATUSES:
                    b_status.add_metric([*labels, st], 1.0 if st == status else 0.0)
                admin_state = b.admin_state
                for st in ADMIN_STATES:
                    b_admin.add_metric([*labels, st], 1.0 if st == admin_state else 0.0)
                b_weight.add_metric(labels, b.configured_weight)
                b_hold.add_metric(labels, _hold(self.proxy, sn, b.name, b.rebalance_hold))
                b_eweight.add_metric(labels, b.effective_weight)
                if b.agent_percent is not None:
                    b_agent.add_metric(labels, b.agent_percent)
                agent_status = b.agent_status
                if agent_status is not AgentStatus.NONE:
                    for st in AGENT_STATUSES:
                        b_agent_ok.add_metric([*labels, st], 1.0 if st is agent_status else 0.0)
                traffic_in, traffic_out = b.traffic()
                b_active.add_metric(labels, b.active)
                b_total.add_metric(labels, b.total)
                b_errors.add_metric(labels, b.connect_errors)
                b_in.add_metric(labels, traffic_in)
                b_out.add_metric(labels, traffic_out)
                if b.health_time is not None:
                    b_check_time.add_metric(labels, b.health_time)
                if b.check_duration is not None:
                    b_check_dur.add_metric(labels, b.check_duration)
                if b.agent_duration is not None:
                    b_agent_dur.add_metric(labels, b.agent_duration)
                node = b.rabbitmq
                if node is None:
                    continue
                # Only fixed words become labels: the alarm kinds are ALARM_KINDS, never the broker's own text.
                for kind in ALARM_KINDS:
                    r_alarm.add_metric([*labels, kind], 1.0 if kind in node.alarms else 0.0)
                r_maint.add_metric(labels, 1.0 if node.maintenance else 0.0)
                if node.status is not ManagementStatus.NONE:
                    r_mgmt.add_metric(labels, 1.0 if node.status is ManagementStatus.OK else 0.0)
                if node.stats is not None:
                    _add_figures(r_figures, labels, node.stats)
        yield from (
            s_accepting,
            s_active,
            s_max,
            s_total,
            s_ended,
            s_close_timeouts,
            s_failed_logins,
            s_given_up,
            s_vhost,
            s_usable,
            b_up,
            b_status,
            b_admin,
            b_weight,
            b_eweight,
            b_agent,
            b_agent_ok,
            b_active,
            b_total,
            b_errors,
            b_in,
            b_out,
            b_check_time,
            b_check_dur,
            b_agent_dur,
            r_alarm,
            r_maint,
            r_mgmt,
            b_share,
            b_fair,
            b_hold,
            s_closed,
        )
        for used_g, total_g, _, _ in r_figures:
            yield used_g
            yield total_g
        if self.proxy.workers is not None:
            yield from worker_metrics(self.proxy.workers)
        yield from _l4_metrics(self.proxy, counter)
        yield from admission_metrics(list(self.proxy.services.values()))

    def _process_level(self) -> Iterator[Metric]:
        """The build and the outcome of the last reload (with workers: the parent's, which waits for every worker)."""
        build = GaugeMetricFamily(
            f"{PREFIX}_build_info", "Always 1; the labels name the rabbitproxy version and the Python it runs on.",
            labels=["version", "python"],
        )  # fmt: skip
        build.add_metric([__version__, platform.python_version()], 1.0)
        last = self.proxy.last_reload
        yield build
        yield GaugeMetricFamily(
            f"{PREFIX}_config_last_reload_successful",
            "1 when the last reload (SIGHUP or POST /api/reload) was applied everywhere, 0 when it was refused or a "
            "worker kept the old configuration; 1 before the first reload.",
            value=1.0 if last.successful else 0.0,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_config_last_reload_success_timestamp_seconds",
            "When the configuration was last loaded successfully (the start, until a reload succeeds).",
            value=last.success_time,
        )


def _hold(proxy: Supervisor, service: str, backend: str, hold: bool) -> float:
    if proxy.workers is not None:
        return float(proxy.workers.holds.get((service, backend), 0))
    return 1.0 if hold else 0.0


def worker_metrics(workers: WorkerSet) -> Iterator[Metric]:
    """The worker processes of ``workers = N``: serving, restarts by cause, and each one's CPU and memory.

    ``process_*`` (prometheus-client's own collector) describe the process that serves /metrics, the parent; the
    workers, which carry the traffic, are ``rabbitproxy_worker_*`` with a ``worker`` label (its index, 0 to N-1,
    which a restarted worker keeps: its CPU counter starts again from 0, which rate() takes as a reset).
    """
    up = GaugeMetricFamily(f"{PREFIX}_worker_up", "1 while the worker is listening and answering.", labels=["worker"])
    restarts = CounterMetricFamily(
        f"{PREFIX}_worker_restarts",
        "Worker processes started again, by cause: exited, hung, start-timeout, channel.",
        labels=["cause"],
    )
    cpu = CounterMetricFamily(
        f"{PREFIX}_worker_cpu_seconds", "User and system CPU time the worker process spent.", labels=["worker"]
    )
    rss = GaugeMetricFamily(
        f"{PREFIX}_worker_resident_memory_bytes", "Resident memory of the worker process.", labels=["worker"]
    )
    now = asyncio.get_running_loop().time()
    for slot in workers.slots:
        up.add_metric([str(slot.index)], 1.0 if slot.serving(now) else 0.0)
    for cause in RESTART_CAUSES:
        restarts.add_metric([cause], workers.restart_causes.get(cause, 0))
    for index, pid in workers.processes():
        try:
            proc = psutil.Process(pid)
            times = proc.cpu_times()
            memory = proc.memory_info().rss
        except psutil.Error:
            continue  # it ended between the listing and now
        cpu.add_metric([str(index)], times.user + times.system)
        rss.add_metric([str(index)], memory)
    yield from (up, restarts, cpu, rss)


def _l4_metrics(proxy: Supervisor, counter: Callable[[str, str, list[str]], CounterMetricFamily]) -> Iterator[Metric]:
    """The kernel's counters of the mode = "l4-nat" services (nothing when there are none)."""
    l4 = proxy.l4
    if l4 is None or not l4.engaged:
        return
    flows = counter("l4_backend_flows", "New flows the kernel sent to the backend (l4-nat).", SB)
    traffic = counter(
        "l4_backend_bytes", "Bytes forwarded to (in) and from (out) the backend (l4-nat).", [*SB, "direction"]
    )
    for (service, backend), c in sorted(l4.counters().items()):
        flows.add_metric([service, backend], c.flows)
        traffic.add_metric([service, backend, "in"], c.bytes_in)
        traffic.add_metric([service, backend, "out"], c.bytes_out)
    tx = counter("l4_table_transactions", "nft transactions that replaced the l4 table.", [])
    tx.add_metric([], l4.transactions)
    fail = counter("l4_table_failures", "nft or conntrack commands that failed (the kernel kept its rules).", [])
    fail.add_metric([], l4.failures)
    cut = counter("l4_flows_deleted", "Conntrack entries deleted for backends marked down or put in maint.", [])
    cut.add_metric([], l4.flows_deleted)
    yield from (flows, traffic, tx, fail, cut)


def admission_metrics(services: list[Service]) -> Iterator[Metric]:
    """Admission control (``connect_rate``): the rate, who is held now, and how long the held ones waited."""
    labels = ["service"]
    rate = GaugeMetricFamily(
        f"{PREFIX}_service_connect_rate",
        "The service's connect_rate: new backend connections it starts per second at most (0: not paced).",
        labels=labels,
    )
    waiting = GaugeMetricFamily(
        f"{PREFIX}_service_admission_waiting",
        "Clients accepted and held now for a connect token (they count against max_connections).",
        labels=labels,
    )
    oldest = GaugeMetricFamily(
        f"{PREFIX}_service_admission_oldest_wait_seconds",
        "How long the longest-held client has waited for a connect token so far.",
        labels=labels,
    )
    waits = HistogramMetricFamily(
        f"{PREFIX}_service_admission_wait_seconds",
        "How long held clients waited for a connect token, until they connected or their connect_queue_timeout"
        " ran out (clients let through at once are not observed).",
        labels=labels,
    )
    for service in services:
        sn = service.name
        rate.add_metric([sn], service.config.connect_rate)
        figures = service.admission_figures()
        if figures is None:
            continue
        waiting.add_metric([sn], figures.waiting)
        oldest.add_metric([sn], figures.oldest_wait)
        cumulative = list(itertools.accumulate(figures.wait_buckets))
        bounds = [*(f"{b:g}" for b in WAIT_BUCKETS), "+Inf"]
        waits.add_metric([sn], list(zip(bounds, cumulative, strict=True)), sum_value=figures.wait_sum)
    yield from (rate, waiting, oldest, waits)


def _add_figures(
    figures: list[tuple[GaugeMetricFamily, GaugeMetricFamily, str, str]], labels: list[str], stats: NodeStats
) -> None:
    for used_g, total_g, used, total in figures:
        used_value, total_value = getattr(stats, used), getattr(stats, total)
        if used_value is not None:
            used_g.add_metric(labels, used_value)
        if total_value is not None:
            total_g.add_metric(labels, total_value)


def registry_for(proxy: Supervisor) -> CollectorRegistry:
    """A registry of its own per proxy (tests run several in one process), plus the process metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(proxy))
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The Prometheus text exposition of ``registry`` and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
