"""docs/reliability.md and its chart from the results of ``bench/faults.py`` (``--update-docs``).

Everything in the generated file comes from one run's JSON, except the explanations, which describe how the
proxies and clients behave (mechanisms, not numbers).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import fmt, markdown_table  # noqa: E402

COLORS = {"rabbitproxy": "#e8743b", "rabbitproxy, workers = 2": "#c44e52", "haproxy": "#4c72b0"}


def label(row: dict[str, Any]) -> str:
    """The target as the tables and the chart name it: rabbitproxy's worker count when it ran more than one."""
    workers = int(row.get("proxy_workers") or 1)
    return row["target"] if workers == 1 else f"{row['target']}, workers = {workers}"


def _n(value: Any, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return fmt(value, digits)
    return f"{value:,}" if isinstance(value, int) else str(value)


def table(rows: Sequence[dict[str, Any]], titles: dict[str, str]) -> str:
    header = [
        "scenario",
        "target",
        "confirmed",
        "confirmed, never consumed",
        "left in queue",
        "duplicates",
        "reconnects",
        "back to 90 %, median / worst (s)",
        "conns on faulted node, during / after",
        "proxy errors",
        "proxy restarts",
    ]
    out = []
    for r in rows:
        if not r.get("complete"):
            failures = "; ".join(str(f) for f in r.get("worker_failures", [])) or "incomplete"
            out.append(
                [titles.get(r["scenario"], r["scenario"]), label(r), f"**run failed**: {failures}"]
                + [""] * (len(header) - 3)
            )
            continue
        lost = r["lost"]
        out.append(
            [
                titles.get(r["scenario"], r["scenario"]),
                label(r),
                _n(r["confirmed"]),
                f"**{lost:,}**" if lost else "0",
                _n(r["in_queue_at_end"]) if r["in_queue_at_end"] >= 0 else "n/a",
                _n(r["duplicates"]),
                _n(r["reconnects"]),
                f"{fmt(r['recovery_median_s'], 0)} / {fmt(r['recovery_worst_s'], 0)}",
                f"{_n(r['conns_on_node_during'])} / {_n(r['conns_on_node_after'])}",
                _n(r["proxy_errors"]),
                _n(r["proxy_restarts"]),
            ]
        )
    return markdown_table(header, out)


def rate_seconds(rate: dict[str, int]) -> list[int]:
    """Every second of a run's rate, gaps (no confirm at all) included, without the partial first and last one."""
    if not rate:
        return []
    secs = [int(s) for s in rate]
    return list(range(min(secs) + 1, max(secs)))


def chart(rows: Sequence[dict[str, Any]], titles: dict[str, str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on a server; must precede pyplot
    import matplotlib.pyplot as plt

    keys = sorted({(r["queue_type"], r["scenario"]) for r in rows if r.get("rate")}, key=lambda k: (k[0] != "quorum",))
    order = list(dict.fromkeys(titles))
    keys.sort(key=lambda k: (k[0] != "quorum", order.index(k[1]) if k[1] in order else 99))
    if not keys:
        return
    cols = 2
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(11, 2.4 * nrows), squeeze=False)
    for ax, (qtype, scenario) in zip(axes.flat, keys, strict=False):
        release = 0.0
        peak = 0
        for r in rows:
            if r.get("queue_type") != qtype or r.get("scenario") != scenario or not r.get("rate"):
                continue
            xs = rate_seconds(r["rate"])
            ys = [r["rate"].get(str(x), 0) for x in xs]
            ax.plot(xs, ys, label=label(r), color=COLORS.get(label(r)), lw=1.2)
            peak = max([peak, *ys])
            release = max(release, r["marks"].get("released", 0.0))
        ax.axvspan(0, max(release, 0.5), color="#ddd", zorder=0)
        ax.set_title(f"{titles.get(scenario, scenario)} ({qtype})", fontsize=8)
        ax.tick_params(labelsize=7)
        # Headroom above the steady rate, or a flat line at the top would hide behind the frame.
        ax.set_ylim(bottom=0, top=max(1.0, peak * 1.15))
        ax.legend(fontsize=7, loc="lower left")
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_visible(False)
    fig.supxlabel("seconds since the fault (grey: fault until released)", fontsize=8)
    fig.supylabel("confirmed msg/s, all publishers", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The findings the numbers support, computed (pure; unit-tested)."""
    lines = []
    for target in dict.fromkeys(label(r) for r in rows):
        mine = [r for r in rows if label(r) == target]
        if not mine:
            continue
        done = [r for r in mine if r.get("complete")]
        lost = sum(r["lost"] for r in done)
        confirmed = sum(r["confirmed"] for r in done)
        failed = len(mine) - len(done)
        where = ", ".join(f"{r['scenario']} ({r['queue_type']}): {r['lost']:,}" for r in done if r["lost"])
        text = f"- **{target}**: {lost:,} of {confirmed:,} confirmed messages never consumed over {len(done)} runs"
        text += f" ({where})." if where else "."
        if failed:
            text += f" {failed} run(s) did not complete (see the table)."
        lines.append(text)
    slower = []
    for r in rows:
        if r["target"] != "rabbitproxy" or not r.get("complete"):
            continue
        name = label(r)
        other = next(
            (
                h
                for h in rows
                if h["target"] == "haproxy"
                and h.get("complete")
                and h["scenario"] == r["scenario"]
                and h["queue_type"] == r["queue_type"]
            ),
            None,
        )
        if other is None:
            continue
        mine, theirs = r["recovery_worst_s"], other["recovery_worst_s"]
        if not math.isnan(mine) and not math.isnan(theirs) and mine > theirs + 2:
            who = "" if name == "rabbitproxy" else f"{name}: "
            slower.append(f"{who}{r['scenario']} ({r['queue_type']}: {mine:.0f} s vs {theirs:.0f} s)")
    if slower:
        lines.append("- Worst-case recovery more than 2 s slower than HAProxy's: " + ", ".join(slower) + ".")
    else:
        lines.append("- rabbitproxy's worst-case recovery was nowhere more than 2 s slower than HAProxy's.")
    alarm = [r for r in rows if r["scenario"] == "alarm" and r.get("complete")]
    if alarm:
        cut = ", ".join(f"{label(r)} ({r['queue_type']}): {r['reconnects']}" for r in alarm)
        lines.append(f"- Connections cut during the memory alarm (client reconnects): {cut}.")
    return lines


def notes() -> list[str]:
    """bench/fault-notes.md, the hand-written reading of the last run, included verbatim (like perf-notes.md)."""
    path = HERE / "fault-notes.md"
    return [path.read_text().rstrip(), ""] if path.exists() else []


def merge(data: dict[str, Any], other: dict[str, Any], why: str) -> dict[str, Any]:
    """``data`` with the rows ``other`` has too (scenario, queue, target) replaced by ``other``'s (pure; unit-tested).

    For a scenario run again on its own (after a fix to the harness): the document says which rows come from which
    run, and why.
    """
    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return (r["scenario"], r["queue_type"], r["target"], int(r.get("proxy_workers") or 1))

    again = {key(r) for r in other["rows"]}
    kept = [r for r in data["rows"] if key(r) not in again]
    names = sorted({f"{s} ({label({'target': t, 'proxy_workers': w})}, {q})" for s, q, t, w in again})
    note = {"started_at": other["started_at"], "minutes": other["minutes"], "scenarios": names, "why": why}
    return data | {"rows": kept + other["rows"], "merged": [*data.get("merged", []), note]}


def _merged(data: dict[str, Any]) -> list[str]:
    out = []
    for m in data.get("merged", []):
        out += [
            ">",
            f"> The rows {'; '.join(m['scenarios'])} come from a later run of just those, started"
            f" {m['started_at']} ({m['minutes']} min), same code and machine: {m['why']}",
        ]
    return out


def _stopped_early(data: dict[str, Any]) -> list[str]:
    """A run written before the end of its plan (stopped, or still going) says so, and what it left out."""
    if data.get("complete_plan", True):
        return []
    done = {(r["queue_type"], r["scenario"]) for r in data["rows"]}
    left = [f"{s} ({q})" for q, s in data["settings"]["plan"] if (q, s) not in done]
    return [
        ">",
        f"> The run was stopped before the end of its plan: {len(data['rows'])} runs measured; not run:"
        f" {', '.join(left) or 'some targets of the last scenario'}.",
    ]


def _alarm_method(settings: dict[str, Any]) -> list[str]:
    """The memory alarm's line of the Method section, when the run had that scenario."""
    bulk = settings.get("bulk")
    if "alarm" not in settings["scenarios"] or not bulk:
        return []
    return [
        "- Memory alarm: `rabbitmqctl set_vm_memory_high_watermark 0.0000001` on the faulted node (an alarm on one"
        " node blocks publishers on all), held, then back to 0.4. Besides the paced load, which sends too little to"
        " fill a socket buffer, one bulk publisher (its own connection, heartbeat"
        f" {int(settings['hold']['alarm'] // 3)} s, a third of the hold: a proxy that counted its silence would cut"
        " it after 2.5 of them) publishes"
        f" {bulk['messages']} messages of {bulk['size'] // 1024} KiB with confirms to the same queue as soon as the"
        " alarm is on: more than the socket buffers between it and the broker hold, so the proxy has to stop"
        " reading it. A connection cut during the alarm shows as a reconnect.",
    ]


def render(data: dict[str, Any], png_name: str) -> str:
    s = data["settings"]
    load, checks, timing = s["load"], s["checks"], s["timing"]
    titles: dict[str, str] = s["scenarios"]
    m = data["machine"]
    rows = data["rows"]
    parts = [
        "# Reliability under faults",
        "",
        f"> Generated by `bench/faults.py{' --quick' if data['mode'] == 'quick' else ''} --update-docs` on"
        f" {data['started_at']} ({data['minutes']} min). Do not edit by hand; run it again.",
        *_stopped_early(data),
        *_merged(data),
        "",
        "What happens to confirmed messages while a RabbitMQ node dies, freezes or is drained, while a memory alarm",
        "blocks the publishers, and while the proxy reloads or restarts: measured on a local 3-node cluster with real",
        "clients, through rabbitproxy (in one process and with worker processes) and through HAProxy configured as an",
        "operator would, with the same check interval, `fall` and `rise`.",
        "",
        "## Findings",
        "",
        *summary_lines(rows),
        "",
        "## Results",
        "",
    ]
    for qtype in ("quorum", "classic"):
        mine = [r for r in rows if r.get("queue_type") == qtype]
        if not mine:
            continue
        kind = "quorum queue, 3 replicas"
        if qtype == "classic":
            kind = "classic durable queue on the faulted node, persistent messages"
        parts += [f"### {kind.capitalize()}", "", table(mine, titles), ""]
    parts += [
        "Columns: *confirmed*: distinct message ids the broker acked to a publisher. *Confirmed, never consumed*:"
        " of those, ids no consumer received by the end of the drain (**must be 0**). *Left in queue*: messages"
        " still in the queue after the consumers gave up (so not lost, only late, if it equals the column before)."
        " *Duplicates*: deliveries of an id already seen (a lost ack, or a republish of a message whose confirm was"
        " lost). *Reconnects*: reconnections of the robust client connections. *Back to 90 %*: seconds from the"
        " fault until a publisher's rate (3-second windows) is back to 90 % of its warm-up median, after a dip"
        " with at least one second below half of it, starting while the fault holds; median and worst over the"
        " publishers; 0 means no such dip (shorter wobbles of a busy machine are not counted)."
        " *Conns on faulted node*: client connections the faulted RabbitMQ"
        " node itself counts, while the fault holds (n/a when it cannot answer: killed or frozen; for the rolling"
        " drain, once the last node was revived) and after the recovery window. Connections there while the node"
        " is cut off are ones the proxy already closed whose close never reached the node: it drops them after two"
        " missed heartbeats. *Proxy errors*: log lines at error level (rabbitproxy) or ALERT (HAProxy). *Proxy"
        " restarts*: the proxy process died by itself and had to be started again.",
        "",
        *notes(),
        "## Publish rate around each fault",
        "",
        f"![confirmed messages per second around each fault]({png_name})",
        "",
        "## Method",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores, kernel {m['kernel']}, Python {m['python']}, RabbitMQ"
        f" {m['rabbitmq']}, HAProxy {m['haproxy']}. The machine is shared: load average"
        f" {', '.join(str(x) for x in m['load_average_at_start'])} at the start and"
        f" {', '.join(str(x) for x in data['load_average_at_end'])} at the end, so the rates are deliberately low.",
        f"- Load per run: {load['publishers']} publishers at {load['rate']:g} msg/s each ({load['window']} confirms"
        f" in flight, {load['size']} B bodies) and {load['consumers']} consumers (prefetch {load['prefetch']},"
        f" manual acks), in {load['processes']} worker processes, aio-pika `connect_robust` (reconnect interval"
        f" {load['reconnect_interval']:g} s, heartbeat {load['heartbeat']} s). Every message has a unique id; a"
        f" publish without a confirm within {load['confirm_timeout']:g} s, a nack, a return or an error is"
        " republished with the same id. Consumers record the id, then ack.",
        f"- Each run: a fresh proxy and a fresh queue declared on node {s['faulted_node']} (the one every node fault"
        f" hits: it holds the classic queue and the quorum queue's first leader); warm-up {timing['warmup']:g} s"
        f" after every publisher had its first confirm (the baseline), the fault, held"
        f" {', '.join(f'{k} {v:g} s' for k, v in s['hold'].items())}, then released; a recovery window of"
        f" {timing['recover']:g} s; the publishers stop and the consumers drain until every publisher has its last"
        " confirms, the queue has no ready message and no consumer but theirs (a stale one, on a connection the"
        f" broker has not yet seen die, still holds deliveries it will requeue), and {load['idle']:g} s pass"
        " without a delivery.",
        f"- rabbitproxy: `rabbitproxy serve`, AMQP health check every {checks['interval']:g} s (timeout"
        f" {checks['timeout']:g} s, `fall = {checks['fall']}`, `rise = {checks['rise']}`),"
        f' `on_marked_down = "close"`, `close_timeout = {checks["close_timeout"]:g}`,'
        f" `shutdown_timeout = {checks['shutdown_timeout']:g}`, least connections, a feedback agent per node"
        ' (`type = "agent"`), maint through `PATCH /api/services/amqp/backends/rabbit1`, reload by SIGHUP, graceful'
        " stop by SIGTERM; each scenario once in one process and once per other worker count in"
        f" {', '.join(str(w) for w in s.get('proxy_workers', [1]))} (`workers = N`: the rows named so).",
        f"- HAProxy: `mode tcp`, `balance leastconn`, `check inter {int(checks['interval'] * 1000)} fall"
        f" {checks['fall']} rise {checks['rise']} on-marked-down shutdown-sessions agent-check` on the same agents,"
        f" `timeout client/server {3 * checks['heartbeat']}s` (three heartbeats), no `hard-stop-after` (so after a"
        " reload the old worker serves its connections until the clients end them); maint by `set server"
        " amqp/rabbit1 state maint` plus `shutdown sessions server amqp/rabbit1` on the admin socket, reload by"
        " SIGUSR2 (master-worker), graceful stop by SIGUSR1 (listeners close, connections stay) and SIGTERM"
        f" {checks['shutdown_timeout']:g} s later, rabbitproxy's `shutdown_timeout`. Its `check` is a TCP connect,"
        " the check an operator usually writes for AMQP.",
        "- Rolling drain: each node in turn `rabbitmq-upgrade drain`, held, `rabbitmq-upgrade revive`, and the next"
        " one only when the proxy counts every backend up again.",
        *_alarm_method(s),
        "",
        "Where the harness differs from the issue:",
        "",
        *[f"- {text}" for text in s["not_done"].values()],
        "",
        "## What the numbers mean for an operator",
        "",
        f"- **Heartbeat.** A frozen node keeps its sockets open and answers nothing. Without a proxy that acts, a"
        f" client notices only when its heartbeat times out (two missed heartbeats, {2 * load['heartbeat']} s here;"
        " RabbitMQ's default of 60 s makes it two minutes). Keep client heartbeats short enough for your recovery"
        " target, and proxy idle timeouts (HAProxy `timeout client/server`) longer than the heartbeat, or the proxy"
        " cuts idle but healthy connections.",
        f"- **`fall` x `interval`.** The time until the proxy marks a failed node down ({checks['fall']} x"
        f" {checks['interval']:g} s here, plus up to one `timeout`). rabbitproxy's AMQP check sends the protocol"
        " header and waits for the broker's `Connection.Start`, so a frozen node or one cut off fails it. A"
        " TCP-connect check (HAProxy's plain `check`) still passes while the kernel accepts connections for a"
        " frozen VM: HAProxy never marks it down, and its clients find out only by their own heartbeat, if the"
        " freeze lasts long enough.",
        "- **`on_marked_down`.** With `close`, rabbitproxy closes the connections of a node it marks down, so the"
        " clients reconnect (to a healthy node) within `fall` x `interval` instead of waiting for their heartbeat."
        " `keep` leaves them; that is only right for clients that cannot reconnect. HAProxy's equivalent is"
        " `on-marked-down shutdown-sessions`.",
        "- **`close_timeout` and `shutdown_timeout`.** How long a closing connection may take to flush before it is"
        " cut, and how long a stopping proxy lets connections finish. A confirm the broker sent but the client never"
        " received only means a republish (a duplicate for the consumer to drop), never a lost message: what the"
        " client did not see confirmed, it publishes again. Consumers must therefore de-duplicate by message id.",
        "- **Reload.** A rabbitproxy reload keeps every established connection. HAProxy's reload starts a new"
        " worker; the old one keeps serving the connections it has until they end (unless `hard-stop-after` is set:"
        " then it cuts them when that runs out, and long-lived AMQP connections reconnect after each reload). With"
        " no `hard-stop-after`, old workers pile up across reloads for as long as their clients stay connected.",
        "- **Alarms.** During a memory or disk alarm RabbitMQ stops reading every publishing connection. A proxy"
        " between them then stops reading the publisher too, once its buffer towards the broker is full; that"
        " silence is not the client's, and neither RabbitMQ nor rabbitproxy times a blocked connection out. Proxy"
        " idle timeouts (HAProxy `timeout client/server`) must outlast the longest alarm you expect, or they cut"
        " the blocked publishers, which then republish what was not confirmed.",
        "- **Classic queues** live on one node: while it is down they cannot take or deliver messages at all (publishes"
        " are returned or not confirmed, and republished); a proxy cannot change that, only quorum queues can. A node"
        " that runs on while clients cannot use it (drained with `rabbitmq-upgrade drain`, in maint, its agent saying"
        " down, cut off from the proxy) still serves its classic queues to clients on the other nodes.",
        "",
    ]
    return "\n".join(parts)


def write(data: dict[str, Any], md: Path, png: Path) -> None:
    chart(data["rows"], data["settings"]["scenarios"], png)
    md.write_text(render(data, png.name))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("json", type=Path)
    ap.add_argument("--out", type=Path, default=HERE.parent / "docs" / "reliability.md")
    ap.add_argument("--rescore", action="store_true", help="compute the recovery columns again from the rates")
    ap.add_argument("--merge", type=Path, help="a run of some scenarios alone, whose rows replace the first's")
    ap.add_argument("--why", default="", help="why those scenarios were run again (printed in the document)")
    args = ap.parse_args(argv)
    data = json.loads(args.json.read_text())
    if args.merge:
        if not args.why:
            ap.error("--merge needs --why")
        data = merge(data, json.loads(args.merge.read_text()), args.why)
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    if args.rescore:
        import faults

        data["rows"] = [faults.rescore(r) for r in data["rows"]]
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    write(data, args.out, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
