"""The receiving side at rest: referrals other agencies sent here (DESIGN.md sections 5, 6).

An incoming referral is encrypted at rest like a case (a data key of its own, wrapped by the
record key; one AEAD whose associated data binds table, row and version); only ids, the sender,
the need code, the state and timestamps are in clear. A redelivered envelope (same message id or
same relay delivery id) changes nothing. A purge on revocation empties the ciphertext and the
wrapped key and keeps a tombstone; it is appended to the node's ledger (``referral-purged``),
which a restore re-applies.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

from sqlmodel import Session, col, select

from node.envelopes import DEFAULT_LIMITS as ENVELOPE_LIMITS
from node.envelopes import ReceivedReferral, ReceivedRevocation
from node.referrals import model
from node.referrals.model import (
    ANSWERS,
    RELAY_ACTOR,
    DeclineReason,
    Direction,
    IncomingReferral,
    OutboxKind,
    OutgoingEnvelope,
    ReferralContent,
    ReferralState,
    ReferralStatus,
    check_key,
)
from node.referrals.outgoing import Outbox
from node.referrals.unit import UnitOfWork
from node.store.tables import IncomingReferralRow, as_utc, utcnow
from tessera import crypto
from tessera.errors import Conflict, InvalidInput, NotFound, Refused, TamperedCiphertext
from tessera.needs import NeedCategory

__all__ = ["LEDGER_PURGED", "IncomingStore"]

#: The ledger line (node's home, outside the database) of a purge.
LEDGER_PURGED: Final = "referral-purged"


class IncomingStore:
    """Referrals received here: stored encrypted, read (audited), answered, purged."""

    def __init__(self, uow: UnitOfWork, outbox: Outbox) -> None:
        self._uow = uow
        self._outbox = outbox

    def store(
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
        check_key(delivery_id, "delivery_id")
        sender = received.sender_agency_id
        _check_reply(reply, sender)
        with self._uow.writing() as session:
            seen = self._uow.seen(session, sender, received.message_id, delivery_id)
            if seen is not None:
                if (
                    seen.kind != OutboxKind.REFERRAL.value
                    or seen.referral_id != received.referral_id
                ):
                    raise Conflict(
                        f"delivery {delivery_id} or message {received.message_id} was already "
                        "applied to another message"
                    )
                return self._records(session, [_incoming_row(session, seen.referral_id)])[0]
            existing = session.get(IncomingReferralRow, received.referral_id)
            if existing is not None:
                if existing.sender_id != sender:
                    raise Conflict(
                        f"referral id {received.referral_id} is already used by another agency"
                    )
                self._uow.processed(
                    session,
                    sender,
                    received.message_id,
                    OutboxKind.REFERRAL,
                    existing.referral_id,
                    delivery_id,
                )
                return self._records(session, [existing])[0]
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
                    self._uow.node.keyring.record_key,
                    data_key,
                    _key_context(received.referral_id),
                ),
            )
            row.ciphertext = _seal(data_key, row, _payload_of(received))
            session.add(row)
            session.flush()
            self._uow.processed(
                session,
                sender,
                received.message_id,
                OutboxKind.REFERRAL,
                row.referral_id,
                delivery_id,
            )
            self._uow.step(
                session, row.referral_id, Direction.INCOMING, ReferralState.DELIVERED, now
            )
            if reply is not None:
                self._outbox.enqueue(session, OutboxKind.STATUS_UPDATE, row.referral_id, reply, b"")
            self._uow.audit(
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
            return self._records(session, [row])[0]

    def inbox(
        self,
        states: Iterable[ReferralState] | None = None,
        *,
        limit: int = 100,
        offset: int = 0,
    ) -> list[IncomingReferral]:
        """Referrals received here (in ``states``, if given), oldest first; nothing decrypted."""
        with self._uow.reading() as session:
            query = select(IncomingReferralRow).order_by(
                col(IncomingReferralRow.received_at), col(IncomingReferralRow.referral_id)
            )
            if states is not None:
                wanted = [ReferralState(s).value for s in states]
                query = query.where(col(IncomingReferralRow.state).in_(wanted))
            rows = session.exec(query.offset(offset).limit(limit)).all()
            return self._records(session, rows)

    def sender_of(self, referral_id: str) -> str:
        """The agency that sent a received referral (whom an answer goes to); NotFound if none
        came. Nothing is decrypted, so nothing is audited."""
        with self._uow.reading() as session:
            return _incoming_row(session, referral_id).sender_id

    def read(self, referral_id: str, actor: str) -> IncomingReferral:
        """One received referral with its decrypted content (None once purged); the read is
        audited ``referral.read``. TamperedCiphertext if its ciphertext or key was altered."""
        with self._uow.reading() as session:
            row = _incoming_row(session, referral_id)
            record = self._records(session, [row])[0]
            payload = self._open(row)
        if payload is not None:
            record = _with_content(record, payload)
        with self._uow.writing() as session:
            self._uow.audit(
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
        """Give a received referral one of the :data:`~node.referrals.model.ANSWERS` (accept,
        decline with a reason, complete); audited ``referral.answered``. ``reply`` (the
        StatusUpdate, sealed to the sender) is queued in the same transaction.

        Each answer may follow only the states the model lists (Conflict otherwise). Giving the
        answer it already has returns it unchanged and queues nothing (a retry). The decline text
        is stored inside the referral's ciphertext.
        """
        status = model.status_code(status)
        answer = ANSWERS.get(status)
        if answer is None:
            codes = [s.value for s in ANSWERS]
            verbs = ", ".join(codes[:-1]) + f" or {codes[-1]}"
            raise InvalidInput(f"a referral is answered {verbs}, not {status.value}")
        model.check_decline(status, reason, text, ENVELOPE_LIMITS.max_decline_text_chars)
        target = ReferralState(status.value)
        with self._uow.writing() as session:
            row = _incoming_row(session, referral_id, for_update=True)
            _check_reply(reply, row.sender_id)
            current = ReferralState(row.state)
            if current is target and row.decline_reason == (reason.value if reason else None):
                return self._records(session, [row])[0]
            if current not in answer.after:
                raise Conflict(
                    f"referral {referral_id} is {current.value}; it cannot be {target.value} now",
                    hint="; ".join(
                        f"{a.verb} a {' or '.join(s.value for s in a.after)} referral"
                        for a in ANSWERS.values()
                    ),
                )
            now = utcnow()
            if reason is not None:
                row.decline_reason = reason.value
                if text:
                    payload = self._open(row)
                    if payload is None:  # pragma: no cover - a purged row is never declined
                        raise Conflict(f"referral {referral_id} was purged")
                    payload["decline_text"] = text
                    data_key = self._key(row)
                    row.version += 1
                    row.ciphertext = _seal(data_key, row, payload)
            row.state = target.value
            row.updated_at = now
            session.add(row)
            self._uow.step(session, referral_id, Direction.INCOMING, target, now)
            if reply is not None:
                self._outbox.enqueue(session, OutboxKind.STATUS_UPDATE, referral_id, reply, b"")
            self._uow.audit(
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
            return self._records(session, [row])[0]

    def purge(
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
        with self._uow.writing() as session:
            row = session.get(IncomingReferralRow, referral_id, with_for_update=True)
            if row is not None and (
                row.sender_id != sender or row.consent_id != revocation.consent_id
            ):
                raise Refused(
                    f"agency {sender!r} revoked referral {referral_id} under consent "
                    f"{revocation.consent_id}, which is not how it was sent here",
                    hint="drop the message; report it to the broker operator",
                )
            if not self._uow.first_time(
                session, sender, revocation.message_id, OutboxKind.REVOCATION, referral_id
            ):
                return list(_purged_names(row)) if row is not None else []
            now = utcnow()
            unreadable = False
            purged_now = True
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
            elif row.state == ReferralState.PURGED.value:
                names = _purged_names(row)
                purged_now = False
            else:
                names, unreadable = self._shred(row, now)
            session.add(row)
            session.flush()
            if purged_now:
                self._uow.step(session, referral_id, Direction.INCOMING, ReferralState.PURGED, now)
            envelope = confirm(names) if confirm is not None else None
            if envelope is not None:
                _check_reply(envelope, sender)
                self._outbox.enqueue(
                    session, OutboxKind.PURGE_CONFIRMATION, referral_id, envelope, b""
                )
            if purged_now:
                self._uow.audit(
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
                self._uow.append_ledger(f"{LEDGER_PURGED} {referral_id}")
                self._uow.checkpoint()
        return list(names)

    def reapply_purge(self, session: Session, referral_id: str, now: dt.datetime) -> bool:
        """A ledger's purge that a restored older backup undid, again; True if it was."""
        row = session.get(IncomingReferralRow, referral_id)
        if row is None or not (row.wrapped_key or row.ciphertext):
            return False
        self._shred(row, now)
        session.add(row)
        return True

    # --- internals -------------------------------------------------------------------------

    def _key(self, row: IncomingReferralRow) -> crypto.DataKey:
        if not row.wrapped_key:
            raise TamperedCiphertext(f"referral {row.referral_id} has no data key")
        return crypto.unwrap_key(
            self._uow.node.keyring.record_key, row.wrapped_key, _key_context(row.referral_id)
        )

    def _open(self, row: IncomingReferralRow) -> dict[str, Any] | None:
        """The decrypted payload; None once purged; TamperedCiphertext if altered."""
        if row.state == ReferralState.PURGED.value and not row.ciphertext:
            return None
        plain = crypto.decrypt(
            self._key(row), row.ciphertext, _associated_data(row.referral_id, row.version)
        )
        payload: dict[str, Any] = json.loads(plain)
        return payload

    def _shred(self, row: IncomingReferralRow, now: dt.datetime) -> tuple[tuple[str, ...], bool]:
        """Empty a referral's ciphertext and key, keeping a tombstone; (field names, unreadable).

        An altered ciphertext is purged all the same: its field names are then unknown.
        """
        try:
            payload = self._open(row)
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

    def _records(
        self, session: Session, rows: Sequence[IncomingReferralRow]
    ) -> list[IncomingReferral]:
        history = self._uow.history(session, Direction.INCOMING, [r.referral_id for r in rows])
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


def _associated_data(referral_id: str, version: int) -> bytes:
    """Associated data of an incoming referral's ciphertext: table, row and version."""
    return f"tessera/v1|incoming_referral|{referral_id}|{version}".encode()


def _key_context(referral_id: str) -> bytes:
    return f"tessera/v1|referral_key|{referral_id}".encode()


def _seal(data_key: crypto.DataKey, row: IncomingReferralRow, payload: Mapping[str, Any]) -> bytes:
    plain = json.dumps(payload, separators=(",", ":")).encode()
    return crypto.encrypt(data_key, plain, _associated_data(row.referral_id, row.version))


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


def _check_reply(reply: OutgoingEnvelope | None, sender: str) -> None:
    if reply is None:
        return
    if not isinstance(reply, OutgoingEnvelope):
        raise InvalidInput("a reply must be an OutgoingEnvelope")
    if reply.recipient_id != sender:
        raise InvalidInput(f"a reply about this referral goes to {sender}, its sender")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
