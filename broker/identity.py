"""The broker's own keys and the people who operate it.

The broker's Ed25519 identity signs directory entries, heads, relay receipts and releases; it opens
no envelope (DESIGN.md section 4: the broker holds no key that opens survivor data). It lives in
``keys/broker.json`` (mode 0600) in the broker's home. Operators and coordinators are listed in
``operators.json`` with their public keys and roles; their private keys are in their own homes
(``credential.json``, the same format as a node staff credential).
"""

from __future__ import annotations

import enum
import json
import os
from dataclasses import dataclass
from pathlib import Path

from tessera import crypto
from tessera.errors import ConfigError, Conflict

IDENTITY_FILE = Path("keys") / "broker.json"
OPERATORS_FILE = "operators.json"


class BrokerRole(enum.StrEnum):
    """Who a person is to the broker."""

    OPERATOR = "operator"
    COORDINATOR = "coordinator"


@dataclass(frozen=True)
class Operator:
    """A person allowed to administer the broker (operator) or read and request statistics."""

    name: str
    role: BrokerRole
    signing_key: bytes


def create_identity(home: Path) -> crypto.Identity:
    """Generate the broker's identity and write it with mode 0600; refuses to overwrite."""
    path = home / IDENTITY_FILE
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    identity = crypto.Identity.generate()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} already exists", hint="this home is already a broker") from None
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(
            {"format": "tessera-broker-identity-v1", "secret": identity.to_secret_bytes().hex()},
            handle,
        )
    return identity


def load_identity(home: Path) -> crypto.Identity:
    """The broker's identity; ConfigError if the file is missing or damaged."""
    path = home / IDENTITY_FILE
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        return crypto.Identity.from_secret_bytes(bytes.fromhex(document["secret"]))
    except FileNotFoundError:
        raise ConfigError(
            f"no broker identity at {path}", hint="run `tessera broker init` first"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"the broker identity {path} is damaged ({exc})", hint="restore it from a backup"
        ) from None


def load_operators(home: Path) -> list[Operator]:
    """Everyone who may operate the broker or read its statistics (re-read when the file
    changes, so adding an operator takes effect without a restart)."""
    path = home / OPERATORS_FILE
    try:
        stamp = path.stat().st_mtime_ns
    except FileNotFoundError:
        return []
    cached = _OPERATORS_CACHE.get(path)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    operators = _read_operators(path)
    _OPERATORS_CACHE[path] = (stamp, operators)
    return operators


_OPERATORS_CACHE: dict[Path, tuple[int, list[Operator]]] = {}


def _read_operators(path: Path) -> list[Operator]:
    try:
        return [
            Operator(
                name=str(o["name"]),
                role=BrokerRole(o["role"]),
                signing_key=bytes.fromhex(o["signing_key"]),
            )
            for o in json.loads(path.read_text(encoding="utf-8"))
        ]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is damaged ({exc})", hint="fix or restore it") from None


def add_operator(home: Path, operator: Operator) -> None:
    """Append an operator or coordinator (atomically rewriting operators.json)."""
    current = load_operators(home)
    if any(o.name == operator.name or o.signing_key == operator.signing_key for o in current):
        raise Conflict(f"{operator.name!r} or that key is already listed")
    document = [
        {"name": o.name, "role": o.role.value, "signing_key": o.signing_key.hex()}
        for o in [*current, operator]
    ]
    tmp = home / (OPERATORS_FILE + ".tmp")
    tmp.write_text(json.dumps(document, indent=2), encoding="utf-8")
    os.replace(tmp, home / OPERATORS_FILE)
