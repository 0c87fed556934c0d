"""One RabbitMQ node's operating-system side: its wrapper process, whether it is paused, and stopping it.

:class:`~rabbitproxy.dev.cluster.DevCluster` decides what the cluster does (boot order, joins, retries); this
module only runs, freezes and ends the processes of one node, which is the part that has to be right about
process trees (the wrapper shell, the Erlang VM below it and the helpers that run in sessions of their own).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rabbitproxy.dev import nodes, processes
from rabbitproxy.dev.ctl import DevClusterError
from rabbitproxy.dev.nodes import Node

STOP_GRACE = 30.0


class NodeProcess:
    """The running (or stopped) processes of one node."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False
        # Killed or stopped on purpose: its exit is not a startup failure.
        self.down = False

    def spawn(self, argv: list[str], home: Path, root: Path | None = None) -> None:
        """Start ``rabbitmq-server`` (``argv``) for this node, its output appended to the node's stdout file.

        With a ``root`` the node runs chrooted there (``argv`` starts with ``chroot``): its paths are given as seen
        from inside, its working directory is the root's /.
        """
        node = self.node
        # A pid file left by the previous run would make the boot wait ask the CLI too early.
        node.pid_file.unlink(missing_ok=True)
        with node.stdout_file.open("ab") as out:
            self.down = False
            self.proc = subprocess.Popen(
                argv,
                env=nodes.node_env(node, home, root),
                cwd=node.dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Own session: a Ctrl-C in the caller's terminal does not reach the brokers, and the
                # whole process group can be killed at once.
                start_new_session=True,
            )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def responsive(self) -> bool:
        return self.alive and not self.paused

    def tree(self) -> list[Any]:
        """The wrapper shell and everything below it, while they can still be found from the wrapper."""
        return processes.process_tree(self.proc)

    def beam_pid(self) -> int | None:
        """PID of the node's Erlang VM (beam.smp), or None when it is not running."""
        return processes.beam_pid(self.tree())

    def pause(self) -> None:
        """Freeze the Erlang VM (SIGSTOP): it keeps its sockets but answers nothing."""
        pid = self._require_beam()
        os.kill(pid, signal.SIGSTOP)
        self.paused = True
        self._await_stopped_state(pid, stopped=True)

    def resume(self) -> None:
        """Let a paused VM run again (SIGCONT)."""
        pid = self._require_beam()
        os.kill(pid, signal.SIGCONT)
        self.paused = False
        self._await_stopped_state(pid, stopped=False)

    def kill(self, tree: list[Any] | None = None) -> None:
        """SIGKILL everything the node started; ``tree`` is a tree() snapshot taken while it ran."""
        proc = self.proc
        if proc is None:
            return
        self.down = True
        self.paused = False
        try:
            processes.kill_tree(proc, self.tree() if tree is None else tree)
        except subprocess.TimeoutExpired as exc:
            raise DevClusterError(f"{self.node.name} (pid {proc.pid}) survived SIGKILL") from exc

    def stop(self, ctl_stop: Callable[[], None], log: Callable[[str], None]) -> None:
        """Stop gracefully with ``ctl_stop`` (``rabbitmqctl stop``), then kill whatever is left."""
        proc = self.proc
        if proc is None:
            return
        tree = self.tree()
        if proc.poll() is None:
            if self.paused:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(processes.beam_pid(tree) or proc.pid, signal.SIGCONT)
            deadline = time.monotonic() + STOP_GRACE
            try:
                ctl_stop()
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
                log(f"rabbitmqctl stop failed on {self.node.name}: {exc}")
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log(f"{self.node.name} did not stop within {STOP_GRACE:.0f}s; killing it")
        # The tree was taken while the wrapper ran: helpers the VM left behind are found only through it.
        self.kill(tree)

    def _require_beam(self) -> int:
        pid = self.beam_pid()
        if pid is None:
            raise DevClusterError(f"{self.node.name} is not running")
        return pid

    def _await_stopped_state(self, pid: int, *, stopped: bool) -> None:
        if not processes.await_stopped_state(pid, stopped=stopped, timeout=STOP_GRACE):
            state = "stop" if stopped else "continue"
            raise DevClusterError(f"{self.node.name} (pid {pid}) did not {state} within {STOP_GRACE:.0f}s")
