"""``rabbitproxy serve`` as a real subprocess (signals, crashes, descriptor counts) and the TOML it reads."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp

from rabbitproxy import config as config_mod

from .waiting import wait_for_sync


def running_loop_name() -> str:
    """``uvloop`` or ``asyncio``: the running loop's kind, so a subprocess proxy can run on the same one."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"


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

    def __init__(
        self,
        config: Mapping[str, Any],
        tmp_path: Path,
        loop: str = "uvloop",
        log_level: str = "warning",
        env: Mapping[str, str] | None = None,
    ):
        # ``env``: variables added to this environment for the process (WATCHDOG_USEC, say).
        self.env = dict(env or {})
        # With start(keep_notify=True), the notify socket stays open for notices() to read what followed READY=1.
        self.notify: socket.socket | None = None
        self.config_path = tmp_path / "rabbitproxy.toml"
        self.config_path.write_text(to_toml(config))
        self.log_path = tmp_path / "rabbitproxy.log"
        self.loop = loop
        self.log_level = log_level
        # A test that asks for a format in the file (JSON, to parse records) gets it; the rest get logfmt lines.
        self.log_format = None if "format" in config.get("log", {}) else "console"
        self.proc: subprocess.Popen[bytes] | None = None
        first = config["services"][0]
        host, port = config_mod.split_host_port(first["listen"])
        self.addr = (host, port)

    def argv(self) -> list[str]:
        argv = [
            sys.executable, "-m", "rabbitproxy", "serve", "--config", str(self.config_path),
            "--loop", self.loop, "--log-level", self.log_level,
        ]  # fmt: skip
        if self.log_format is not None:
            # logfmt lines, which tests search; the default for a file would be JSON.
            argv += ["--log-format", self.log_format]
        return argv

    def start(self, keep_notify: bool = False) -> ProxyProcess:
        """Start the process and wait for its sd_notify READY=1 (every listener bound, admin API up)."""
        self._log = self.log_path.open("wb")
        notify_path = self.config_path.with_suffix(".notify")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            notify.bind(str(notify_path))
            notify.settimeout(0.2)
            env = dict(os.environ, **self.env, NOTIFY_SOCKET=str(notify_path))
            self.proc = subprocess.Popen(self.argv(), stdout=self._log, stderr=subprocess.STDOUT, env=env)
            wait_for_sync(lambda: self._ready(notify), timeout=60, what="the proxy's READY=1")
        finally:
            if keep_notify:
                notify.setblocking(False)
                self.notify = notify
            else:
                notify.close()
                notify_path.unlink()
        return self

    def notices(self) -> list[str]:
        """The sd_notify messages that arrived since the last call (start(keep_notify=True) first)."""
        assert self.notify is not None
        out = []
        while True:
            try:
                out.append(self.notify.recv(4096).decode())
            except BlockingIOError:
                return out

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
        if self.notify is not None:
            self.notify.close()
            self.notify = None
        return self.proc.returncode

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.asynccontextmanager
async def running_process(proxy: ProxyProcess) -> AsyncIterator[ProxyProcess]:
    """``proxy`` started (off the loop: start blocks until READY=1, and backends in this loop must answer its
    checks meanwhile), then stopped on the way out, which must end with exit code 0."""
    await asyncio.to_thread(proxy.start)
    try:
        yield proxy
    finally:
        assert await asyncio.to_thread(proxy.stop) == 0, proxy.log()[-3000:]


async def admin_get(url: str) -> Any:
    """A GET of the admin API that must answer 200; JSON decoded where it is JSON."""
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json() if resp.content_type == "application/json" else await resp.text()
