"""Process-tree helpers for devcluster: find, freeze-wait and kill everything a wrapper script started.

A RabbitMQ node is a shell wrapper, the Erlang VM below it and a few helpers; the helpers run in sessions of
their own, so a process group kill alone does not reach them. These functions work on snapshots of the tree
taken while the wrapper still runs, because once it has exited its children can no longer be found from it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import psutil

_T = TypeVar("_T")

# How long to wait for a SIGKILLed process to be reaped before calling it a survivor.
KILL_WAIT = 30.0


def process_tree(proc: subprocess.Popen[bytes] | None) -> list[psutil.Process]:
    """The running wrapper and everything below it; empty once the wrapper has exited."""
    if proc is None or proc.poll() is not None:
        return []
    try:
        root = psutil.Process(proc.pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def beam_pid(tree: list[psutil.Process]) -> int | None:
    """PID of the Erlang VM (beam.smp) in a process tree, or None."""
    for proc in tree:
        with contextlib.suppress(psutil.Error):
            if proc.name().startswith("beam"):
                return int(proc.pid)
    return None


def kill_tree(proc: subprocess.Popen[bytes], tree: list[psutil.Process]) -> None:
    """SIGKILL the wrapper ``proc`` and the ``tree`` snapshot below it, then reap the wrapper.

    Raises subprocess.TimeoutExpired when the wrapper is still there :data:`KILL_WAIT` seconds later.
    """
    # Only a wrapper we have not reaped yet still owns its pid, and so its process group id; after that,
    # killpg could hit an unrelated group that reuses the number.
    owns_group = proc.poll() is None
    # The VM and its helpers go first, so the wrapper shell is still there to reap the VM; killing the
    # wrapper first would leave that to init.
    for member in tree[1:]:
        with contextlib.suppress(psutil.Error):
            if member.name() != "epmd":  # shared with every other Erlang node on the machine
                member.kill()
    if owns_group:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=KILL_WAIT)


def await_stopped_state(pid: int, *, stopped: bool, timeout: float) -> bool:
    """Wait until the process is (or is no longer) stopped by SIGSTOP; False when ``timeout`` passed first."""
    # Signal delivery is asynchronous; callers promise a frozen (or thawed) process when they return.
    deadline = time.monotonic() + timeout
    while (psutil.Process(pid).status() == psutil.STATUS_STOPPED) != stopped:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a text file, or why it could not be read."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"({exc})"
    return "\n".join(text.splitlines()[-lines:])


def run_in_parallel(items: Sequence[_T], work: Callable[[_T, threading.Event], None]) -> None:
    """Run ``work(item, abort)`` for every item in threads; the first error sets ``abort`` and is raised.

    ``work`` should return soon after ``abort`` is set. The other threads are not waited for after an error:
    the caller's cleanup (killing the nodes they wait on) is what ends any subprocess call they are blocked in.
    """
    abort = threading.Event()

    def run(item: _T) -> None:
        try:
            work(item, abort)
        except BaseException:
            abort.set()  # the other threads give up at their next check instead of at their deadline
            raise

    pool = ThreadPoolExecutor(max_workers=max(1, len(items)), thread_name_prefix="devcluster-wait")
    try:
        futures = [pool.submit(run, item) for item in items]
        done, _ = concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
        for future in done:
            if (error := future.exception()) is not None:
                raise error
    finally:
        abort.set()
        pool.shutdown(wait=False, cancel_futures=True)
