"""Self-signed TLS certificates for node and broker servers (DESIGN.md section 5).

X.509 is the one job the ``cryptography`` package does in Tessera; gRPC's TLS does the rest. Clients
pin the server's certificate (passed as the trust root), so a self-signed certificate is safe when
its fingerprint is obtained out of band or at enrolment; operators may configure real ones instead.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tessera.errors import ConfigError

# The name every self-signed Tessera certificate carries; clients override the TLS target name to it
# so a certificate works whatever address the server is reached at.
SERVER_NAME = "tessera.local"
_VALIDITY = datetime.timedelta(days=825)


def create_self_signed(cert_path: Path, key_path: Path, common_name: str) -> None:
    """Write a fresh ECDSA P-256 key (mode 0600) and a self-signed certificate for it."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = [
        x509.DNSName(SERVER_NAME),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key_bytes)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def read_pem(path: Path) -> bytes:
    """Read a PEM file, or raise ConfigError saying which file is missing."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read TLS file {path}: {exc.strerror}",
            hint="re-run init, or point tls_cert/tls_key in tessera.toml at real files",
        ) from exc


def certificate_fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of the certificate's DER bytes, hex: what operators compare out of band."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
