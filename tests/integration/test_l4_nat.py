"""``mode = "l4-nat"`` across real routing: the kernel forwards, rabbitproxy only steers (tests/support/l4net.py).

Every test runs ``rabbitproxy serve`` in the balancer namespace of a topology of its own (client, balancer with a
bridge, three backends whose default route is the balancer) and talks to the VIP from the client namespace. The
nft table has this process's id in its name; the namespaces, and so the table, are deleted whatever happens.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.l4net import (
    BACKEND_IPS,
    BRIDGE_IP,
    CLIENT_IP,
    PORT,
    VIP,
    BalancerProxy,
    Topology,
    l4_config,
    topology,
)
from tests.support.process import to_toml
from tests.support.waiting import wait_for_sync

SECOND_NODE = "10.233.2.14"
RELAY_PORT = 7002
TAG = f"rpl4{os.getpid() % 100000}"
TABLE = f"rp_l4_{os.getpid() % 100000}"


@pytest.fixture
def topo() -> Iterator[Topology]:
    with topology(TAG) as t:
        yield t


def usable_in_table(topo: Topology) -> str:
    return topo.nft("list", "table", "ip", TABLE, check=False)


def backend_view(topo: Topology, name: str) -> dict[str, Any]:
    service = topo.admin("GET", "/api/services/amqp")
    return next(b for b in service["backends"] if b["name"] == name)


def flows_totalling(flows: Callable[[], dict[str, int]], total: int) -> dict[str, int]:
    """The API's flow counters once they add up to ``total`` (a reading is reused for half a second)."""
    seen: dict[str, int] = {}

    def done() -> bool:
        seen.update(flows())
        return sum(seen.values()) == total

    wait_for_sync(done, timeout=15, what=f"flow counters adding up to {total}")
    return dict(seen)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("workers", [1, 2])
def test_weights_are_respected_and_the_backend_sees_the_client(topo: Topology, tmp_path: Path, workers: int) -> None:
    cfg = l4_config((100, 300, 0), table=TABLE, workers=workers)
    # An l7 service beside it: relayed by this process (by its workers with workers = 2), while the parent owns
    # the l4 table.
    relay = {"name": "relay", "listen": f"{VIP}:{RELAY_PORT}", "protocol": "tcp", "health_check": {"type": "none"},
             "backends": [{"name": "r0", "address": BACKEND_IPS[2], "port": PORT}]}  # fmt: skip
    cfg["services"].append(relay)
    with BalancerProxy(topo, cfg, tmp_path):
        relayed = topo.ask(f"count 20 {RELAY_PORT}")
        # The relay connects from the balancer's own address: the l7 path, not the kernel's DNAT.
        assert relayed["names"] == {"b2": 20} and relayed["peers"] == [BRIDGE_IP], relayed
        got = topo.ask("count 800")
        assert got["failed"] == 0
        names = got["names"]
        # Weight 0 takes nothing; 1:3 otherwise, with bounds wide enough for a random draw of 800 (expected 200
        # and 600, standard deviation about 12).
        assert "b2" not in names, names
        assert 120 <= names["b0"] <= 290, names
        assert names["b0"] + names["b1"] == 800
        # DNAT keeps the source: every backend saw the client namespace's own address.
        assert got["peers"] == [CLIENT_IP]
        # The kernel's counters reach the API (this process saw none of these connections) and /metrics.
        view = topo.admin("GET", "/api/services/amqp")
        assert view["mode"] == "l4-nat" and "no per-connection identity" in view["l4"]["note"]
        expected = {"b0": names["b0"], "b1": names["b1"], "b2": 0}

        def flows() -> dict[str, int]:
            return {b["name"]: b["l4"]["flows"] for b in topo.admin("GET", "/api/services/amqp")["backends"]}

        # Counter readings are reused for half a second; wait for them to show every flow.
        wait_for_sync(lambda: flows() == expected, timeout=10, what=f"the API's flows {expected}")
        metrics = topo.admin("GET", "/metrics")
        assert f'rabbitproxy_l4_backend_flows_total{{backend="b1",service="amqp"}} {float(names["b1"])}' in metrics


def test_a_drained_backend_takes_no_new_flows_and_keeps_its_established_ones(topo: Topology, tmp_path: Path) -> None:
    with BalancerProxy(topo, l4_config((100, 100, 100), table=TABLE), tmp_path):
        held = topo.ask("open 30")["names"]
        assert "b0" in held, held
        topo.admin("PATCH", "/api/services/amqp/backends/b0", {"state": "drain"})
        got = topo.ask("count 300")
        assert got["failed"] == 0 and "b0" not in got["names"], got
        # Every connection opened before the drain still works, those on b0 included.
        assert all(topo.ask("ping")["alive"])


def test_a_failed_backend_loses_new_flows_within_the_fall_time_and_its_flows_are_cut(
    topo: Topology, tmp_path: Path
) -> None:
    cfg = l4_config((100, 100, 100), table=TABLE)
    with BalancerProxy(topo, cfg, tmp_path):
        held = topo.ask("open 30")["names"]
        assert "b2" in held, held
        check = cfg["services"][0]["health_check"]
        # b2's check port stops answering; its data port (and the flows on it) stay up.
        topo.stop_check_port(2)
        began = time.monotonic()
        # Three backends of weight 100 drew from 300 numbers; without b2 the table draws from 200.
        wait_for_sync(lambda: "mod 200 vmap" in usable_in_table(topo), timeout=30, what="b2 out of the table")
        # fall x interval, plus a check timeout and the 0.1 s poll: a generous bound for a busy machine.
        assert time.monotonic() - began < check["fall"] * check["interval"] + check["timeout"] + 5.0
        got = topo.ask("count 300")
        assert got["failed"] == 0 and "b2" not in got["names"], got
        # on_marked_down = "close" (the default): b2's conntrack entries were deleted, so a packet on one of its
        # flows now opens a new one to another backend, which resets it; the others' flows are untouched.
        alive = topo.ask("ping")["alive"]
        assert [a for a, n in zip(alive, held, strict=True) if n == "b2"] == [False] * held.count("b2")
        assert all(a for a, n in zip(alive, held, strict=True) if n != "b2")


def test_the_rules_survive_a_sigkill_and_the_next_start_replaces_them(topo: Topology, tmp_path: Path) -> None:
    for run in ("1", "2"):
        (tmp_path / run).mkdir()
    first = BalancerProxy(topo, l4_config((100, 100, 100), table=TABLE), tmp_path / "1").start()
    first.kill()
    # The crashed proxy's table still forwards new flows to all three backends.
    got = topo.ask("count 120")
    assert got["failed"] == 0 and set(got["names"]) == {"b0", "b1", "b2"}, got
    # The next start writes its own table over it: b1 now has weight 0.
    with BalancerProxy(topo, l4_config((100, 0, 100), table=TABLE), tmp_path / "2"):
        got = topo.ask("count 120")
        assert got["failed"] == 0 and "b1" not in got["names"], got
        assert usable_in_table(topo).count("vmap") == 1
    # A clean stop removes it: the VIP refuses new flows (nothing listens on the balancer itself).
    assert usable_in_table(topo) == ""
    assert topo.ask("count 3")["failed"] == 3


def test_the_proxy_spends_no_cpu_per_forwarded_connection(topo: Topology, tmp_path: Path) -> None:
    with BalancerProxy(topo, l4_config((100, 100, 100), table=TABLE), tmp_path) as proxy:
        topo.ask("count 20")
        before, t0 = cpu_seconds(proxy.pid), time.monotonic()
        got = topo.ask("count 2000")
        used, wall = cpu_seconds(proxy.pid) - before, time.monotonic() - t0
        assert got["failed"] == 0 and sum(got["names"].values()) == 2000
        # What the proxy may spend meanwhile is its polls (10 a second, each a few list reads): a tenth of a
        # core-second per wall second is far above that and far below a relay's cost of 2,000 connections.
        assert used < 0.1 * wall + 0.2, f"{used:.2f} s of CPU in {wall:.1f} s for 2000 connections"


def test_a_rabbitmq_node_put_in_maintenance_gets_no_new_flows(topo: Topology, tmp_path: Path) -> None:
    # b0 and b2 are two clustered RabbitMQ nodes (in b0's namespace), b1 the plain backend. On 3.10 a drained node
    # is told from a dead one by the node monitor (its own management API refuses while its peer reports it
    # running) together with the health check (its AMQP listener is closed): docs/operations.md.
    ports = topo.start_brokers(0, SECOND_NODE, 5673)
    cfg = l4_config((100, 100, 100), table=TABLE, rabbitmq={"interval": 0.5})
    backends = cfg["services"][0]["backends"]
    backends[0].update(port=5673, check_port=5673, management_port=ports[0])
    backends[2].update(address=SECOND_NODE, port=5673, check_port=5673, management_port=ports[1])
    with BalancerProxy(topo, cfg, tmp_path):

        def flows() -> dict[str, int]:
            view = topo.admin("GET", "/api/services/amqp")
            return {b["name"]: b["l4"]["flows"] for b in view["backends"]}

        assert topo.ask("syn 90")["failed"] == 0
        assert flows_totalling(flows, 90)["b0"] > 0
        topo.broker_maintenance()
        wait_for_sync(lambda: backend_view(topo, "b0")["status"] == "maintenance", timeout=60, what="maintenance")
        before = flows_totalling(flows, 90)
        assert topo.ask("syn 90")["failed"] == 0
        after = flows_totalling(flows, 180)
        assert after["b0"] == before["b0"]


def test_a_reload_rewrites_the_table_and_an_api_weight_change_applies_at_once(topo: Topology, tmp_path: Path) -> None:
    with BalancerProxy(topo, l4_config((100, 100, 100), table=TABLE), tmp_path) as proxy:
        got = topo.ask("count 90")
        assert set(got["names"]) == {"b0", "b1", "b2"}, got
        proxy.config_path.write_text(to_toml(l4_config((0, 100, 100), table=TABLE)))
        topo.admin("POST", "/api/reload")
        got = topo.ask("count 90")
        assert got["failed"] == 0 and "b0" not in got["names"], got
        topo.admin("PATCH", "/api/services/amqp/backends/b1", {"weight": 0})
        got = topo.ask("count 60")
        assert got["names"] == {"b2": 60}, got


def test_without_cap_net_admin_the_proxy_refuses_to_start_naming_the_key(topo: Topology, tmp_path: Path) -> None:
    """In the balancer namespace (so that a failure to drop the capability could touch no shared table)."""
    proxy = BalancerProxy(topo, l4_config((100, 100, 100), table=TABLE), tmp_path)
    drop = ["setpriv", "--bounding-set=-net_admin,-net_raw", "--inh-caps=-all"]
    argv = proxy.argv()
    netns, serve = argv[:4], argv[4:]
    done = subprocess.run([*netns, *drop, *serve], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    assert f"services['amqp'].mode: \"l4-nat\" could not program nftables table '{TABLE}'" in done.stderr
    assert "Operation not permitted" in done.stderr
    assert usable_in_table(topo) == ""


def test_a_drain_deadline_cuts_the_flows_still_on_the_backend(topo: Topology, tmp_path: Path) -> None:
    with BalancerProxy(topo, l4_config((100, 100, 100), table=TABLE), tmp_path):
        held = topo.ask("open 30")["names"]
        assert "b0" in held, held
        topo.admin("PATCH", "/api/services/amqp/backends/b0", {"state": "drain", "deadline": 1.0})

        def b0_cut() -> bool:
            alive = topo.ask("ping")["alive"]
            return not any(a for a, n in zip(alive, held, strict=True) if n == "b0")

        wait_for_sync(b0_cut, timeout=30, interval=0.5, what="b0's flows cut at the deadline")
        alive = topo.ask("ping")["alive"]
        assert all(a for a, n in zip(alive, held, strict=True) if n != "b0")
