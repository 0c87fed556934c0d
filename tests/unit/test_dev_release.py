"""The dev cluster's 4.0 path, decided before anything runs: paths as a chrooted node sees them, its commands."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from rabbitproxy.cli import app
from rabbitproxy.dev import ctl, nodes, rootfs
from rabbitproxy.dev.cluster import DevCluster
from rabbitproxy.dev.nodes import Node

ROOT = Path("/var/cache/rabbitproxy-ci/rabbitmq-4.0-trixie-root-1")


def _node(base: Path, stream_port: int = 0) -> Node:
    return Node("rp1-x@localhost", 5672, 15672, 25672, 1, base / "rp1-x", stream_port)


def test_paths_are_given_as_the_chrooted_node_sees_them() -> None:
    base = ROOT / "var/tmp/rabbitproxy-devcluster-abc"
    env = nodes.node_env(_node(base), base / "home", ROOT)
    assert env["HOME"] == "/var/tmp/rabbitproxy-devcluster-abc/home"
    assert env["RABBITMQ_CONFIG_FILE"] == "/var/tmp/rabbitproxy-devcluster-abc/rp1-x/rabbitmq.conf"
    assert env["RABBITMQ_MNESIA_BASE"] == "/var/tmp/rabbitproxy-devcluster-abc/rp1-x/mnesia"
    assert env["RABBITMQ_CONF_ENV_FILE"] == "/var/tmp/rabbitproxy-devcluster-abc/home/rabbitmq-env.conf"
    # The host's own RabbitMQ keeps host paths.
    host = nodes.node_env(_node(Path("/tmp/dc")), Path("/tmp/dc/home"))
    assert host["HOME"] == "/tmp/dc/home"
    assert host["RABBITMQ_CONFIG_FILE"] == "/tmp/dc/rp1-x/rabbitmq.conf"


def test_a_path_outside_the_root_is_refused() -> None:
    with pytest.raises(ValueError, match="is not in the subpath"):
        nodes.inside(ROOT, Path("/tmp/elsewhere"))


def test_commands_run_inside_the_root_with_proc_mounted_in_their_own_namespace() -> None:
    bin_dir = ctl.RABBITMQ_BIN_DIR
    assert ctl.command(bin_dir, "rabbitmqctl") == [str(bin_dir / "rabbitmqctl")]
    argv = ctl.command(bin_dir, "rabbitmqctl", ROOT)
    assert argv[:4] == ["unshare", "--mount", "--propagation", "private"]
    assert argv[-2:] == [str(ROOT), str(bin_dir / "rabbitmqctl")]
    assert 'mount -t proc proc "$0/proc" && exec chroot "$0" "$@"' in argv


def test_stream_listener_only_when_the_node_has_a_stream_port() -> None:
    base = Path("/tmp/dc")
    with_stream = nodes.config_lines(_node(base, 30001), None, management=True, extra_config=(), startup_timeout=60)
    assert "stream.listeners.tcp.1 = 127.0.0.1:30001" in with_stream
    without = nodes.config_lines(_node(base), None, management=True, extra_config=(), startup_timeout=60)
    assert not any(line.startswith("stream.") for line in without)


def test_unknown_release_is_refused_and_the_root_name_carries_the_recipe() -> None:
    with pytest.raises(ValueError, match=r"release must be one of system, 4\.0"):
        DevCluster(1, release="3.13")
    assert rootfs.root_path("4.0").name == f"rabbitmq-4.0-trixie-root-{rootfs.RECIPE}"


def test_demo_refuses_an_unknown_release_before_starting_anything() -> None:
    result = CliRunner().invoke(app, ["demo", "--rabbitmq", "3.13"])
    assert result.exit_code == 2
    assert "--rabbitmq: '3.13' is not one of system, 4.0" in result.output
