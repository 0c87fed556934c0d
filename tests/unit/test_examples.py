"""The shipped examples agree with themselves, with the image and with the config schema.

A user copies these files first; a port that does not line up or a config that does not validate would be their
first experience of the project. The configs are validated here by the config loader, and by the real
`rabbitproxy check-config` command in tests/integration/test_examples_check_config.py.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from rabbitproxy import config as config_mod
from tests.support.examples import (
    EXAMPLES,
    IMAGE_CONFIG,
    REPO,
    compose_proxy_config_path,
    load_compose,
    load_kubernetes,
)

# What the compose file and the Kubernetes Deployment put in the proxy's environment (a Secret's value there).
TOKEN_ENV = {"RABBITPROXY_ADMIN_TOKEN": "example-token"}


def dockerfile_instructions() -> dict[str, list[str]]:
    """Instruction -> arguments of the final stage (continuation lines joined)."""
    text = (REPO / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    stages = re.split(r"^FROM ", text, flags=re.MULTILINE)
    out: dict[str, list[str]] = {}
    for line in stages[-1].splitlines()[1:]:
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.setdefault(word.upper(), []).append(rest.strip())
    return out


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)s", value)
    assert m, f"expected a duration like '35s', got {value!r}"
    return float(m.group(1))


# -- Dockerfile --------------------------------------------------------------------------------------------------------


def test_dockerfile_final_stage_is_what_the_docs_promise() -> None:
    final = dockerfile_instructions()
    text = (REPO / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, flags=re.MULTILINE)) == 2, "builder stage plus a runtime stage"
    assert final["USER"] == ["10001:10001"]
    assert final["EXPOSE"] == ["5672 9080"]
    assert final["ENTRYPOINT"] == ['["rabbitproxy"]']
    assert final["CMD"] == [f'["serve", "--config", "{IMAGE_CONFIG}"]']
    assert final["HEALTHCHECK"][0].endswith('CMD ["rabbitproxy", "healthcheck", "--quiet"]')
    assert "COPY --from=builder /opt/rabbitproxy /opt/rabbitproxy" in [f"COPY {c}" for c in final["COPY"]]
    # Nothing of this machine (its CA bundle, its package index) may be baked in.
    assert "ca-certificates.crt" not in text
    assert "pip.conf" not in text
    assert "PIP_INDEX_URL" not in text


def test_dockerignore_sends_only_the_package() -> None:
    lines = [ln for ln in (REPO / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines[0] == "*"
    assert {ln for ln in lines if ln.startswith("!")} == {"!pyproject.toml", "!README.md", "!rabbitproxy/"}


# -- Compose -----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


def test_compose_has_three_clustered_rabbitmq_nodes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    rabbits = {name: s for name, s in services.items() if name != "rabbitproxy"}
    assert sorted(rabbits) == ["rabbit1", "rabbit2", "rabbit3"]
    cookies = set()
    for name, svc in rabbits.items():
        assert re.fullmatch(r"rabbitmq:[\w.]+-management", svc["image"]), svc["image"]
        assert svc["hostname"] == name
        cookies.add(svc["environment"]["RABBITMQ_ERLANG_COOKIE"])
        mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
        assert mounts["/etc/rabbitmq/conf.d/10-cluster.conf"] == "./rabbitmq/cluster.conf"
    assert len(cookies) == 1, "every node needs the same Erlang cookie"

    conf = dict(
        line.split(" = ", 1)
        for line in (EXAMPLES / "rabbitmq" / "cluster.conf").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert conf["cluster_formation.peer_discovery_backend"] == "classic_config"
    listed = {v for k, v in conf.items() if k.startswith("cluster_formation.classic_config.nodes.")}
    assert listed == {f"rabbit@{svc['hostname']}" for svc in rabbits.values()}


def test_compose_proxy_matches_its_config(compose: dict[str, Any]) -> None:
    services = compose["services"]
    proxy = services["rabbitproxy"]
    assert proxy["build"]["context"] == ".."
    assert (EXAMPLES / proxy["build"]["context"] / proxy["build"]["dockerfile"]).resolve() == REPO / "Dockerfile"

    # The token comes from the environment the compose file gives the proxy; without it serve refuses the file.
    with pytest.raises(config_mod.ConfigError, match=r"admin\.token: required"):
        config_mod.load(compose_proxy_config_path(compose), env={})
    cfg = config_mod.load(compose_proxy_config_path(compose), env=TOKEN_ENV)

    # AMQP published on every interface, the admin API on the host's loopback only.
    ports = {p.rsplit(":", 1)[1]: p.rsplit(":", 1)[0] for p in proxy["ports"]}
    service = cfg.services[0]
    assert ports[str(service.listen_port)] == "5672"
    admin_host, admin_port = config_mod.split_host_port(cfg.admin.listen)
    assert ports[str(admin_port)] == f"127.0.0.1:{admin_port}"
    # Inside the container the admin must not be on loopback (the port could not be published), so a token is set.
    assert admin_host == "0.0.0.0"
    assert "RABBITPROXY_ADMIN_TOKEN" in proxy["environment"]

    # Every backend is a RabbitMQ service of this file, on the port the node listens on.
    backend_hosts = {b.address for b in service.backends}
    assert backend_hosts == set(services) - {"rabbitproxy"}
    assert {service.backend_port(b) for b in service.backends} == {5672}
    assert set(proxy["depends_on"]) == backend_hosts

    # Docker must wait longer than the drain and the closes' flush before it kills the proxy.
    assert seconds(proxy["stop_grace_period"]) > service.shutdown_timeout + service.close_timeout


# -- Kubernetes --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    return load_kubernetes()


def test_kubernetes_config_validates(manifests: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    toml_text = manifests["ConfigMap"]["data"]["rabbitproxy.toml"]
    path = tmp_path / "rabbitproxy.toml"
    path.write_text(toml_text)
    # The Deployment gives the token from a Secret; without it serve would refuse this file.
    with pytest.raises(config_mod.ConfigError, match=r"admin\.token: required"):
        config_mod.load(path, env={})
    assert len(config_mod.load(path, env=TOKEN_ENV).services[0].backends) == 3
    assert tomllib.loads(toml_text)["admin"]["listen"] == "0.0.0.0:9080"


def test_kubernetes_objects_reference_each_other(manifests: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    deployment, service, configmap = manifests["Deployment"], manifests["Service"], manifests["ConfigMap"]
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["replicas"] == 2
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()

    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    path = tmp_path / "rabbitproxy.toml"
    path.write_text(configmap["data"]["rabbitproxy.toml"])
    cfg = config_mod.load(path, env=TOKEN_ENV)
    assert ports["amqp"] == cfg.services[0].listen_port
    assert ports["admin"] == config_mod.split_host_port(cfg.admin.listen)[1]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["amqp"]

    # The config map is mounted where the image's CMD reads it.
    (volume,) = pod["volumes"]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    (mount,) = container["volumeMounts"]
    assert mount["name"] == volume["name"]
    assert f"{mount['mountPath']}/rabbitproxy.toml" == IMAGE_CONFIG
    assert container.get("args", ["serve", "--config", IMAGE_CONFIG]) == ["serve", "--config", IMAGE_CONFIG]

    for probe, path in (("readinessProbe", "/healthz"), ("livenessProbe", "/livez")):
        http_get = container[probe]["httpGet"]
        assert (http_get["path"], http_get["port"]) == (path, "admin")

    # A non-loopback admin needs its token; it comes from a Secret, never from the manifest itself.
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["RABBITPROXY_ADMIN_TOKEN"]["valueFrom"]

    # The image's user, checked by the kubelet; and time for preStop plus the drain before SIGKILL.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    svc = cfg.services[0]
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + svc.shutdown_timeout + svc.close_timeout


# -- What every example shows (issue 27) -------------------------------------------------------------------------------


def shipped_configs(compose: dict[str, Any], manifests: dict[str, dict[str, Any]], tmp_path: Path) -> list[Any]:
    k8s = tmp_path / "k8s.toml"
    k8s.write_text(manifests["ConfigMap"]["data"]["rabbitproxy.toml"])
    return [config_mod.load(compose_proxy_config_path(compose), env=TOKEN_ENV), config_mod.load(k8s, env=TOKEN_ENV)]


def test_examples_keep_the_heartbeat_aware_idle_timeout(
    compose: dict[str, Any], manifests: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    # 0 would turn off what finds clients that vanished (and make `connections --sort idle` meaningless).
    for cfg in shipped_configs(compose, manifests, tmp_path):
        for service in cfg.services:
            assert service.client_idle_timeout == "auto", service.name


def test_compose_runs_a_rabbitmq_release_the_suite_tests(compose: dict[str, Any]) -> None:
    # The suite's brokers: 3.10 (Debian 12's package) and 4.0 (rabbitproxy.dev.rootfs); the Compose file uses 4.0.
    tested = {"3.10", "4.0"}
    for name in ("rabbit1", "rabbit2", "rabbit3"):
        release = re.fullmatch(r"rabbitmq:(\d+\.\d+)(?:\.\d+)?-management", compose["services"][name]["image"])
        assert release and release.group(1) in tested, compose["services"][name]["image"]


def test_compose_starts_with_three_commands() -> None:
    header = (EXAMPLES / "docker-compose.yml").read_text().split("\n\n", 1)[0]
    commands = [line.removeprefix("#").strip() for line in header.splitlines() if line.startswith("#   ")]
    assert len(commands) == 3, commands
    assert commands[0] == "cd examples" and commands[-1].startswith("docker compose up")


def test_kubernetes_image_is_pinned_to_the_documented_tag(manifests: dict[str, dict[str, Any]]) -> None:
    (container,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    image = container["image"]
    assert not image.endswith(":latest") and ":" in image.rsplit("/", 1)[-1], image
    # docs/deployment.md builds and pushes exactly this tag.
    assert f"docker push {image}" in (REPO / "docs" / "deployment.md").read_text()


def test_a_disruption_budget_keeps_a_proxy_serving(manifests: dict[str, dict[str, Any]]) -> None:
    deployment, budget = manifests["Deployment"], manifests["PodDisruptionBudget"]
    assert budget["apiVersion"] == "policy/v1"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # At least one of the replicas stays through a voluntary disruption.
    if "maxUnavailable" in budget["spec"]:
        assert budget["spec"]["maxUnavailable"] < deployment["spec"]["replicas"]
    else:
        assert budget["spec"]["minAvailable"] >= 1
