"""The sending side at rest: referrals this node sent, and the outbox (DESIGN.md section 6).

- :meth:`OutgoingStore.record_sent` writes, in ONE transaction, the referral (state ``queued``),
  the sealed envelope into the outbox, the need's status ``referred`` and the ``referral.sent``
  audit entry that is the accounting of disclosures; it re-checks the stored consent under a
  lock, so a consent revoked a moment earlier refuses the referral;
- the :class:`Outbox` keeps each sealed envelope, and each request to purge a revoked consent's
  envelopes at the broker, until the broker accepted it (the relay worker calls
  :meth:`Outbox.mark_sent`); a failure is counted and retried, nothing is lost when a process
  dies;
- statuses, revocations and purge confirmations move a referral only forward
  (:func:`node.referrals.model.moves_forward`), and each message id takes effect once.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Sequence
from typing import Any, Final

from sqlalchemy import delete
from sqlmodel import Session, col, select

from node import consent as consent_mod
from node.consent import Consent
from node.envelopes import DEFAULT_LIMITS as ENVELOPE_LIMITS
from node.envelopes import ReceivedPurgeConfirmation
from node.htcds.catalogue import FIELD_NAMES
from node.referrals import model
from node.referrals.consents import consent_of, consent_row
from node.referrals.model import (
    RELAY_ACTOR,
    DeclineReason,
    Direction,
    OutboxItem,
    OutboxKind,
    OutgoingEnvelope,
    OutgoingReferral,
    ReferralState,
    ReferralStatus,
    check_key,
    check_uuid,
)
from node.referrals.unit import UnitOfWork
from node.store.tables import CaseRow, OutboxRow, OutgoingReferralRow, as_utc, utcnow
from tessera import crypto
from tessera.errors import Conflict, InvalidInput, NotFound, Refused
from tessera.needs import NeedCategory, NeedStatus
from tessera.timestamps import require_aware

__all__ = ["Outbox", "OutgoingStore"]

_FIELD_ORDER: Final = {name: index for index, name in enumerate(FIELD_NAMES)}
_MAX_NAME_CHARS: Final = 200
_MAX_ERROR_CHARS: Final = 500
_COMMITMENT_BYTES: Final = 32


class Outbox:
    """Envelopes for other agencies and purge requests for the broker, until accepted."""

    def __init__(self, uow: UnitOfWork) -> None:
        self._uow = uow

    def enqueue(
        self,
        session: Session,
        kind: OutboxKind,
        referral_id: str,
        envelope: OutgoingEnvelope,
        commitment: bytes,
    ) -> None:
        """Queue a sealed envelope, in the caller's transaction."""
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

    def enqueue_purge(self, consent_id: str, commitment: bytes) -> int:
        """Queue the request that the broker purge every envelope under a revoked consent
        (``Relay.PurgeConsent``); its outbox id. One is pending per consent at a time."""
        check_uuid(consent_id, "consent_id")
        if not isinstance(commitment, bytes) or len(commitment) != _COMMITMENT_BYTES:
            raise InvalidInput("a purge needs the consent's 32-byte commitment")
        key = f"purge:{consent_id}"
        with self._uow.writing() as session:
            pending = session.exec(
                select(OutboxRow).where(OutboxRow.idempotency_key == key)
            ).first()
            if pending is not None:
                assert pending.id is not None
                return pending.id
            row = OutboxRow(
                kind=OutboxKind.CONSENT_PURGE.value,
                referral_id=consent_id,
                recipient_id="",
                idempotency_key=key,
                consent_commitment=commitment,
                sealed=b"",
            )
            session.add(row)
            session.flush()
            assert row.id is not None
            return row.id

    def withdraw(self, session: Session, consent_id: str) -> int:
        """Delete the referral envelopes under a consent that are still queued, so none leaves
        after its revocation; how many there were."""
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

    def item(self, item_id: int) -> OutboxItem | None:
        """One queued item, or None once it is done (or withdrawn)."""
        with self._uow.reading() as session:
            row = session.get(OutboxRow, item_id)
            return _outbox_item(row) if row is not None else None

    def pending(self, limit: int = 100) -> list[OutboxItem]:
        """What the broker has not accepted yet, oldest first."""
        with self._uow.reading() as session:
            rows = session.exec(select(OutboxRow).order_by(col(OutboxRow.id)).limit(limit))
            return [_outbox_item(row) for row in rows]

    def mark_sent(self, item_id: int, receipt: bytes) -> bool:
        """The broker accepted an envelope or a purge: delete it from the outbox (a referral
        becomes ``sent``, keeping the relay receipt). False if it was no longer there (already
        marked, or withdrawn by a revocation)."""
        if not isinstance(receipt, bytes):
            raise InvalidInput("a relay receipt must be bytes")
        with self._uow.writing() as session:
            item = session.get(OutboxRow, item_id)
            if item is None:
                return False
            session.delete(item)
            if item.kind == OutboxKind.CONSENT_PURGE.value:
                return True
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
                        self._uow.step(
                            session, row.referral_id, Direction.OUTGOING, ReferralState.SENT, now
                        )
            self._uow.audit(
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

    def failed(self, item_id: int, error: str) -> None:
        """Count a failed push (the item stays queued); ``error`` is the relay's reason, kept for
        the operator (never survivor data)."""
        with self._uow.writing() as session:
            item = session.get(OutboxRow, item_id)
            if item is None:
                return
            item.attempts += 1
            item.last_error = str(error)[:_MAX_ERROR_CHARS]
            item.last_attempt_at = utcnow()
            session.add(item)


class OutgoingStore:
    """Referrals this node sent, and what their recipients report back."""

    def __init__(self, uow: UnitOfWork, outbox: Outbox) -> None:
        self._uow = uow
        self._outbox = outbox

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
        check_uuid(referral_id, "referral_id")
        check_key(idempotency_key, "idempotency_key")
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
        with self._uow.writing() as session:
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
                return self._records(session, [existing])[0]
            if session.get(OutgoingReferralRow, referral_id) is not None:
                raise Conflict(f"referral {referral_id} is already recorded")
            self._uow.node.case_row(session, case_id)  # NotFound, also once erased
            stored = consent_of(consent_row(session, consent.consent_id, for_update=True))
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
            self._uow.step(session, referral_id, Direction.OUTGOING, ReferralState.QUEUED, now)
            self._set_need(session, case_id, need, NeedStatus.REFERRED, now)
            session.flush()
            self._outbox.enqueue(
                session, OutboxKind.REFERRAL, referral_id, envelope, consent_commitment
            )
            self._uow.audit(
                session,
                actor,
                "referral.sent",
                case_id,
                _disclosure(row, names, note=bool(note), need_status=NeedStatus.REFERRED.value),
            )
            return self._records(session, [row])[0]

    def sent(
        self,
        case_id: str | None = None,
        *,
        consent_id: str | None = None,
        states: Iterable[ReferralState] | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[OutgoingReferral]:
        """Referrals this node sent, most recently changed first, optionally filtered."""
        with self._uow.reading() as session:
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
            return self._records(session, rows)

    def get(self, referral_id: str) -> OutgoingReferral:
        """One referral this node sent; NotFound otherwise."""
        with self._uow.reading() as session:
            return self._records(session, [_outgoing_row(session, referral_id)])[0]

    def to_revoke(self, consent_id: str) -> list[OutgoingReferral]:
        """The referrals sent under a consent that are not yet revoked (or purged), oldest
        first."""
        with self._uow.reading() as session:
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
            return self._records(session, rows)

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
        referral only forward (stale or repeated ones are ignored) and, with it, the need
        (:func:`node.referrals.model.need_after`). Audited ``referral.delivered`` (a disclosure
        event) or ``referral.status``. Each message id takes effect once.
        """
        status = model.status_code(status)
        check_uuid(message_id, "message_id")
        model.check_decline(status, reason, text, ENVELOPE_LIMITS.max_decline_text_chars)
        at = utcnow() if status_at is None else require_aware(status_at, "status_at")
        with self._uow.writing() as session:
            row = _outgoing_row(session, referral_id, for_update=True)
            if row.recipient_id != sender_of_status:
                raise Refused(
                    f"agency {sender_of_status!r} reported a status of referral {referral_id}, "
                    "which was sent to another agency",
                    hint="drop the message; report it to the broker operator",
                )
            if not self._uow.first_time(
                session, sender_of_status, message_id, OutboxKind.STATUS_UPDATE, referral_id
            ):
                return self._records(session, [row])[0]
            target = ReferralState(status.value)
            if model.moves_forward(ReferralState(row.state), target):
                row.state = target.value
                row.updated_at = at
                need_status = model.need_after(status)
                if reason is not None:
                    row.decline_reason = reason.value
                    row.decline_text = self._seal_decline(session, row, text)
                session.add(row)
                self._uow.step(session, referral_id, Direction.OUTGOING, target, at)
                if need_status is not None:
                    self._set_need(session, row.case_id, NeedCategory(row.need), need_status, at)
                if status is ReferralStatus.DELIVERED:
                    self._uow.audit(
                        session, actor, "referral.delivered", row.case_id, _disclosure(row)
                    )
                else:
                    self._uow.audit(
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
            return self._records(session, [row])[0]

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
        with self._uow.writing() as session:
            row = _outgoing_row(session, referral_id, for_update=True)
            envelope = OutgoingEnvelope(row.recipient_id, message_id, sealed)
            if consent_row(session, row.consent_id).revoked_at is None:
                raise Conflict(
                    f"the consent of referral {referral_id} is not revoked",
                    hint="revoke the consent first (`tessera consent revoke`)",
                )
            if ReferralState(row.state) in (ReferralState.REVOKED, ReferralState.PURGED):
                return self._records(session, [row])[0]
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
            self._uow.step(session, referral_id, Direction.OUTGOING, ReferralState.REVOKED, now)
            self._outbox.enqueue(session, OutboxKind.REVOCATION, referral_id, envelope, b"")
            self._uow.audit(session, actor, "revocation.sent", row.case_id, _disclosure(row))
            return self._records(session, [row])[0]

    def record_purge_confirmation(
        self, actor: str, confirmation: ReceivedPurgeConfirmation
    ) -> OutgoingReferral:
        """The recipient confirmed it purged a referral: state ``purged``, audited
        ``purge.confirmed`` with the purged field names. Only the recipient may confirm, for the
        referral's own consent (Refused); each message id takes effect once."""
        if not isinstance(confirmation, ReceivedPurgeConfirmation):
            raise InvalidInput("record_purge_confirmation needs a ReceivedPurgeConfirmation")
        sender = confirmation.sender_agency_id
        consent_id = confirmation.consent_id
        message_id = confirmation.message_id
        with self._uow.writing() as session:
            row = _outgoing_row(session, confirmation.referral_id, for_update=True)
            if row.recipient_id != sender or row.consent_id != consent_id:
                raise Refused(
                    f"agency {sender!r} confirmed a purge of referral {row.referral_id} under "
                    f"consent {consent_id}, which does not match what was sent",
                    hint="drop the message; report it to the broker operator",
                )
            if (
                self._uow.first_time(
                    session, sender, message_id, OutboxKind.PURGE_CONFIRMATION, row.referral_id
                )
                and row.state != ReferralState.PURGED.value
            ):
                at = require_aware(confirmation.purged_at, "purged_at")
                row.state = ReferralState.PURGED.value
                row.updated_at = at
                session.add(row)
                self._uow.step(
                    session, row.referral_id, Direction.OUTGOING, ReferralState.PURGED, at
                )
                self._uow.audit(
                    session,
                    actor,
                    "purge.confirmed",
                    row.case_id,
                    _disclosure(row, list(confirmation.purged_fields)),
                )
            return self._records(session, [row])[0]

    # --- internals -------------------------------------------------------------------------

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
            self._uow.node.put_need(session, case, category, status, None, now)

    def _seal_decline(self, session: Session, row: OutgoingReferralRow, text: str) -> bytes:
        # The recipient's free text may describe the survivor: encrypt it under their data key,
        # so erasing the survivor shreds it. Nothing is kept once they are erased.
        if not text:
            return b""
        case = session.get(CaseRow, row.case_id)
        if case is None:
            return b""
        return crypto.encrypt(
            self._uow.node.data_key(case), text.encode(), _decline_associated_data(row.referral_id)
        )

    def _open_decline(self, session: Session, row: OutgoingReferralRow) -> str:
        if not row.decline_text:
            return ""
        case = session.get(CaseRow, row.case_id)
        if case is None:
            return ""
        plain = crypto.decrypt(
            self._uow.node.data_key(case),
            row.decline_text,
            _decline_associated_data(row.referral_id),
        )
        return plain.decode()

    def _records(
        self, session: Session, rows: Sequence[OutgoingReferralRow]
    ) -> list[OutgoingReferral]:
        history = self._uow.history(session, Direction.OUTGOING, [r.referral_id for r in rows])
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


# --- module helpers -----------------------------------------------------------------------------


def _decline_associated_data(referral_id: str) -> bytes:
    return f"tessera/v1|outgoing_referral|{referral_id}|decline_text".encode()


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


def _outgoing_row(
    session: Session, referral_id: str, for_update: bool = False
) -> OutgoingReferralRow:
    row = session.get(OutgoingReferralRow, referral_id, with_for_update=for_update)
    if row is None:
        raise NotFound(f"this node sent no referral {referral_id}")
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
