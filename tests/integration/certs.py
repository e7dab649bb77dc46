"""A certificate authority and certificates made by the test run, with ``openssl``."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Sequence

import attrs
import pytest


@attrs.frozen
class Issued:
    """A certificate and its key, as PEM files."""

    cert: Path
    key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


class CertificateAuthority:
    """A throwaway CA: ``issue`` signs server certificates for the given names."""

    def __init__(self, directory: Path) -> None:
        if shutil.which("openssl") is None:
            pytest.skip("openssl is needed to make the test certificates (apt-get install openssl)")
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.cert, self.key = directory / "ca.pem", directory / "ca.key"
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-days", "2", "-subj", "/CN=lbsvc test CA", "-keyout", str(self.key), "-out", str(self.cert))

    def issue(self, name: str, alt_names: Sequence[str], usage: str = "serverAuth,clientAuth") -> Issued:
        """A certificate for ``alt_names`` (``DNS:…`` or ``IP:…``) signed by this CA, for servers and clients."""
        key, csr, cert = (self.directory / f"{name}.{ext}" for ext in ("key", "csr", "pem"))
        extensions = self.directory / f"{name}.ext"
        extensions.write_text(f"subjectAltName={','.join(alt_names)}\nextendedKeyUsage={usage}\n")
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(csr))
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key),
                 "-CAcreateserial", "-days", "2", "-extfile", str(extensions), "-out", str(cert))
        return Issued(cert, key)

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts this CA only."""
        return ssl.create_default_context(cafile=str(self.cert))

    @staticmethod
    def server_context(issued: Issued) -> ssl.SSLContext:
        """A server context presenting ``issued``."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(issued.cert), str(issued.key))
        return context
