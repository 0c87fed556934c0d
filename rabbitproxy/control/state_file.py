"""``[admin] state_file``: what an operator set at runtime (drain, maint, weights), kept across restarts.

The file is JSON, rewritten after every change an operator makes through the admin API and after every reload;
it holds only the backends an operator changed. Each is written atomically (a temporary file in the same
directory, fsync, rename, fsync of the directory), so a crash leaves the old file or the new one, never half of
one. It is read once, at start, before any listener serves.

A runtime weight is stored with the file's weight it overrode (``file_weight``). At start, and at a reload, the
override is restored only while the configuration still says that weight: a weight edited in the file since then is
the newer decision and wins. This is HAProxy's rule for its server-state file.

A state file that cannot be read or makes no sense never stops the proxy: it starts from its configuration, logs
why, and moves the bad file aside (``<name>.bad-<UTC timestamp>``) so the next save does not destroy the evidence.
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from rabbitproxy.balancing.backend import ADMIN_STATES, AdminState
from rabbitproxy.balancing.reasons import CloseReason

if TYPE_CHECKING:
    from rabbitproxy.relay.service import Service

log = structlog.get_logger("rabbitproxy.state")

VERSION = 1
# A state file names a few backends; anything much larger is not ours.
MAX_SIZE = 4 * 1024 * 1024


class StateFileError(Exception):
    """The state file cannot be read or is not one of ours; ``str()`` says why."""


@dataclass(frozen=True, slots=True)
class SavedBackend:
    state: AdminState
    # The runtime weight and the file's weight it overrode; both None without an override.
    weight: int | None
    file_weight: int | None


def snapshot(services: Mapping[str, Service]) -> dict[str, Any]:
    """The JSON document for the operator changes of ``services`` (only the backends an operator changed)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, service in services.items():
        for b in service.pool.backends:
            if b.operator_state == "ready" and not b.weight_overridden:
                continue
            entry: dict[str, Any] = {"state": b.operator_state}
            if b.weight_overridden:
                entry["weight"] = b.configured_weight
                entry["file_weight"] = b.config.weight
            out.setdefault(name, {})[b.name] = entry
    return {"version": VERSION, "services": out}


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: all of it or nothing, even across a power cut."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # The rename is durable only once the directory that records it is on disk.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save(path: Path, services: Mapping[str, Service]) -> bool:
    """Write the operator changes; log and return False when the file cannot be written (the change stays)."""
    data = json.dumps(snapshot(services), indent=2, sort_keys=True).encode() + b"\n"
    try:
        write_atomic(path, data)
    except OSError as exc:
        log.error("state file not written: operator changes will not survive a restart", path=str(path), error=str(exc))
        return False
    return True


def parse(raw: bytes) -> dict[str, dict[str, SavedBackend]]:
    """The saved backends by service and name; StateFileError when ``raw`` is not a state file of ours."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise StateFileError(f"not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION or not isinstance(doc.get("services"), dict):
        raise StateFileError(f"not a rabbitproxy state file of version {VERSION}")
    out: dict[str, dict[str, SavedBackend]] = {}
    for svc, backends in doc["services"].items():
        if not isinstance(backends, dict):
            raise StateFileError(f"services.{svc}: not a table of backends")
        for name, entry in backends.items():
            out.setdefault(svc, {})[name] = _entry(f"services.{svc}.{name}", entry)
    return out


def _entry(where: str, entry: Any) -> SavedBackend:
    if not isinstance(entry, dict) or entry.get("state") not in ADMIN_STATES:
        raise StateFileError(f"{where}: state must be one of {', '.join(ADMIN_STATES)}")
    weight, file_weight = entry.get("weight"), entry.get("file_weight")
    for key, value in (("weight", weight), ("file_weight", file_weight)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1000):
            raise StateFileError(f"{where}.{key}: not a weight from 0 to 1000")
    if (weight is None) != (file_weight is None):
        raise StateFileError(f"{where}: weight and file_weight go together")
    return SavedBackend(entry["state"], weight, file_weight)


def read(path: Path) -> dict[str, dict[str, SavedBackend]] | None:
    """The saved state; None when there is no file yet; StateFileError when it is unreadable or bad."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_SIZE + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateFileError(f"cannot read it: {exc.strerror or exc}") from None
    if len(raw) > MAX_SIZE:
        raise StateFileError(f"larger than {MAX_SIZE} bytes")
    return parse(raw)


def set_aside(path: Path) -> Path | None:
    """Rename a bad state file to ``<name>.bad-<UTC timestamp>``; None if even that fails."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.bad-{stamp}")
    try:
        os.replace(path, target)
    except OSError:
        return None
    return target


def restore(path: Path, services: Mapping[str, Service]) -> None:
    """Apply the saved operator changes to ``services`` (just built, serving nobody yet); never raises for the file."""
    try:
        saved = read(path)
    except StateFileError as exc:
        aside = set_aside(path)
        log.error(
            "state file ignored: starting from the configuration",
            path=str(path),
            reason=str(exc),
            moved_to=str(aside) if aside else None,
        )
        return
    if saved is None:
        log.info("no state file yet: starting from the configuration", path=str(path))
        return
    restored = 0
    for svc_name, backends in saved.items():
        service = services.get(svc_name)
        for name, entry in backends.items():
            backend = service.pool.by_name.get(name) if service is not None else None
            if backend is None:
                log.info("state file: backend no longer configured, forgotten", service=svc_name, backend=name)
                continue
            backend.set_operator_state(entry.state, CloseReason.BACKEND_MAINT, close=False)
            if entry.weight is not None:
                if entry.file_weight == backend.config.weight:
                    backend.set_weight(entry.weight)
                else:
                    log.info(
                        "state file: runtime weight dropped, the file's weight changed since it was set",
                        service=svc_name,
                        backend=name,
                        runtime_weight=entry.weight,
                        file_weight=backend.config.weight,
                    )
            restored += 1
    log.info("operator changes restored from the state file", path=str(path), backends=restored)
