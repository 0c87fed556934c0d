"""The bench's modules (bench/ is scripts, not a package), importable by tests, and the routes they test with."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import amqp_bench  # noqa: E402
import common  # noqa: E402
import idle_bench  # noqa: E402
import placement  # noqa: E402
import report  # noqa: E402
import tcp_bench  # noqa: E402

__all__ = ["BENCH", "ROUTES", "amqp_bench", "common", "idle_bench", "placement", "report", "tcp_bench"]

ROUTES = [
    common.Route("amqp", 15672, (("127.0.0.1", 5001), ("127.0.0.1", 5002))),
    common.Route("echo", 15673, (("127.0.0.1", 6001),), protocol="tcp"),
]
