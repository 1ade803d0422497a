"""Issuing and withdrawing coordinators' credentials (DESIGN.md sections 1 and 7).

A regional coordinator opens statistics rounds and reads releases with a credential of their own:
a fresh key pair in their own home (``credential.json``, the format node staff and the broker's
operator hold, pinning the broker's address and TLS certificate), whose public key is listed
with the role coordinator in the broker's ``operators.json``. Only that public key stays with the
broker. Removing the entry withdraws the credential from the broker's next request on: the
servers re-read the file (broker.identity.load_operators), so nothing needs a restart.

These run on the broker's host against its home, as ``broker init`` does; the broker may be
running or not.
"""

from __future__ import annotations

import datetime as dt
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker import identity as broker_identity
from broker.identity import BrokerRole, Operator
from tessera import credential, crypto
from tessera.config import Role, Settings
from tessera.errors import ConfigError, Conflict, InvalidInput

MAX_NAME_CHARS = 100


@dataclass(frozen=True)
class IssuedCredential:
    """A coordinator just listed with the broker, and where their credential was written."""

    operator: Operator
    home: Path
    broker_address: str


def add_coordinator(
    settings: Settings, name: str, out_home: Path, address: str = ""
) -> IssuedCredential:
    """Make a coordinator called ``name``: a new identity whose credential is written into
    ``out_home`` and whose public key is listed in operators.json.

    ``address`` is where the coordinator reaches the broker (host:port); by default the address
    a running broker recorded in its home, else its configured ``listen`` address. Refuses a
    name already listed and an ``out_home`` that holds anything (Conflict), so no credential is
    ever overwritten. If listing the key fails, the credential just written is deleted again.
    """
    home = _broker_home(settings)
    name = _check_name(name)
    if any(o.name == name for o in broker_identity.load_operators(home)):
        raise Conflict(
            f"{name!r} is already listed with this broker",
            hint="choose another name, or `tessera broker coordinator remove` the old one first",
        )
    out_home = out_home.resolve()
    if out_home.exists() and (not out_home.is_dir() or any(out_home.iterdir())):
        raise Conflict(
            f"{out_home} already exists and is not an empty folder",
            hint="choose a new folder for the coordinator's credential (it becomes their --home)",
        )
    reach = _broker_address(settings, address)
    try:
        certificate = settings.cert_path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the broker's TLS certificate {settings.cert_path} ({exc})",
            hint="check `tls_cert` in the broker's tessera.toml",
        ) from None
    created_folder = not out_home.exists()
    issued = crypto.Identity.generate()
    written = credential.write(
        out_home,
        credential.Credential(
            name=name, identity=issued, node_address=reach, node_certificate=certificate
        ),
        lock=None,
    )
    operator = Operator(
        name=name,
        role=BrokerRole.COORDINATOR,
        signing_key=issued.public.signing_key,
        added_at=dt.datetime.now(dt.UTC).replace(microsecond=0),
    )
    try:
        broker_identity.add_operator(home, operator)
    except BaseException:
        # The key was never listed, so its credential opens nothing: do not leave it behind.
        written.unlink(missing_ok=True)
        if created_folder:
            out_home.rmdir()
        raise
    return IssuedCredential(operator=operator, home=out_home, broker_address=reach)


def list_people(settings: Settings) -> list[Operator]:
    """Everyone listed in operators.json: operators and coordinators, in the file's order."""
    return broker_identity.load_operators(_broker_home(settings))


def remove_coordinator(settings: Settings, name: str) -> Operator:
    """Withdraw the coordinator called ``name``; their next request is refused.

    NotFound if nobody has that name; Refused if that person is an operator (this command
    removes coordinators only).
    """
    return broker_identity.remove_operator(_broker_home(settings), name, BrokerRole.COORDINATOR)


def person_row(operator: Operator) -> dict[str, Any]:
    """One line of ``broker coordinator list``: name, role, the key the broker checks, added_at."""
    return {
        "name": operator.name,
        "role": operator.role.value,
        "signing_key": operator.signing_key.hex(),
        "added_at": operator.added_at.isoformat() if operator.added_at is not None else None,
    }


def _broker_home(settings: Settings) -> Path:
    if settings.role is not Role.BROKER:
        raise ConfigError(
            f"{settings.home} is not a broker's home",
            hint="pass the broker's directory with --home (where `tessera broker init` ran)",
        )
    return settings.home


def _check_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > MAX_NAME_CHARS:
        raise InvalidInput(f"a coordinator's name has 1 to {MAX_NAME_CHARS} characters")
    if any(unicodedata.category(c).startswith("C") for c in name):
        raise InvalidInput("a coordinator's name may not contain control characters")
    return name


def _broker_address(settings: Settings, address: str) -> str:
    if not address:
        # A running broker records the address it actually bound (its port may be chosen at
        # start-up); otherwise use the configured one, which then needs a fixed port.
        recorded = credential.recorded_address(settings.home)
        if recorded is not None:
            address = recorded
        else:
            _host, _, port = settings.listen.rpartition(":")
            if port == "0":
                raise ConfigError(
                    f"the broker listens on a port chosen at start-up ({settings.listen}) "
                    "and is not running",
                    hint="start it with `tessera broker serve` first, or pass --address HOST:PORT",
                )
            if not port.isdigit():
                raise ConfigError(
                    f"the broker's listen address {settings.listen!r} has no port",
                    hint="pass --address HOST:PORT",
                )
            address = credential.reachable_address(settings.listen, int(port))
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInput(
            f"{address!r} is not a HOST:PORT address", hint="e.g. broker.example.org:7440"
        )
    return address
