"""The TCP bench's three figures through ``mode = "l4-nat"``, ``mode = "l7"`` and HAProxy, in network namespaces.

    PYTHONPATH=. .venv/bin/python bench/l4_bench.py --quick --json bench/results/l4.json --update-docs

The topology is the l4-nat test's (tests/support/l4net.py): a client namespace, the balancer namespace with a
bridge, three backends whose default route is the balancer. Every target runs at once on its own port of the VIP
(10.233.1.1): rabbitproxy with ``mode = "l4-nat"`` (the kernel forwards), rabbitproxy with ``mode = "l7"``
(``protocol = "tcp"``, the relay), HAProxy ``mode tcp`` with round robin; ``direct`` goes from the client to one
backend's own address, routed (not NATed) by the balancer. Targets are interleaved within each repeat and the
medians reported, with the CPU seconds each proxy process spent during the measurement. Loads and backends are
``bench/l4_load.py`` (uvloop, no iperf3 or sockperf needed), so absolute numbers are Python's; the ratios between
targets are the point. Nothing is pinned: every process shares the machine's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from tests.support.l4net import BACKEND_IPS, VIP, Topology, sh  # noqa: E402
from tests.support.process import to_toml  # noqa: E402

ECHO, SINK = 7400, 7401
PORTS = {"l4-nat": 7500, "l7": 7600, "haproxy": 7700}
SINK_OFFSET = 1  # each target's sink route listens on its port + 1
TARGETS = ("direct", "l4-nat", "l7", "haproxy")
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- l4-bench:begin -->", "<!-- l4-bench:end -->"


def backends(port: int) -> list[dict[str, Any]]:
    return [{"name": f"b{i}", "address": a, "port": port} for i, a in enumerate(BACKEND_IPS)]


def rabbitproxy_config(mode: str, table: str) -> dict[str, Any]:
    services = []
    for route, backend_port in (("echo", ECHO), ("sink", SINK)):
        port = PORTS[mode] + (SINK_OFFSET if route == "sink" else 0)
        svc: dict[str, Any] = {
            "name": route,
            "mode": mode,
            "listen": f"{VIP}:{port}",
            "backends": backends(backend_port),
        }
        svc["health_check"] = {"type": "tcp", "interval": 2.0}
        if mode == "l7":
            svc.update(protocol="tcp", backlog=4096)
        services.append(svc)
    return {"nft_table": table, "admin": {"enabled": False}, "services": services}


def haproxy_config() -> str:
    lines = ["global", "    maxconn 8000", "", "defaults", "    mode tcp", "    timeout connect 5s",
             "    timeout client 3h", "    timeout server 3h", "    maxconn 8000"]  # fmt: skip
    for route, backend_port in (("echo", ECHO), ("sink", SINK)):
        port = PORTS["haproxy"] + (SINK_OFFSET if route == "sink" else 0)
        lines += ["", f"listen {route}", f"    bind {VIP}:{port}", "    balance roundrobin"]
        lines += [f"    server b{i} {a}:{backend_port}" for i, a in enumerate(BACKEND_IPS)]
    return "\n".join(lines) + "\n"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(topo: Topology, *args: str) -> dict[str, float]:
    out = sh(sys.executable, str(HERE / "l4_load.py"), *args, ns=topo.client)
    result: dict[str, float] = json.loads(out)
    return result


def address(target: str, sink: bool = False) -> tuple[str, int]:
    if target == "direct":
        return BACKEND_IPS[0], SINK if sink else ECHO
    return VIP, PORTS[target] + (SINK_OFFSET if sink else 0)


def measure(topo: Topology, target: str, test: str, pid: int | None, quick: bool) -> dict[str, float]:
    seconds = 3.0 if quick else 10.0
    before = cpu_seconds(pid) if pid else 0.0
    if test == "connrate":
        host, port = address(target)
        res = load(topo, "connrate", host, str(port), str(seconds), "16")
    elif test == "bulk":
        host, port = address(target, sink=True)
        res = load(topo, "bulk", host, str(port), "512" if quick else "4096")
    else:
        host, port = address(target)
        res = load(topo, "pingpong", host, str(port), str(seconds), "64")
    if pid:
        res["proxy_cpu_s"] = cpu_seconds(pid) - before
    return res


def start(topo: Topology, work: Path) -> dict[str, subprocess.Popen[bytes]]:
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for i, a in enumerate(BACKEND_IPS):
        p = subprocess.Popen(["ip", "netns", "exec", topo.backend_ns(i), sys.executable, str(HERE / "l4_load.py"),
                              "serve", a, str(ECHO), str(SINK)], stdout=subprocess.PIPE)  # fmt: skip
        assert p.stdout is not None and p.stdout.readline().strip() == b"listening"
        procs[f"backend{i}"] = p
    table = f"rp_bench_{os.getpid()}"
    for mode in ("l4-nat", "l7"):
        cfg = work / f"{mode}.toml"
        cfg.write_text(to_toml(rabbitproxy_config(mode, table)))
        log = (work / f"{mode}.log").open("wb")
        procs[mode] = subprocess.Popen(
            ["ip", "netns", "exec", topo.balancer, sys.executable, "-m", "rabbitproxy", "serve", "--config", str(cfg),
             "--loop", "uvloop", "--log-level", "warning"],
            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )  # fmt: skip
    (work / "haproxy.cfg").write_text(haproxy_config())
    procs["haproxy"] = subprocess.Popen(
        ["ip", "netns", "exec", topo.balancer, "haproxy", "-db", "-f", str(work / "haproxy.cfg")],
        stdout=(work / "haproxy.log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    down: list[str] = []
    while time.monotonic() < deadline:
        down = []
        for t in TARGETS:
            try:
                if load(topo, "connrate", *map(str, address(t)), "0.2", "1")["conn_s"] <= 0:
                    down.append(t)
            except (AssertionError, ValueError) as exc:
                down.append(f"{t}: {exc}")
        if not down:
            return procs
        time.sleep(0.5)
    logs = "\n".join(f"{f.name}: {f.read_text()[-800:]}" for f in work.glob("*.log"))
    raise SystemExit(f"not up within 60 s: {down}\n{logs}")


def run(quick: bool, repeats: int) -> dict[str, Any]:
    topo = Topology(f"rpbench{os.getpid() % 100000}")
    results: dict[str, dict[str, list[dict[str, float]]]] = {t: {} for t in TARGETS}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            topo.build()
            procs = start(topo, Path(tmp))
            for _ in range(repeats):
                for test in ("connrate", "bulk", "pingpong"):
                    for target in TARGETS:
                        pid = procs[target].pid if target in procs else None
                        res = measure(topo, target, test, pid, quick)
                        results[target].setdefault(test, []).append(res)
                        print(target, test, res, file=sys.stderr, flush=True)
            for p in procs.values():
                p.terminate()
                p.wait(30)
        finally:
            topo.destroy()
    return {
        "quick": quick,
        "repeats": repeats,
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "haproxy": re.findall(
            r"version (\S+)", subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout
        )[:1],
        "results": results,
    }


def med(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def markdown(data: dict[str, Any]) -> str:
    r = data["results"]
    load = ", ".join(f"{x:.2f}" for x in data["load_average"])
    lines = [
        BEGIN,
        "",
        '## Layer-4 NAT (`mode = "l4-nat"`) against the relay and HAProxy',
        "",
        f"Rendered by `bench/l4_bench.py{' --quick' if data['quick'] else ''}` ({data['repeats']} repeats, medians; "
        f"{data['cpus']} CPUs, kernel {data['kernel']}, HAProxy {''.join(data['haproxy'])}; load average at the end "
        f"{load}: the machine was shared). Network namespaces: client -> balancer (VIP) -> three backends on a "
        "bridge, replies routed back through the balancer; loads and backends are Python/uvloop "
        "(`bench/l4_load.py`), nothing pinned. `direct` is the client to one backend, routed by the balancer "
        "without NAT. Proxy CPU is the proxy process's own CPU seconds during the measurement (the kernel's "
        "forwarding in softirq is not charged to any process).",
        "",
        "| target | short connections/s | proxy CPU s | bulk Gbit/s (1 stream) | proxy CPU s "
        "| 64 B ping-pong p50 µs | p99 µs |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for t in TARGETS:
        c, b, p = r[t]["connrate"], r[t]["bulk"], r[t]["pingpong"]
        cpu_c = f"{med(c, 'proxy_cpu_s'):.2f}" if "proxy_cpu_s" in c[0] else "-"
        cpu_b = f"{med(b, 'proxy_cpu_s'):.2f}" if "proxy_cpu_s" in b[0] else "-"
        lines.append(
            f"| {t} | {med(c, 'conn_s'):,.0f} | {cpu_c} | {med(b, 'gbit_s'):.2f} | {cpu_b} | "
            f"{med(p, 'p50_us'):.0f} | {med(p, 'p99_us'):.0f} |"
        )
    lines += ["", END]
    return "\n".join(lines)


def update_docs(section: str) -> None:
    text = DOC.read_text()
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    DOC.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 s per measurement, 512 MB bulk (else 10 s, 4 GB)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--update-docs", action="store_true", help="render the section into docs/benchmarks.md")
    args = ap.parse_args()
    data = run(args.quick, args.repeats)
    if args.json:
        args.json.write_text(json.dumps(data, indent=1))
    section = markdown(data)
    print(section)
    if args.update_docs:
        update_docs(section)


if __name__ == "__main__":
    main()
