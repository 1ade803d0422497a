"""Consent-gated referrals at rest: consents, outgoing and incoming referrals, the outbox
(DESIGN.md section 6; docs/referrals.md describes the pure core this builds on).

:class:`ReferralStore` is a companion of :class:`~node.store.cases.NodeStore`: it shares its
engine, keyring, write lock, transaction helper and audit log, so every change here is appended to
the same hash-chained audit log in the same transaction as the change ("an action is logged if and
only if it happened").

Sending side:

- a consent row holds ids, codes, categories, the method, the witnessing staff principal, its
  window and the survivor's pseudonym, never a survivor field;
- :meth:`ReferralStore.record_sent` writes, in ONE transaction, the referral (state ``queued``),
  the sealed envelope into the outbox, the need's status ``referred`` and the ``referral.sent``
  audit entry that is the accounting of disclosures; it re-checks the stored consent under a lock,
  so a consent revoked a moment earlier refuses the referral;
- the outbox keeps each sealed envelope until the broker accepted it (the relay worker calls
  :meth:`~ReferralStore.mark_outbox_sent`); nothing is lost when a process dies;
- statuses, revocations and purge confirmations move a referral only forward, and each incoming
  message id takes effect once (``processed_message``).

Receiving side: an incoming referral is encrypted at rest like a case (a data key of its own,
wrapped by the record key; one AEAD whose associated data binds table, row and version); only ids,
the sender, the need code, the state and timestamps are in clear. A redelivered envelope (same
message id or same relay delivery id) changes nothing. A purge on revocation empties the
ciphertext and the wrapped key and keeps a tombstone.

Restoring an older backup must not undo a revocation or a purge: both are appended to the node's
ledger (``ledger.log``) as ``consent-revoked`` and ``referral-purged`` lines, and
:meth:`ReferralStore.reapply_ledger` applies them again.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import enum
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from node import consent as consent_mod
from node.consent import Consent, ConsentMethod, _check_uuid
from node.envelopes import DEFAULT_LIMITS as ENVELOPE_LIMITS
from node.envelopes import (
    DeclineReason,
    ReceivedPurgeConfirmation,
    ReceivedReferral,
    ReceivedRevocation,
    ReferralStatus,
    _check_decline,
)
from node.htcds import FIELD_NAMES, NeedCategory, NeedStatus
from node.store.cases import NodeStore
from node.store.tables import (
    AuditHeadRow,
    CaseRow,
    ConsentRow,
    IncomingReferralRow,
    OutboxRow,
    OutgoingReferralRow,
    ProcessedMessageRow,
    ReferralEventRow,
    as_utc,
    utcnow,
)
from tessera import crypto
from tessera.errors import Conflict, InvalidInput, NotFound, Refused, TamperedCiphertext
from tessera.timestamps import require_aware

__all__ = [
    "LABEL_PSEUDONYM",
    "IncomingReferral",
    "OutboxItem",
    "OutboxKind",
    "OutgoingEnvelope",
    "OutgoingReferral",
    "ReferralContent",
    "ReferralState",
    "ReferralStep",
    "ReferralStore",
    "serialised_writing",
]

#: derive_key label of the key behind survivor pseudonyms (a subkey of the record key).
LABEL_PSEUDONYM: Final = b"tessera/v1/survivor-pseudonym"
#: Who the store names in the audit log for what the relay worker does.
RELAY_ACTOR: Final = "system:relay"
# Ledger lines (node's home, outside the database) that a restore must re-apply.
LEDGER_PURGED: Final = "referral-purged"
LEDGER_REVOKED: Final = "consent-revoked"

_FIELD_ORDER: Final = {name: index for index, name in enumerate(FIELD_NAMES)}
_MAX_KEY_CHARS: Final = 128
_MAX_NAME_CHARS: Final = 200
_MAX_ERROR_CHARS: Final = 500
_COMMITMENT_BYTES: Final = 32


@contextmanager
def serialised_writing(
    node_store: NodeStore, conflict: str, hint: str | None = None
) -> Iterator[Session]:
    """NodeStore's write transaction, serialised on the audit head on PostgreSQL too, for the
    stores beside it (this one and ``node.store.budget.BudgetStore``).

    Locking the head first makes the look-ups that make a write idempotent (is this key,
    message, delivery or charge already here?) exclusive across processes, as SQLite's BEGIN
    IMMEDIATE does. A constraint violation anyway rolls everything back and is a Conflict with
    the message ``conflict``.
    """
    try:
        with node_store._writing() as session:
            if node_store.engine.dialect.name == "postgresql":
                session.exec(select(AuditHeadRow).with_for_update()).first()
            yield session
    except IntegrityError:
        raise Conflict(conflict, hint=hint) from None


# --- domain objects ---------------------------------------------------------------------------


class ReferralState(enum.StrEnum):
    """Where a referral stands as this node knows it (node.proto ``ReferralState``).

    Outgoing: ``queued`` (in the outbox) → ``sent`` (the broker accepted it) → ``delivered`` →
    ``accepted`` | ``declined``; ``accepted`` → ``completed``; after a revocation ``revoked`` →
    ``purged``. Incoming: ``delivered`` (stored here) → ``accepted`` | ``declined``;
    ``accepted`` → ``completed``; any → ``purged``.
    """

    QUEUED = "queued"
    SENT = "sent"
    DELIVERED = "delivered"
    ACCEPTED = "accepted"
    DECLINED = "declined"
    COMPLETED = "completed"
    REVOKED = "revoked"
    PURGED = "purged"


class OutboxKind(enum.StrEnum):
    """What an outbox envelope carries (the ``EnvelopeContent`` payload)."""

    REFERRAL = "referral"
    STATUS_UPDATE = "status_update"
    REVOCATION = "revocation"
    PURGE_CONFIRMATION = "purge_confirmation"


class _Direction(enum.StrEnum):
    OUTGOING = "out"
    INCOMING = "in"


@dataclass(frozen=True)
class ReferralStep:
    """One state a referral reached, and when."""

    state: ReferralState
    at: dt.datetime


@dataclass(frozen=True)
class OutgoingEnvelope:
    """A sealed envelope (built by ``node.envelopes``) to queue for the relay worker.

    ``message_id`` is the envelope's message id and the relay idempotency key.
    """

    recipient_id: str
    message_id: str
    sealed: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_key(self.recipient_id, "recipient_id")
        _check_uuid(self.message_id, "message_id")
        if not isinstance(self.sealed, bytes) or not self.sealed:
            raise InvalidInput("a sealed envelope must be non-empty bytes")
        if len(self.sealed) > ENVELOPE_LIMITS.max_sealed_bytes:
            raise InvalidInput(
                f"a sealed envelope is at most {ENVELOPE_LIMITS.max_sealed_bytes:,} bytes"
            )


@dataclass(frozen=True)
class OutgoingReferral:
    """A referral this node sent. ``fields`` are HTCDS field *names* in column order."""

    referral_id: str
    case_id: str
    consent_id: str
    recipient_id: str
    recipient_name: str
    need: NeedCategory
    fields: tuple[str, ...]
    state: ReferralState
    decline_reason: DeclineReason | None
    decline_text: str = field(repr=False)
    message_id: str
    idempotency_key: str
    consent_commitment: bytes = field(repr=False)
    relay_receipt: bytes = field(repr=False)
    created_at: dt.datetime
    updated_at: dt.datetime
    history: tuple[ReferralStep, ...] = ()


@dataclass(frozen=True)
class ReferralContent:
    """The decrypted content of an incoming referral: survivor data, kept out of ``repr``.

    ``receipt_*`` are the exact bytes of the consent receipt it travelled with, verified when it
    was received (node.consent.verify_receipt); parse ``receipt_body`` as a ConsentReceipt.
    """

    fields: Mapping[str, str] = field(repr=False)
    note: str = field(repr=False)
    sender_contact: str = field(repr=False)
    sent_at: dt.datetime
    receipt_body: bytes = field(repr=False)
    receipt_signature: bytes = field(repr=False)
    receipt_signer: bytes = field(repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", MappingProxyType(dict(self.fields)))


@dataclass(frozen=True)
class IncomingReferral:
    """A referral received here. ``content`` is set only by :meth:`ReferralStore.incoming`
    (decrypted, audited) and is None once purged; ``need`` is None only for the tombstone of a
    referral revoked before it arrived."""

    referral_id: str
    sender_id: str
    consent_id: str
    need: NeedCategory | None
    state: ReferralState
    decline_reason: DeclineReason | None
    received_at: dt.datetime
    updated_at: dt.datetime
    purged_at: dt.datetime | None
    purged_fields: tuple[str, ...]
    history: tuple[ReferralStep, ...] = ()
    content: ReferralContent | None = None
    decline_text: str = field(default="", repr=False)


@dataclass(frozen=True)
class OutboxItem:
    """An envelope waiting for the relay worker: ciphertext and routing only."""

    id: int
    kind: OutboxKind
    referral_id: str
    recipient_id: str
    idempotency_key: str
    consent_commitment: bytes = field(repr=False)
    sealed: bytes = field(repr=False)
    attempts: int
    last_error: str
    created_at: dt.datetime
    last_attempt_at: dt.datetime | None


# --- the store --------------------------------------------------------------------------------

# How far along each outgoing state is; a status applies only if it moves the referral forward.
_RANK: Final = {
    ReferralState.QUEUED: 0,
    ReferralState.SENT: 1,
    ReferralState.DELIVERED: 2,
    ReferralState.ACCEPTED: 3,
    ReferralState.DECLINED: 3,
    ReferralState.COMPLETED: 4,
}
_FINAL: Final = frozenset(
    {
        ReferralState.DECLINED,
        ReferralState.COMPLETED,
        ReferralState.REVOKED,
        ReferralState.PURGED,
    }
)
# DESIGN.md section 2: what a referral's status means for the need it was for.
_NEED_AFTER: Final = {
    ReferralStatus.ACCEPTED: NeedStatus.IN_PROGRESS,
    ReferralStatus.DECLINED: NeedStatus.UNMET,
    ReferralStatus.COMPLETED: NeedStatus.MET,
}
# The answers a receiving caseworker may give, and the states each may follow.
_ANSWERS: Final = {
    ReferralStatus.ACCEPTED: (ReferralState.DELIVERED,),
    ReferralStatus.DECLINED: (ReferralState.DELIVERED,),
    ReferralStatus.COMPLETED: (ReferralState.ACCEPTED,),
}


class ReferralStore:
    """Consents, referrals both ways, and the outbox, beside a node's :class:`NodeStore`."""

    def __init__(self, node_store: NodeStore) -> None:
        self._store = node_store
        self._pseudonym_key = crypto.derive_key(node_store.keyring.record_key, LABEL_PSEUDONYM)

    # --- transactions ------------------------------------------------------------------------

    def _writing(self) -> AbstractContextManager[Session]:
        return serialised_writing(
            self._store,
            "that change conflicts with a record the node already holds; nothing was written",
            hint="check the ids and idempotency keys you used",
        )

    def _append(
        self,
        session: Session,
        actor: str,
        action: str,
        case_id: str | None,
        detail: Mapping[str, Any],
    ) -> None:
        self._store._audit.append(session, actor, action, case_id, detail)

    # --- survivor pseudonyms -----------------------------------------------------------------

    def survivor_pseudonym(self, case_id: str, recipient_agency_id: str | None = None) -> str:
        """A keyed, stable, non-reversible pseudonym of a survivor for consent receipts.

        The keyed BLAKE2b blind index of the case id under a subkey of the record key
        (``LABEL_PSEUDONYM``): 64 hex characters, which only this node can recompute and nobody
        can map back. With ``recipient_agency_id`` it is also specific to that agency, so two
        recipients cannot match their pseudonyms to find the same survivor (recommended); without
        it, it is one per case.
        """
        if not isinstance(case_id, str) or not case_id:
            raise InvalidInput("a pseudonym needs a case id")
        value = case_id
        if recipient_agency_id is not None:
            _check_key(recipient_agency_id, "recipient_agency_id")
            # Hex keeps agency ids that differ only in letter case apart (the index casefolds).
            value = f"{case_id}|{recipient_agency_id.encode().hex()}"
        return crypto.blind_index(self._pseudonym_key, value)

    # --- consents (sending side) ------------------------------------------------------------

    def grant_consent(self, actor: str, consent: Consent) -> Consent:
        """Record a survivor's consent for an existing, unerased case; audited ``consent.grant``.

        Recording the same consent again returns it unchanged (a retried request); the same id
        with other terms is a Conflict. A consent is recorded unrevoked.
        """
        if not isinstance(consent, Consent):
            raise InvalidInput("grant_consent needs a Consent")
        if consent.revoked_at is not None:
            raise InvalidInput("a consent is recorded unrevoked; revoke it afterwards")
        with self._writing() as session:
            self._store._row(session, consent.case_id)  # NotFound, also once erased
            existing = session.get(ConsentRow, consent.consent_id)
            if existing is not None:
                if _consent(existing) != consent:
                    raise Conflict(
                        f"consent {consent.consent_id} is already recorded with other terms",
                        hint="a consent cannot be changed; record a new one",
                    )
                return _consent(existing)
            row = ConsentRow(
                consent_id=consent.consent_id,
                case_id=consent.case_id,
                recipient_agency_id=consent.recipient_agency_id,
                purpose=consent.purpose.value,
                categories=json.dumps(sorted(consent.categories)),
                method=consent.method.value,
                witnessed_by=consent.witnessed_by,
                survivor_pseudonym=consent.survivor_pseudonym,
                granted_at=consent.granted_at,
                expires_at=consent.expires_at,
                revoked_at=None,
            )
            session.add(row)
            self._append(
                session,
                actor,
                "consent.grant",
                consent.case_id,
                {
                    "consent_id": consent.consent_id,
                    "recipient_id": consent.recipient_agency_id,
                    "purpose": consent.purpose.value,
                    "categories": sorted(consent.categories),
                    "method": consent.method.value,
                    "expires_at": consent.expires_at.isoformat(),
                },
            )
        return _consent(row)

    def consent(self, consent_id: str) -> Consent:
        """One consent; NotFound if the node has none with that id."""
        with self._store._reading() as session:
            return _consent(_consent_row(session, consent_id))

    def consents(self, case_id: str | None = None) -> list[Consent]:
        """Consents (of one case, if given), newest first."""
        with self._store._reading() as session:
            query = select(ConsentRow).order_by(
                col(ConsentRow.granted_at).desc(), col(ConsentRow.consent_id)
            )
            if case_id is not None:
                query = query.where(ConsentRow.case_id == case_id)
            return [_consent(row) for row in session.exec(query)]

    def revoke_consent(
        self, actor: str, consent_id: str, now: dt.datetime
    ) -> tuple[Consent, list[OutgoingReferral]]:
        """Withdraw a consent (never undone); audited ``consent.revoke``.

        Referral envelopes under it still in the outbox are withdrawn before they leave. Returns
        the consent and every referral sent under it that has not yet been revoked: the caller
        asks the broker to purge the consent's envelopes and sends a Revocation for each
        (:meth:`record_revocation_sent`). Revoking again returns what is still to revoke.
        """
        now = require_aware(now, "now")
        with self._writing() as session:
            row = _consent_row(session, consent_id, for_update=True)
            revoked_now = row.revoked_at is None
            if revoked_now:
                row.revoked_at = max(now, as_utc(row.granted_at))
                session.add(row)
                withdrawn = _withdraw_referral_envelopes(session, consent_id)
                self._append(
                    session,
                    actor,
                    "consent.revoke",
                    row.case_id,
                    {
                        "consent_id": consent_id,
                        "recipient_id": row.recipient_agency_id,
                        "purpose": row.purpose,
                        "envelopes_withdrawn": withdrawn,
                    },
                )
            rows = session.exec(
                select(OutgoingReferralRow)
                .where(
                    OutgoingReferralRow.consent_id == consent_id,
                    col(OutgoingReferralRow.state).not_in(
                        (ReferralState.REVOKED.value, ReferralState.PURGED.value)
                    ),
                )
                .order_by(col(OutgoingReferralRow.created_at))
            ).all()
            revoked = _consent(row)
            referrals = self._outgoing_list(session, rows)
        if revoked_now:
            assert revoked.revoked_at is not None
            self._store._append_ledger(
                f"{LEDGER_REVOKED} {consent_id} {revoked.revoked_at.isoformat()}"
            )
        return revoked, referrals

    # --- outgoing referrals (sending side) ---------------------------------------------------

    def record_sent(
        self,
        actor: str,
        referral_id: str,
        case_id: str,
        consent: Consent,
        recipient_id: str,
        recipient_name: str,
        need: NeedCategory,
        fields_sent: Sequence[str],
        idempotency_key: str,
        sealed: bytes,
        message_id: str,
        *,
        consent_commitment: bytes,
        note: str = "",
        now: dt.datetime | None = None,
    ) -> OutgoingReferral:
        """Record a referral and queue its sealed envelope, all in ONE transaction.

        Writes the referral (``queued``), the outbox row holding ``sealed`` (ciphertext only) with
        ``consent_commitment`` for the broker, the need's status ``referred``, and the
        ``referral.sent`` audit entry: the accounting of disclosures (recipient, referral,
        consent, purpose, field names, whether a note went). Before that it checks, under a lock
        on the stored consent, that the consent is this case's and still covers the recipient,
        need, every field and the note at ``now`` (node.consent.check_covers), so a consent
        revoked a moment ago refuses it (ConsentRefused).

        A repeated ``idempotency_key`` returns the referral it recorded and adds nothing.
        """
        now = utcnow() if now is None else require_aware(now, "now")
        _check_uuid(referral_id, "referral_id")
        _check_key(idempotency_key, "idempotency_key")
        envelope = OutgoingEnvelope(recipient_id, message_id, sealed)
        if not isinstance(recipient_name, str) or len(recipient_name) > _MAX_NAME_CHARS:
            raise InvalidInput(f"recipient_name is at most {_MAX_NAME_CHARS} characters")
        if (
            not isinstance(consent_commitment, bytes)
            or len(consent_commitment) != _COMMITMENT_BYTES
        ):
            raise InvalidInput("consent_commitment must be the receipt's 32-byte commitment")
        if not isinstance(consent, Consent):
            raise InvalidInput("record_sent needs the Consent it is sent under")
        with self._writing() as session:
            existing = session.exec(
                select(OutgoingReferralRow).where(
                    OutgoingReferralRow.idempotency_key == idempotency_key
                )
            ).first()
            if existing is not None:
                if (existing.referral_id, existing.case_id, existing.recipient_id) != (
                    referral_id,
                    case_id,
                    recipient_id,
                ):
                    raise Conflict("that idempotency key was used for another referral")
                return self._outgoing_list(session, [existing])[0]
            if session.get(OutgoingReferralRow, referral_id) is not None:
                raise Conflict(f"referral {referral_id} is already recorded")
            self._store._row(session, case_id)  # NotFound, also once erased
            stored = _consent(_consent_row(session, consent.consent_id, for_update=True))
            if stored.case_id != case_id:
                raise Refused(
                    f"consent {stored.consent_id} belongs to another case",
                    hint="send under a consent recorded for this case",
                )
            consent_mod.check_covers(stored, recipient_id, need, fields_sent, now, note=note)
            need = NeedCategory(need)
            names = sorted(set(fields_sent), key=_FIELD_ORDER.__getitem__)
            row = OutgoingReferralRow(
                referral_id=referral_id,
                case_id=case_id,
                consent_id=stored.consent_id,
                recipient_id=recipient_id,
                recipient_name=recipient_name,
                need=need.value,
                fields=json.dumps(names),
                state=ReferralState.QUEUED.value,
                decline_reason=None,
                decline_text=b"",
                idempotency_key=idempotency_key,
                message_id=message_id,
                consent_commitment=consent_commitment,
                relay_receipt=b"",
                created_at=now,
                updated_at=now,
            )
            session.add(row)
            session.flush()
            self._step(session, referral_id, _Direction.OUTGOING, ReferralState.QUEUED, now)
            self._set_need(session, case_id, need, NeedStatus.REFERRED, now)
            session.flush()
            self._enqueue(session, OutboxKind.REFERRAL, referral_id, envelope, consent_commitment)
            self._append(
                session,
                actor,
                "referral.sent",
                case_id,
                _disclosure(row, names, note=bool(note), need_status=NeedStatus.REFERRED.value),
            )
            result = self._outgoing_list(session, [row])[0]
        return result

    def outgoing(
        self,
        case_id: str | None = None,
        *,
        consent_id: str | None = None,
        states: Iterable[ReferralState] | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[OutgoingReferral]:
        """Referrals this node sent, most recently changed first, optionally filtered."""
        with self._store._reading() as session:
            query = select(OutgoingReferralRow).order_by(
                col(OutgoingReferralRow.updated_at).desc(), col(OutgoingReferralRow.referral_id)
            )
            if case_id is not None:
                query = query.where(OutgoingReferralRow.case_id == case_id)
            if consent_id is not None:
                query = query.where(OutgoingReferralRow.consent_id == consent_id)
            if states is not None:
                wanted = [ReferralState(s).value for s in states]
                query = query.where(col(OutgoingReferralRow.state).in_(wanted))
            rows = session.exec(query.offset(offset).limit(limit)).all()
            return self._outgoing_list(session, rows)

    def outgoing_by_id(self, referral_id: str) -> OutgoingReferral:
        """One referral this node sent; NotFound otherwise."""
        with self._store._reading() as session:
            return self._outgoing_list(session, [_outgoing_row(session, referral_id)])[0]

    def apply_status(
        self,
        actor: str,
        referral_id: str,
        sender_of_status: str,
        status: ReferralStatus,
        reason: DeclineReason | None,
        text: str,
        message_id: str,
        *,
        status_at: dt.datetime | None = None,
    ) -> OutgoingReferral:
        """Apply a status the recipient reported (an opened ``ReceivedStatus``).

        Only the agency the referral went to may report its status (Refused). A status moves the
        referral only forward (stale or repeated ones are ignored) and, with it, the need:
        accepted → in_progress, declined → unmet, completed → met. Audited ``referral.delivered``
        (a disclosure event) or ``referral.status``. Each message id takes effect once.
        """
        status = _status(status)
        _check_uuid(message_id, "message_id")
        _check_decline(status, reason, text, ENVELOPE_LIMITS)
        at = utcnow() if status_at is None else require_aware(status_at, "status_at")
        with self._writing() as session:
            row = _outgoing_row(session, referral_id, for_update=True)
            if row.recipient_id != sender_of_status:
                raise Refused(
                    f"agency {sender_of_status!r} reported a status of referral {referral_id}, "
                    "which was sent to another agency",
                    hint="drop the message; report it to the broker operator",
                )
            if not self._first_time(
                session, sender_of_status, message_id, OutboxKind.STATUS_UPDATE, referral_id
            ):
                return self._outgoing_list(session, [row])[0]
            target = ReferralState(status.value)
            if _moves_forward(ReferralState(row.state), target):
                row.state = target.value
                row.updated_at = at
                need_status = _NEED_AFTER.get(status)
                if status is ReferralStatus.DECLINED:
                    assert reason is not None
                    row.decline_reason = reason.value
                    row.decline_text = self._seal_decline(session, row, text)
                session.add(row)
                self._step(session, referral_id, _Direction.OUTGOING, target, at)
                if need_status is not None:
                    self._set_need(session, row.case_id, NeedCategory(row.need), need_status, at)
                if status is ReferralStatus.DELIVERED:
                    self._append(
                        session, actor, "referral.delivered", row.case_id, _disclosure(row)
                    )
                else:
                    self._append(
                        session,
                        actor,
                        "referral.status",
                        row.case_id,
                        {
                            "referral_id": referral_id,
                            "recipient_id": row.recipient_id,
                            "status": status.value,
                            "reason": reason.value if reason else None,
                            "need_status": need_status.value if need_status else None,
                        },
                    )
            result = self._outgoing_list(session, [row])[0]
        return result

    def record_revocation_sent(
        self,
        actor: str,
        referral_id: str,
        sealed: bytes,
        message_id: str,
        *,
        now: dt.datetime | None = None,
    ) -> OutgoingReferral:
        """Queue the Revocation of a referral whose consent was revoked; audited
        ``revocation.sent``. The referral becomes ``revoked`` until the recipient confirms the
        purge. A referral already revoked or purged is returned unchanged (nothing queued)."""
        now = utcnow() if now is None else require_aware(now, "now")
        with self._writing() as session:
            row = _outgoing_row(session, referral_id, for_update=True)
            envelope = OutgoingEnvelope(row.recipient_id, message_id, sealed)
            if _consent_row(session, row.consent_id).revoked_at is None:
                raise Conflict(
                    f"the consent of referral {referral_id} is not revoked",
                    hint="revoke the consent first (`tessera consent revoke`)",
                )
            if ReferralState(row.state) in (ReferralState.REVOKED, ReferralState.PURGED):
                return self._outgoing_list(session, [row])[0]
            # Its own envelope must not leave after its revocation.
            session.exec(
                delete(OutboxRow).where(
                    col(OutboxRow.referral_id) == referral_id,
                    col(OutboxRow.kind) == OutboxKind.REFERRAL.value,
                )
            )
            row.state = ReferralState.REVOKED.value
            row.updated_at = now
            session.add(row)
            self._step(session, referral_id, _Direction.OUTGOING, ReferralState.REVOKED, now)
            self._enqueue(session, OutboxKind.REVOCATION, referral_id, envelope, b"")
            self._append(session, actor, "revocation.sent", row.case_id, _disclosure(row))
            result = self._outgoing_list(session, [row])[0]
        return result

    def record_purge_confirmation(
        self, actor: str, confirmation: ReceivedPurgeConfirmation
    ) -> OutgoingReferral:
        """The recipient confirmed it purged a referral: state ``purged``, audited
        ``purge.confirmed`` with the purged field names. Only the recipient may confirm, for the
        referral's own consent (Refused); each message id takes effect once."""
        if not isinstance(confirmation, ReceivedPurgeConfirmation):
            raise InvalidInput("record_purge_confirmation needs a ReceivedPurgeConfirmation")
        sender = confirmation.sender_agency_id
        with self._writing() as session:
            row = _outgoing_row(session, confirmation.referral_id, for_update=True)
            if row.recipient_id != sender or row.consent_id != confirmation.consent_id:
                raise Refused(
                    f"agency {sender!r} confirmed a purge of referral {row.referral_id} under "
                    f"consent {confirmation.consent_id}, which does not match what was sent",
                    hint="drop the message; report it to the broker operator",
                )
            if (
                self._first_time(
                    session,
                    sender,
                    confirmation.message_id,
                    OutboxKind.PURGE_CONFIRMATION,
                    row.referral_id,
                )
                and row.state != ReferralState.PURGED.value
            ):
                at = require_aware(confirmation.purged_at, "purged_at")
                row.state = ReferralState.PURGED.value
                row.updated_at = at
                session.add(row)
                self._step(session, row.referral_id, _Direction.OUTGOING, ReferralState.PURGED, at)
                self._append(
                    session,
                    actor,
                    "purge.confirmed",
                    row.case_id,
                    _disclosure(row, list(confirmation.purged_fields)),
                )
            result = self._outgoing_list(session, [row])[0]
        return result

    # --- the outbox --------------------------------------------------------------------------

    def pending_outbox(self, limit: int = 100) -> list[OutboxItem]:
        """Envelopes the broker has not accepted yet, oldest first."""
        with self._store._reading() as session:
            rows = session.exec(select(OutboxRow).order_by(col(OutboxRow.id)).limit(limit))
            return [_outbox_item(row) for row in rows]

    def mark_outbox_sent(self, item_id: int, receipt: bytes) -> bool:
        """The broker accepted an envelope: delete it from the outbox (a referral becomes
        ``sent``, keeping the relay receipt). False if it was no longer there (already marked,
        or withdrawn by a revocation)."""
        if not isinstance(receipt, bytes):
            raise InvalidInput("a relay receipt must be bytes")
        with self._writing() as session:
            item = session.get(OutboxRow, item_id)
            if item is None:
                return False
            case_id = None
            if item.kind == OutboxKind.REFERRAL.value:
                row = session.get(OutgoingReferralRow, item.referral_id)
                if row is not None:
                    case_id = row.case_id
                    if row.state == ReferralState.QUEUED.value:
                        now = utcnow()
                        row.state = ReferralState.SENT.value
                        row.relay_receipt = receipt
                        row.updated_at = now
                        session.add(row)
                        self._step(
                            session, row.referral_id, _Direction.OUTGOING, ReferralState.SENT, now
                        )
            session.delete(item)
            self._append(
                session,
                RELAY_ACTOR,
                "envelope.relayed",
                case_id,
                {
                    "kind": item.kind,
                    "referral_id": item.referral_id,
                    "recipient_id": item.recipient_id,
                },
            )
        return True

    def outbox_failed(self, item_id: int, error: str) -> None:
        """Count a failed push (the envelope stays queued); ``error`` is the relay's reason, kept
        for the operator (never survivor data)."""
        with self._writing() as session:
            item = session.get(OutboxRow, item_id)
            if item is None:
                return
            item.attempts += 1
            item.last_error = str(error)[:_MAX_ERROR_CHARS]
            item.last_attempt_at = utcnow()
            session.add(item)

    # --- incoming referrals (receiving side) ------------------------------------------------

    def store_incoming(
        self,
        received: ReceivedReferral,
        delivery_id: str,
        *,
        actor: str = RELAY_ACTOR,
        reply: OutgoingEnvelope | None = None,
    ) -> IncomingReferral:
        """Store a referral that ``open_envelope`` verified, encrypted; audited
        ``referral.received``. ``reply`` (the DELIVERED status, sealed to the sender) is queued in
        the same transaction.

        Exactly once in effect: the same message (same sender and message id) or the same relay
        delivery again, or another copy of a referral already here (or purged here), returns
        what is stored and writes nothing new.
        """
        if not isinstance(received, ReceivedReferral):
            raise InvalidInput("store_incoming needs a ReceivedReferral")
        _check_key(delivery_id, "delivery_id")
        sender = received.sender_agency_id
        _check_reply(reply, sender)
        with self._writing() as session:
            seen = _seen(session, sender, received.message_id, delivery_id)
            if seen is not None:
                if (
                    seen.kind != OutboxKind.REFERRAL.value
                    or seen.referral_id != received.referral_id
                ):
                    raise Conflict(
                        f"delivery {delivery_id} or message {received.message_id} was already "
                        "applied to another message"
                    )
                return self._incoming_list(session, [_incoming_row(session, seen.referral_id)])[0]
            existing = session.get(IncomingReferralRow, received.referral_id)
            if existing is not None:
                if existing.sender_id != sender:
                    raise Conflict(
                        f"referral id {received.referral_id} is already used by another agency"
                    )
                self._processed(
                    session,
                    sender,
                    received.message_id,
                    OutboxKind.REFERRAL,
                    existing.referral_id,
                    delivery_id,
                )
                return self._incoming_list(session, [existing])[0]
            now = utcnow()
            data_key = crypto.DataKey.generate()  # one key per referral: a purge shreds it
            row = IncomingReferralRow(
                referral_id=received.referral_id,
                sender_id=sender,
                consent_id=received.receipt.consent_id,
                need=received.need.value,
                state=ReferralState.DELIVERED.value,
                version=1,
                received_at=now,
                updated_at=now,
                ciphertext=b"",
                wrapped_key=crypto.wrap_key(
                    self._store.keyring.record_key,
                    data_key,
                    _incoming_key_context(received.referral_id),
                ),
            )
            row.ciphertext = _seal_incoming(data_key, row, _payload_of(received))
            session.add(row)
            session.flush()
            self._processed(
                session,
                sender,
                received.message_id,
                OutboxKind.REFERRAL,
                row.referral_id,
                delivery_id,
            )
            self._step(session, row.referral_id, _Direction.INCOMING, ReferralState.DELIVERED, now)
            if reply is not None:
                self._enqueue(session, OutboxKind.STATUS_UPDATE, row.referral_id, reply, b"")
            self._append(
                session,
                actor,
                "referral.received",
                None,
                {
                    "referral_id": row.referral_id,
                    "sender_id": sender,
                    "consent_id": row.consent_id,
                    "need": row.need,
                    "fields": list(received.fields),
                    "note": bool(received.note),
                },
            )
            result = self._incoming_list(session, [row])[0]
        return result

    def inbox(
        self,
        states: Iterable[ReferralState] | None = None,
        *,
        limit: int = 100,
        offset: int = 0,
    ) -> list[IncomingReferral]:
        """Referrals received here (in ``states``, if given), oldest first; nothing decrypted."""
        with self._store._reading() as session:
            query = select(IncomingReferralRow).order_by(
                col(IncomingReferralRow.received_at), col(IncomingReferralRow.referral_id)
            )
            if states is not None:
                wanted = [ReferralState(s).value for s in states]
                query = query.where(col(IncomingReferralRow.state).in_(wanted))
            rows = session.exec(query.offset(offset).limit(limit)).all()
            return self._incoming_list(session, rows)

    def incoming_sender(self, referral_id: str) -> str:
        """The agency that sent a received referral (whom an answer goes to); NotFound if none
        came. Nothing is decrypted, so nothing is audited."""
        with self._store._reading() as session:
            return _incoming_row(session, referral_id).sender_id

    def incoming(self, referral_id: str, actor: str) -> IncomingReferral:
        """One received referral with its decrypted content (None once purged); the read is
        audited ``referral.read``. TamperedCiphertext if its ciphertext or key was altered."""
        with self._store._reading() as session:
            row = _incoming_row(session, referral_id)
            record = self._incoming_list(session, [row])[0]
            payload = self._open_incoming(row)
        if payload is not None:
            record = _with_content(record, payload)
        with self._writing() as session:
            self._append(
                session,
                actor,
                "referral.read",
                None,
                {"referral_id": referral_id, "sender_id": record.sender_id},
            )
        return record

    def answer(
        self,
        actor: str,
        referral_id: str,
        status: ReferralStatus,
        reason: DeclineReason | None,
        text: str,
        *,
        reply: OutgoingEnvelope | None = None,
    ) -> IncomingReferral:
        """Accept, decline (with a reason) or complete a received referral; audited
        ``referral.answered``. ``reply`` (the StatusUpdate, sealed to the sender) is queued in the
        same transaction.

        Allowed: delivered → accepted | declined, accepted → completed (Conflict otherwise).
        Giving the answer it already has returns it unchanged and queues nothing (a retry).
        The decline text is stored inside the referral's ciphertext.
        """
        status = _status(status)
        if status not in _ANSWERS:
            raise InvalidInput(
                f"a referral is answered accepted, declined or completed, not {status.value}"
            )
        _check_decline(status, reason, text, ENVELOPE_LIMITS)
        target = ReferralState(status.value)
        with self._writing() as session:
            row = _incoming_row(session, referral_id, for_update=True)
            _check_reply(reply, row.sender_id)
            current = ReferralState(row.state)
            if current is target and row.decline_reason == (reason.value if reason else None):
                return self._incoming_list(session, [row])[0]
            if current not in _ANSWERS[status]:
                raise Conflict(
                    f"referral {referral_id} is {current.value}; it cannot be {target.value} now",
                    hint="accept or decline a delivered referral; complete an accepted one",
                )
            now = utcnow()
            if status is ReferralStatus.DECLINED:
                assert reason is not None
                row.decline_reason = reason.value
                if text:
                    payload = self._open_incoming(row)
                    if payload is None:  # pragma: no cover - a purged row is never declined
                        raise Conflict(f"referral {referral_id} was purged")
                    payload["decline_text"] = text
                    data_key = self._incoming_key(row)
                    row.version += 1
                    row.ciphertext = _seal_incoming(data_key, row, payload)
            row.state = target.value
            row.updated_at = now
            session.add(row)
            self._step(session, referral_id, _Direction.INCOMING, target, now)
            if reply is not None:
                self._enqueue(session, OutboxKind.STATUS_UPDATE, referral_id, reply, b"")
            self._append(
                session,
                actor,
                "referral.answered",
                None,
                {
                    "referral_id": referral_id,
                    "sender_id": row.sender_id,
                    "status": status.value,
                    "reason": reason.value if reason else None,
                },
            )
            result = self._incoming_list(session, [row])[0]
        return result

    def purge_incoming(
        self,
        referral_id: str,
        actor: str,
        revocation: ReceivedRevocation,
        *,
        confirm: Callable[[tuple[str, ...]], OutgoingEnvelope | None] | None = None,
    ) -> list[str]:
        """Purge a received referral's personal data on its sender's revocation; returns the
        names of the fields purged. Audited ``referral.purged``.

        The ciphertext and the wrapped data key are emptied (on SQLite, secure_delete and a WAL
        checkpoint keep no copy), and the row stays as a tombstone: ids, state ``purged``,
        timestamps and the purged field names. Only the sending agency, for the referral's own
        consent, may revoke it (Refused). A revocation of a referral not (yet) here leaves a
        tombstone, so the referral is never stored if it arrives later. ``confirm(names)``, if
        given, returns the PurgeConfirmation to queue in the same transaction (or None); it must
        not raise. The same message again returns the names and changes nothing.
        """
        if not isinstance(revocation, ReceivedRevocation):
            raise InvalidInput("purge_incoming needs a ReceivedRevocation")
        if revocation.referral_id != referral_id:
            raise InvalidInput(f"the revocation is for referral {revocation.referral_id}")
        sender = revocation.sender_agency_id
        purged_now = False
        with self._writing() as session:
            row = session.get(IncomingReferralRow, referral_id, with_for_update=True)
            if row is not None and (
                row.sender_id != sender or row.consent_id != revocation.consent_id
            ):
                raise Refused(
                    f"agency {sender!r} revoked referral {referral_id} under consent "
                    f"{revocation.consent_id}, which is not how it was sent here",
                    hint="drop the message; report it to the broker operator",
                )
            if not self._first_time(
                session, sender, revocation.message_id, OutboxKind.REVOCATION, referral_id
            ):
                return list(_purged_names(row)) if row is not None else []
            now = utcnow()
            unreadable = False
            if row is None:
                row = IncomingReferralRow(
                    referral_id=referral_id,
                    sender_id=sender,
                    consent_id=revocation.consent_id,
                    need=None,
                    state=ReferralState.PURGED.value,
                    purged_fields="[]",
                    received_at=now,
                    updated_at=now,
                    purged_at=now,
                    ciphertext=b"",
                    wrapped_key=b"",
                )
                names: tuple[str, ...] = ()
                purged_now = True
            elif row.state == ReferralState.PURGED.value:
                names = _purged_names(row)
            else:
                names, unreadable = self._shred(row, now)
                purged_now = True
            session.add(row)
            session.flush()
            if purged_now:
                self._step(session, referral_id, _Direction.INCOMING, ReferralState.PURGED, now)
            envelope = confirm(names) if confirm is not None else None
            if envelope is not None:
                _check_reply(envelope, sender)
                self._enqueue(session, OutboxKind.PURGE_CONFIRMATION, referral_id, envelope, b"")
            if purged_now:
                self._append(
                    session,
                    actor,
                    "referral.purged",
                    None,
                    {
                        "referral_id": referral_id,
                        "sender_id": sender,
                        "consent_id": revocation.consent_id,
                        "fields": list(names),
                        "unreadable": unreadable,
                    },
                )
        if purged_now:
            self._store._append_ledger(f"{LEDGER_PURGED} {referral_id}")
            self._store._checkpoint()
        return list(names)

    # --- after a restore ---------------------------------------------------------------------

    def reapply_ledger(self, actor: str, ledger: Iterable[tuple[str, str]]) -> int:
        """Re-apply every consent revocation and referral purge of the node's ledger (the
        ``(kind, value)`` pairs of ``node.backup.read_ledger``) that a restored older backup
        undid; returns how many. Call it after ``restore_backup``."""
        count = 0
        entries = list(ledger)
        with self._writing() as session:
            now = utcnow()
            for kind, value in entries:
                if kind == LEDGER_PURGED:
                    row = session.get(IncomingReferralRow, value)
                    if row is not None and (row.wrapped_key or row.ciphertext):
                        self._shred(row, now)
                        session.add(row)
                        count += 1
                elif kind == LEDGER_REVOKED:
                    consent_id, _sep, when = value.partition(" ")
                    consent = session.get(ConsentRow, consent_id)
                    if consent is not None and consent.revoked_at is None:
                        consent.revoked_at = _parse_time(when, now)
                        session.add(consent)
                        _withdraw_referral_envelopes(session, consent_id)
                        count += 1
            if count:
                self._append(session, actor, "referrals.ledger_reapplied", None, {"changes": count})
        self._store._checkpoint()
        return count

    # --- internals: shared -------------------------------------------------------------------

    def _first_time(
        self, session: Session, sender: str, message_id: str, kind: OutboxKind, referral_id: str
    ) -> bool:
        """Record ``(sender, message_id)`` as applied; False if it already was."""
        if session.get(ProcessedMessageRow, (sender, message_id)) is not None:
            return False
        self._processed(session, sender, message_id, kind, referral_id, None)
        return True

    def _processed(
        self,
        session: Session,
        sender: str,
        message_id: str,
        kind: OutboxKind,
        referral_id: str,
        delivery_id: str | None,
    ) -> None:
        session.add(
            ProcessedMessageRow(
                sender_id=sender,
                message_id=message_id,
                kind=kind.value,
                referral_id=referral_id,
                delivery_id=delivery_id,
            )
        )

    def _enqueue(
        self,
        session: Session,
        kind: OutboxKind,
        referral_id: str,
        envelope: OutgoingEnvelope,
        commitment: bytes,
    ) -> None:
        session.add(
            OutboxRow(
                kind=kind.value,
                referral_id=referral_id,
                recipient_id=envelope.recipient_id,
                idempotency_key=envelope.message_id,
                consent_commitment=commitment,
                sealed=envelope.sealed,
            )
        )
        session.flush()

    def _step(
        self,
        session: Session,
        referral_id: str,
        direction: _Direction,
        state: ReferralState,
        at: dt.datetime,
    ) -> None:
        session.add(
            ReferralEventRow(
                referral_id=referral_id, direction=direction.value, state=state.value, at=at
            )
        )

    def _history(
        self, session: Session, direction: _Direction, referral_ids: Sequence[str]
    ) -> dict[str, tuple[ReferralStep, ...]]:
        steps: dict[str, list[ReferralStep]] = {}
        if referral_ids:
            rows = session.exec(
                select(ReferralEventRow)
                .where(
                    col(ReferralEventRow.referral_id).in_(referral_ids),
                    ReferralEventRow.direction == direction.value,
                )
                .order_by(col(ReferralEventRow.id))
            )
            for row in rows:
                steps.setdefault(row.referral_id, []).append(
                    ReferralStep(ReferralState(row.state), as_utc(row.at))
                )
        return {key: tuple(value) for key, value in steps.items()}

    # --- internals: sending side -------------------------------------------------------------

    def _set_need(
        self,
        session: Session,
        case_id: str,
        category: NeedCategory,
        status: NeedStatus,
        now: dt.datetime,
    ) -> None:
        """NodeStore.set_need's change, inside this transaction (audited with the referral).
        Nothing happens for an erased survivor."""
        case = session.get(CaseRow, case_id)
        if case is not None:
            self._store._put_need(session, case, category, status, None, now)

    def _seal_decline(self, session: Session, row: OutgoingReferralRow, text: str) -> bytes:
        # The recipient's free text may describe the survivor: encrypt it under their data key,
        # so erasing the survivor shreds it. Nothing is kept once they are erased.
        if not text:
            return b""
        case = session.get(CaseRow, row.case_id)
        if case is None:
            return b""
        return crypto.encrypt(
            self._store._data_key(case), text.encode(), _decline_associated_data(row.referral_id)
        )

    def _open_decline(self, session: Session, row: OutgoingReferralRow) -> str:
        if not row.decline_text:
            return ""
        case = session.get(CaseRow, row.case_id)
        if case is None:
            return ""
        plain = crypto.decrypt(
            self._store._data_key(case),
            row.decline_text,
            _decline_associated_data(row.referral_id),
        )
        return plain.decode()

    def _outgoing_list(
        self, session: Session, rows: Sequence[OutgoingReferralRow]
    ) -> list[OutgoingReferral]:
        history = self._history(session, _Direction.OUTGOING, [r.referral_id for r in rows])
        return [
            OutgoingReferral(
                referral_id=row.referral_id,
                case_id=row.case_id,
                consent_id=row.consent_id,
                recipient_id=row.recipient_id,
                recipient_name=row.recipient_name,
                need=NeedCategory(row.need),
                fields=tuple(json.loads(row.fields)),
                state=ReferralState(row.state),
                decline_reason=DeclineReason(row.decline_reason) if row.decline_reason else None,
                decline_text=self._open_decline(session, row),
                message_id=row.message_id,
                idempotency_key=row.idempotency_key,
                consent_commitment=row.consent_commitment,
                relay_receipt=row.relay_receipt,
                created_at=as_utc(row.created_at),
                updated_at=as_utc(row.updated_at),
                history=history.get(row.referral_id, ()),
            )
            for row in rows
        ]

    # --- internals: receiving side -----------------------------------------------------------

    def _incoming_key(self, row: IncomingReferralRow) -> crypto.DataKey:
        if not row.wrapped_key:
            raise TamperedCiphertext(f"referral {row.referral_id} has no data key")
        return crypto.unwrap_key(
            self._store.keyring.record_key,
            row.wrapped_key,
            _incoming_key_context(row.referral_id),
        )

    def _open_incoming(self, row: IncomingReferralRow) -> dict[str, Any] | None:
        """The decrypted payload; None once purged; TamperedCiphertext if altered."""
        if row.state == ReferralState.PURGED.value and not row.ciphertext:
            return None
        plain = crypto.decrypt(
            self._incoming_key(row),
            row.ciphertext,
            _incoming_associated_data(row.referral_id, row.version),
        )
        payload: dict[str, Any] = json.loads(plain)
        return payload

    def _shred(self, row: IncomingReferralRow, now: dt.datetime) -> tuple[tuple[str, ...], bool]:
        """Empty a referral's ciphertext and key, keeping a tombstone; (field names, unreadable).

        An altered ciphertext is purged all the same: its field names are then unknown.
        """
        try:
            payload = self._open_incoming(row)
            names = tuple(sorted(payload["fields"])) if payload else ()
            unreadable = False
        except TamperedCiphertext:
            names, unreadable = (), True
        row.ciphertext = b""
        row.wrapped_key = b""
        row.version += 1
        row.state = ReferralState.PURGED.value
        row.purged_fields = json.dumps(list(names))
        row.purged_at = now
        row.updated_at = now
        return names, unreadable

    def _incoming_list(
        self, session: Session, rows: Sequence[IncomingReferralRow]
    ) -> list[IncomingReferral]:
        history = self._history(session, _Direction.INCOMING, [r.referral_id for r in rows])
        return [
            IncomingReferral(
                referral_id=row.referral_id,
                sender_id=row.sender_id,
                consent_id=row.consent_id,
                need=NeedCategory(row.need) if row.need else None,
                state=ReferralState(row.state),
                decline_reason=DeclineReason(row.decline_reason) if row.decline_reason else None,
                received_at=as_utc(row.received_at),
                updated_at=as_utc(row.updated_at),
                purged_at=as_utc(row.purged_at) if row.purged_at else None,
                purged_fields=_purged_names(row),
                history=history.get(row.referral_id, ()),
            )
            for row in rows
        ]


# --- module helpers -----------------------------------------------------------------------------


def _incoming_associated_data(referral_id: str, version: int) -> bytes:
    """Associated data of an incoming referral's ciphertext: table, row and version."""
    return f"tessera/v1|incoming_referral|{referral_id}|{version}".encode()


def _incoming_key_context(referral_id: str) -> bytes:
    return f"tessera/v1|referral_key|{referral_id}".encode()


def _decline_associated_data(referral_id: str) -> bytes:
    return f"tessera/v1|outgoing_referral|{referral_id}|decline_text".encode()


def _seal_incoming(
    data_key: crypto.DataKey, row: IncomingReferralRow, payload: Mapping[str, Any]
) -> bytes:
    plain = json.dumps(payload, separators=(",", ":")).encode()
    return crypto.encrypt(data_key, plain, _incoming_associated_data(row.referral_id, row.version))


def _payload_of(received: ReceivedReferral) -> dict[str, Any]:
    receipt = received.receipt
    return {
        "fields": dict(received.fields),
        "note": received.note,
        "sender_contact": received.sender_contact,
        "sent_at": received.sent_at.isoformat(),
        "receipt": {
            "body": _b64(receipt.body),
            "signature": _b64(receipt.signature),
            "signer": _b64(receipt.signer),
        },
        "decline_text": "",
    }


def _with_content(record: IncomingReferral, payload: Mapping[str, Any]) -> IncomingReferral:
    receipt = payload["receipt"]
    content = ReferralContent(
        fields=payload["fields"],
        note=str(payload["note"]),
        sender_contact=str(payload["sender_contact"]),
        sent_at=dt.datetime.fromisoformat(payload["sent_at"]),
        receipt_body=base64.b64decode(receipt["body"]),
        receipt_signature=base64.b64decode(receipt["signature"]),
        receipt_signer=base64.b64decode(receipt["signer"]),
    )
    return dataclasses.replace(
        record, content=content, decline_text=str(payload.get("decline_text", ""))
    )


def _purged_names(row: IncomingReferralRow) -> tuple[str, ...]:
    return tuple(json.loads(row.purged_fields)) if row.purged_fields else ()


def _disclosure(
    row: OutgoingReferralRow, fields: Sequence[str] | None = None, **extra: Any
) -> dict[str, Any]:
    """Audit detail of a disclosure event, in the keys node.serde.disclosure_pb reads."""
    return {
        "recipient_id": row.recipient_id,
        "recipient_name": row.recipient_name,
        "referral_id": row.referral_id,
        "consent_id": row.consent_id,
        "purpose": row.need,
        "fields": list(json.loads(row.fields) if fields is None else fields),
        **extra,
    }


def _moves_forward(current: ReferralState, target: ReferralState) -> bool:
    """Statuses only move a referral forward (docs/referrals.md): never out of a final state,
    never back, and accepted/declined never replace each other."""
    if current in _FINAL:
        return False
    return _RANK[target] > _RANK[current]


def _seen(
    session: Session, sender: str, message_id: str, delivery_id: str
) -> ProcessedMessageRow | None:
    by_message = session.get(ProcessedMessageRow, (sender, message_id))
    if by_message is not None:
        return by_message
    return session.exec(
        select(ProcessedMessageRow).where(ProcessedMessageRow.delivery_id == delivery_id)
    ).first()


def _withdraw_referral_envelopes(session: Session, consent_id: str) -> int:
    """Delete the referral envelopes under a consent that are still in the outbox, so none
    leaves after its revocation; how many there were."""
    under = select(OutgoingReferralRow.referral_id).where(
        OutgoingReferralRow.consent_id == consent_id
    )
    withdrawn = session.exec(
        select(OutboxRow.id).where(
            OutboxRow.kind == OutboxKind.REFERRAL.value,
            col(OutboxRow.referral_id).in_(under),
        )
    ).all()
    if withdrawn:
        session.exec(delete(OutboxRow).where(col(OutboxRow.id).in_(withdrawn)))
    return len(withdrawn)


def _consent_row(session: Session, consent_id: str, for_update: bool = False) -> ConsentRow:
    row = session.get(ConsentRow, consent_id, with_for_update=for_update)
    if row is None:
        raise NotFound(
            f"no consent {consent_id}", hint="`tessera consent list` shows the consents there are"
        )
    return row


def _outgoing_row(
    session: Session, referral_id: str, for_update: bool = False
) -> OutgoingReferralRow:
    row = session.get(OutgoingReferralRow, referral_id, with_for_update=for_update)
    if row is None:
        raise NotFound(f"this node sent no referral {referral_id}")
    return row


def _incoming_row(
    session: Session, referral_id: str, for_update: bool = False
) -> IncomingReferralRow:
    row = session.get(IncomingReferralRow, referral_id, with_for_update=for_update)
    if row is None:
        raise NotFound(
            f"this node received no referral {referral_id}",
            hint="`tessera referral inbox` lists what arrived",
        )
    return row


def _outbox_item(row: OutboxRow) -> OutboxItem:
    assert row.id is not None
    return OutboxItem(
        id=row.id,
        kind=OutboxKind(row.kind),
        referral_id=row.referral_id,
        recipient_id=row.recipient_id,
        idempotency_key=row.idempotency_key,
        consent_commitment=row.consent_commitment,
        sealed=row.sealed,
        attempts=row.attempts,
        last_error=row.last_error,
        created_at=as_utc(row.created_at),
        last_attempt_at=as_utc(row.last_attempt_at) if row.last_attempt_at else None,
    )


def _consent(row: ConsentRow) -> Consent:
    return Consent(
        consent_id=row.consent_id,
        case_id=row.case_id,
        recipient_agency_id=row.recipient_agency_id,
        purpose=NeedCategory(row.purpose),
        categories=frozenset(json.loads(row.categories)),
        method=ConsentMethod(row.method),
        witnessed_by=row.witnessed_by,
        granted_at=as_utc(row.granted_at),
        expires_at=as_utc(row.expires_at),
        revoked_at=as_utc(row.revoked_at) if row.revoked_at else None,
        survivor_pseudonym=row.survivor_pseudonym,
    )


def _check_reply(reply: OutgoingEnvelope | None, sender: str) -> None:
    if reply is None:
        return
    if not isinstance(reply, OutgoingEnvelope):
        raise InvalidInput("a reply must be an OutgoingEnvelope")
    if reply.recipient_id != sender:
        raise InvalidInput(f"a reply about this referral goes to {sender}, its sender")


def _check_key(value: object, name: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= _MAX_KEY_CHARS:
        raise InvalidInput(f"{name} must be 1 to {_MAX_KEY_CHARS} characters")
    return value


def _status(value: object) -> ReferralStatus:
    try:
        return ReferralStatus(str(value))
    except ValueError:
        raise InvalidInput(
            f"unknown referral status {value!r}",
            hint=f"one of: {', '.join(s.value for s in ReferralStatus)}",
        ) from None


def _parse_time(value: str, default: dt.datetime) -> dt.datetime:
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return default
    return as_utc(parsed)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
