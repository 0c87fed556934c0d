"""The files a configuration names (certificates, keys, CA bundles): read and checked when the file is validated.

``serve``, a reload and ``check-config`` all validate through here, so a key that does not match its certificate,
a "key" file that holds a certificate or a CA bundle OpenSSL cannot read is refused by all three, naming the key,
instead of passing ``check-config`` and failing at start. The SSL contexts the proxy uses are still built later,
from the validated data (:mod:`rabbitproxy.relay.tls`); the ones made here only prove the files load, and are
dropped.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from pydantic import ValidationInfo


def _read(path: str) -> str:
    if not Path(path).is_file():
        raise ValueError(f"{path!r} does not exist or is not a file")
    try:
        return Path(path).read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        raise ValueError(f"cannot read {path!r}: {exc.strerror or exc}") from None


def existing_file(path: str) -> str:
    """A field validator: ``path`` (if set) names a readable file."""
    if path:
        _read(path)
    return path


def certificate_file(path: str) -> str:
    """A field validator: ``path`` holds a certificate in PEM form."""
    text = _read(path)
    if "-----BEGIN CERTIFICATE-----" not in text:
        what = "a private key, not a certificate" if "PRIVATE KEY-----" in text else "no certificate in PEM form"
        raise ValueError(f"{path!r} holds {what}")
    try:
        # Parses every certificate in the file, so a damaged one is blamed on this key, not on the key's.
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise ValueError(f"{path!r} holds no certificate OpenSSL can read: {exc}") from None
    return path


def key_file(path: str, info: ValidationInfo) -> str:
    """A field validator for ``key`` after ``cert``: a private key in PEM form that belongs to that certificate."""
    text = _read(path)
    if "PRIVATE KEY-----" not in text:
        cert_only = "-----BEGIN CERTIFICATE-----" in text
        what = "a certificate, not a private key" if cert_only else "no private key in PEM form"
        raise ValueError(f"{path!r} holds {what}")
    cert = info.data.get("cert")
    if cert is None:
        # The certificate has an error of its own; there is nothing to match the key against.
        return path
    if "ENCRYPTED" in text:
        raise ValueError(f"{path!r} is encrypted: the proxy starts unattended and needs the key without a passphrase")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, path)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ValueError(f"{path!r} does not match the certificate in {cert!r}") from None
        raise ValueError(f"cannot load the certificate {cert!r} with the key {path!r}: {exc}") from None
    return path


def ca_file(path: str) -> str:
    """A field validator: ``path`` (if set) is a CA bundle OpenSSL can load."""
    if not path:
        return path
    text = _read(path)
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise ValueError(f"{path!r} holds no CA certificate in PEM form")
    try:
        ssl.create_default_context(cafile=path)
    except ssl.SSLError as exc:
        raise ValueError(f"cannot load the CA bundle {path!r}: {exc}") from None
    return path
