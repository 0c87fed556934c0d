#!/usr/bin/env python3
"""What one ``rabbitproxy healthcheck`` costs: wall time and CPU per run (issue 19).

A container ``HEALTHCHECK`` runs the probe every 10 s and a keepalived ``track_script`` every 1 to 2 s on both
members of an HA pair, so its cost is paid over and over. This bench starts a real ``rabbitproxy serve`` (one TCP
service with ``health_check.type = "none"`` in front of a socket that only listens, and the admin API on a free
loopback port), then runs, one after another:

- ``rabbitproxy healthcheck --quiet --config FILE`` against that live admin API (the container's form: the probe
  reads ``[admin] listen`` from the same file ``serve`` uses), expecting exit 0 every time;
- ``rabbitproxy --version`` and ``rabbitproxy --help``.

Each command runs ``--runs`` times (default 50) through the installed console script (or ``python -c`` calling
``rabbitproxy.cli:main`` where no script is installed), interleaved so that a burst of load from other work hits
every command alike. Wall time is measured around spawn and ``os.wait4``; CPU is the child's user + system time
from ``wait4``'s rusage. Median and max are printed and written to ``bench/results/probe.json``;
``--update-docs`` also renders the "Probe cost" section of docs/benchmarks.md from that JSON (``bench/report.py``
renders the same section on a full ``bench/run_all``), so no number there is typed by hand.

``--baseline REV`` measures the same commands a second time with the ``rabbitproxy`` package of git revision REV
(extracted with ``git archive`` into a temporary directory and put first on ``PYTHONPATH``), against the same live
proxy: the "before" figures of a change.

    bench/probe_cost.py                          # 50 runs of each command
    bench/probe_cost.py --runs 100 --baseline 52dffdd --update-docs
"""

from __future__ import annotations

import argparse
import http.client
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    RABBITPROXY,
    ROOT,
    Proc,
    exit_cleanly_on_sigterm,
    fmt,
    free_port,
    machine_info,
    markdown_table,
    median,
    write_json,
)

RESULTS = HERE / "results" / "probe.json"
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## Probe cost"
# Issue 19's targets for the healthcheck, per run on the bench machine.
TARGET_WALL_MS = 40.0
TARGET_CPU_MS = 30.0


def entry_command() -> list[str]:
    """How the operator's ``rabbitproxy`` is run: the console script beside this interpreter, if installed."""
    script = Path(sys.executable).with_name("rabbitproxy")
    if script.is_file() and os.access(script, os.X_OK):
        # The script's shebang may name another path to the same venv; run it with this interpreter, as exec would.
        return [sys.executable, str(script)]
    return [sys.executable, "-c", "import sys; from rabbitproxy.cli import main; sys.exit(main())"]


def serve_config(admin_port: int, listen_port: int, backend_port: int) -> str:
    return "\n".join(
        [
            "[admin]",
            f'listen = "127.0.0.1:{admin_port}"',
            "",
            "[log]",
            'level = "warning"',
            "",
            "[[services]]",
            'name = "tcp"',
            f'listen = "127.0.0.1:{listen_port}"',
            "shutdown_timeout = 1.0",
            "[services.health_check]",
            'type = "none"',
            "[[services.backends]]",
            'name = "b1"',
            'address = "127.0.0.1"',
            f"port = {backend_port}",
            "",
        ]
    )


def wait_healthy(port: int, proc: Proc, timeout: float = 60.0) -> None:
    """Poll the admin API's /healthz until it answers 200, or fail (early if the proxy died)."""
    deadline = time.monotonic() + timeout
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2.0)
        try:
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        if proc.popen is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"rabbitproxy serve exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the admin API on 127.0.0.1:{port} was not healthy after {timeout:g}s")
        time.sleep(0.1)


def run_once(argv: Sequence[str], env: Mapping[str, str]) -> tuple[int, float, float]:
    """Run ``argv`` to completion: exit status, wall seconds, CPU seconds (user + system, from wait4)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # wait4 reports this child's own rusage; Popen.wait would reap it without.
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.stderr is not None
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {proc.returncode}: {err.strip()}")
    return proc.returncode, wall, usage.ru_utime + usage.ru_stime


def extract(rev: str, into: Path) -> Path:
    """The ``rabbitproxy`` package of git revision ``rev``, unpacked under ``into`` (the repository is only read)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "rabbitproxy"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def summary(samples: Sequence[float]) -> dict[str, float]:
    ms = [s * 1000 for s in samples]
    return {"median_ms": median(ms), "max_ms": max(ms), "min_ms": min(ms)}


def measure(
    commands: Mapping[str, list[str]], trees: Mapping[str, Path], runs: int, env: Mapping[str, str]
) -> dict[str, dict[str, Any]]:
    """Run every command of every tree ``runs`` times, interleaved; per "tree/command": wall and CPU summaries."""
    walls: dict[str, list[float]] = {}
    cpus: dict[str, list[float]] = {}
    for _ in range(runs):
        for tree, path in trees.items():
            tree_env = dict(env) | {"PYTHONPATH": str(path)}
            for name, argv in commands.items():
                _, wall, cpu = run_once(argv, tree_env)
                walls.setdefault(f"{tree}/{name}", []).append(wall)
                cpus.setdefault(f"{tree}/{name}", []).append(cpu)
    return {
        key: {"runs": len(walls[key]), "wall": summary(walls[key]), "cpu": summary(cpus[key])} for key in walls
    }


def render_section(doc: Mapping[str, Any]) -> str:
    """The "Probe cost" section of docs/benchmarks.md, from the JSON this bench writes."""
    results = doc["results"]
    rows = []
    for key, r in results.items():
        tree, _, command = key.partition("/")
        rows.append(
            [
                f"`rabbitproxy {command}`",
                tree,
                fmt(r["wall"]["median_ms"], 1),
                fmt(r["wall"]["max_ms"], 1),
                fmt(r["cpu"]["median_ms"], 1),
                fmt(r["cpu"]["max_ms"], 1),
            ]
        )
    hc = results.get("current/healthcheck")
    verdict = ""
    if hc is not None:
        wall, cpu = hc["wall"]["median_ms"], hc["cpu"]["median_ms"]
        met = wall < TARGET_WALL_MS and cpu < TARGET_CPU_MS
        verdict = (
            f" Target (issue 19): under {TARGET_WALL_MS:g} ms wall and {TARGET_CPU_MS:g} ms CPU per healthcheck "
            f"(median): {'met' if met else '**not met**'} ({fmt(wall, 1)} ms wall, {fmt(cpu, 1)} ms CPU)."
        )
    baseline = doc["settings"].get("baseline")
    before = f' "before" is the package at `{baseline}`, run against the same proxy.' if baseline else ""
    return "\n".join(
        [
            SECTION,
            "",
            f"Run: {doc['started_at']}, `bench/probe_cost.py`, {doc['settings']['runs']} runs of each command, "
            "interleaved, each a new process through the console script; `healthcheck --quiet --config FILE` "
            "against a live `rabbitproxy serve` (exit 0 every run). Wall is spawn to exit as seen by the bench, "
            "CPU is the child's user + system time (`wait4`). Load average at start "
            f"{doc['machine']['load_average_at_start']}, at the end {doc['load_average_at_end']}; "
            f"Python {doc['machine']['python']}.{before}{verdict}",
            "",
            markdown_table(
                ["command", "code", "wall median ms", "wall max ms", "CPU median ms", "CPU max ms"], rows
            ),
            "",
            "For scale, a bare `python -c pass` in the same environment (the interpreter and `site` alone): "
            f"{fmt(doc['interpreter']['wall']['median_ms'], 1)} ms wall, "
            f"{fmt(doc['interpreter']['cpu']['median_ms'], 1)} ms CPU (median).",
        ]
    )


def update_docs(section: str, path: Path = DOCS) -> None:
    """Replace the "Probe cost" section of ``path`` (up to the next ``## `` heading), or insert it before the
    hand-written profile notes that end the file."""
    lines = path.read_text().splitlines()
    if SECTION in lines:
        start = lines.index(SECTION)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    else:
        start = end = next((i for i, line in enumerate(lines) if line.startswith("## Profile")), len(lines))
    new = [*lines[:start], *section.splitlines(), "", *lines[end:]]
    path.write_text("\n".join(new).rstrip("\n") + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=50, help="runs of each command (default 50)")
    ap.add_argument("--baseline", metavar="REV", help="also measure the rabbitproxy package of this git revision")
    ap.add_argument("--json", type=Path, default=RESULTS, help=f"where to write the results (default {RESULTS})")
    ap.add_argument("--update-docs", action="store_true", help="rewrite the Probe cost section of docs/benchmarks.md")
    args = ap.parse_args(argv)
    exit_cleanly_on_sigterm()

    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    info = machine_info()
    machine = {k: info[k] for k in ("cpu", "cores", "kernel", "python", "load_average_at_start")}
    # The proxy and the probes must not pick up this shell's RABBITPROXY_* settings, and the proxy runs the code
    # of this checkout; Proc passes this process's environment on, so it is set here.
    for key in [k for k in os.environ if k.startswith("RABBITPROXY_")]:
        del os.environ[key]
    os.environ["PYTHONPATH"] = str(ROOT)
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="rabbitproxy-probe-") as tmp:
        work = Path(tmp)
        trees = {"current": ROOT}
        if args.baseline:
            trees = {"before": extract(args.baseline, Path(tempfile.mkdtemp(dir=work))), **trees}
        admin_port, listen_port = free_port(), free_port()
        # A backend that only listens: health checks are off, and nothing connects through the proxy.
        with socket.create_server(("127.0.0.1", 0)) as backend:
            config = work / "rabbitproxy.toml"
            config.write_text(serve_config(admin_port, listen_port, backend.getsockname()[1]))
            proxy = Proc(
                "rabbitproxy",
                [*RABBITPROXY, "serve", "--config", str(config), "--loop", "uvloop"],
                work / "serve.log",
            )
            proxy.start()
            try:
                wait_healthy(admin_port, proxy)
                entry = entry_command()
                commands = {
                    "healthcheck": [*entry, "healthcheck", "--quiet", "--config", str(config)],
                    "--version": [*entry, "--version"],
                    "--help": [*entry, "--help"],
                }
                bare = measure({"pass": [sys.executable, "-c", "pass"]}, {"python": ROOT}, args.runs, env)
                results = measure(commands, trees, args.runs, env)
            finally:
                proxy.stop()
    doc: dict[str, Any] = {
        "bench": "probe",
        "started_at": started,
        "machine": machine,
        "settings": {"runs": args.runs, "baseline": args.baseline, "entry": entry, "interleaved": True},
        "interpreter": bare["python/pass"],
        "results": results,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    write_json(args.json, doc)
    section = render_section(doc)
    print(section)
    if args.update_docs:
        update_docs(section)
        print(f"updated {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
