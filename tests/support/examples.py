"""The shipped examples (compose file, Kubernetes manifests), read the way a user's tools read them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
IMAGE_CONFIG = "/etc/rabbitproxy/rabbitproxy.toml"


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load((EXAMPLES / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def compose_proxy_config_path(compose: dict[str, Any]) -> Path:
    """The rabbitproxy config file the compose file mounts where the image reads it."""
    mounts = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["rabbitproxy"]["volumes"]}
    return EXAMPLES / mounts[IMAGE_CONFIG]


def load_kubernetes() -> dict[str, dict[str, Any]]:
    """The Kubernetes objects by kind; exactly one each of ConfigMap, Deployment, PodDisruptionBudget and Service."""
    by_kind: dict[str, dict[str, Any]] = {}
    for path in sorted((EXAMPLES / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in by_kind, f"two {doc['kind']} objects"
            by_kind[doc["kind"]] = doc
    assert sorted(by_kind) == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service"]
    return by_kind
