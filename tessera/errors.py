"""One hierarchy of typed errors for all of Tessera.

Every expected failure is a :class:`TesseraError` whose message says what happened and whose
``hint`` says what to do. Each subclass names an :class:`ErrorKind`; the kind alone decides the gRPC
status code (``tessera.rpc``) and the CLI exit code (``cli.main``), so both mappings live in exactly
one place each. Nothing here imports gRPC, so the CLI can raise these without loading it.
"""

from __future__ import annotations

import enum
from typing import ClassVar


class ErrorKind(enum.Enum):
    """A class of failure, with its gRPC status name and CLI exit code.

    Exit codes are documented in docs/cli.md; keep the two in step.
    """

    INTERNAL = ("INTERNAL", 1)
    USAGE = ("INVALID_ARGUMENT", 2)
    NOT_CONFIGURED = ("FAILED_PRECONDITION", 3)
    UNAUTHENTICATED = ("UNAUTHENTICATED", 4)
    PERMISSION_DENIED = ("PERMISSION_DENIED", 5)
    NOT_FOUND = ("NOT_FOUND", 6)
    INVALID_INPUT = ("INVALID_ARGUMENT", 7)
    REFUSED = ("FAILED_PRECONDITION", 8)
    CONFLICT = ("ALREADY_EXISTS", 9)
    UNAVAILABLE = ("UNAVAILABLE", 10)
    INTEGRITY = ("DATA_LOSS", 11)
    EXHAUSTED = ("RESOURCE_EXHAUSTED", 12)
    NOT_BUILT = ("UNIMPLEMENTED", 13)

    def __init__(self, grpc_status: str, exit_code: int) -> None:
        self.grpc_status = grpc_status
        self.exit_code = exit_code


class TesseraError(Exception):
    """Base of every expected failure: a message for a person, and what to do about it."""

    kind: ClassVar[ErrorKind] = ErrorKind.INTERNAL

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


# --- configuration and setup ---------------------------------------------------------------


class ConfigError(TesseraError):
    """A configuration file or setting is missing or wrong."""

    kind = ErrorKind.NOT_CONFIGURED


class NotBuiltError(TesseraError):
    """A command group that exists in the product plan but is not built yet."""

    kind = ErrorKind.NOT_BUILT


# --- crypto (DESIGN.md section 5) ----------------------------------------------------------


class CryptoError(TesseraError):
    """Base of every cryptographic failure. Integrity failures fail closed."""

    kind = ErrorKind.INTEGRITY


class BadSignature(CryptoError):
    """A signature does not verify under the expected key and label."""


class WrongRecipient(CryptoError):
    """An envelope was not sealed to this key (or its ciphertext was altered)."""


class TamperedCiphertext(CryptoError):
    """An AEAD ciphertext failed authentication: altered, moved, rolled back, or wrong key."""


class RolledBack(CryptoError):
    """Stored data is older than what was last written and anchored outside it: a record put
    back at an older version, an audit log rewound behind its checkpoint, an escrow that shrank.
    """


class WrongPassphrase(CryptoError):
    """The passphrase (or key file) does not open the node's key-encryption key."""

    kind = ErrorKind.UNAUTHENTICATED


class KeyFileError(CryptoError):
    """A key file is missing, unreadable or not a key."""

    kind = ErrorKind.NOT_CONFIGURED


class RequestAuthError(CryptoError):
    """A signed request was refused (base for stale, replayed, unknown-key requests)."""

    kind = ErrorKind.UNAUTHENTICATED


class StaleRequest(RequestAuthError):
    """A signed request's timestamp lies outside the replay window."""


class ReplayedRequest(RequestAuthError):
    """A signed request's nonce was already seen inside the replay window."""


# --- general request outcomes ---------------------------------------------------------------


class Unauthenticated(TesseraError):
    """The caller could not be identified (no credential, unknown or revoked key)."""

    kind = ErrorKind.UNAUTHENTICATED


class PermissionDenied(TesseraError):
    """The caller is known but its role does not allow this."""

    kind = ErrorKind.PERMISSION_DENIED


class NotFound(TesseraError):
    """The named object does not exist (or is not visible to the caller)."""

    kind = ErrorKind.NOT_FOUND


class InvalidInput(TesseraError):
    """A request, file or value is malformed or outside the allowed vocabulary."""

    kind = ErrorKind.INVALID_INPUT


class WeakPassphrase(InvalidInput):
    """A new passphrase (node or staff credential) is below the strength policy (exit 7)."""


class Refused(TesseraError):
    """A policy refuses the action: no or expired consent, budget spent, below threshold."""

    kind = ErrorKind.REFUSED


class Conflict(TesseraError):
    """The object already exists, or was changed by someone else first."""

    kind = ErrorKind.CONFLICT


class Unavailable(TesseraError):
    """A server or database cannot be reached right now; trying again later may work."""

    kind = ErrorKind.UNAVAILABLE


class Exhausted(TesseraError):
    """A limit was hit: size, rate, disk space."""

    kind = ErrorKind.EXHAUSTED


class StorageError(TesseraError):
    """The store could not complete a write; nothing was half-written."""

    kind = ErrorKind.UNAVAILABLE
