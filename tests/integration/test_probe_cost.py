"""`rabbitproxy healthcheck` stays cheap: run in a fresh interpreter, it must not import the heavy libraries.

A keepalived track_script runs the probe every second or two, so every import on its path is paid again and again
(issue 19: typer, pydantic and asyncio made each run cost about 0.27 s of CPU). These tests run the console entry
point exactly as the installed script does, in a new process, and list which of those libraries ended up in
``sys.modules``. bench/probe_cost.py measures the time itself; asserting timings here would only make a busy
machine fail the test.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.net import free_port, tcp_server

REPO = Path(__file__).resolve().parents[2]
# The libraries the probe must never load; typer vendors click, so click is not listed.
HEAVY = frozenset({"typer", "pydantic", "pydantic_core", "aiohttp", "asyncio", "structlog", "rich", "uvloop"})
# Not heavy in the same way, but an http:// probe has no use for OpenSSL, nor for http.client and the email package
# it parses headers with (see probe._get_plain).
SSL = "ssl"
EMAIL = "email"
MARKER = "LOADED:"
NEW_MARKER = "NEW:"
# Everything the probe and --version may import beyond what a bare interpreter has loaded, when run without
# ``site`` (``-S``): our own modules, ``os`` and what it imports (``site`` loads those at every normal start), the
# ``__future__`` module that ``from __future__ import annotations`` loads, and the socket extension. Issue 19 took
# out typing, collections.abc, pathlib, tomllib (with re and datetime), json, urllib.parse, socket (with
# selectors, array and enum) and the idna codec, each a millisecond or more per run; any of them coming back fails
# test_probe_imports_only_what_it_uses.
SITE_LOADS = frozenset({"os", "os.path", "posixpath", "genericpath", "stat", "_stat", "_collections_abc"})
ALLOWED_NEW = SITE_LOADS | {"__future__", "_socket"}

# What the console script does (``sys.exit(main())`` after ``from rabbitproxy.cli import main``), then one line
# naming the heavy packages that were imported, however main() ended, and one with every module it added.
SCRIPT = f"""
import sys
before = set(sys.modules)
sys.argv = ["rabbitproxy", *sys.argv[1:]]
from rabbitproxy.cli import main
try:
    main()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
loaded = sorted({{name.partition(".")[0] for name in sys.modules}} & set({sorted(HEAVY | {SSL, EMAIL})!r}))
sys.stdout.write("\\n{MARKER}" + ",".join(loaded) + "\\n")
sys.stdout.write("{NEW_MARKER}" + ",".join(sorted(set(sys.modules) - before)) + "\\n")
sys.stdout.flush()
sys.exit(code)
"""


def run_entry(
    *args: str, env: dict[str, str] | None = None, flags: tuple[str, ...] = ()
) -> tuple[int, str, str, set[str]]:
    """Run ``rabbitproxy ARGS`` in a fresh interpreter: exit status, stdout, stderr, heavy packages loaded."""
    code, out, err, loaded, _ = run_entry_modules(*args, env=env, flags=flags)
    return code, out, err, loaded


def run_entry_modules(
    *args: str, env: dict[str, str] | None = None, flags: tuple[str, ...] = ()
) -> tuple[int, str, str, set[str], set[str]]:
    """:func:`run_entry`, and the names of all the modules the entry point added to ``sys.modules``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RABBITPROXY_")}
    clean["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, *flags, "-c", SCRIPT, *args],
        env=clean | (env or {}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    out, _, tail = proc.stdout.rpartition(MARKER)
    loaded, _, new = tail.partition(NEW_MARKER)
    assert new, f"the entry point did not finish: {proc.stdout!r} {proc.stderr!r}"
    return (
        proc.returncode,
        out,
        proc.stderr,
        {name for name in loaded.strip().split(",") if name},
        {name for name in new.strip().split(",") if name},
    )


def test_unhealthy_probe_loads_nothing_heavy() -> None:
    port = free_port()
    code, _, err, loaded = run_entry("healthcheck", "--admin", f"127.0.0.1:{port}", "--timeout", "5")
    assert code == 1
    assert f"unhealthy: http://127.0.0.1:{port}/healthz:" in err
    assert "Connection refused" in err
    assert loaded == set()


def test_probe_reading_a_config_file_loads_nothing_heavy(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "rabbitproxy.toml"
    config.write_text(
        f'[admin]\nlisten = "0.0.0.0:{port}"\ntoken = "secret"\n\n[[services]]\nname = "amqp"\n'
        '[[services.backends]]\nname = "r1"\naddress = "127.0.0.1"\n'
    )
    # The file through the environment, as the container image sets it.
    code, _, err, loaded = run_entry("healthcheck", env={"RABBITPROXY_CONFIG": str(config)})
    assert code == 1
    assert f"unhealthy: http://127.0.0.1:{port}/healthz:" in err
    assert loaded == set()


async def healthz(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A /healthz that answers as a healthy proxy does."""
    await reader.readuntil(b"\r\n\r\n")
    body = b'{"status": "ok"}'
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
    writer.write(b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    writer.close()


@pytest.mark.asyncio
async def test_healthy_probe_loads_nothing_heavy() -> None:
    async with tcp_server(healthz) as port:
        code, out, _, loaded = await asyncio.to_thread(run_entry, "healthcheck", "--admin", f"127.0.0.1:{port}")
    assert code == 0
    assert out.strip() == f"healthy: http://127.0.0.1:{port}/healthz: ok"
    assert loaded == set()


def test_https_after_http_in_one_process_still_works() -> None:
    # The http:// probe speaks HTTP itself; an https:// check in the same process goes through http.client and ssl.
    port = free_port()
    script = (
        "from rabbitproxy.admin.probe import check\n"
        f"for scheme in ('http', 'https'):\n"
        f"    print(check(scheme + '://127.0.0.1:{port}/healthz', 5.0).detail)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=dict(os.environ) | {"PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = proc.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"http://127.0.0.1:{port}/healthz:")
    assert lines[1].startswith(f"https://127.0.0.1:{port}/healthz:")
    assert all("Connection refused" in line for line in lines)


@pytest.mark.asyncio
@pytest.mark.parametrize("form", ["admin", "config", "version"])
async def test_probe_imports_only_what_it_uses(form: str, tmp_path: Path) -> None:
    # Without ``site`` (-S) nothing but the standard library and this checkout can be imported, so the probe
    # working at all shows that a wheel installed with --no-deps is enough for it; and the editable install's
    # import hook, which loads pathlib, re and urllib.parse at startup, cannot hide them coming back.
    async with tcp_server(healthz) as port:
        config = tmp_path / "rabbitproxy.toml"
        config.write_text(
            f"# the admin API\n[ admin ]\nlisten = \"0.0.0.0:{port}\"  # all addresses\ntoken = 'secret'\n\n"
            '[[services]]\nname = "amqp"\nlisten = ["0.0.0.0:5672",\n  "[::]:5672"]\n'
            '[[services.backends]]\nname = "r1"\naddress = "127.0.0.1"\n'
        )
        args = {
            "admin": ("healthcheck", "--admin", f"localhost:{port}"),
            "config": ("healthcheck", "--config", str(config)),
            "version": ("--version",),
        }[form]
        code, out, err, loaded, new = await asyncio.to_thread(run_entry_modules, *args, flags=("-S",))
    assert code == 0, err
    assert out.strip().startswith("healthy: " if form != "version" else "rabbitproxy ")
    assert loaded == set()
    ours = {name for name in new if name == "rabbitproxy" or name.startswith("rabbitproxy.")}
    assert new - ours <= ALLOWED_NEW, f"the {form} path now also imports {sorted(new - ours - ALLOWED_NEW)}"


def test_version_loads_nothing_heavy() -> None:
    code, out, _, loaded = run_entry("--version")
    assert code == 0
    assert out.strip().startswith("rabbitproxy ")
    assert loaded == set()


def test_help_pays_for_the_cli_only() -> None:
    code, out, _, loaded = run_entry("--help")
    assert code == 0
    assert "healthcheck" in out
    # typer and its rich help are what --help is for; the proxy's own libraries are not.
    assert loaded - {SSL, EMAIL} <= {"typer", "rich"}


def test_healthcheck_help_is_typer_help() -> None:
    code, out, _, _ = run_entry("healthcheck", "--help")
    assert code == 0
    assert "--admin" in out
    assert "--timeout" in out
