"""A running proxy whose /metrics holds every series the shipped dashboard and alerts read, in every state the
dashboard's state panels name: backends up, drained, in maint and down, feedback agents answering and unreachable,
a node monitor reading management APIs that answer as a real node with a memory alarm did, one without, and none.
"""

from __future__ import annotations

import asyncio

import aiohttp

from tests.support.management_replay import replayed_management_api
from tests.support.metrics import samples
from tests.support.net import dead_port, free_port, tcp_server
from tests.support.proxy import run_proxy, service_config
from tests.support.waiting import wait_for


async def report_75_percent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"75%\n")
    await writer.drain()


async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()


# The series that exist only once something has answered: a health check, an agent, a management API poll.
FIRST_ANSWERS = (
    "rabbitproxy_backend_last_check_timestamp_seconds",
    "rabbitproxy_backend_agent_percent",
    "rabbitproxy_backend_agent_duration_seconds",
    "rabbitproxy_backend_rabbitmq_fds_used",
)


async def live_scrape() -> str:
    """/metrics of a proxy whose backends are up, drained, in maint and down, with agents and a node monitor.

    rabbit1's and rabbit3's management API answers as a real node with a memory alarm did, rabbit5's as a node
    without one; rabbit2's and rabbit4's agent and management ports have nothing listening; rabbit4 itself is down.
    """
    admin = f"127.0.0.1:{free_port()}"
    async with (
        tcp_server(hold) as port,
        tcp_server(report_75_percent) as agent_port,
        replayed_management_api() as mgmt_port,
        replayed_management_api(node="node", alarms="local_alarms_ok") as well_port,
    ):
        with dead_port() as dead:
            backends = [
                {"name": "rabbit1", "port": port, "agent_port": agent_port, "management_port": mgmt_port},
                {"name": "rabbit2", "port": port, "agent_port": dead, "management_port": dead},
                {"name": "rabbit3", "port": port, "agent_port": agent_port, "management_port": mgmt_port},
                {"name": "rabbit4", "port": dead, "agent_port": dead, "management_port": dead},
                {"name": "rabbit5", "port": port, "agent_port": agent_port, "management_port": well_port},
            ]
            svc = service_config(
                [{"address": "127.0.0.1", **b} for b in backends],
                health_check={"type": "tcp", "interval": 0.2, "timeout": 2.0, "rise": 1, "fall": 1},
                feedback={"type": "agent", "interval": 0.2, "timeout": 2.0},
                # With alarm_weight above 0 a node with an alarm stays "up" (at 0 its status is "drain").
                rabbitmq={"interval": 0.2, "timeout": 2.0, "alarm_weight": 50},
            )
            async with run_proxy(svc, admin={"listen": admin}), aiohttp.ClientSession() as http:
                for backend, state in (("rabbit2", "drain"), ("rabbit3", "maint")):
                    url = f"http://{admin}/api/services/amqp/backends/{backend}"
                    async with http.patch(url, json={"state": state, "force": True}) as r:
                        assert r.status == 200, await r.text()

                async def complete() -> str | None:
                    async with http.get(f"http://{admin}/metrics") as r:
                        assert r.status == 200
                        text = await r.text()
                    live = samples(text)
                    settled = {
                        key("rabbitproxy_backend_status", "rabbit4", status="down"): 1.0,
                        key("rabbitproxy_backend_rabbitmq_management_up", "rabbit2"): 0.0,
                        key("rabbitproxy_backend_rabbitmq_alarm", "rabbit1", kind="memory"): 1.0,
                        key("rabbitproxy_backend_agent_status", "rabbit2", status="unreachable"): 1.0,
                        key("rabbitproxy_backend_rabbitmq_management_up", "rabbit5"): 1.0,
                    }
                    ready = all(f"{name}{{" in text for name in FIRST_ANSWERS)
                    return text if ready and all(live.get(k) == v for k, v in settled.items()) else None

                return await wait_for(complete, what="every backend's state and first answers in /metrics")


def key(name: str, backend: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted({"service": "amqp", "backend": backend, **labels}.items()))
