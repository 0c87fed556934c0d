"""Shared parts of the benchmarks: statistics, config generators, subprocess proxies, CPU/RSS accounting.

The pure parts (statistics, the HAProxy/nginx/rabbitproxy config text) are unit-tested in
``tests/unit/test_bench.py``, and ``tests/integration/test_bench_configs.py`` runs HAProxy's and nginx's own checks
on the configs; everything else starts and measures real processes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
RABBITPROXY = [sys.executable, "-m", "rabbitproxy"]


# -- statistics ---------------------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    """The median, or NaN for no values (a target that failed every repeat shows as NaN, not as zero)."""
    xs = sorted(v for v in values if not math.isnan(v))
    if not xs:
        return math.nan
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (``pct`` from 0 to 100); NaN for no values."""
    if not values:
        return math.nan
    if not 0 <= pct <= 100:
        raise ValueError(f"percentile must be within 0..100, got {pct}")
    xs = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(xs)))
    return xs[rank - 1]


def ratio(value: float, reference: float) -> float:
    """``value / reference``; NaN when either is missing or the reference is zero."""
    if math.isnan(value) or math.isnan(reference) or reference == 0:
        return math.nan
    return value / reference


@dataclass(frozen=True)
class ConnCpu:
    """What a proxy spent on short connections: CPU per connection, and how busy its core was meanwhile."""

    us_per_conn: float
    core_share: float


def conn_cpu(raw: dict[str, dict[str, list[dict[str, float]]]], target: str, duration: float) -> ConnCpu:
    """Medians over the connection-rate runs of both kinds (pure; unit-tested).

    A proxy whose core is nearly full sets the rate itself; one well below a full core was waiting for the load
    driver, so its connections/s say more about the driver than about the proxy.
    """
    per_conn: list[float] = []
    share: list[float] = []
    for test in ("conn_client_close", "conn_server_close"):
        for run in raw.get(test, {}).get(target, []):
            cpu, ok = run.get("cpu_s", 0.0), run.get("ok", 0.0)
            if cpu > 0 and ok > 0:
                per_conn.append(cpu / ok * 1e6)
                share.append(cpu / duration)
    if not per_conn:
        return ConnCpu(math.nan, math.nan)
    return ConnCpu(median(per_conn), median(share))


def interleave(targets: Sequence[str], repeats: int) -> list[tuple[int, str]]:
    """The run order A B C A B C ...: slow drift of a shared machine then hits every target alike."""
    return [(r, t) for r in range(repeats) for t in targets]


def fmt(value: float, digits: int = 1) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    return f"{value:,.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# -- configuration of the proxies under test ------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """One listener of a proxy under test and the backends behind it."""

    name: str
    listen_port: int
    backends: tuple[tuple[str, int], ...]
    # What rabbitproxy is told the service speaks: "amqp" reads the handshake, "tcp" relays blindly, as HAProxy's
    # mode tcp and nginx's stream do. The TCP bench's echo, iperf3 and sockperf traffic is not AMQP.
    protocol: str = "amqp"


def rabbitproxy_config(
    routes: Sequence[Route], *, max_connections: int = 20000, log_level: str = "warning", workers: int = 1
) -> str:
    """TOML for ``rabbitproxy serve``: one service per route, round robin, no health checks (HAProxy's are off too).

    ``workers`` > 1 runs that many data-path processes (a top-level key, so it comes before every table).
    """
    lines = [f"workers = {workers}", ""] if workers > 1 else []
    lines += ["[admin]", "enabled = false", "", "[log]", f'level = "{log_level}"', ""]
    for r in routes:
        lines += [
            "[[services]]",
            f'name = "{r.name}"',
            f'listen = "127.0.0.1:{r.listen_port}"',
            'balance = "weighted-round-robin"',
            f'protocol = "{r.protocol}"',
            f"max_connections = {max_connections}",
            "backlog = 4096",
            "shutdown_timeout = 1.0",
            "[services.health_check]",
            'type = "none"',
        ]
        for i, (host, port) in enumerate(r.backends):
            lines += ["[[services.backends]]", f'name = "b{i + 1}"', f'address = "{host}"', f"port = {port}"]
        lines.append("")
    return "\n".join(lines)


TUNED_MAXPIPES = 512


def haproxy_config(
    routes: Sequence[Route], *, tuned: bool = False, maxconn: int = 9900, nbthread: int | None = None
) -> str:
    """An HAProxy TCP-mode config equivalent to :func:`rabbitproxy_config` for the same routes.

    The default variant is what an operator writes from the Loadbalancer.org guide: ``mode tcp``, round robin,
    long client/server timeouts. The tuned one adds kernel splicing and bigger buffers, the usual first steps.
    ``nbthread`` fixes the number of threads (HAProxy's default is one per CPU it may run on).
    """
    lines = [
        "global",
        f"    maxconn {maxconn}",
        "    log stderr format raw local0 err",
    ]
    if nbthread is not None:
        lines.append(f"    nbthread {nbthread}")
    if tuned:
        # Splicing needs a pipe (two descriptors) per busy connection; a fixed pool keeps maxconn under the
        # descriptor limit.
        lines += ["    tune.bufsize 65536", "    tune.maxaccept 256", f"    maxpipes {TUNED_MAXPIPES}"]
    lines += [
        "",
        "defaults",
        "    mode tcp",
        "    timeout connect 5s",
        "    timeout client 3h",
        "    timeout server 3h",
        f"    maxconn {maxconn}",
    ]
    if tuned:
        lines += ["    option splice-auto", "    option tcp-smart-accept", "    option tcp-smart-connect"]
    for r in routes:
        lines += ["", f"listen {r.name}", f"    bind 127.0.0.1:{r.listen_port}", "    balance roundrobin"]
        for i, (host, port) in enumerate(r.backends):
            lines.append(f"    server b{i + 1} {host}:{port}")
    return "\n".join(lines) + "\n"


def nginx_config(routes: Sequence[Route], *, workdir: Path, nofile: int = 20000) -> str:
    """An nginx ``stream`` config for the same routes (one worker, as the proxy is pinned to one core)."""
    lines = [
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;",
        "daemon off;",
        "master_process on;",
        "worker_processes 1;",
        f"worker_rlimit_nofile {nofile};",
        f"pid {workdir / 'nginx.pid'};",
        f"error_log {workdir / 'nginx-error.log'} error;",
        # nginx counts both legs of a proxied connection against worker_connections.
        f"events {{ worker_connections {nofile - 100}; }}",
        "stream {",
    ]
    for r in routes:
        lines.append(f"    upstream {r.name} {{")
        lines += [f"        server {host}:{port};" for host, port in r.backends]
        lines += [
            "    }",
            "    server {",
            f"        listen 127.0.0.1:{r.listen_port} backlog=4096;",
            f"        proxy_pass {r.name};",
            "        proxy_timeout 3h;",
            "    }",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


# -- processes ------------------------------------------------------------------------------------------------------


def nofile_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def raise_nofile() -> None:
    """Raise the soft descriptor limit to the hard one (the container's hard limit cannot be raised)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def preexec(cpus: set[int] | None) -> Callable[[], None]:
    """Runs in the child before exec: pin to ``cpus`` (HAProxy sizes its threads from this) and raise nofile."""

    def run() -> None:
        raise_nofile()
        if cpus:
            os.sched_setaffinity(0, cpus)

    return run


def exit_cleanly_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so the benches' ``finally`` blocks stop every proxy, broker and helper.

    Python's default SIGTERM ends the process at once; an interrupted run then left its targets running.
    """

    def _exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll until something accepts on 127.0.0.1:port, or fail (early if ``proc`` died)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as probe:
                # Through a proxy this probe reaches the backend too. Waiting for the whole chain to close it
                # keeps it from racing the first real test: iperf3's one-test-at-a-time server otherwise drops
                # the next client's control connection while it is still busy with this empty one.
                probe.shutdown(socket.SHUT_WR)
                probe.settimeout(5.0)
                with contextlib.suppress(OSError):
                    while probe.recv(4096):
                        pass
                return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening on {port}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")
        time.sleep(0.05)


@dataclass
class Proc:
    """A subprocess under test (or a helper) with its log file; ``stop()`` is safe to call twice."""

    name: str
    argv: list[str]
    log_path: Path
    cpus: set[int] | None = None
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        with self.log_path.open("wb") as log:
            self.popen = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=preexec(self.cpus)
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def stop(self, timeout: float = 10.0) -> None:
        p = self.popen
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def tree(pid: int) -> list[psutil.Process]:
    """The process and its children (nginx's workers, HAProxy's master-worker)."""
    try:
        p = psutil.Process(pid)
        return [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for p in tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def rss_bytes(pid: int) -> int:
    total = 0
    for p in tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


@dataclass
class Usage:
    cpu: float = 0.0
    peak_rss: int = 0


@contextlib.contextmanager
def measure(pid: int | None, interval: float = 0.1) -> Iterator[Usage]:
    """CPU seconds used by ``pid``'s tree inside the block and its peak RSS (sampled; None: measure nothing)."""
    usage = Usage()
    if pid is None:
        yield usage
        return
    stop = threading.Event()
    start_cpu = cpu_seconds(pid)

    def sample() -> None:
        while not stop.is_set():
            usage.peak_rss = max(usage.peak_rss, rss_bytes(pid))
            stop.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield usage
    finally:
        stop.set()
        thread.join()
        usage.peak_rss = max(usage.peak_rss, rss_bytes(pid))
        usage.cpu = cpu_seconds(pid) - start_cpu


# -- the proxies under test ---------------------------------------------------------------------------------------


@dataclass
class Target:
    """A way to reach the backends: ``direct`` or through one of the proxies; ``ports`` maps route -> port."""

    name: str
    ports: dict[str, int]
    proc: Proc | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


def start_target(kind: str, routes: Sequence[Route], workdir: Path, cpus: set[int] | None) -> Target:
    """Start one proxy of ``kind`` for ``routes`` and wait until every listener accepts.

    kinds: rabbitproxy, rabbitproxy-info (connection logs at info), haproxy, haproxy-tuned, nginx; and for the
    scaling comparison rabbitproxy-w1/-w2 (``workers = 1``/``2``), haproxy-nbthread1/-nbthread2.
    """
    # Not named after the kind: a directory called "rabbitproxy" in the cwd would shadow the package for -m.
    d = workdir / f"target-{kind}"
    d.mkdir(parents=True, exist_ok=True)
    if kind in ("rabbitproxy", "rabbitproxy-info") or kind.startswith("rabbitproxy-w"):
        level = "info" if kind == "rabbitproxy-info" else "warning"
        workers = int(kind.removeprefix("rabbitproxy-w")) if kind.startswith("rabbitproxy-w") else 1
        (d / "rabbitproxy.toml").write_text(rabbitproxy_config(routes, log_level=level, workers=workers))
        argv = [*RABBITPROXY, "serve", "--config", str(d / "rabbitproxy.toml"), "--loop", "uvloop"]
        argv += ["--log-level", level]
    elif kind in ("haproxy", "haproxy-tuned"):
        tuned = kind == "haproxy-tuned"
        maxconn = (nofile_limit() - 200 - (2 * TUNED_MAXPIPES if tuned else 0)) // 2
        (d / "haproxy.cfg").write_text(haproxy_config(routes, tuned=tuned, maxconn=maxconn))
        argv = ["haproxy", "-W", "-db", "-f", str(d / "haproxy.cfg")]
    elif kind.startswith("haproxy-nbthread"):
        nbthread = int(kind.removeprefix("haproxy-nbthread"))
        maxconn = (nofile_limit() - 200) // 2
        (d / "haproxy.cfg").write_text(haproxy_config(routes, maxconn=maxconn, nbthread=nbthread))
        argv = ["haproxy", "-W", "-db", "-f", str(d / "haproxy.cfg")]
    elif kind == "nginx":
        (d / "nginx.conf").write_text(nginx_config(routes, workdir=d, nofile=nofile_limit()))
        argv = ["nginx", "-p", str(d), "-c", str(d / "nginx.conf")]
    else:
        raise ValueError(f"unknown target kind {kind!r}")
    proc = Proc(kind, argv, d / "out.log", cpus=cpus).start()
    assert proc.popen is not None
    try:
        for r in routes:
            wait_port(r.listen_port, proc=proc.popen)
    except (RuntimeError, TimeoutError) as exc:
        proc.stop()
        raise RuntimeError(f"{kind} did not start: {exc}\n{proc.log_tail()}") from None
    return Target(kind, {r.name: r.listen_port for r in routes}, proc)


def target_routes(routes: Sequence[Route], kinds: Sequence[str]) -> dict[str, list[Route]]:
    """Each proxy gets its own listen ports, so all of them can run at once and be interleaved."""
    return {k: [Route(r.name, free_port(), r.backends, r.protocol) for r in routes] for k in kinds}


# -- the machine ----------------------------------------------------------------------------------------------------


def _version(argv: list[str], pick: Callable[[str], str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    try:
        return pick(out.stdout + out.stderr)
    except (IndexError, ValueError):
        return "unknown"


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        import uvloop

        uvloop_version = str(getattr(uvloop, "__version__", "unknown"))
    except ImportError:
        uvloop_version = "not installed"
    rabbit = "not installed"
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        out = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", "rabbitmq-server"], capture_output=True, text=True, timeout=30
        )
        rabbit = out.stdout.strip() or rabbit
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvloop": uvloop_version,
        "haproxy": _version(["haproxy", "-v"], lambda s: s.split()[2]),
        "nginx": _version(["nginx", "-v"], lambda s: s.strip().split("/")[1].split()[0]),
        "rabbitmq": rabbit,
        "iperf3": _version(["iperf3", "--version"], lambda s: s.split()[1]),
        "sockperf": _version(["sockperf", "--version"], lambda s: s.split("version")[1].split()[0]),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "nofile_hard_limit": nofile_limit(),
    }


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def print_medians(
    title: str, cols: Sequence[tuple[str, str, int]], summary: dict[str, dict[str, float]], console: Any
) -> None:
    """A rich table of per-target medians; ``cols`` are (title, key, decimals), latencies stored in µs shown in ms."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("target")
    for col_title, _, _ in cols:
        table.add_column(col_title, justify="right")
    for name, row in summary.items():
        cells = []
        for _, key, d in cols:
            v = row.get(key, math.nan)
            cells.append(fmt(v / 1000 if key.startswith("latency") else v, d))
        table.add_row(name, *cells)
    console.print(table)
