"""The directory's constants, wire limits and field checks: what any parsed or built directory
field must satisfy (ids, display text, keys, chain values, services) and the signed-blob helper.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from google.protobuf.message import DecodeError

from tessera import crypto, labels
from tessera.crypto import Identity
from tessera.errors import InvalidInput
from tessera.v1 import common_pb2 as common_pb
from tessera.v1 import directory_pb2 as directory_pb

# --- constants (directory.proto header) -------------------------------------------------------

CHAIN_BYTES: Final = 32
GENESIS_CHAIN: Final = bytes(CHAIN_BYTES)
"""chain(0): 32 zero bytes (directory.proto header)."""

POSSESSION_LABEL: Final = labels.LABEL_KEY_ROTATION
"""Label of a ROTATE's possession signature. directory.proto (LogEntry.possession_signature,
RotateKeysRequest.possession_signature) names tessera/v1/key-rotation, the same label as the
statement itself; the two are told apart by who signs (old key: statement, new key: possession)."""


@dataclass(frozen=True)
class DirectoryLimits:
    """Safety limits applied to everything parsed from the wire, as named defaults.

    They bound the work and memory an untrusted peer can cause and keep display fields sane.
    The broker and nodes must use the same values, or a node could refuse a log the broker
    accepted; raise them only together (and in a new protocol version if they ever shrink).
    """

    max_statement_bytes: int = 4096
    max_entry_bytes: int = 8192
    max_head_bytes: int = 1024
    max_id_chars: int = 128  # agency_id and region
    max_name_chars: int = 200
    max_reason_chars: int = 1000
    max_services: int = 64


DEFAULT_LIMITS: Final = DirectoryLimits()

# Identifiers (agency ids, regions) are ASCII so that look-alike characters cannot make two ids
# that a person reads as one; display text may be any Unicode except control/format characters.
_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]*", re.ASCII)
_FORBIDDEN_TEXT_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Co", "Zl", "Zp"})
_NEED_PREFIX: Final = "NEED_CATEGORY_"
SERVICE_CODES: Final[dict[int, str]] = {
    value: name.removeprefix(_NEED_PREFIX).lower()
    for name, value in common_pb.NeedCategory.items()
    if value != common_pb.NEED_CATEGORY_UNSPECIFIED
}
SERVICE_VALUES: Final[dict[str, int]] = {code: value for value, code in SERVICE_CODES.items()}


# --- checking wire fields ---------------------------------------------------------------------


def parse_body(
    message: directory_pb.DirectoryEntry | directory_pb.LogEntry | directory_pb.LogHead,
    body: bytes,
    what: str,
) -> None:
    try:
        message.ParseFromString(body)
    except DecodeError:
        raise InvalidInput(f"the {what} body is not a valid protobuf message") from None


def check_key(value: bytes, name: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != crypto.KEY_BYTES:
        got = len(value) if isinstance(value, bytes) else type(value).__name__
        raise InvalidInput(f"{name} must be {crypto.KEY_BYTES} bytes (got {got})")
    return value


def check_chain(value: bytes, name: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != CHAIN_BYTES:
        raise InvalidInput(f"a {name} must be {CHAIN_BYTES} bytes")
    return value


def check_agency_id(value: str, name: str, limits: DirectoryLimits) -> str:
    """``value`` if it is a well-formed agency (or case) id under ``limits``; InvalidInput naming
    ``name`` otherwise. Used wherever an agency id is read from outside."""
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= limits.max_id_chars
        or _ID_PATTERN.fullmatch(value) is None
    ):
        raise InvalidInput(
            f"{name} must be 1 to {limits.max_id_chars} ASCII letters, digits or ._:@- "
            "starting with a letter or digit"
        )
    return value


def check_text(value: str, name: str, max_chars: int, *, required: bool) -> str:
    """``value`` if it is display text a person may safely be shown (bounded, no control or
    format characters such as a right-to-left override); InvalidInput naming ``name``."""
    if not isinstance(value, str) or len(value) > max_chars:
        raise InvalidInput(f"{name} must be text of at most {max_chars} characters")
    if required and not value.strip():
        raise InvalidInput(f"{name} is required")
    if any(unicodedata.category(char) in _FORBIDDEN_TEXT_CATEGORIES for char in value):
        raise InvalidInput(f"{name} contains control or formatting characters")
    return value


def services_to_wire(codes: Iterable[str]) -> list[common_pb.NeedCategory.ValueType]:
    if isinstance(codes, str):
        raise InvalidInput("services must be a list of NEEDS.md codes, not one string")
    values: set[int] = set()
    for code in codes:
        value = SERVICE_VALUES.get(code) if isinstance(code, str) else None
        if value is None:
            raise InvalidInput(
                f"unknown service {code!r}", hint=f"one of: {', '.join(SERVICE_VALUES)}"
            )
        if value in values:
            raise InvalidInput(f"service {code!r} is listed twice")
        values.add(value)
    return [common_pb.NeedCategory.ValueType(value) for value in sorted(values)]


def services_from_wire(values: Iterable[int], limits: DirectoryLimits) -> tuple[str, ...]:
    """NEEDS.md codes, after checking ascending order without duplicates (directory.proto).

    A value this version does not know (added by a later tessera.v1) is skipped, not refused,
    so that adding a category does not stop older nodes from syncing the directory.
    """
    values = list(values)
    if len(values) > limits.max_services:
        raise InvalidInput(f"a statement lists at most {limits.max_services} services")
    if any(value <= common_pb.NEED_CATEGORY_UNSPECIFIED for value in values):
        raise InvalidInput("a statement's services may not include an unset category")
    if any(later <= earlier for earlier, later in itertools.pairwise(values)):
        raise InvalidInput("a statement's services must be in ascending order without duplicates")
    return tuple(SERVICE_CODES[value] for value in values if value in SERVICE_CODES)


def sign_blob(signer: Identity, label: bytes, body: bytes) -> common_pb.SignedBlob:
    """``body`` as a SignedBlob signed by ``signer`` under ``label`` (common.proto, rule 2)."""
    return common_pb.SignedBlob(
        body=body, signature=signer.sign(label, body), signer=signer.public.signing_key
    )


def short_key(key: bytes) -> str:
    """A short, unambiguous-enough rendering of a public key for error messages."""
    return key[:8].hex() + "…" if key else "(none)"
