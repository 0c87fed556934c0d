"""``rabbitproxy keepalived-config``: the keepalived.conf for one side of a highly available pair of proxies.

keepalived (VRRP) does the election and moves the virtual IP; we only write its configuration. The choices, and why:

- Both sides start as ``state BACKUP`` with ``nopreempt``: a proxy that comes back after a failure does not take the
  VIP back (which would reset every connection through the other side a second time). keepalived ignores
  ``nopreempt`` on an instance that starts as MASTER, hence BACKUP on both; the higher priority wins the first
  election. ``--preempt`` turns that off for those who want a fixed primary.
- Unicast peers: multicast is often filtered (clouds, many switches), and naming the peer keeps two pairs on one
  segment from hearing each other.
- A ``vrrp_script`` runs ``rabbitproxy healthcheck`` every ``interval`` seconds; it fails when the proxy is dead,
  hung, shutting down or has no healthy backend (``/healthz``). A failure puts the instance into FAULT: it drops
  the VIP and sends a priority-0 advertisement, so the peer takes over at once (after its skew time,
  (256 - priority) / 256 s) instead of waiting for three missed adverts. One failure is enough (``fall`` 1)
  because the probe fails only on a definite answer: refused, not 200, or no answer within ``probe_timeout``
  (2 s) from a proxy whose loop answers in microseconds. keepalived's own ``timeout`` is long (30 s) on purpose:
  on a busy host starting the Python probe can take seconds, and a slow *probe* must never move the VIP (with
  3 s, then 10 s, both sides of the test pair gave up the VIP at once on a heavily loaded machine). With the
  defaults a killed proxy loses the VIP 1-2 s after it dies. ``rise`` 2 keeps a flapping proxy from taking the VIP
  back and forth. (keepalived's ``vrrp_track_process`` would notice a dead process without polling, but it needs
  the kernel's proc connector, which only the initial network namespace gets: not in containers with their own
  network, nor in the namespaces of our test, so it is not offered.)
- With ``--health-file`` (the proxy's ``[admin] health_file``), a ``track_file`` as well: keepalived watches that
  file with inotify, so a proxy that begins to shut down (or loses its last backend) gives up the VIP within
  moments instead of at the next probe. The probe still catches what the file cannot say: a killed or hung proxy.
- ``notify`` runs on every transition (MASTER, BACKUP, FAULT, STOP) with keepalived's arguments appended
  (``INSTANCE <name> <state> <priority>``), so the default ``logger`` line records each one in the system log.

Everything that goes into the file is validated here: a quote or a newline in an argument would otherwise change
the configuration's meaning.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

DEFAULT_NOTIFY = "/usr/bin/logger -t rabbitproxy-vrrp"
DEFAULT_ROUTER_ID = 51
# VRRPv2 simple-password authentication carries 8 bytes; keepalived silently truncates a longer one, and two sides
# whose passwords differ only after the 8th character would then agree, which nobody intends.
MAX_PASSWORD = 8
_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
# Linux interface names: at most 15 bytes, no whitespace or slash.
_IFNAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")
# Characters that would end a quoted keepalived string or start a new statement.
_UNSAFE = re.compile(r"[\"'\n\r{}#!\\]")


@dataclass(frozen=True)
class KeepalivedSide:
    """What one side of the pair needs; :func:`render` turns it into keepalived.conf text."""

    vip: str
    interface: str
    peers: Sequence[str]
    priority: int
    router_id: int = DEFAULT_ROUTER_ID
    password: str | None = None
    preempt: bool = False
    source: str | None = None
    instance: str = "rabbitproxy"
    advert_interval: int = 1
    check_interval: int = 1
    check_timeout: int = 30
    probe_timeout: float = 2.0
    fall: int = 1
    rise: int = 2
    # The probe command's first word: the rabbitproxy executable (an absolute path keeps keepalived from relying
    # on its own PATH, which is not the operator's).
    rabbitproxy: str = "/usr/local/bin/rabbitproxy"
    admin: str | None = None
    config: str | None = None
    # keepalived runs the probe and notify as this user. The probe needs no privilege (it reads the proxy's config,
    # mode 0644, and asks the admin API on loopback; keepalived itself, as root, reads the health file), so root
    # would only widen what a compromised probe could do.
    script_user: str = "nobody"
    # The proxy's [admin] health_file: keepalived watches it and gives up the VIP the moment it says 1 (shutdown).
    health_file: str | None = None
    notify: str | None = DEFAULT_NOTIFY
    extra_args: Sequence[str] = field(default_factory=tuple)


def validate(side: KeepalivedSide) -> list[str]:
    """Every problem with ``side``, one line each naming the option; empty when it can be rendered."""
    problems: list[str] = []
    vip: ipaddress.IPv4Interface | ipaddress.IPv6Interface | None = None
    try:
        vip = ipaddress.ip_interface(side.vip)
    except ValueError:
        problems.append(f"--vip: {side.vip!r} is not an address with an optional prefix, e.g. 10.0.0.100/24")
    if not _IFNAME.match(side.interface):
        problems.append(f"--interface: {side.interface!r} is not an interface name")
    if not side.peers:
        problems.append("--peer: give the other proxy's address (repeat for more than one)")
    for peer in side.peers:
        try:
            addr = ipaddress.ip_address(peer)
        except ValueError:
            problems.append(f"--peer: {peer!r} is not an IP address")
            continue
        if vip is not None and addr.version != vip.version:
            problems.append(f"--peer: {peer} is IPv{addr.version} but the VIP is IPv{vip.version}")
        elif vip is not None and addr == vip.ip:
            problems.append(f"--peer: {peer} is the VIP itself; give the other proxy's own address")
    if side.source is not None:
        try:
            src = ipaddress.ip_address(side.source)
        except ValueError:
            problems.append(f"--source: {side.source!r} is not an IP address")
        else:
            if str(src) in {str(ipaddress.ip_address(p)) for p in side.peers if _is_ip(p)}:
                problems.append(f"--source: {side.source} is also given as a --peer")
    if not 1 <= side.priority <= 254:
        problems.append(f"--priority: {side.priority} is not in 1..254 (255 is reserved for an address owner)")
    if not 1 <= side.router_id <= 255:
        problems.append(f"--router-id: {side.router_id} is not in 1..255")
    if side.password is not None and not (1 <= len(side.password.encode()) <= MAX_PASSWORD):
        problems.append(f"--password: must be 1 to {MAX_PASSWORD} bytes (VRRPv2 carries no more)")
    if side.password is not None and (_UNSAFE.search(side.password) or " " in side.password):
        problems.append("--password: must not contain spaces, quotes, braces, '#', '!' or backslashes")
    if not _NAME.match(side.instance):
        problems.append(f"--instance: {side.instance!r} may contain only letters, digits and _.:-")
    for name, value, low, high in (
        ("--advert-interval", side.advert_interval, 1, 255),
        ("--check-interval", side.check_interval, 1, 3600),
        ("--check-timeout", side.check_timeout, 1, 3600),
        ("--fall", side.fall, 1, 100),
        ("--probe-timeout", side.probe_timeout, 0.1, 3600),
        ("--rise", side.rise, 1, 100),
    ):
        if not low <= value <= high:
            problems.append(f"{name}: {value} is not in {low}..{high}")
    if not _NAME.match(side.script_user):
        problems.append(f"--script-user: {side.script_user!r} is not a user name")
    # The probe's words are joined with spaces inside one quoted string, so none may contain a space.
    words = (
        ("--rabbitproxy", side.rabbitproxy),
        ("--admin", side.admin),
        ("--config", side.config),
        ("--health-file", side.health_file),
        *(("--healthcheck-arg", a) for a in side.extra_args),
    )
    for name, text in words:
        if text is not None and (not text or _UNSAFE.search(text) or any(c.isspace() for c in text)):
            problems.append(f"{name}: {text!r} must be non-empty, without spaces, quotes, braces, '#', '!' or '\\'")
    if side.notify is not None and (not side.notify.strip() or _UNSAFE.search(side.notify)):
        problems.append(f"--notify: {side.notify!r} must be non-empty, without quotes, braces, '#', '!' or '\\'")
    if side.probe_timeout >= side.check_timeout:
        problems.append(
            f"--probe-timeout: {side.probe_timeout:g} must be shorter than --check-timeout ({side.check_timeout}),"
            " so that a proxy that does not answer is reported by the probe, not killed with it"
        )
    if not side.rabbitproxy.startswith("/"):
        problems.append(f"--rabbitproxy: {side.rabbitproxy!r} must be an absolute path")
    if side.health_file is not None and not side.health_file.startswith("/"):
        problems.append(f"--health-file: {side.health_file!r} must be an absolute path")
    return problems


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def healthcheck_command(side: KeepalivedSide) -> str:
    """The track script's command line: a quiet ``rabbitproxy healthcheck`` with its own (short) timeout."""
    args = [side.rabbitproxy, "healthcheck", "--quiet", "--timeout", f"{side.probe_timeout:g}"]
    if side.admin is not None:
        args += ["--admin", side.admin]
    if side.config is not None:
        args += ["--config", side.config]
    args += list(side.extra_args)
    return " ".join(args)


def render(side: KeepalivedSide) -> str:
    """keepalived.conf text for ``side``; raises ValueError (one problem per line) when :func:`validate` objects."""
    problems = validate(side)
    if problems:
        raise ValueError("\n".join(problems))
    vip = ipaddress.ip_interface(side.vip)
    peers = [str(ipaddress.ip_address(p)) for p in side.peers]
    lines = [
        "# keepalived.conf for one side of a rabbitproxy pair, written by `rabbitproxy keepalived-config`.",
        "# Both sides run state BACKUP; the higher priority wins the first election"
        + (", and keeps the VIP: preempt is on." if side.preempt else "; nopreempt then keeps the VIP in place."),
        "",
        "global_defs {",
        # Scripts run as a named user, and keepalived refuses any that a non-root user could modify.
        "    enable_script_security",
        f"    script_user {side.script_user}",
        # When its timers fire late (a busy host), keepalived moves itself to realtime scheduling: late adverts
        # would make the backup take the VIP while the master still holds it. (Seen in the HA test at load 20.)
        "    max_auto_priority",
        "}",
        "",
        "vrrp_script rabbitproxy_healthy {",
        f'    script "{healthcheck_command(side)}"',
        f"    interval {side.check_interval}",
        f"    timeout {side.check_timeout}",
        f"    fall {side.fall}",
        f"    rise {side.rise}",
        "}",
        "",
    ]
    if side.health_file is not None:
        # weight 0: any non-zero value is a FAULT, at once (inotify), with no fall count to wait for.
        lines += ["track_file rabbitproxy_health_file {", f'    file "{side.health_file}"', "    weight 0", "}", ""]
    lines += [
        f"vrrp_instance {side.instance} {{",
        "    state BACKUP",
        f"    interface {side.interface}",
        f"    virtual_router_id {side.router_id}",
        f"    priority {side.priority}",
        f"    advert_int {side.advert_interval}",
    ]
    if not side.preempt:
        lines.append("    nopreempt")
    if side.source is not None:
        lines.append(f"    unicast_src_ip {ipaddress.ip_address(side.source)}")
    lines.append("    unicast_peer {")
    lines += [f"        {p}" for p in peers]
    lines.append("    }")
    if side.password is not None:
        lines += ["    authentication {", "        auth_type PASS", f"        auth_pass {side.password}", "    }"]
    lines += [
        "    virtual_ipaddress {",
        f"        {vip.with_prefixlen} dev {side.interface}",
        "    }",
        "    track_script {",
        "        rabbitproxy_healthy",
        "    }",
    ]
    if side.health_file is not None:
        lines += ["    track_file {", "        rabbitproxy_health_file", "    }"]
    if side.notify is not None:
        # keepalived appends: INSTANCE <name> <MASTER|BACKUP|FAULT|STOP> <priority>.
        lines.append(f'    notify "{side.notify}"')
    lines += ["}", ""]
    return "\n".join(lines)
