"""The layer contract of docs/architecture.md, read from the source: which package may import which.

Every ``import`` and ``from ... import`` in every module counts, including those inside functions and under
``TYPE_CHECKING``: a lazy import is still a dependency, it only moves the cost. The rules:

- the base modules (``addresses``, ``config``, ``durations``, ``logs``, ``tasks``) and ``protocols`` import no
  other layer;
- ``balancing`` imports only the base;
- ``relay`` does not import ``control``, ``admin``, ``agent``, ``dev``, ``app`` or ``cli``;
- ``control`` does not import ``admin``, ``agent``, ``dev``, ``app`` or ``cli``;
- ``admin`` does not import ``agent``, ``dev``, ``app`` or ``cli``;
- ``agent`` stands alone on the RabbitMQ hosts: only the base and ``protocols``;
- ``dev`` (local clusters for the demo, tests and bench) is reachable from ``cli`` only, never from what ``serve``
  runs;
- ``migrate`` (``convert-haproxy``) reads text and writes text: only the base, reachable from ``cli`` only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "rabbitproxy"
BASE = {"addresses", "config", "durations", "logs", "tasks"}

# What each layer may import besides itself.
ALLOWED: dict[str, set[str]] = {
    "base": {"base"},
    "protocols": {"base"},
    "balancing": {"base"},
    "relay": {"base", "protocols", "balancing"},
    "control": {"base", "protocols", "balancing", "relay"},
    "admin": {"base", "protocols", "balancing", "relay", "control"},
    "agent": {"base", "protocols"},
    "dev": {"base"},
    "migrate": {"base"},
    "app": {"base", "protocols", "balancing", "relay", "control", "admin"},
    "cli": {"base", "protocols", "balancing", "relay", "control", "admin", "agent", "dev", "migrate", "app"},
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    """The layer of ``rabbitproxy.X[.Y]``: a subpackage's name, or "base"/"app"/"cli" for a top-level module."""
    parts = module.split(".")
    if len(parts) == 1:
        return "base"
    head = parts[1]
    if head == "__main__":
        return "cli"
    if head in ALLOWED and head != "base":
        return head
    if head in BASE:
        return "base"
    raise AssertionError(f"{module}: a top-level module the layer contract does not know; place it in a layer")


def imports_of(path: Path) -> set[str]:
    """Every rabbitproxy module that ``path`` imports, anywhere in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "rabbitproxy")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.split(".")[0] != "rabbitproxy":
                continue
            # "from rabbitproxy.relay import legs" imports the submodule, not just the package.
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if _exists(candidate) else target)
    return found


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").exists() or (PACKAGE / rel / "__init__.py").exists()


MODULES = sorted(PACKAGE.rglob("*.py"))
GRAPH = {module_name(p): imports_of(p) for p in MODULES}


def test_every_module_is_found() -> None:
    # Guards the test itself: an empty walk would pass every rule below.
    assert {"rabbitproxy.app", "rabbitproxy.relay.legs", "rabbitproxy.control.supervisor"} <= GRAPH.keys()
    assert "rabbitproxy.balancing.pool" in GRAPH["rabbitproxy.relay.service"]


def violations(module: str, deps: set[str]) -> list[str]:
    layer = layer_of(module)
    return sorted(
        f"{dep} ({layer_of(dep)})" for dep in deps if layer_of(dep) != layer and layer_of(dep) not in ALLOWED[layer]
    )


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down_the_layers(module: str) -> None:
    wrong = violations(module, GRAPH[module])
    assert not wrong, f"{module} ({layer_of(module)}) must not import {wrong}"


def reachable(start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        mod = todo.pop()
        if mod in seen or mod not in GRAPH:
            continue
        seen.add(mod)
        # Importing a.b.c runs a/__init__ and a/b/__init__ too.
        parts = mod.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        todo.extend(GRAPH[mod])
    return seen


def test_serve_never_reaches_the_dev_tooling() -> None:
    served = reachable("rabbitproxy.app")
    assert "rabbitproxy.relay.legs" in served
    assert not {m for m in served if m.startswith("rabbitproxy.dev")}


def test_a_violation_is_caught() -> None:
    # The checker itself, on made-up edges: upward imports are reported, downward ones are not.
    upward = violations("rabbitproxy.relay.legs", {"rabbitproxy.control.health"})
    assert upward == ["rabbitproxy.control.health (control)"]
    assert violations("rabbitproxy.balancing.pool", {"rabbitproxy.relay.legs"}) == ["rabbitproxy.relay.legs (relay)"]
    assert violations("rabbitproxy.app", {"rabbitproxy.dev.cluster"}) == ["rabbitproxy.dev.cluster (dev)"]
    assert violations("rabbitproxy.control.health", {"rabbitproxy.relay.service", "rabbitproxy.config"}) == []
