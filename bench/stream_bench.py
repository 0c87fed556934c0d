"""Stream protocol throughput through a ``protocol = "stream"`` service against direct connections to the nodes.

    .venv/bin/python bench/stream_bench.py --quick --json out/stream.json     # about a minute after the cluster boots

A local 3-node RabbitMQ 4.0 cluster (``rabbitproxy.dev.cluster``, streams on) advertises each node's real stream
address, so the same unmodified client (rstream, plain mode) works both ways: ``direct`` bootstraps on a node and
follows the metadata to the leader (publishing) or a replica (consuming); ``rabbitproxy`` bootstraps on the proxy's
service port and follows the rewritten metadata to the nodes' ``node_port`` listeners. Each run publishes N messages
of SIZE bytes with publisher confirms (the client's own batching; the run ends when the last confirm arrived) and
then consumes them from the first offset; the proxy (``rabbitproxy serve``, one process, uvloop) has its CPU read
over each phase, given per million messages. Targets are interleaved within each repeat; medians are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import common  # noqa: E402
from common import Proc, fmt, markdown_table, median  # noqa: E402
from rich.console import Console  # noqa: E402
from rstream import AMQPMessage, ConsumerOffsetSpecification, MessageContext, OffsetType  # noqa: E402
from rstream import Consumer as StreamConsumer  # noqa: E402
from rstream import Producer as StreamProducer  # noqa: E402

from rabbitproxy.dev.cluster import DevCluster  # noqa: E402
from rabbitproxy.dev.nodes import Node  # noqa: E402

# The target: through the proxy at least this fraction of the direct throughput, both ways.
TARGET_RATIO = 0.9

TARGETS = ("direct", "rabbitproxy")
CREDENTIALS: dict[str, Any] = {"username": "guest", "password": "guest"}
console = Console(stderr=True, width=170)


def proxy_config(cluster: DevCluster, listen_port: int) -> str:
    lines = [
        "[admin]",
        "enabled = false",
        "[log]",
        'level = "warning"',
        "[[services]]",
        'name = "streams"',
        f'listen = "127.0.0.1:{listen_port}"',
        'protocol = "stream"',
        "[services.health_check]",
        "interval = 1.0",
    ]
    for node in cluster.nodes:
        lines += [
            "[[services.backends]]",
            f'name = "rabbit{node.index}"',
            'address = "127.0.0.1"',
            f"port = {node.stream_port}",
            f"node_port = {common.free_port()}",
        ]
    return "\n".join(lines) + "\n"


async def publish(host: str, port: int, stream: str, count: int, size: int) -> float:
    """Seconds to publish ``count`` messages and receive every confirm."""
    body = b"x" * size
    confirmed = 0
    done = asyncio.Event()

    async def on_confirm(status: Any) -> None:
        nonlocal confirmed
        confirmed += 1
        if confirmed == count:
            done.set()

    async with StreamProducer(host, port, **CREDENTIALS) as producer:
        await producer.create_stream(stream, exists_ok=True)
        began = time.perf_counter()
        for _ in range(count):
            await producer.send(stream, AMQPMessage(body=body), on_publish_confirm=on_confirm)
        await asyncio.wait_for(done.wait(), 300)
        return time.perf_counter() - began


async def consume(host: str, port: int, stream: str, count: int) -> float:
    """Seconds to read ``count`` messages from the first offset (from subscribe to the last message)."""
    received = 0
    done = asyncio.Event()

    async def on_message(_message: bytes, _context: MessageContext) -> None:
        nonlocal received
        received += 1
        if received == count:
            done.set()

    consumer = StreamConsumer(host, port, **CREDENTIALS)
    await consumer.start()
    try:
        began = time.perf_counter()
        first = ConsumerOffsetSpecification(OffsetType.FIRST, None)
        await consumer.subscribe(stream, on_message, offset_specification=first)
        await asyncio.wait_for(done.wait(), 300)
        return time.perf_counter() - began
    finally:
        await consumer.close()


async def delete(host: str, port: int, stream: str) -> None:
    async with StreamProducer(host, port, **CREDENTIALS) as producer:
        await producer.delete_stream(stream)


async def one_run(target: str, addr: tuple[str, int], pid: int | None, count: int, size: int) -> dict[str, float]:
    stream = f"bench-{target}-{uuid.uuid4().hex[:8]}"
    cpu0 = common.cpu_seconds(pid) if pid else 0.0
    pub = await publish(*addr, stream, count, size)
    cpu1 = common.cpu_seconds(pid) if pid else 0.0
    con = await consume(*addr, stream, count)
    cpu2 = common.cpu_seconds(pid) if pid else 0.0
    await delete(*addr, stream)
    per_million = 1e6 / count
    return {
        "publish_msgs_per_s": count / pub,
        "consume_msgs_per_s": count / con,
        "publish_cpu_s_per_million": (cpu1 - cpu0) * per_million if pid else float("nan"),
        "consume_cpu_s_per_million": (cpu2 - cpu1) * per_million if pid else float("nan"),
    }


def advertise_real_address(node: Node) -> list[str]:
    # Direct clients follow the metadata to the node's own listener; the proxy learns the same and rewrites it.
    return ["stream.advertised_host = 127.0.0.1", f"stream.advertised_port = {node.stream_port}"]


async def run(count: int, size: int, repeats: int, workdir: Path) -> dict[str, Any]:
    cluster = DevCluster(3, release="4.0", stream=True, node_config=advertise_real_address)
    await asyncio.to_thread(cluster.start)
    proc: Proc | None = None
    try:
        listen_port = common.free_port()
        (workdir / "rabbitproxy.toml").write_text(proxy_config(cluster, listen_port))
        argv = [sys.executable, "-m", "rabbitproxy", "serve", "--config", str(workdir / "rabbitproxy.toml")]
        proc = Proc("rabbitproxy", [*argv, "--loop", "uvloop"], workdir / "out.log").start()
        common.wait_port(listen_port, proc=proc.popen)
        # The proxy serves once its checks have answered; give the stream checks a moment to learn every node.
        await asyncio.sleep(3.0)
        addrs = {"direct": ("127.0.0.1", cluster.nodes[0].stream_port), "rabbitproxy": ("127.0.0.1", listen_port)}
        raw: dict[str, list[dict[str, float]]] = {t: [] for t in TARGETS}
        for _, target in common.interleave(TARGETS, repeats):
            pid = proc.pid if target == "rabbitproxy" else None
            result = await one_run(target, addrs[target], pid, count, size)
            raw[target].append(result)
            console.print(target, {k: round(v, 2) for k, v in result.items()})
    finally:
        if proc is not None:
            proc.stop()
        await asyncio.to_thread(cluster.stop)
    summary = {t: {k: median([r[k] for r in rows]) for k in rows[0]} for t, rows in raw.items()}
    d, p = summary["direct"], summary["rabbitproxy"]
    summary["ratio"] = {
        "publish": p["publish_msgs_per_s"] / d["publish_msgs_per_s"],
        "consume": p["consume_msgs_per_s"] / d["consume_msgs_per_s"],
    }
    return {"summary": summary, "raw": raw}


def render_section(doc: dict[str, Any]) -> str:
    """The "Streams" section of docs/benchmarks.md, from the JSON this bench writes."""
    summary, st = doc["summary"], doc["settings"]
    rows = [
        [
            name,
            fmt(r["publish_msgs_per_s"], 0),
            fmt(r["consume_msgs_per_s"], 0),
            "n/a" if name == "direct" else fmt(r["publish_cpu_s_per_million"], 2),
            "n/a" if name == "direct" else fmt(r["consume_cpu_s_per_million"], 2),
        ]
        for name, r in summary.items()
        if name in TARGETS
    ]
    ratio = summary["ratio"]
    verdicts = [
        f"{way} {fmt(ratio[way], 2)}x direct ({'met' if ratio[way] >= TARGET_RATIO else '**not met**'})"
        for way in ("publish", "consume")
    ]
    load = doc.get("machine", {}).get("load_average_at_start")
    # Each repeat's ratio (the targets run back to back within a repeat): how far one run is from the median.
    raw = doc.get("raw", {})
    spread = []
    for way, key in (("publish", "publish_msgs_per_s"), ("consume", "consume_msgs_per_s")):
        pairs = zip(raw.get("rabbitproxy", []), raw.get("direct", []), strict=False)
        ratios = [p[key] / d[key] for p, d in pairs if d[key]]
        if ratios:
            spread.append(f"{way} {fmt(min(ratios), 2)} to {fmt(max(ratios), 2)}")
    return "\n".join(
        [
            "## Streams",
            "",
            f"bench/stream_bench.py{' --quick' if st.get('quick') else ''}: {st['messages']:,} messages of "
            f"{st['size']} bytes per run, {st['repeats']} interleaved repeats, medians. rstream in its plain mode "
            "against a local 3-node RabbitMQ 4.0 cluster: `direct` bootstraps on a node and follows the metadata to "
            "the leader (publish, with confirms) and a replica (consume); `rabbitproxy` bootstraps on a "
            '`protocol = "stream"` service and follows the rewritten metadata to the nodes\' `node_port` '
            "listeners. Proxy CPU is `rabbitproxy serve` (one process, uvloop) over each phase, per million messages.",
            "",
            markdown_table(
                [
                    "target",
                    "publish msg/s (confirmed)",
                    "consume msg/s",
                    "proxy CPU s / M published",
                    "proxy CPU s / M consumed",
                ],
                rows,
            ),
            "",
            f"Target (issue 28): at least {TARGET_RATIO:g}x direct; "
            + "; ".join(verdicts)
            + "."
            + (f" Per repeat: {'; '.join(spread)}." if spread else "")
            + (f" Load average when the run started: {load}." if load else "")
            + " The proxy's own CPU is well under a second per million messages either way, so its parsing is not"
            " what limits these rates; the extra hop on cores that the clients, the three nodes and the proxy share"
            " is the likely cause of the differences (not measured apart).",
            "",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    common.exit_cleanly_on_sigterm()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="50,000 messages, 2 repeats (about a minute)")
    ap.add_argument("--messages", type=int, help="messages per run (default 300,000; quick 50,000)")
    ap.add_argument("--size", type=int, default=100, help="message body size in bytes")
    ap.add_argument("--repeats", type=int, help="interleaved repeats (default 3, quick 2)")
    ap.add_argument("--json", type=Path, help="write raw results and medians here")
    args = ap.parse_args(argv)
    count = args.messages or (50_000 if args.quick else 300_000)
    repeats = args.repeats or (2 if args.quick else 3)
    with tempfile.TemporaryDirectory(prefix="rabbitproxy-stream-bench-") as tmp:
        doc = asyncio.run(run(count, args.size, repeats, Path(tmp)))
    doc["settings"] = {"messages": count, "size": args.size, "repeats": repeats, "quick": args.quick}
    doc["machine"] = common.machine_info()
    console.print(doc["summary"])
    console.print(render_section(doc))
    if args.json:
        common.write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
