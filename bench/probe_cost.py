#!/usr/bin/env python3
"""What one ``rabbitproxy healthcheck`` costs: wall time and CPU per run (issue 19).

A container ``HEALTHCHECK`` runs the probe every 10 s and a keepalived ``track_script`` every 1 to 2 s on both
members of an HA pair, so its cost is paid over and over. This bench starts a real ``rabbitproxy serve`` (one TCP
service with ``health_check.type = "none"`` in front of a socket that only listens, and the admin API on a free
loopback port), then runs, one after another:

- ``rabbitproxy healthcheck --quiet --config FILE`` against that live admin API (the container's form: the probe
  reads ``[admin] listen`` from the same file ``serve`` uses), expecting exit 0 every time;
- ``rabbitproxy --version`` and ``rabbitproxy --help``.

Each command runs in two installs of the same tree:

- ``editable``: the development venv's console script, which is an *editable* install (setuptools'
  ``__editable__`` finder is imported by a ``.pth`` file at every interpreter start, about 10 ms of imports of its
  own), with this checkout first on ``PYTHONPATH``;
- ``wheel``: what the Docker image and a plain ``pip install`` give: a wheel built from this tree, installed with
  ``--no-deps`` into a temporary venv (the probe, ``--version`` and the fast dispatcher are stdlib-only, which
  tests/integration/test_probe_cost.py proves; ``--help`` loads typer, which that venv does not have, so it is
  measured in the editable install only), its console script run with no ``PYTHONPATH``.

Each command runs ``--runs`` times (default 50), interleaved (every command of every install once, then again) so
that a burst of load from other work hits every row alike, after one warm-up run each. Bytecode is cached as in a
normal install: the children get ``PYTHONPYCACHEPREFIX`` pointing into the temporary directory and no
``PYTHONDONTWRITEBYTECODE`` (without a cache, every run would compile the package again, which no installed
proxy does). Wall time is measured around spawn and ``os.wait4``; CPU is the child's user + system time from
``wait4``'s rusage. Median and max are printed and written to ``bench/results/probe.json``, with the load average
at the start and the end; ``--update-docs`` also renders the "Probe cost" section of docs/benchmarks.md from that
JSON (``bench/report.py`` renders the same section on a full ``bench/run_all``), so no number there is typed by
hand.

``--baseline REV`` measures the same commands a second time with the tree of git revision REV (extracted with
``git archive`` into a temporary directory; put first on ``PYTHONPATH`` for the editable row, built into a wheel
of its own for the wheel row), against the same live proxy: the "before" figures of a change.

    bench/probe_cost.py                          # 50 runs of each command
    bench/probe_cost.py --runs 100 --baseline 52dffdd --update-docs
    bench/probe_cost.py --no-wheel               # the editable install only (no wheel build)
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
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


def entry_command(python: str = sys.executable) -> list[str]:
    """How the operator's ``rabbitproxy`` is run: the console script beside ``python``, if installed."""
    script = Path(python).with_name("rabbitproxy")
    if script.is_file() and os.access(script, os.X_OK):
        # The script's shebang may name another path to the same venv; run it with this interpreter, as exec would.
        return [python, str(script)]
    return [python, "-c", "import sys; from rabbitproxy.cli import main; sys.exit(main())"]


def install_wheel(tree: Path, work: Path) -> Path:
    """Build a wheel of ``tree`` and install it, without dependencies, into a new venv under ``work``.

    Returns the venv's interpreter. The tree is copied first, so that the build's ``build/`` and ``*.egg-info``
    land in ``work``, not in the checkout.
    """
    src = work / "src"
    src.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(tree / name, src / name)
    shutil.copytree(tree / "rabbitproxy", src / "rabbitproxy", ignore=shutil.ignore_patterns("__pycache__"))
    dist = work / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "-q", "-w", str(dist), str(src)], check=True)
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    wheels = sorted(dist.glob("rabbitproxy-*.whl"))
    # Without PYTHONPATH: with the checkout on it, pip finds its rabbitproxy.egg-info, takes the package for
    # installed already and installs nothing.
    subprocess.run(
        [*pip, "--python", str(python), "install", "-q", "--no-deps", "--no-index", *map(str, wheels)],
        check=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    if not (venv / "bin" / "rabbitproxy").is_file():
        raise RuntimeError(f"installing {wheels} into {venv} gave no rabbitproxy script")
    where = subprocess.run(
        [str(python), "-c", "import rabbitproxy; print(rabbitproxy.__file__)"],
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not where.startswith(str(venv)):
        raise RuntimeError(f"the venv {venv} imports rabbitproxy from {where}, not from the wheel")
    return python


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


def run_once(argv: Sequence[str], env: Mapping[str, str], cwd: Path | None = None) -> tuple[int, float, float]:
    """Run ``argv`` to completion: exit status, wall seconds, CPU seconds (user + system, from wait4)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
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
    """The package of git revision ``rev`` (and what a wheel build needs), unpacked under ``into``; the repository
    is only read."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "rabbitproxy", "pyproject.toml", "README.md"],
        capture_output=True,
        check=True,
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def summary(samples: Sequence[float]) -> dict[str, float]:
    ms = [s * 1000 for s in samples]
    return {"median_ms": median(ms), "max_ms": max(ms), "min_ms": min(ms)}


class Row:
    """One row of the table: a tree (``before``/``current``), an install, a command, and how to run it."""

    __slots__ = ("argv", "env", "key")

    def __init__(self, key: str, argv: list[str], env: Mapping[str, str]) -> None:
        self.key = key
        self.argv = argv
        self.env = env


def measure(rows: Sequence[Row], runs: int, cwd: Path) -> dict[str, dict[str, Any]]:
    """Run every row ``runs`` times, interleaved, after one warm-up run each; per key: wall and CPU summaries.

    The commands run in ``cwd``, away from the checkout, so that nothing imports this tree by accident (a
    ``python -c`` puts its working directory first on ``sys.path``).
    """
    for row in rows:
        # Fills the bytecode cache, as the first run after an install does.
        run_once(row.argv, row.env, cwd)
    walls: dict[str, list[float]] = {row.key: [] for row in rows}
    cpus: dict[str, list[float]] = {row.key: [] for row in rows}
    for _ in range(runs):
        for row in rows:
            _, wall, cpu = run_once(row.argv, row.env, cwd)
            walls[row.key].append(wall)
            cpus[row.key].append(cpu)
    return {key: {"runs": len(walls[key]), "wall": summary(walls[key]), "cpu": summary(cpus[key])} for key in walls}


INSTALLS = {
    "editable": "dev venv, editable install",
    "wheel": "wheel in a fresh venv (as in the image)",
}


def render_section(doc: Mapping[str, Any]) -> str:
    """The "Probe cost" section of docs/benchmarks.md, from the JSON this bench writes."""
    results = doc["results"]
    rows = []
    for key, r in results.items():
        tree, install, command = key.split("/", 2)
        rows.append(
            [
                f"`rabbitproxy {command}`",
                tree,
                INSTALLS.get(install, install),
                fmt(r["wall"]["median_ms"], 1),
                fmt(r["wall"]["max_ms"], 1),
                fmt(r["cpu"]["median_ms"], 1),
                fmt(r["cpu"]["max_ms"], 1),
            ]
        )
    verdicts = []
    for install in INSTALLS:
        hc = results.get(f"current/{install}/healthcheck")
        if hc is not None:
            wall, cpu = hc["wall"]["median_ms"], hc["cpu"]["median_ms"]
            met = wall < TARGET_WALL_MS and cpu < TARGET_CPU_MS
            verdicts.append(
                f"{INSTALLS[install]}: {'met' if met else '**not met**'} ({fmt(wall, 1)} ms wall, {fmt(cpu, 1)} ms CPU)"
            )
    verdict = (
        f" Target (issue 19): under {TARGET_WALL_MS:g} ms wall and {TARGET_CPU_MS:g} ms CPU per healthcheck (median); "
        + "; ".join(verdicts)
        + "."
        if verdicts
        else ""
    )
    baseline = doc["settings"].get("baseline")
    before = f' "before" is the tree at `{baseline}`, run against the same proxy.' if baseline else ""
    bare = doc["interpreter"]
    scale = [
        f"{INSTALLS.get(install, install)}: {fmt(r['wall']['median_ms'], 1)} ms wall, "
        f"{fmt(r['cpu']['median_ms'], 1)} ms CPU"
        for install, r in bare.items()
    ]
    return "\n".join(
        [
            SECTION,
            "",
            f"Run: {doc['started_at']}, `bench/probe_cost.py`, {doc['settings']['runs']} runs of each command, "
            "interleaved, each a new process through the console script, bytecode cached as in an installed "
            "package; `healthcheck --quiet --config FILE` against a live `rabbitproxy serve` (exit 0 every run). "
            "Two installs of the same tree: the development venv's editable install (its `.pth` finder costs about "
            "10 ms of imports at every interpreter start) and a wheel of the tree installed with `--no-deps` into a "
            "fresh venv, which is what the Docker image and `pip install` give (`--help` needs typer, so it has no "
            "wheel row). Wall is spawn to exit as seen by the bench, CPU is the child's user + system time "
            f"(`wait4`). Load average at start {doc['machine']['load_average_at_start']}, at the end "
            f"{doc['load_average_at_end']} (2 cores, shared); Python {doc['machine']['python']}.{before}{verdict}",
            "",
            markdown_table(
                ["command", "code", "install", "wall median ms", "wall max ms", "CPU median ms", "CPU max ms"], rows
            ),
            "",
            "For scale, a bare `python -c pass` in each venv (the interpreter and `site` alone), run interleaved "
            "with the commands above, median: " + "; ".join(scale) + ".",
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
    ap.add_argument("--baseline", metavar="REV", help="also measure the tree of this git revision")
    ap.add_argument("--no-wheel", action="store_true", help="measure the editable install only (no wheel build)")
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
    with tempfile.TemporaryDirectory(prefix="rabbitproxy-probe-") as tmp:
        work = Path(tmp)
        # Bytecode as an installed package has it, written only under the temporary directory.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
        trees = {"current": ROOT}
        if args.baseline:
            trees = {"before": extract(args.baseline, Path(tempfile.mkdtemp(dir=work))), **trees}
        wheels: dict[str, str] = {}
        if not args.no_wheel:
            for tree, path in trees.items():
                wheels[tree] = str(install_wheel(path, work / f"wheel-{tree}"))
        no_path = {k: v for k, v in env.items() if k != "PYTHONPATH"}
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
                commands = {
                    "healthcheck": ["healthcheck", "--quiet", "--config", str(config)],
                    "--version": ["--version"],
                    "--help": ["--help"],
                }
                rows: list[Row] = []
                bare = [Row("python/editable", [sys.executable, "-c", "pass"], no_path)]
                for tree, path in trees.items():
                    tree_env = env | {"PYTHONPATH": str(path)}
                    rows += [
                        Row(f"{tree}/editable/{name}", [*entry_command(), *cmd], tree_env)
                        for name, cmd in commands.items()
                    ]
                    if tree in wheels:
                        rows += [
                            Row(f"{tree}/wheel/{name}", [*entry_command(wheels[tree]), *cmd], no_path)
                            for name, cmd in commands.items()
                            if name != "--help"
                        ]
                if "current" in wheels:
                    bare.append(Row("python/wheel", [wheels["current"], "-c", "pass"], no_path))
                # The bare interpreter is interleaved with the rest, so that it sees the same load.
                measured = measure([*bare, *rows], args.runs, work)
                interpreter = {row.key.partition("/")[2]: measured.pop(row.key) for row in bare}
                results = measured
            finally:
                proxy.stop()
    doc: dict[str, Any] = {
        "bench": "probe",
        "started_at": started,
        "machine": machine,
        "settings": {
            "runs": args.runs,
            "baseline": args.baseline,
            "installs": ["editable", *(["wheel"] if wheels else [])],
            "interleaved": True,
            "warm_up_runs": 1,
        },
        "interpreter": interpreter,
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
