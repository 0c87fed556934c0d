"""TLS and limit settings: validation with key paths, SSL contexts built from them, the accept-error filter."""

from __future__ import annotations

import asyncio
import errno
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest

from rabbitproxy import config as config_mod
from rabbitproxy.config import ConfigError
from rabbitproxy.relay.listeners import AcceptErrorFilter
from rabbitproxy.relay.tls import ServiceTLS, backend_context
from tests.support.tls import make_ca


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("tls")
    ca = make_ca(d, "unit")
    cert, key = ca.issue("server")
    other_cert, other_key = ca.issue("other")
    garbage = d / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    combined = d / "combined.pem"
    combined.write_text(cert.read_text() + key.read_text())
    return {
        "ca": str(ca.cert),
        "cert": str(cert),
        "key": str(key),
        "garbage": str(garbage),
        "other_key": str(other_key),
        "other_cert": str(other_cert),
        "combined": str(combined),
    }


def service(**extra: Any) -> dict[str, Any]:
    return {"name": "s", "backends": [{"name": "b", "address": "127.0.0.1"}], **extra}


def errors(**extra: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_mod.validate({"services": [service(**extra)]})
    return info.value.errors


def test_defaults_keep_plain_tcp_and_a_hello_timeout() -> None:
    sc = config_mod.validate({"services": [service()]}).services[0]
    assert (sc.tls, sc.backend_tls, sc.send_proxy_protocol, sc.accept_proxy_protocol) == (None, False, "off", False)
    assert sc.client_hello_timeout == 10.0
    assert sc.backends[0].max_connections == 0


def test_missing_files_are_named_by_key(files: dict[str, str]) -> None:
    assert errors(tls={"cert": "/nope/cert.pem", "key": files["key"]}) == [
        "services['s'].tls.cert: '/nope/cert.pem' does not exist or is not a file"
    ]
    assert errors(backend_tls=True, backend_tls_ca="/nope/ca.pem") == [
        "services['s'].backend_tls_ca: '/nope/ca.pem' does not exist or is not a file"
    ]


@pytest.mark.parametrize(
    ("tls", "key", "message"),
    [
        ({"key": "cert"}, "tls.key", "holds a certificate, not a private key"),
        ({"cert": "key"}, "tls.cert", "holds a private key, not a certificate"),
        ({"key": "other_key"}, "tls.key", "does not match the certificate in"),
        ({"ca": "key"}, "tls.ca", "holds no CA certificate in PEM form"),
        ({"ca": "garbage"}, "tls.ca", "cannot load the CA bundle"),
    ],
)
def test_certificates_and_keys_are_loaded_and_matched_when_the_file_is_validated(
    files: dict[str, str], tls: dict[str, str], key: str, message: str
) -> None:
    # check-config, serve and a reload all validate through here, so none of them accepts these (issue 26).
    chosen = {"cert": files["cert"], "key": files["key"]} | {k: files[v] for k, v in tls.items()}
    (line,) = errors(tls=chosen)
    assert line.startswith(f"services['s'].{key}: ") and message in line, line


@pytest.mark.parametrize("ca_key", ["backend_tls_ca", "rabbitmq.ca"])
def test_other_ca_files_are_read_too(files: dict[str, str], ca_key: str) -> None:
    if ca_key == "backend_tls_ca":
        (line,) = errors(backend_tls=True, backend_tls_ca=files["key"])
    else:
        (line,) = errors(rabbitmq={"scheme": "https", "ca": files["garbage"]})
    assert line.startswith(f"services['s'].{ca_key}: "), line


def test_an_encrypted_key_is_refused_without_a_prompt(files: dict[str, str], tmp_path: Path) -> None:
    # Unattended, the proxy could only hang on OpenSSL's passphrase prompt; it says what is wrong instead.
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(
        ["openssl", "pkey", "-in", files["key"], "-aes256", "-passout", "pass:secret", "-out", str(encrypted)],
        check=True,
        capture_output=True,
    )
    (line,) = errors(tls={"cert": files["cert"], "key": str(encrypted)})
    assert line.startswith("services['s'].tls.key: ") and "is encrypted" in line, line


def test_a_key_file_that_holds_the_certificate_too_is_accepted(files: dict[str, str]) -> None:
    # HAProxy's habit: one file with both. OpenSSL takes the key from it, so serve can use it.
    sc = config_mod.validate({"services": [service(tls={"cert": files["combined"], "key": files["combined"]})]})
    assert ServiceTLS(sc.services[0]).server is not None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"verify_client": "required"}, "needs ca"),
        ({"min_version": "TLSv1.1"}, "'TLSv1.2' or 'TLSv1.3'"),
        ({"ciphers": "ALL"}, "unknown key"),
    ],
)
def test_tls_section_is_validated(files: dict[str, str], extra: dict[str, Any], message: str) -> None:
    (line,) = errors(tls={"cert": files["cert"], "key": files["key"], **extra})
    assert line.startswith("services['s'].tls") and message in line


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"send_proxy_protocol": "v3"}, "send_proxy_protocol: must be one of 'off', 'v1' or 'v2', not 'v3'"),
        ({"backend_tls_server_name": "x"}, "backend_tls_server_name: needs backend_tls = true"),
        ({"backend_tls": True, "send_proxy_protocol": "v2"}, "backend_tls: cannot be combined with send_proxy"),
        ({"client_hello_timeout": -1}, "client_hello_timeout: must not be negative"),
    ],
)
def test_service_settings_are_validated(extra: dict[str, Any], message: str) -> None:
    (line,) = errors(**extra)
    assert message in line


def test_backend_limit_and_proxy_override_are_validated() -> None:
    (line,) = errors(backends=[{"name": "b", "address": "h", "max_connections": -1}])
    assert line.startswith("services['s'].backends['b'].max_connections")
    sc = config_mod.validate(
        {
            "services": [
                service(send_proxy_protocol="v1", backends=[{"name": "b", "address": "h", "send_proxy_protocol": "v2"}])
            ]
        }
    ).services[0]
    assert sc.proxy_protocol_for(sc.backends[0]) == "v2"


def test_server_context_follows_the_config(files: dict[str, str]) -> None:
    sc = config_mod.validate(
        {
            "services": [
                service(
                    tls={
                        "cert": files["cert"],
                        "key": files["key"],
                        "ca": files["ca"],
                        "verify_client": "required",
                        "min_version": "TLSv1.3",
                    }
                )
            ]
        }
    ).services[0]
    tls = ServiceTLS(sc)
    assert tls.server is not None and tls.backend is None
    ctx = tls.server.listener
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    # With client verification on, TLS 1.3 issues no tickets: a resumed session would skip the certificate check.
    assert ctx.num_tickets == 0 and ctx.options & ssl.OP_NO_TICKET
    plain = ServiceTLS(sc.model_copy(update={"tls": sc.tls.model_copy(update={"verify_client": "none"})}))  # type: ignore[union-attr]
    assert plain.server is not None and plain.server.listener.num_tickets > 0
    # A reload builds new contexts (each with its own, empty session cache), never patches the old ones.
    assert ServiceTLS(sc).server.listener is not ctx  # type: ignore[union-attr]


def test_an_unloadable_certificate_is_a_config_error_naming_the_key(files: dict[str, str]) -> None:
    # Validation reads the files (serve, a reload and check-config alike) ...
    (line,) = errors(tls={"cert": files["garbage"], "key": files["key"]})
    assert line.startswith("services['s'].tls.cert: ") and "holds no certificate" in line
    # ... and a file that breaks between validation and use is still refused by its key when the context is built.
    sc = config_mod.validate({"services": [service(tls={"cert": files["cert"], "key": files["key"]})]}).services[0]
    assert sc.tls is not None
    broken = sc.model_copy(update={"tls": sc.tls.model_copy(update={"cert": files["garbage"]})})
    with pytest.raises(ConfigError) as info:
        ServiceTLS(broken)
    assert info.value.errors[0].startswith("services['s'].tls.cert: cannot load the certificate and key")


def test_backend_context_verifies_unless_told_not_to(files: dict[str, str]) -> None:
    sc = config_mod.validate({"services": [service(backend_tls=True, backend_tls_ca=files["ca"])]}).services[0]
    ctx = backend_context(sc)
    assert ctx is not None and ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    loose = backend_context(sc.model_copy(update={"backend_tls_verify": False}))
    assert loose is not None and loose.verify_mode == ssl.CERT_NONE and not loose.check_hostname


def test_accept_error_filter_condenses_resource_errors_and_passes_others_on() -> None:
    seen: list[dict[str, Any]] = []
    handler = AcceptErrorFilter(lambda loop, ctx: seen.append(ctx))
    loop = asyncio.new_event_loop()
    try:
        emfile = OSError(errno.EMFILE, "Too many open files")
        for _ in range(100):
            handler(loop, {"message": "socket.accept() out of system resource", "exception": emfile})
        other = {"message": "something else", "exception": RuntimeError("x")}
        handler(loop, other)
    finally:
        loop.close()
    assert handler.total == 100 and handler.suppressed == 99
    assert seen == [other]
