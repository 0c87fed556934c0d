"""Test certificates, made on the spot with the openssl binary (Debian's, always present next to Python's ssl)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@dataclass(frozen=True)
class CA:
    cert: Path
    key: Path

    def issue(
        self, name: str, *, ip: str = "127.0.0.1", dns: str = "localhost", client: bool = False
    ) -> tuple[Path, Path]:
        """A leaf certificate and key signed by this CA, valid for ``ip`` and ``dns`` (or a client certificate)."""
        d = self.cert.parent
        key, csr, cert, ext = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.pem", d / f"{name}.ext"
        usage = "clientAuth" if client else "serverAuth"
        ext.write_text(f"subjectAltName=IP:{ip},DNS:{dns}\nextendedKeyUsage={usage}\nbasicConstraints=CA:FALSE\n")
        _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key),
                 "-CAcreateserial", "-days", "2", "-out", str(cert), "-extfile", str(ext), cwd=d)  # fmt: skip
        return cert, key


def make_ca(directory: Path, name: str) -> CA:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}-ca.pem", directory / f"{name}-ca.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name} test CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=directory)  # fmt: skip
    return CA(cert, key)
