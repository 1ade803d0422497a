"""Enrolment codes: what a broker operator hands an agency administrator (DESIGN.md section 5).

A code carries the broker's address, the SHA-256 of its TLS certificate, and a one-time token
bound to the agency id and region. The node fetches the broker's certificate, accepts it only if
its fingerprint matches the code (so a self-signed broker certificate is safe to trust), then
enrols over TLS with the token. Hand the code over a channel you trust; it is single-use and
expires.
"""

from __future__ import annotations

import base64
import hashlib
import json
import ssl
from dataclasses import dataclass

from tessera.errors import InvalidInput, Unavailable

PREFIX = "TESSERA-ENROL-"


@dataclass(frozen=True)
class EnrolmentCode:
    """The decoded content of an enrolment code."""

    broker_address: str
    certificate_sha256: str
    token: str
    agency_id: str
    region: str

    def encode(self) -> str:
        """The code as one copy-pasteable line."""
        document = {
            "b": self.broker_address,
            "c": self.certificate_sha256,
            "t": self.token,
            "a": self.agency_id,
            "r": self.region,
        }
        raw = json.dumps(document, separators=(",", ":")).encode()
        return PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(code: str) -> EnrolmentCode:
    """Parse a code; InvalidInput saying what is wrong with it."""
    text = code.strip()
    if not text.startswith(PREFIX):
        raise InvalidInput(
            "that is not a Tessera enrolment code",
            hint=f"codes start with {PREFIX}; ask the broker operator for one",
        )
    body = text[len(PREFIX) :]
    try:
        document = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        return EnrolmentCode(
            broker_address=str(document["b"]),
            certificate_sha256=str(document["c"]),
            token=str(document["t"]),
            agency_id=str(document["a"]),
            region=str(document["r"]),
        )
    except (ValueError, KeyError, TypeError):
        raise InvalidInput(
            "the enrolment code is damaged",
            hint="copy it again, whole, from the operator's message",
        ) from None


def certificate_sha256(cert_pem: bytes) -> str:
    """SHA-256 of a PEM certificate's DER bytes, hex."""
    der = ssl.PEM_cert_to_DER_cert(cert_pem.decode())
    return hashlib.sha256(der).hexdigest()


def fetch_certificate(code: EnrolmentCode, timeout: float = 10.0) -> bytes:
    """The broker's certificate, fetched over TLS and accepted only if it matches the code."""
    host, _sep, port = code.broker_address.rpartition(":")
    try:
        pem = ssl.get_server_certificate((host.strip("[]"), int(port)), timeout=timeout)
    except (TimeoutError, OSError, ValueError) as exc:
        raise Unavailable(
            f"cannot reach the broker at {code.broker_address}: {exc}",
            hint="check the address and that the broker is running",
        ) from None
    if certificate_sha256(pem.encode()) != code.certificate_sha256:
        raise InvalidInput(
            "the broker's TLS certificate does not match the enrolment code",
            hint="someone may be impersonating the broker; check with the operator",
        )
    return pem.encode()
