"""Credentials: a person's own key pair plus how to reach their server (issue 4 item 6).

Node staff and broker operators both hold one. The servers record the address they actually
bound in ``run/node.json`` in their home, so a credential in the same home finds them even when
they listen on a port chosen at start-up.

A credential lives in that person's own ``--home`` as ``credential.json`` (mode 0600) and never
leaves it: only its public key is registered with the node. ``node init`` writes the first
administrator's credential into the node's own home, so one person on one laptop has nothing more
to set up.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from tessera import crypto
from tessera.errors import ConfigError

CREDENTIAL_FILE = "credential.json"
RUN_FILE = Path("run") / "node.json"
_FORMAT = "tessera-staff-credential-v1"


@dataclass(frozen=True)
class Credential:
    """A staff member's identity and their node's address and TLS certificate."""

    name: str
    identity: crypto.Identity
    node_address: str
    node_certificate: bytes

    def __repr__(self) -> str:
        return f"Credential(name={self.name!r}, node_address={self.node_address!r})"


def write(home: Path, credential: Credential) -> Path:
    """Write ``home/credential.json`` with mode 0600; refuses to overwrite one."""
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = home / CREDENTIAL_FILE
    document = {
        "format": _FORMAT,
        "name": credential.name,
        "node_address": credential.node_address,
        "node_certificate": credential.node_certificate.decode(),
        "secret": credential.identity.to_secret_bytes().hex(),
    }
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(
            f"{path} already exists", hint="use another --home for another person"
        ) from None
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2)
    return path


def read(home: Path) -> Credential:
    """Load the credential in ``home``; ConfigError saying how to get one if there is none."""
    path = home / CREDENTIAL_FILE
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        if document.get("format") != _FORMAT:
            raise ValueError("unknown format")
        return Credential(
            name=str(document["name"]),
            identity=crypto.Identity.from_secret_bytes(bytes.fromhex(document["secret"])),
            node_address=str(document["node_address"]),
            node_certificate=str(document["node_certificate"]).encode(),
        )
    except FileNotFoundError:
        raise ConfigError(
            f"no staff credential in {home}",
            hint="run `tessera node init` there, or ask your administrator for a credential "
            "(`tessera node staff add`) and pass its folder with --home",
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"{path} is not a valid staff credential ({exc})",
            hint="ask your administrator for a new one",
        ) from None


def resolve_address(home: Path, credential: Credential) -> str:
    """Where the node listens: the address a running node recorded in this home, else the
    credential's."""
    return recorded_address(home) or credential.node_address


def recorded_address(home: Path) -> str | None:
    """The address a server running from ``home`` recorded in its run file, if there is one."""
    run_file = home / RUN_FILE
    if run_file.exists():
        try:
            return str(json.loads(run_file.read_text())["address"])
        except (OSError, ValueError, KeyError):
            pass
    return None


def reachable_address(listen: str, port: int) -> str:
    """The address clients use for a server bound on ``listen`` that got ``port``."""
    host = listen.rsplit(":", 1)[0] or "127.0.0.1"
    wildcard = host in ("0.0.0.0", "[::]")  # noqa: S104 - recognising, not binding
    return f"{'127.0.0.1' if wildcard else host}:{port}"


def write_run_file(home: Path, address: str) -> None:
    """Record where a running server listens (removed again on a graceful stop)."""
    path = home / RUN_FILE
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text(json.dumps({"address": address, "pid": os.getpid()}))
