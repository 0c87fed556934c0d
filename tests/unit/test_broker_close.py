"""Issue 13 part B, the pure parts: the close rate, the broker's name of a proxied connection, drain deadlines on
the command line, and the rebalancer's decisions."""

from __future__ import annotations

import pytest

from rabbitproxy import config as config_mod
from rabbitproxy.balancing.pool import Pool
from rabbitproxy.balancing.rebalance import Share, balances, held, to_close
from rabbitproxy.cli import parse_duration
from rabbitproxy.control.closer import TokenBucket, broker_connection_name

# -- token bucket ----------------------------------------------------------------------------------------------------


def test_the_bucket_spaces_closes_evenly_at_the_rate() -> None:
    bucket = TokenBucket(rate=20.0, now=100.0)
    waits = [bucket.reserve(100.0) for _ in range(5)]
    # The first goes at once, each next one 1/20 s after the one before.
    assert waits == pytest.approx([0.0, 0.05, 0.10, 0.15, 0.20])


def test_the_bucket_never_allows_more_than_the_rate_in_any_second() -> None:
    bucket = TokenBucket(rate=10.0, now=0.0)
    now = 0.0
    times = []
    for _ in range(50):
        now += bucket.reserve(now)
        times.append(now)
    for i, t in enumerate(times):
        in_window = [u for u in times[i:] if u < t + 1.0]
        assert len(in_window) <= 10


def test_the_bucket_refills_while_idle_but_only_up_to_its_burst() -> None:
    bucket = TokenBucket(rate=2.0, now=0.0, burst=3.0)
    assert [bucket.reserve(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.reserve(0.0) == pytest.approx(0.5)
    # A long pause refills three tokens, not thousands.
    assert [bucket.reserve(1000.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.reserve(1000.0) == pytest.approx(0.5)


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1.0), (-1.0, 1.0), (5.0, 0.5)])
def test_the_bucket_refuses_nonsense(rate: float, burst: float) -> None:
    with pytest.raises(ValueError, match="rate must be positive"):
        TokenBucket(rate, 0.0, burst)


# -- the broker's name of a connection -------------------------------------------------------------------------------


def test_without_a_proxy_header_the_broker_sees_the_proxy_as_the_client() -> None:
    name = broker_connection_name(("127.0.0.1", 40001), ("127.0.0.1", 5672), None)
    assert name == "127.0.0.1:40001 -> 127.0.0.1:5672"


def test_with_a_proxy_header_the_broker_names_both_ends_from_the_header() -> None:
    header = (("10.9.8.7", 51234), ("192.0.2.1", 5672))
    name = broker_connection_name(("127.0.0.1", 40001), ("127.0.0.2", 5673), header)
    # The client's address and the proxy's listener, as the header said: not the broker's own socket (3.10.8).
    assert name == "10.9.8.7:51234 -> 192.0.2.1:5672"


def test_ipv6_ends_are_bracketed_as_the_broker_prints_them() -> None:
    name = broker_connection_name(("::1", 40001), ("::1", 5672), None)
    assert name == "[::1]:40001 -> [::1]:5672"


@pytest.mark.parametrize("header", [(None, ("192.0.2.1", 5672)), (("10.9.8.7", 51234), None), (None, None)])
def test_a_proxy_header_without_addresses_leaves_the_name_unknown(
    header: tuple[tuple[str, int] | None, tuple[str, int] | None],
) -> None:
    assert broker_connection_name(("127.0.0.1", 40001), ("127.0.0.1", 5672), header) is None


# -- drain deadlines on the command line -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("300", 300.0), ("90s", 90.0), ("5m", 300.0), ("1h", 3600.0), ("1.5h", 5400.0), (" 2M ", 120.0)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "5 minutes", "-5m", "0", "0s", "inf", "nan", "5d"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


# -- the rebalancer's decisions --------------------------------------------------------------------------------------


def _shares(*actives: int, weights: tuple[int, ...] | None = None) -> list[Share]:
    weights = weights or tuple(100 for _ in actives)
    return [Share(f"rabbit{i + 1}", a, w) for i, (a, w) in enumerate(zip(actives, weights, strict=True))]


def test_after_a_restart_the_two_crowded_nodes_give_up_their_excess() -> None:
    balance = balances(_shares(15, 15, 0))
    assert [round(b.share, 3) for b in balance] == [0.5, 0.5, 0.0]
    assert [round(b.fair, 3) for b in balance] == [0.333, 0.333, 0.333]
    assert to_close(balance, 0.25) == {"rabbit1": 5, "rabbit2": 5}


def test_within_tolerance_nothing_is_closed() -> None:
    assert to_close(balances(_shares(12, 10, 8)), 0.25) == {}
    assert to_close(balances(_shares(0, 0, 0)), 0.25) == {}


def test_shares_follow_the_weights() -> None:
    # rabbit1 weighs as much as the other two together: 20 of 40 is its fair share, 30 is too many.
    balance = balances(_shares(30, 5, 5, weights=(200, 100, 100)))
    assert to_close(balance, 0.25) == {"rabbit1": 10}


def test_backends_without_weight_take_no_part() -> None:
    # A node that is down or drained (weight 0) neither counts towards the total nor receives a share.
    balance = balances(_shares(10, 10, 7, weights=(100, 100, 0)))
    assert [b.name for b in balance] == ["rabbit1", "rabbit2"]
    assert to_close(balance, 0.25) == {}


def test_only_backends_over_for_long_enough_are_named() -> None:
    assert to_close(balances(_shares(15, 15, 0)), 0.25, over=["rabbit2"]) == {"rabbit2": 5}


def test_a_handful_of_connections_is_never_moved_back_and_forth() -> None:
    # One connection, two nodes: whichever holds it is "over", but moving it would only make the other one over.
    assert to_close(balances(_shares(1, 0)), 0.25) == {}
    # Two on one of three: one moves, and 1/1/0 is then left alone.
    assert to_close(balances(_shares(2, 0, 0)), 0.25) == {"rabbit1": 1}
    assert to_close(balances(_shares(1, 1, 0)), 0.25) == {}


def test_crowded_backends_are_held_while_another_is_below_its_share() -> None:
    assert held(balances(_shares(10, 10, 0))) == {"rabbit1", "rabbit2"}
    # 28 connections: 9.33 each is fair, so 8 is a whole connection short and 10 is at or above the share.
    assert held(balances(_shares(10, 10, 8))) == {"rabbit1", "rabbit2"}
    assert held(balances(_shares(10, 10, 9))) == set()
    assert held(balances(_shares(10, 10, 10))) == set()
    assert held(balances(_shares(11, 10, 10))) == set()


# -- the pool honours a hold but never refuses because of it ---------------------------------------------------------


def _pool() -> Pool:
    cfg = config_mod.validate(
        {
            "services": [
                {
                    "name": "amqp",
                    "health_check": {"type": "none"},
                    "backends": [
                        {"name": "rabbit1", "address": "127.0.0.1", "port": 1},
                        {"name": "rabbit2", "address": "127.0.0.1", "port": 2},
                        {"name": "rabbit3", "address": "127.0.0.1", "port": 3},
                        {"name": "spare", "address": "127.0.0.1", "port": 4, "backup": True},
                    ],
                }
            ]
        }
    )
    return Pool.from_config(cfg.services[0], healthy=True)


def test_new_connections_go_to_the_backends_not_held() -> None:
    pool = _pool()
    pool.by_name["rabbit1"].rebalance_hold = True
    pool.by_name["rabbit2"].rebalance_hold = True
    assert {pool.choose().name for _ in range(20)} == {"rabbit3"}  # type: ignore[union-attr]


def test_held_backends_still_take_clients_when_nothing_else_can() -> None:
    pool = _pool()
    for name in ("rabbit1", "rabbit2"):
        pool.by_name[name].rebalance_hold = True
    r3 = pool.by_name["rabbit3"]
    # A retry that failed on the only backend not held goes to a held one, not to the backup or nowhere.
    chosen = {pool.choose(exclude=[r3]).name for _ in range(20)}  # type: ignore[union-attr]
    assert chosen == {"rabbit1", "rabbit2"}
    r3.healthy = False
    assert {pool.choose().name for _ in range(20)} == {"rabbit1", "rabbit2"}  # type: ignore[union-attr]


def test_backups_still_open_only_when_no_regular_backend_is_usable() -> None:
    pool = _pool()
    for name in ("rabbit1", "rabbit2", "rabbit3"):
        pool.by_name[name].rebalance_hold = True
    assert pool.choose().name != "spare"  # type: ignore[union-attr]
    assert pool.choose(exclude=[pool.by_name[n] for n in ("rabbit1", "rabbit2", "rabbit3")]) is None
    for name in ("rabbit1", "rabbit2", "rabbit3"):
        pool.by_name[name].healthy = False
    assert pool.choose().name == "spare"  # type: ignore[union-attr]


# -- the CLI sends what it parsed ------------------------------------------------------------------------------------


def test_backend_drain_sends_the_deadline_in_seconds_and_force(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from rabbitproxy.admin import client as client_mod
    from rabbitproxy.cli import app

    sent: list[dict[str, object]] = []

    def fake_request(self: object, method: str, path: str, body: object = None) -> object:
        assert (method, path) == ("PATCH", "/api/services/amqp/backends/rabbit1")
        sent.append(body)  # type: ignore[arg-type]
        return {
            "status": "drain",
            "operator_state": "drain",
            "connections": {"active": 20},
            "closed_connections": 0,
            "deadline": 300.0,
        }

    monkeypatch.setattr(client_mod.AdminClient, "request", fake_request)
    result = CliRunner().invoke(app, ["backend", "drain", "amqp", "rabbit1", "--deadline", "5m", "--force"])
    assert result.exit_code == 0, result.output
    assert sent == [{"state": "drain", "deadline": 300.0, "force": True}]
    assert "closed through the broker in 300 s" in result.output
    bad = CliRunner().invoke(app, ["backend", "drain", "amqp", "rabbit1", "--deadline", "soon"])
    assert bad.exit_code == 2
    assert "--deadline" in bad.stderr
    assert len(sent) == 1
