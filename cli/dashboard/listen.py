"""Where the dashboard listens, and with what TLS material.

Plain HTTP is served on loopback only: anything else needs TLS, because the page and its
downloads would otherwise cross a network in clear and could be altered on the way. The TLS
material is, in order: ``--tls-cert`` and ``--tls-key`` as given; with ``--tls``, the home's own
(``tls/server.crt`` and ``tls/server.key``: the broker's, when the home is the broker's), else a
self-signed certificate made once with the ``cryptography`` package (``tessera.tls``) and kept
in ``dashboard-tls/`` in the home, so a browser that accepted it once keeps accepting it.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from tessera.errors import ConfigError, InvalidInput, Refused

LOOPBACK_NAMES = ("localhost",)
HOME_TLS = Path("tls")
DASHBOARD_TLS = Path("dashboard-tls")
CERT_FILE, KEY_FILE = "server.crt", "server.key"
_MAX_PORT = 65535


@dataclass(frozen=True)
class Listen:
    """A ``host:port`` to bind; port 0 asks the system for a free one."""

    host: str
    port: int

    @property
    def is_loopback(self) -> bool:
        if self.host in LOOPBACK_NAMES:
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def url_host(self) -> str:
        """The host as a URL writes it: IPv6 in brackets, an unspecified address as loopback."""
        try:
            address = ipaddress.ip_address(self.host)
        except ValueError:
            return self.host
        if address.is_unspecified:
            address = ipaddress.ip_address("::1" if address.version == 6 else "127.0.0.1")
        return f"[{address}]" if address.version == 6 else str(address)


def parse_listen(text: str) -> Listen:
    """``127.0.0.1:8443``, ``localhost:0``, ``[::1]:8443`` or ``0.0.0.0:8443``."""
    host, sep, port = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > _MAX_PORT:
        raise InvalidInput(
            f"--listen must be HOST:PORT, not {text!r}",
            hint="for example --listen 127.0.0.1:8443 (port 0: any free port)",
        )
    return Listen(host, int(port))


@dataclass(frozen=True)
class TlsFiles:
    """A certificate and its key; ``fingerprint`` is the certificate's SHA-256, to compare
    with what the browser shows for a self-signed one."""

    cert: Path
    key: Path
    fingerprint: str
    made: bool = False  # made just now (a new self-signed certificate)

    def context(self) -> ssl.SSLContext:
        """A server TLS context (TLS 1.2 at least) holding the certificate and key."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot use the TLS certificate {self.cert} with the key {self.key}: {exc}",
                hint="give a PEM certificate and its matching unencrypted PEM key",
            ) from exc
        return context


def tls_files(home: Path, tls: bool, cert: Path | None, key: Path | None) -> TlsFiles | None:
    """The TLS material to serve with, or None for plain HTTP (see the module's docstring)."""
    from tessera.tls import certificate_fingerprint, create_self_signed, read_pem

    if (cert is None) != (key is None):
        raise InvalidInput(
            "--tls-cert and --tls-key go together", hint="give both, or --tls for the home's own"
        )
    if cert is not None and key is not None:
        return TlsFiles(cert, key, certificate_fingerprint(read_pem(cert)))
    if not tls:
        return None
    own = home / HOME_TLS
    if (own / CERT_FILE).is_file() and (own / KEY_FILE).is_file():
        chosen, made = own, False
    else:
        chosen, made = home / DASHBOARD_TLS, False
        if not (chosen / CERT_FILE).is_file() or not (chosen / KEY_FILE).is_file():
            chosen.mkdir(mode=0o700, parents=True, exist_ok=True)
            create_self_signed(chosen / CERT_FILE, chosen / KEY_FILE, "Tessera dashboard")
            made = True
    return TlsFiles(
        chosen / CERT_FILE,
        chosen / KEY_FILE,
        certificate_fingerprint(read_pem(chosen / CERT_FILE)),
        made,
    )


def check_transport(listen: Listen, tls: TlsFiles | None) -> None:
    """Refuse plain HTTP anywhere but loopback (before anything is bound or contacted)."""
    if tls is None and not listen.is_loopback:
        raise Refused(
            f"--listen {listen.host}:{listen.port} is not a loopback address, and without TLS"
            " the dashboard would serve it over plain HTTP",
            hint="add --tls (or --tls-cert FILE --tls-key FILE) to serve HTTPS there,"
            " or listen on 127.0.0.1",
        )
