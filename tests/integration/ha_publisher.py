"""A confirmed publisher for test_ha_pair: runs in the client namespace, talks to the VIP, reports on stdout.

``python -m tests.integration.ha_publisher URL QUEUE``: publishes 0, 1, 2, ... as persistent messages to QUEUE
through the default exchange on a channel with publisher confirms, over an aio-pika ``connect_robust``
connection, and prints ``confirmed N`` once the broker has confirmed message N. A publish that fails (the proxy
died, the connection is being recovered) is retried with the same number, so every number printed is in the queue,
some perhaps twice. Errors are printed as ``error N ...`` for the test's failure message. Runs until killed.
"""

from __future__ import annotations

import asyncio
import sys

import aio_pika

# Short, so that recovery is paced by the VIP moving and not by the client's back-off.
RECONNECT_INTERVAL = 0.3
PUBLISH_TIMEOUT = 5.0
PAUSE = 0.02  # Between messages: a steady trickle, not a load test.
RETRY_PAUSE = 0.1


async def main(url: str, queue: str) -> None:
    connection = await aio_pika.connect_robust(url, reconnect_interval=RECONNECT_INTERVAL, timeout=5)
    channel = await connection.channel(publisher_confirms=True)
    print("connected", flush=True)
    n = 0
    while True:
        message = aio_pika.Message(str(n).encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        try:
            await asyncio.wait_for(channel.default_exchange.publish(message, routing_key=queue), PUBLISH_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - any failure means: not confirmed, try the same number again
            print(f"error {n} {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            await asyncio.sleep(RETRY_PAUSE)
            continue
        print(f"confirmed {n}", flush=True)
        n += 1
        await asyncio.sleep(PAUSE)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
