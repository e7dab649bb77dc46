"""TLS to a dependency (the broker, Redis, PostgreSQL, a peer), verified, never a silent downgrade.

:class:`ClientTLS` is what an operator asks for one link: whose certificates
to trust (a CA file, or the system's CAs when none is named) and, optionally,
a client certificate and its key.  The server's certificate must chain to
that trust and name the host connected to (a DNS name or an IP address,
checked by ``service_identity``); the name goes out as SNI.  :meth:`check`
loads every file at start, so a CA file that does not parse, a certificate
without its key or a key that is not the certificate's stops the daemon with
one line instead of failing on every connection.

Twisted links take :meth:`creator` (``optionsForClientTLS``) and
:meth:`wrap` (``wrapClientTLS`` around a TCP endpoint); a blocking driver
running in a thread (pg8000) takes :meth:`context`, an ``ssl.SSLContext``
with the same rules.
"""

from __future__ import annotations

import re
import ssl as stdlib_ssl
from typing import Any, Optional, Sequence

import attrs
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import ssl
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None


def read_ca_file(path: str) -> Sequence[ssl.Certificate]:
    """The certificates in a PEM file; ``ValueError`` naming what is wrong."""
    blocks = _PEM.findall(_read(path))
    if not blocks:
        raise ValueError(f"{path} holds no PEM certificate")
    try:
        return [ssl.Certificate.loadPEM(block) for block in blocks]
    except Exception as e:  # OpenSSL's own error types
        raise ValueError(f"{path}: a certificate does not load: {e}") from None


def tls_failure(reason: Any) -> Optional[str]:
    """One line for a connection ended by TLS (OpenSSL's error list, or a certificate for another name);
    None when ``reason`` (an exception or a ``Failure``) is not about TLS."""
    value = getattr(reason, "value", reason)
    if isinstance(value, SSL.Error):
        details = value.args[0] if value.args and isinstance(value.args[0], list) else []
        reasons = [entry[-1] for entry in details if isinstance(entry, tuple) and entry and entry[-1]]
        return "TLS: " + ("; ".join(reasons) or str(value) or "handshake failed")
    if isinstance(value, VerificationError):
        return f"TLS: the certificate does not name this host ({value})"
    return None


def describe_tls_failure(reason: Any) -> str:
    """:func:`tls_failure`, or else whatever ended the connection, in one line."""
    value = getattr(reason, "value", reason)
    return tls_failure(value) or str(value) or type(value).__name__


@attrs.frozen
class ClientTLS:
    """TLS for one link: trust (a CA file or the system's) and an optional client certificate."""

    ca_file: Optional[str] = None
    """PEM certificates to trust instead of the system's CAs."""
    cert_file: Optional[str] = None
    """A client certificate (PEM), sent when the server asks; needs ``key_file``."""
    key_file: Optional[str] = None

    def check(self) -> None:
        """Load every file now; ``ValueError`` with one line saying what is wrong."""
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs both its certificate file and its key file")
        self._trust()
        self._client_certificate()

    def _trust(self) -> Any:
        if self.ca_file is None:
            return ssl.platformTrust()
        return ssl.trustRootFromCertificates(list(read_ca_file(self.ca_file)))

    def _client_certificate(self) -> Optional[ssl.PrivateCertificate]:
        if self.cert_file is None or self.key_file is None:
            return None
        certificate, key = _read(self.cert_file), _read(self.key_file)
        try:
            loaded: ssl.PrivateCertificate = ssl.PrivateCertificate.loadPEM(certificate + b"\n" + key)
        except Exception as e:  # OpenSSL's own error types: not PEM, or not this certificate's key
            raise ValueError(f"client certificate {self.cert_file} with key {self.key_file} does not load:"
                             f" {describe_tls_failure(e)}") from None
        return loaded

    def creator(self, hostname: str) -> IOpenSSLClientConnectionCreator:
        """Twisted's connection options: the server verified for ``hostname``, which goes out as SNI."""
        return ssl.optionsForClientTLS(hostname, trustRoot=self._trust(),
                                       clientCertificate=self._client_certificate())

    def wrap(self, endpoint: IStreamClientEndpoint, hostname: str) -> IStreamClientEndpoint:
        """``endpoint`` with TLS on top, verified for ``hostname``."""
        return wrapClientTLS(self.creator(hostname), endpoint)

    def context(self, check_hostname: bool = True, verify: bool = True) -> stdlib_ssl.SSLContext:
        """The same rules as a standard-library context (for drivers that take one)."""
        context = stdlib_ssl.create_default_context(cafile=self.ca_file)
        context.check_hostname = check_hostname and verify
        if not verify:
            context.verify_mode = stdlib_ssl.CERT_NONE
        if self.cert_file is not None and self.key_file is not None:
            try:
                context.load_cert_chain(self.cert_file, self.key_file)
            except (OSError, stdlib_ssl.SSLError) as e:
                raise ValueError(f"client certificate {self.cert_file} with key {self.key_file} does not load:"
                                 f" {e}") from None
        return context
