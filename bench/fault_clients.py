"""The load of the fault-injection runs: confirmed publishers and de-duplicating consumers in worker processes.

Every message carries a unique integer id (``publisher * 10**9 + sequence``) as its AMQP ``message_id``. A
publisher counts a message as confirmed only when the broker acked it; whatever failed (a nack, a return, a lost
connection, no confirm within ``confirm_timeout``) is republished with the same id once the robust connection is
back, which is what a careful application does. Consumers ack manually, after recording the id, so a message whose
ack was lost is delivered again and counted as a duplicate. The driver (``faults.py``) compares the confirmed ids
with the delivered ones.

Publishers stop when the driver sets ``stop``; consumers then keep draining until every publisher (in every worker)
has finished, the queue holds no ready message and no consumer but ours, and nothing arrived for ``idle`` seconds
(or ``drain_limit`` passed): :func:`drain_over`. The queue check is what lets ``idle`` be short without counting a
late message as lost.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

ID_BASE = 10**9


@dataclass(frozen=True)
class ClientLoad:
    """How much load each target gets. Bounded on purpose: the machine is shared and the rate must stay steady."""

    publishers: int = 4
    consumers: int = 2
    processes: int = 2
    # Messages per second per publisher; a paced rate makes "back to 90 %" well defined.
    rate: float = 25.0
    # Publishes in flight per publisher (confirms outstanding).
    window: int = 10
    size: int = 256
    prefetch: int = 50
    heartbeat: int = 10
    reconnect_interval: float = 1.0
    confirm_timeout: float = 5.0
    # Seconds without a delivery (once the queue is settled) before a consumer stops draining.
    idle: float = 6.0
    drain_limit: float = 90.0


@dataclass(frozen=True)
class Signals:
    """What the driver and the worker processes share (multiprocessing primitives of one context)."""

    # Set by the driver once the proxy takes clients: the workers are started before, so their imports overlap it.
    go: Any
    # Set by the driver: publishers stop, consumers start draining.
    stop: Any
    # Publishers that had their first confirm.
    ready: Any
    # Publishers that stopped and whose last publishes were confirmed or given up: the drain waits for all of them.
    finished: Any


@dataclass(frozen=True)
class Job:
    url: str
    queue: str
    persistent: bool
    load: ClientLoad
    publishers: tuple[int, ...]
    consumers: tuple[int, ...]


def split(load: ClientLoad) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Deal publishers and consumers out to the worker processes, round robin (pure)."""
    n = max(1, load.processes)
    pubs: list[list[int]] = [[] for _ in range(n)]
    cons: list[list[int]] = [[] for _ in range(n)]
    for i in range(load.publishers):
        pubs[i % n].append(i)
    for i in range(load.consumers):
        cons[(load.publishers + i) % n].append(i)
    return [(tuple(p), tuple(c)) for p, c in zip(pubs, cons, strict=True) if p or c]


def drain_over(
    now: float,
    *,
    stopped_at: float,
    last_delivery: float,
    publishers_left: int,
    ready_messages: int | None,
    consumers_on_queue: int | None,
    load: ClientLoad,
) -> bool:
    """Whether a consumer may stop draining (pure; unit-tested).

    Only once no publisher can still get a confirm, the queue has no ready message (``None``: it could not be asked)
    and no consumer beyond the harness's own (a stale one, on a node that died or froze, still holds unacked
    deliveries that the broker will requeue once it notices), and nothing arrived for ``load.idle`` seconds. A
    confirmed message that is still on its way would otherwise be counted as lost. After ``load.drain_limit``
    seconds it stops anyway: what is left is then reported as left in the queue.
    """
    if now - stopped_at > load.drain_limit:
        return True
    settled = (
        publishers_left <= 0
        and ready_messages == 0
        and consumers_on_queue is not None
        and consumers_on_queue <= load.consumers
    )
    return settled and now - max(last_delivery, stopped_at) > load.idle


def client_url(base: str, load: ClientLoad) -> str:
    return f"{base}?heartbeat={load.heartbeat}&reconnect_interval={load.reconnect_interval}&connection_timeout=5"


async def _work(job: Job, signals: Signals) -> dict[str, Any]:
    import aio_pika
    import aiormq

    stop, ready = signals.stop, signals.ready
    load = job.load
    url = client_url(job.url, load)
    errors: Counter[str] = Counter()
    reconnects = 0
    connections: list[Any] = []
    confirmed: list[int] = []
    timelines: list[dict[int, int]] = []
    # The publisher index of each timeline, in the same order.
    publisher_ids: list[int] = []
    delivered: list[list[int]] = []
    deliveries = 0
    body = b"x" * load.size
    mode = aio_pika.DeliveryMode.PERSISTENT if job.persistent else aio_pika.DeliveryMode.NOT_PERSISTENT

    def on_reconnect(*_args: Any) -> None:
        nonlocal reconnects
        reconnects += 1

    async def connect(name: str) -> Any:
        # The first connect may land on a node that is still settling; retry like an application would.
        for attempt in range(30):
            try:
                conn = await aio_pika.connect_robust(url, client_properties={"connection_name": name})
            except (OSError, aiormq.exceptions.AMQPError, TimeoutError, ConnectionError) as exc:
                errors[f"connect: {type(exc).__name__}"] += 1
                await asyncio.sleep(min(2.0, 0.2 * (attempt + 1)))
                continue
            conn.reconnect_callbacks.add(on_reconnect)
            connections.append(conn)
            return conn
        raise ConnectionError(f"{name}: could not connect to {job.url}")

    async def publish_one(exchange: Any, mid: int) -> bool:
        msg = aio_pika.Message(body, message_id=str(mid), delivery_mode=mode)
        try:
            async with asyncio.timeout(load.confirm_timeout):
                ack = await exchange.publish(msg, routing_key=job.queue, mandatory=True)
        except (OSError, aiormq.exceptions.AMQPError, aio_pika.exceptions.AMQPError, TimeoutError, RuntimeError) as e:
            errors[type(e).__name__] += 1
            return False
        if isinstance(ack, aiormq.spec.Basic.Ack):
            return True
        errors[type(ack).__name__] += 1
        return False

    async def publisher(i: int) -> None:
        timeline: dict[int, int] = {}
        timelines.append(timeline)
        publisher_ids.append(i)
        conn = await connect(f"faults-pub-{i}")
        channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
        exchange = channel.default_exchange
        seq = 0
        retry: list[int] = []
        in_flight = asyncio.Semaphore(load.window)
        tasks: set[asyncio.Task[None]] = set()
        failed_at = 0.0
        first = True

        async def one(mid: int) -> None:
            nonlocal failed_at, first
            try:
                if await publish_one(exchange, mid):
                    confirmed.append(mid)
                    now = int(time.time())
                    timeline[now] = timeline.get(now, 0) + 1
                    if first:
                        first = False
                        with ready.get_lock():
                            ready.value += 1
                else:
                    retry.append(mid)
                    failed_at = time.monotonic()
            finally:
                in_flight.release()

        # One message every 1/rate seconds, up to ``window`` awaiting their confirms: a smooth rate that a confirm
        # latency of up to window/rate seconds does not slow down.
        period = 1 / load.rate
        next_at = time.monotonic()
        while not stop.is_set():
            await in_flight.acquire()
            if time.monotonic() - failed_at < 0.2:
                # The robust connection reconnects in the background; retrying at once would only spin.
                await asyncio.sleep(0.2)
            if retry:
                mid = retry.pop(0)
            else:
                mid = i * ID_BASE + seq
                seq += 1
            task = asyncio.create_task(one(mid))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            next_at += period
            lag = next_at - time.monotonic()
            if lag > 0:
                await asyncio.sleep(lag)
            elif lag < -1.0:
                # Fell behind (a fault): carry on at the paced rate instead of bursting to catch up.
                next_at = time.monotonic()
        # Publishes still in flight count if they are confirmed; they end within confirm_timeout.
        try:
            await asyncio.gather(*tasks)
        finally:
            with signals.finished.get_lock():
                signals.finished.value += 1

    async def consumer(i: int) -> None:
        nonlocal deliveries
        seen: set[int] = set()
        ids: list[int] = []
        delivered.append(ids)
        last = time.monotonic()
        conn = await connect(f"faults-con-{i}")
        channel = await conn.channel()
        await channel.set_qos(prefetch_count=load.prefetch)
        # Passive: the robust channel declares it again after a reconnect, and must not disagree with its arguments.
        queue = await channel.declare_queue(job.queue, passive=True)

        async def on_message(message: Any) -> None:
            nonlocal deliveries, last
            deliveries += 1
            last = time.monotonic()
            mid = int(message.message_id)
            if mid not in seen:
                seen.add(mid)
                ids.append(mid)
            try:
                await message.ack()
            except (OSError, aiormq.exceptions.AMQPError, aio_pika.exceptions.AMQPError, RuntimeError) as exc:
                # The delivery stays unacked on a dead channel; the broker redelivers it (a duplicate, counted).
                errors[f"ack: {type(exc).__name__}"] += 1

        await queue.consume(on_message)
        while not stop.is_set():
            await asyncio.sleep(0.25)
        stopped_at = time.monotonic()
        ready_messages: int | None = None
        consumers_on_queue: int | None = None
        while True:
            await asyncio.sleep(0.25)
            publishers_left = load.publishers - signals.finished.value
            if publishers_left <= 0:
                # A passive declare on the consuming channel: the queue's ready messages and its consumers.
                try:
                    ok = await queue.declare(timeout=2)
                except (OSError, aiormq.exceptions.AMQPError, aio_pika.exceptions.AMQPError, TimeoutError) as exc:
                    errors[f"drain check: {type(exc).__name__}"] += 1
                    ready_messages = consumers_on_queue = None
                else:
                    ready_messages, consumers_on_queue = ok.message_count, ok.consumer_count
            if drain_over(
                time.monotonic(),
                stopped_at=stopped_at,
                last_delivery=last,
                publishers_left=publishers_left,
                ready_messages=ready_messages,
                consumers_on_queue=consumers_on_queue,
                load=load,
            ):
                return

    async def guarded(coro: Any) -> None:
        try:
            await coro
        except Exception as exc:  # noqa: BLE001 - a role that died is reported and counted, never hidden
            errors[f"role died: {type(exc).__name__}"] += 1

    try:
        await asyncio.gather(
            *(guarded(consumer(i)) for i in job.consumers), *(guarded(publisher(i)) for i in job.publishers)
        )
    finally:
        for c in connections:
            try:
                await asyncio.wait_for(c.close(), 10)
            except (TimeoutError, OSError, aiormq.exceptions.AMQPError, ConnectionError):
                errors["close"] += 1
    return {
        "confirmed": confirmed,
        "timelines": timelines,
        "publisher_ids": publisher_ids,
        "delivered": delivered,
        "deliveries": deliveries,
        "reconnects": reconnects,
        "errors": dict(errors),
    }


def worker_main(job: Job, signals: Signals, out: Any) -> None:
    import logging

    import aio_pika  # noqa: F401 - imported before ``go``, while the driver starts the proxy
    import uvloop

    # aiormq logs a traceback for every connection a fault breaks; the errors are counted instead.
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)
    logging.getLogger("aio_pika").setLevel(logging.CRITICAL)

    try:
        if not signals.go.wait(120):
            raise TimeoutError("the driver never said go")
        out.put(uvloop.run(_work(job, signals)))
    except BaseException as exc:  # noqa: BLE001 - the driver must hear of every failure
        out.put({"failed": f"{type(exc).__name__}: {exc}"})
