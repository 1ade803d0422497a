"""Domain objects of the regional broker: what its logic works with, between wire and storage.

Frozen dataclasses that check their invariants when built, so an invalid one never exists
(STYLE.md, after sigstore-python). Protobuf messages stay at the edge (the servicers); SQLModel
tables stay in ``broker.store``.

Everything here is something the broker may learn (DESIGN.md section 4): agency ids, public keys,
times, sizes, digests, consent commitments and sealed ciphertext. No object carries a survivor
field, a private key or an enrolment token in clear.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from tessera.errors import InvalidInput
from tessera.timestamps import require_aware

# Sizes fixed by the wire contract (common.proto, relay.proto, directory.proto).
KEY_BYTES = 32  # Ed25519 verify key, X25519 public key
DIGEST_BYTES = 32  # tessera.crypto.digest output: chain values, commitments, envelope digests


def check_bytes(value: bytes, name: str, sizes: tuple[int, ...]) -> bytes:
    """``value`` if it is bytes of one of the lengths in ``sizes``; otherwise InvalidInput."""
    if not isinstance(value, bytes) or len(value) not in sizes:
        wanted = " or ".join(str(size) for size in sizes)
        raise InvalidInput(f"{name} must be {wanted} bytes")
    return value


@dataclass(frozen=True)
class AgencyState:
    """What the directory currently says about one agency, as the broker keeps it.

    The current-state summary of the log (DESIGN.md section 5): the keys of the agency's latest
    entry and whether it is revoked. A revoked agency keeps the keys it was revoked with, so a
    request signed by them is recognised and refused rather than treated as unknown.
    ``sequence`` is the log sequence of the entry that last changed the agency.
    """

    agency_id: str
    region: str
    signing_key: bytes
    encryption_key: bytes
    revoked: bool
    sequence: int

    def __post_init__(self) -> None:
        check_bytes(self.signing_key, "an agency's signing key", (KEY_BYTES,))
        check_bytes(self.encryption_key, "an agency's encryption key", (KEY_BYTES,))
        if self.sequence < 1:
            raise InvalidInput("an agency's log sequence starts at 1")


@dataclass(frozen=True)
class StoredLogEntry:
    """One broker-signed entry of the directory log, exactly as appended.

    ``body`` is the serialized ``LogEntry`` (b_n of the hash chain, directory.proto header) and
    ``signature`` the broker's signature over it; ``chain`` is chain(``sequence``). The broker's
    servicer rebuilds the ``SignedBlob`` from these and its own signing key.
    """

    sequence: int
    agency_id: str
    body: bytes
    signature: bytes
    chain: bytes

    def __post_init__(self) -> None:
        if self.sequence < 1:
            raise InvalidInput("a log entry's sequence starts at 1")
        check_bytes(self.chain, "a chain value", (DIGEST_BYTES,))


@dataclass(frozen=True)
class EnvelopePut:
    """One Send as the store takes it: a sealed envelope from ``sender_id`` for ``recipient_id``.

    The store checks every field (each put of a batch succeeds or fails on its own), so this
    carries the request's values as they came.
    """

    sender_id: str
    recipient_id: str
    idempotency_key: str
    consent_commitment: bytes
    ciphertext: bytes


@dataclass(frozen=True)
class AcceptedEnvelope:
    """The broker's record that it holds an envelope: the facts of a ``RelayReceipt``.

    ``duplicate`` is true when the put repeated an earlier one with the same (sender,
    idempotency key); every other field is then the original's, so the sender gets back the
    same receipt (relay.proto, Send). ``envelope_digest`` is
    ``digest("tessera/v1/envelope", sealed_envelope)``.
    """

    envelope_id: str
    sender_id: str
    recipient_id: str
    idempotency_key: str
    consent_commitment: bytes
    envelope_digest: bytes
    size: int
    received_at: dt.datetime
    duplicate: bool

    def __post_init__(self) -> None:
        check_bytes(self.consent_commitment, "a consent commitment", (0, DIGEST_BYTES))
        check_bytes(self.envelope_digest, "an envelope digest", (DIGEST_BYTES,))
        require_aware(self.received_at, "received_at")
        if self.size < 1:
            raise InvalidInput("an accepted envelope is at least one byte")


@dataclass(frozen=True)
class StoredEnvelope:
    """An envelope waiting in a recipient's mailbox, as offered to that recipient.

    ``envelope_id`` is the delivery id; it never changes across redeliveries, so the recipient
    can deduplicate (exactly-once in effect, DESIGN.md section 6). ``attempts`` counts the leases
    so far, 1 on the first delivery. ``lease_owner``/``lease_until`` name the broker process
    that holds it and until when, or are None when it is not leased.
    """

    envelope_id: str
    sender_id: str
    recipient_id: str
    consent_commitment: bytes
    ciphertext: bytes
    received_at: dt.datetime
    attempts: int
    lease_owner: str | None
    lease_until: dt.datetime | None

    def __post_init__(self) -> None:
        check_bytes(self.consent_commitment, "a consent commitment", (0, DIGEST_BYTES))
        require_aware(self.received_at, "received_at")
        if not self.ciphertext:
            raise InvalidInput("a stored envelope is never empty")
        if self.attempts < 0:
            raise InvalidInput("a delivery attempt count is never negative")

    @property
    def size(self) -> int:
        """Length of the sealed envelope in bytes."""
        return len(self.ciphertext)


@dataclass(frozen=True)
class PurgeResult:
    """What a consent purge did (relay.proto, ``PurgeConsentResponse``).

    ``purged``: undelivered envelopes deleted by this call. ``already_delivered``: envelopes
    under the commitment that their recipient had acknowledged before it (those must be purged
    by the recipient, after a revocation envelope).
    """

    purged: int
    already_delivered: int

    def __post_init__(self) -> None:
        if self.purged < 0 or self.already_delivered < 0:
            raise InvalidInput("purge counts are never negative")
