"""What every configuration model shares: the error type, the frozen base model, value types, host and file checks."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict

from rabbitproxy.addresses import PORT_RULE
from rabbitproxy.durations import duration_seconds


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
    _check_not_a_number(host, name)
    if ":" in name:
        if name.count(":") > 1:
            raise ValueError(f"{host!r} is not a valid IPv6 address")
        raise ValueError(f"{host!r} is not a host name or IP address: a port goes in its own key, not after ':'")
    if len(name) > 253:
        raise ValueError(f"{host[:40]!r}...: a host name has at most 253 characters, this one {len(name)}")
    for label in name.split("."):
        _check_label(host, label)
    return host


def _check_not_a_number(host: str, name: str) -> None:
    """Refuse what the resolver would read as an IPv4 address in one of its old forms.

    ``inet_aton`` behind getaddrinfo takes ``010.0.0.10`` as octal (8.0.0.10), ``12345`` as 0.0.48.57 and
    ``0x0a.1`` as hex, so only the canonical dotted quad, which :mod:`ipaddress` accepted above, may be a number.
    As in the WHATWG URL standard, a name whose last label is a number is such an attempt.
    """
    last = name.rsplit(".", 1)[-1].lower()
    if not (last.isdigit() or (last.startswith("0x") and all(c in "0123456789abcdef" for c in last[2:]))):
        return
    if name.isdigit():
        raise ValueError(
            f"{host!r} is all digits, which is not a host name (the resolver would read it as an IPv4 address);"
            " write an IPv4 address as four numbers, such as 10.0.0.10"
        )
    octal = any(len(part) > 1 and part.startswith("0") for part in name.split("."))
    raise ValueError(
        f"{host!r} is not a valid IPv4 address: write four decimal numbers from 0 to 255 without leading zeros,"
        " such as 10.0.0.10" + (" (a leading 0 makes the resolver read octal: 010.0.0.10 is 8.0.0.10)" if octal else "")
    )


def _check_label(host: str, label: str) -> None:
    if not label:
        raise ValueError(f"{host!r} is not a valid host name: empty label (two dots in a row, or a leading dot)")
    if len(label) > 63:
        raise ValueError(f"{host!r} is not a valid host name: label {label[:20]!r}... is longer than 63 characters")
    if not _LABEL_CHARS.issuperset(label):
        bad = next(c for c in label if c not in _LABEL_CHARS)
        hint = "; write an international name in its xn-- form" if not bad.isascii() else ""
        raise ValueError(
            f"{host!r} is not a valid host name: {bad!r} (only letters, digits, '-', '_' and '.' are allowed{hint})"
        )
    if label.startswith("-") or label.endswith("-"):
        raise ValueError(f"{host!r} is not a valid host name: label {label!r} starts or ends with '-'")


class _Model(BaseModel):
    # Unknown keys are errors: a misspelt option that is silently ignored is worse than a refusal to start.
    # Strict: a string is not a number and "on" is not true. A quoted port in a file is a mistake to point out,
    # not to guess at, and ``backup = "false"`` must never mean true.
    # TOML has inf and nan; neither is a tolerance or a rate.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def _port(value: Any) -> Any:
    # One wording for every port mistake: out of range, a string, a float, a boolean.
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ValueError(f"{PORT_RULE}, not {value!r}")
    return value


def _positive(value: float) -> float:
    if not value > 0:
        raise ValueError("must be more than 0 seconds")
    return value


def _whole_seconds(value: Any) -> int:
    seconds = duration_seconds(value)
    if seconds != int(seconds):
        raise ValueError(f"must be whole seconds, not {seconds:g} s")
    return int(seconds)


# Durations: seconds as a number, or a string in the command line's grammar ("250ms", "5s", "2m", "1h").
Seconds = Annotated[float, BeforeValidator(duration_seconds)]
PositiveSeconds = Annotated[float, BeforeValidator(duration_seconds), AfterValidator(_positive)]
WholeSeconds = Annotated[int, BeforeValidator(_whole_seconds)]
Port = Annotated[int, BeforeValidator(_port)]


ProxyProtocolVersion = Literal["off", "v1", "v2"]
TLSVersion = Literal["TLSv1.2", "TLSv1.3"]
