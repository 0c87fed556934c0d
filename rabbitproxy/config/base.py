"""What every configuration model shares: the error type, the frozen base model, value types, host and file checks."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class ConfigError(Exception):
    """The configuration is invalid; ``errors`` holds one ``"key.path: reason"`` line per problem."""

    def __init__(self, errors: list[str], source: str = "") -> None:
        self.errors = errors
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(where + "invalid configuration:\n" + "\n".join(f"  {e}" for e in errors))


# Letters, digits and hyphens per label (RFC 1123), plus the underscore: Docker Compose v1 container names and
# other local names carry one, and the system resolver looks them up without complaint.
_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


def check_host(host: str) -> str:
    """Return ``host`` if it is an IP literal or could be a DNS name, else raise ``ValueError`` saying why.

    Only the shape is checked, nothing is looked up. A name that fails here would fail every connect and every
    check (getaddrinfo raises ``UnicodeError`` for an empty or over-long label, before any lookup), so it is
    refused when the configuration is read. Non-ASCII names are refused too: write them in their ``xn--`` form.
    """
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    # One trailing dot is the fully qualified form of the same name.
    name = host.removesuffix(".")
    if not name:
        raise ValueError(f"{host!r} is not a host name or IP address")
    if len(name) > 253:
        raise ValueError(f"{host[:40]!r}...: a host name has at most 253 characters, this one {len(name)}")
    for label in name.split("."):
        if not label:
            raise ValueError(f"{host!r} is not a valid host name: empty label (two dots in a row, or a leading dot)")
        if len(label) > 63:
            raise ValueError(f"{host!r} is not a valid host name: label {label[:20]!r}... is longer than 63 characters")
        if not _LABEL_CHARS.issuperset(label):
            bad = next(c for c in label if c not in _LABEL_CHARS)
            raise ValueError(
                f"{host!r} is not a valid host name: {bad!r} (only letters, digits, '-', '_' and '.' are allowed;"
                " write an international name in its xn-- form)"
            )
        if label.startswith("-") or label.endswith("-"):
            raise ValueError(f"{host!r} is not a valid host name: label {label!r} starts or ends with '-'")
    return host


class _Model(BaseModel):
    # Unknown keys are errors: a misspelt option that is silently ignored is worse than a refusal to start.
    model_config = ConfigDict(extra="forbid", frozen=True)


Seconds = Annotated[float, Field(ge=0)]
PositiveSeconds = Annotated[float, Field(gt=0)]
Port = Annotated[int, Field(gt=0, lt=65536)]


ProxyProtocolVersion = Literal["off", "v1", "v2"]
TLSVersion = Literal["TLSv1.2", "TLSv1.3"]


def _existing_file(v: str) -> str:
    # Phase one checks that the file is there, so a typo is reported with its key; reading it is phase two's job.
    if v and not Path(v).is_file():
        raise ValueError(f"{v!r} does not exist or is not a file")
    return v
