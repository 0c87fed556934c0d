"""The memory-alarm scenario of the fault runs: publishers blocked by RabbitMQ, then released.

A memory alarm on any node blocks every publishing connection in the cluster: the broker stops reading them. The
paced publishers of the load (bench/fault_clients.py) send too little to notice (a few KiB wait in the socket
buffers), so the scenario adds one bulk publisher, as an application with a backlog would be: once the alarm is on
it publishes :data:`Bulk.messages` large messages with confirms, more than the socket buffers between it and the
broker hold, so the proxy in between has to stop reading it. Its heartbeat is a third of the hold
(:func:`heartbeat_for`), so a proxy that counted that silence as the client's would cut it within the hold
(after 2.5 heartbeats; issue 25), while the client itself does not give up: aiormq closes a connection it cannot
write a heartbeat to for 3 x (heartbeat + 1) s, whatever is in between (directly to RabbitMQ as well). Its message
ids are outside the publishers' range and go to the same queue, so the run's loss check covers them; its result has
the shape of a worker's, so the run's counting takes it as one.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from fault_clients import ID_BASE

# The watermark that raises the alarm at once on any node, and RabbitMQ's default that clears it.
ALARM_WATERMARK = "0.0000001"
DEFAULT_WATERMARK = "0.4"
# The bulk publisher's message ids: ``BULK_PUBLISHER * ID_BASE + n``, far from the paced publishers' indexes.
BULK_PUBLISHER = 900


def heartbeat_for(hold: float) -> int:
    """The bulk publisher's heartbeat for an alarm held ``hold`` seconds (pure; unit-tested).

    A third of the hold: 2.5 heartbeats (a proxy's heartbeat timeout) end within the hold, and aiormq's own limit
    on a connection it cannot write to, 3 x (heartbeat + 1), lies beyond it.
    """
    return max(1, int(hold // 3))


@dataclass(frozen=True)
class Bulk:
    """The bulk publisher: 32 MiB in all, several times what the kernel's socket buffers and the proxy hold."""

    messages: int = 32
    size: int = 1024 * 1024
    heartbeat: int = 3
    # How long after the release it may take to have every message confirmed (a busy machine, a quorum queue).
    settle: float = 120.0


class BulkPublisher:
    """Publishes the bulk in a thread with its own event loop, republishing what fails, until all are confirmed."""

    def __init__(self, url: str, queue: str, persistent: bool, bulk: Bulk = Bulk(), attempt: float = 600.0) -> None:
        self.url = f"{url}?heartbeat={bulk.heartbeat}&reconnect_interval=1&connection_timeout=5"
        self.queue = queue
        self.persistent = persistent
        self.bulk = bulk
        # Seconds one publish may wait for its confirm: longer than the alarm holds (a blocked publish waits for
        # it), but bounded, because a publish whose connection was cut under it may never be answered.
        self.attempt = attempt
        self.confirmed: list[int] = []
        self.reconnects = 0
        self.errors: Counter[str] = Counter()
        self.confirmed_at_release: int | None = None
        self._thread = threading.Thread(target=self._main, name="faults-bulk", daemon=True)
        self._failed: str | None = None

    def start(self) -> None:
        self._thread.start()

    def released(self) -> None:
        """The alarm was cleared: note how many messages had their confirm while it held (few: it blocked them)."""
        self.confirmed_at_release = len(self.confirmed)

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def result(self) -> dict[str, Any]:
        """What a worker process reports (bench/fault_clients.py), for the run's counting."""
        if self._thread.is_alive() or self._failed is not None:
            return {"failed": f"bulk publisher: {self._failed or 'still publishing'}"}
        if len(self.confirmed) < self.bulk.messages:
            return {"failed": f"bulk publisher: {len(self.confirmed)} of {self.bulk.messages} confirmed"}
        return {
            "confirmed": list(self.confirmed),
            "timelines": [],
            "publisher_ids": [],
            "delivered": [],
            "deliveries": 0,
            "reconnects": self.reconnects,
            "errors": {f"bulk: {k}": v for k, v in self.errors.items()},
        }

    def summary(self) -> dict[str, Any]:
        return {
            "messages": self.bulk.messages,
            "bytes": self.bulk.messages * self.bulk.size,
            "heartbeat": self.bulk.heartbeat,
            "confirmed": len(self.confirmed),
            "confirmed_while_blocked": self.confirmed_at_release,
            "reconnects": self.reconnects,
        }

    def _main(self) -> None:
        import uvloop

        try:
            uvloop.run(self._run())
        except BaseException as exc:  # noqa: BLE001 - reported in the run's row, never lost (a thread has no caller)
            self._failed = f"{type(exc).__name__}: {exc}"

    async def _run(self) -> None:
        import aio_pika
        import aiormq

        def on_reconnect(*_args: Any) -> None:
            self.reconnects += 1

        conn = await aio_pika.connect_robust(self.url, client_properties={"connection_name": "faults-bulk"})
        conn.reconnect_callbacks.add(on_reconnect)
        # A robust channel: after a reconnect it is opened again, and the failed publishes are sent again on it.
        channel = await conn.channel(publisher_confirms=True)
        mode = aio_pika.DeliveryMode.PERSISTENT if self.persistent else aio_pika.DeliveryMode.NOT_PERSISTENT
        body = b"b" * self.bulk.size
        deadline = time.monotonic() + 600.0

        async def one(n: int) -> None:
            mid = BULK_PUBLISHER * ID_BASE + n
            while time.monotonic() < deadline:
                msg = aio_pika.Message(body, message_id=str(mid), delivery_mode=mode)
                try:
                    async with asyncio.timeout(self.attempt):
                        ack = await channel.default_exchange.publish(msg, routing_key=self.queue, mandatory=True)
                except (
                    OSError,
                    aiormq.exceptions.AMQPError,
                    aio_pika.exceptions.AMQPError,
                    RuntimeError,
                    TimeoutError,
                ) as exc:
                    self.errors[type(exc).__name__] += 1
                    await asyncio.sleep(1.0)
                    continue
                except asyncio.CancelledError:
                    # aiormq fails a publish waiting on a connection that closed with CancelledError; only a
                    # cancellation of this task itself ends it.
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise
                    self.errors["connection closed under a publish"] += 1
                    await asyncio.sleep(1.0)
                    continue
                if isinstance(ack, aiormq.spec.Basic.Ack):
                    self.confirmed.append(mid)
                    return
                self.errors[type(ack).__name__] += 1
            raise TimeoutError(f"message {mid} never confirmed")

        try:
            await asyncio.gather(*(one(n) for n in range(self.bulk.messages)))
        finally:
            await asyncio.wait_for(conn.close(), 30)
