"""The broker's own keys and the people who operate it.

The broker's Ed25519 identity signs directory entries, heads, relay receipts and releases; it opens
no envelope (DESIGN.md section 4: the broker holds no key that opens survivor data). It lives in
``keys/broker.json`` (mode 0600) in the broker's home. Operators and coordinators are listed in
``operators.json`` with their public keys and roles; their private keys are in their own homes
(``credential.json``, the same format as a node staff credential).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tessera import crypto, files
from tessera.errors import ConfigError, Conflict, NotFound, Refused

IDENTITY_FILE = Path("keys") / "broker.json"
OPERATORS_FILE = "operators.json"
_LOCK_FILE = OPERATORS_FILE + ".lock"


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
    added_at: dt.datetime | None = None  # None for entries written before it was recorded


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
    """Everyone who may operate the broker or read its statistics.

    The file is read on every call and parsed again whenever its bytes differ from the last
    parse, so adding or removing a coordinator takes effect at the next request, without a
    restart (a modification time alone can miss two rewrites inside one clock tick). Only
    operators' and coordinators' requests reach this: agencies are looked up first.
    """
    path = home / OPERATORS_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError(f"cannot read {path} ({exc})", hint="check its permissions") from None
    cached = _OPERATORS_CACHE.get(path)
    if cached is not None and cached[0] == raw:
        return cached[1]
    operators = _parse_operators(path, raw)
    _OPERATORS_CACHE[path] = (raw, operators)
    return operators


_OPERATORS_CACHE: dict[Path, tuple[bytes, list[Operator]]] = {}


def _parse_operators(path: Path, raw: bytes) -> list[Operator]:
    try:
        return [
            Operator(
                name=str(o["name"]),
                role=BrokerRole(o["role"]),
                signing_key=bytes.fromhex(o["signing_key"]),
                # Entries written before added_at existed (broker init until now) have none.
                added_at=dt.datetime.fromisoformat(o["added_at"]) if o.get("added_at") else None,
            )
            for o in json.loads(raw.decode("utf-8"))
        ]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path} is damaged ({exc})", hint="fix or restore it") from None


@contextlib.contextmanager
def _editing(home: Path) -> Iterator[list[Operator]]:
    """The current list, read under an exclusive lock held until the caller has written its
    change, so two commands editing operators.json at once cannot lose each other's change."""
    fd = os.open(home / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        path = home / OPERATORS_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raw = b"[]"
        yield _parse_operators(path, raw)
    finally:
        os.close(fd)


def _write_operators(home: Path, operators: list[Operator]) -> None:
    document = [
        {
            "name": o.name,
            "role": o.role.value,
            "signing_key": o.signing_key.hex(),
            **({"added_at": o.added_at.isoformat()} if o.added_at is not None else {}),
        }
        for o in operators
    ]
    files.atomic_write(home / OPERATORS_FILE, json.dumps(document, indent=2).encode("utf-8"))


def add_operator(home: Path, operator: Operator) -> None:
    """Append an operator or coordinator (atomically rewriting operators.json).

    Conflict if the name or the key is already listed.
    """
    with _editing(home) as current:
        if any(o.name == operator.name or o.signing_key == operator.signing_key for o in current):
            raise Conflict(
                f"{operator.name!r} or that key is already listed in {home / OPERATORS_FILE}",
                hint="choose another name, or remove the old entry first",
            )
        _write_operators(home, [*current, operator])


def remove_operator(home: Path, name: str, role: BrokerRole) -> Operator:
    """Withdraw the person called ``name``, who must hold ``role`` (atomically rewriting
    operators.json); their key is refused from the broker's next request on.

    NotFound if nobody has that name; Refused if they hold another role, or if removing them
    would leave the broker with no operator (nobody could issue enrolment tokens any more).
    """
    with _editing(home) as current:
        found = next((o for o in current if o.name == name), None)
        if found is None:
            raise NotFound(
                f"nobody called {name!r} is listed in {home / OPERATORS_FILE}",
                hint="`tessera broker coordinator list` shows who is",
            )
        if found.role is not role:
            raise Refused(
                f"{name!r} has the role {found.role.value}, not {role.value}",
                hint=f"this removes only a {role.value}; an operator is removed by editing "
                f"{OPERATORS_FILE} in the broker's home (keep at least one)",
            )
        remaining = [o for o in current if o.name != name]
        if not any(o.role is BrokerRole.OPERATOR for o in remaining):
            raise Refused(
                f"{name!r} is the broker's last operator",
                hint="add another operator before removing this one",
            )
        _write_operators(home, remaining)
    return found
