"""Shared test helpers: free ports, polling with a deadline, an in-process proxy, small TCP servers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aio_pika

from rabbitproxy import config as config_mod
from rabbitproxy.app import serve
from rabbitproxy.control.supervisor import Supervisor


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def wait_for(
    predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = "condition"
) -> Any:
    """Poll until ``predicate()`` is truthy (awaiting it if needed) or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = predicate()
        if isinstance(last, Awaitable):
            last = await last
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last value {last!r})")
        await asyncio.sleep(interval)


def wait_for_sync(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last value {last!r})")
        time.sleep(interval)


def service_config(
    backends: list[Mapping[str, Any]], *, name: str = "amqp", listen: str | None = None, **extra: Any
) -> dict[str, Any]:
    svc: dict[str, Any] = {
        "name": name,
        "listen": listen or f"127.0.0.1:{free_port()}",
        "health_check": {"type": "none"},
        "shutdown_timeout": 5.0,
        "backends": [dict(b) for b in backends],
    }
    svc.update(extra)
    return svc


@contextlib.asynccontextmanager
async def run_proxy(*services: Mapping[str, Any], admin: Mapping[str, Any] | None = None) -> AsyncIterator[Supervisor]:
    """Run ``serve()`` in this loop (uvicorn's ``run_server`` pattern); yields the running :class:`Supervisor`."""
    data: dict[str, Any] = {
        "services": [dict(s) for s in services],
        "admin": dict(admin) if admin is not None else {"enabled": False},
    }
    cfg = config_mod.validate(data, "test")
    stop = asyncio.Event()
    started: asyncio.Future[Supervisor] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(cfg, shutdown_trigger=stop.wait, ready=started.set_result))
    done, _ = await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    try:
        yield started.result()
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


def listen_addr(proxy: Supervisor, service: str = "amqp") -> tuple[str, int]:
    host, port = proxy.services[service].bound[0]
    return host, port


def open_fds(pid: int | None = None) -> int:
    return len(os.listdir(f"/proc/{pid or os.getpid()}/fd"))


def fd_targets(pid: int) -> list[str]:
    """What a process's descriptors point at (socket:[inode], pipe:[...], files), for failure messages."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(f"{fd}->{os.readlink(f'/proc/{pid}/fd/{fd}')}")
        except OSError:
            continue
    return sorted(out)


@contextlib.asynccontextmanager
async def tcp_server(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]], host: str = "127.0.0.1"
) -> AsyncIterator[int]:
    """A plain TCP backend for tests of the relay itself; yields its port. Handlers are cancelled on exit."""
    handlers: set[asyncio.Task[None]] = set()

    async def guarded(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            await handler(r, w)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            # A cancelled handler ends quietly so asyncio does not log the cancellation as an error.
            pass
        finally:
            handlers.discard(task)
            w.close()

    server = await asyncio.start_server(guarded, host, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for t in list(handlers):
            t.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


@contextlib.contextmanager
def silent_backend() -> Any:
    """A port whose SYNs go unanswered, so a connect to it only ends by timing out; yields the port.

    A listener with a backlog of 0 holds one finished handshake in its accept queue; once that place is taken
    (by the filler connection here) and nobody accepts, Linux drops every further SYN.
    """
    listener = socket.socket()
    filler = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        filler.connect(listener.getsockname())
        yield listener.getsockname()[1]
    finally:
        filler.close()
        listener.close()


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


def to_toml(data: Mapping[str, Any]) -> str:
    """Just enough TOML writing for test configs: scalars, tables and arrays of tables."""

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        raise TypeError(type(v))

    lines: list[str] = []

    def table(prefix: str, d: Mapping[str, Any], header: str | None) -> None:
        if header:
            lines.append(header)
        nested = []
        for k, v in d.items():
            if isinstance(v, Mapping):
                nested.append((k, v, False))
            elif isinstance(v, list) and v and all(isinstance(x, Mapping) for x in v):
                nested.append((k, v, True))
            else:
                lines.append(f"{k} = {scalar(v)}")
        for k, v, is_array in nested:
            path = f"{prefix}{k}"
            if is_array:
                for item in v:
                    table(f"{path}.", item, f"[[{path}]]")
            else:
                table(f"{path}.", v, f"[{path}]")

    table("", data, None)
    return "\n".join(lines) + "\n"


class ProxyProcess:
    """``rabbitproxy serve`` as a real subprocess (for signals, crashes and descriptor counts)."""

    def __init__(self, config: Mapping[str, Any], tmp_path: Path, loop: str = "uvloop", log_level: str = "warning"):
        self.config_path = tmp_path / "rabbitproxy.toml"
        self.config_path.write_text(to_toml(config))
        self.log_path = tmp_path / "rabbitproxy.log"
        self.loop = loop
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None
        first = config["services"][0]
        host, port = config_mod.split_host_port(first["listen"])
        self.addr = (host, port)

    def argv(self) -> list[str]:
        return [
            sys.executable, "-m", "rabbitproxy", "serve", "--config", str(self.config_path),
            "--loop", self.loop, "--log-level", self.log_level,
        ]  # fmt: skip

    def start(self) -> ProxyProcess:
        """Start the process and wait for its sd_notify READY=1 (every listener bound, admin API up)."""
        self._log = self.log_path.open("wb")
        notify_path = self.config_path.with_suffix(".notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(str(notify_path))
            notify.settimeout(0.2)
            env = dict(os.environ, NOTIFY_SOCKET=str(notify_path))
            self.proc = subprocess.Popen(self.argv(), stdout=self._log, stderr=subprocess.STDOUT, env=env)
            wait_for_sync(lambda: self._ready(notify), timeout=60, what="the proxy's READY=1")
        notify_path.unlink()
        return self

    def _ready(self, notify: socket.socket) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"proxy exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
        try:
            return notify.recv(256) == b"READY=1"
        except TimeoutError:
            return False

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def client_dead(conn: aio_pika.abc.AbstractConnection) -> bool:
    """True once an aio-pika client saw its connection end (its own is_closed only turns on after close())."""
    transport = conn.transport
    return conn.is_closed or transport is None or transport.connection.is_closed


async def close_all(conns: list[aio_pika.abc.AbstractConnection]) -> None:
    """Close the clients that are still open (closing a dead one raises)."""
    for c in conns:
        if not client_dead(c):
            await c.close()
