"""The referral use cases of one node: grant, send, receive, answer, revoke, apply a status,
purge (DESIGN.md section 6).

Each flow validates against the pure core (``node.consent``, ``node.envelopes``), builds and seals
what must leave, and records it through the stores in one unit of work, with the envelope in the
outbox: nothing leaves the node except through the relay worker, which retries until the broker
accepted it. That includes the request that the broker purge a revoked consent's envelopes.

The flows block (database, directory file); the servicer and the relay worker run them in worker
threads and adapt them to gRPC in a few lines each. No protobuf here: ``node.serde`` converts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from node import consent as consent_mod
from node import directory_sync, envelopes
from node.consent import Consent, ReceiptBlob
from node.referrals.model import (
    RELAY_ACTOR,
    ConsentMethod,
    ConsentState,
    ConsentView,
    DeclineReason,
    IncomingReferral,
    OutgoingEnvelope,
    OutgoingReferral,
    ReferralStatus,
    SignedReceipt,
    consent_state,
)
from node.referrals.stores import ReferralStores
from node.store.cases import NodeStore
from tessera import crypto, directory
from tessera.errors import InvalidInput, NotFound, Refused, TesseraError
from tessera.logs import fields as log_fields
from tessera.needs import NeedCategory

__all__ = ["OFFLINE", "Courier", "GrantRequest", "Referrals", "Revoked", "SendRequest", "Shown"]

log = logging.getLogger(__name__)


class Courier(Protocol):
    """The relay worker as the servicer sees it (node.relay_worker.RelayWorker)."""

    def wake(self) -> None:
        """Push the outbox now (something was just queued)."""

    async def purge_now(self, item_id: int) -> int:
        """Push one queued purge at once; how many envelopes the broker purged (0 if it failed:
        the item stays queued and is retried)."""


class _Offline:
    """No relay worker yet (the node is not enrolled): everything waits in the outbox."""

    def wake(self) -> None:
        return None

    async def purge_now(self, item_id: int) -> int:
        return 0


OFFLINE: Final[Courier] = _Offline()


@dataclass(frozen=True)
class GrantRequest:
    """What a caseworker asks to record (already validated at the edge)."""

    case_id: str
    recipient_id: str
    purpose: NeedCategory
    categories: frozenset[str]
    method: ConsentMethod
    witnessed_by: str
    expires_at: dt.datetime
    idempotency_key: str


@dataclass(frozen=True)
class SendRequest:
    """A referral to send (already validated at the edge); ``fields`` empty sends every field
    the consent covers."""

    case_id: str
    consent_id: str
    recipient_id: str
    need: NeedCategory
    fields: tuple[str, ...]
    note: str
    sender_contact: str
    idempotency_key: str


@dataclass(frozen=True)
class Revoked:
    """A revoked consent, the referrals told to purge, and the queued purge at the broker."""

    consent: ConsentView
    revoked_referral_ids: tuple[str, ...]
    purge_item: int


@dataclass(frozen=True)
class Shown:
    """One referral shown to staff: incoming (with its content) or outgoing (with its
    consent)."""

    incoming: IncomingReferral | None = None
    outgoing: OutgoingReferral | None = None
    consent: ConsentView | None = None


class Referrals:
    """The referral lifecycle of one node: its use cases over :class:`ReferralStores`."""

    def __init__(self, store: NodeStore, home: Path) -> None:
        self.stores = ReferralStores(store)
        self._cases = store
        self._keyring = store.keyring
        self._home = home

    # --- consents --------------------------------------------------------------------------

    def grant_consent(self, actor: str, request: GrantRequest) -> ConsentView:
        """Record a survivor's consent for a recipient in the directory; a retried request
        (same idempotency key) returns the consent it recorded."""
        consent_id = self._keyed_uuid(b"tessera/v1/consent-id", request.idempotency_key)
        consents = self.stores.consents
        with contextlib.suppress(NotFound):
            return self.consent_view(consents.get(consent_id))  # a retried request
        self.recipient(request.recipient_id)  # the recipient must be in the directory
        consent = Consent(
            consent_id=consent_id,
            case_id=request.case_id,
            recipient_agency_id=request.recipient_id,
            purpose=request.purpose,
            categories=request.categories,
            method=request.method,
            witnessed_by=request.witnessed_by or actor,
            granted_at=dt.datetime.now(dt.UTC),
            expires_at=request.expires_at,
            revoked_at=None,
            survivor_pseudonym=consents.survivor_pseudonym(request.case_id, request.recipient_id),
        )
        return self.consent_view(consents.grant(actor, consent))

    def consents(self, case_id: str | None, state: ConsentState | None = None) -> list[ConsentView]:
        """Consents (of one case), newest first, in ``state`` if given."""
        now = dt.datetime.now(dt.UTC)
        return [
            self.consent_view(c)
            for c in self.stores.consents.of_case(case_id)
            if state is None or consent_state(c, now) == state
        ]

    def consent_view(self, consent: Consent) -> ConsentView:
        """A consent with its signed receipt, state and referrals."""
        blob = self._receipt(consent)
        referral_ids = tuple(
            r.referral_id for r in self.stores.outgoing.sent(consent_id=consent.consent_id)
        )
        return ConsentView(
            consent=consent,
            receipt=SignedReceipt(blob.body, blob.signature, blob.signer),
            state=consent_state(consent, dt.datetime.now(dt.UTC)),
            referral_ids=referral_ids,
        )

    def revoke(self, actor: str, consent_id: str) -> Revoked:
        """Withdraw a consent: in one transaction revoke it, withdraw its queued envelopes and
        queue the purge of its envelopes at the broker; then queue a Revocation for every
        referral sent under it. The relay worker pushes both, retrying until accepted."""
        link = directory_sync.load_link(self._home)
        commitment = consent_mod.commitment(self._receipt(self.stores.consents.get(consent_id)))
        now = dt.datetime.now(dt.UTC)
        with self.stores.uow.writing():
            consent, referrals = self.stores.revoke_consent(actor, consent_id, now)
            purge_item = self.stores.outbox.enqueue_purge(consent_id, commitment)
        revoked_at = consent.revoked_at or now
        done = []
        for referral in referrals:
            message_id = str(uuid.uuid4())
            sealed = envelopes.revocation_envelope(
                self._keyring.identity,
                link.agency_id,
                self.recipient(referral.recipient_id),
                referral.referral_id,
                consent.consent_id,
                revoked_at,
                dt.datetime.now(dt.UTC),
                message_id,
            )
            self.stores.outgoing.record_revocation_sent(
                actor, referral.referral_id, sealed, message_id
            )
            done.append(referral.referral_id)
        return Revoked(self.consent_view(consent), tuple(done), purge_item)

    # --- sending ---------------------------------------------------------------------------

    def send(self, actor: str, request: SendRequest) -> OutgoingReferral:
        """Send a referral under a consent: nothing is read or serialised unless the consent
        covers it (DESIGN.md section 6); a retried request returns the referral it made."""
        key = request.idempotency_key
        referral_id = self._keyed_uuid(b"tessera/v1/referral-id", key)
        message_id = self._keyed_uuid(b"tessera/v1/referral-message-id", key)
        with contextlib.suppress(NotFound):
            return self.stores.outgoing.get(referral_id)  # a retried request
        consent = self.stores.consents.get(request.consent_id)
        if consent.case_id != request.case_id:
            raise Refused(
                f"consent {request.consent_id} belongs to another case",
                hint="send under a consent recorded for this case",
            )
        recipient, need, note = request.recipient_id, request.need, request.note
        now = dt.datetime.now(dt.UTC)
        # The gate: nothing is read or serialised unless the consent covers it.
        consent_mod.check_covers(consent, recipient, need, request.fields, now, note=note)
        case = self._cases.get_case(actor, request.case_id)
        allowed = consent_mod.minimise(case.fields, consent)
        chosen = (
            {name: allowed[name] for name in request.fields if name in allowed}
            if request.fields
            else allowed
        )
        consent_mod.check_covers(consent, recipient, need, chosen, now, note=note)
        link = directory_sync.load_link(self._home)
        record = self.recipient(recipient)
        receipt = consent_mod.receipt_blob(self._keyring.identity, link.agency_id, consent)
        sealed = envelopes.referral_envelope(
            self._keyring.identity,
            link.agency_id,
            record,
            referral_id,
            need,
            chosen,
            note,
            receipt,
            now,
            message_id,
            sender_contact=request.sender_contact,
        )
        return self.stores.outgoing.record_sent(
            actor,
            referral_id,
            request.case_id,
            consent,
            recipient,
            record.name,
            need,
            list(chosen),
            key,
            sealed,
            message_id,
            consent_commitment=consent_mod.commitment(receipt),
            note=note,
            now=now,
        )

    # --- the receiving side ----------------------------------------------------------------

    def show(self, actor: str, referral_id: str) -> Shown:
        """One referral: received here (decrypted, the read audited) or sent from here."""
        try:
            return Shown(incoming=self.stores.incoming.read(referral_id, actor))
        except NotFound:
            outgoing = self.stores.outgoing.get(referral_id)
        consent = self.consent_view(self.stores.consents.get(outgoing.consent_id))
        self._cases.audit(
            actor,
            "referral.read",
            outgoing.case_id,
            {"referral_id": referral_id, "recipient_id": outgoing.recipient_id},
        )
        return Shown(outgoing=outgoing, consent=consent)

    def answer(
        self,
        actor: str,
        referral_id: str,
        status: ReferralStatus,
        reason: DeclineReason | None,
        text: str,
    ) -> IncomingReferral:
        """Answer a received referral; the StatusUpdate for its sender goes into the outbox in
        the same transaction."""
        sender_id = self.stores.incoming.sender_of(referral_id)
        link = directory_sync.load_link(self._home)
        message_id = str(uuid.uuid4())
        sealed = envelopes.status_envelope(
            self._keyring.identity,
            link.agency_id,
            self.recipient(sender_id),
            referral_id,
            status,
            reason,
            text,
            dt.datetime.now(dt.UTC),
            message_id,
        )
        reply = OutgoingEnvelope(sender_id, message_id, sealed)
        return self.stores.incoming.answer(actor, referral_id, status, reason, text, reply=reply)

    def receive(
        self, sender: directory.AgencyRecord, opened: envelopes.OpenedEnvelope, delivery_id: str
    ) -> bool:
        """Apply one verified envelope (``node.envelopes.open_envelope``); True if a reply was
        queued. Each kind has its flow: a referral is stored and DELIVERED goes back; a status
        moves a referral forward; a revocation purges and is confirmed; a confirmation closes."""
        if isinstance(opened, envelopes.ReceivedReferral):
            self.stores.incoming.store(
                opened,
                delivery_id,
                reply=self._reply(sender, opened.referral_id, ReferralStatus.DELIVERED),
            )
            return True
        if isinstance(opened, envelopes.ReceivedStatus):
            self.stores.outgoing.apply_status(
                RELAY_ACTOR,
                opened.referral_id,
                opened.sender_agency_id,
                opened.status,
                opened.decline_reason,
                opened.decline_text,
                opened.message_id,
                status_at=opened.status_at,
            )
            return False
        if isinstance(opened, envelopes.ReceivedRevocation):
            self.purge(sender, opened)
            return True
        self.stores.outgoing.record_purge_confirmation(RELAY_ACTOR, opened)
        return False

    def purge(
        self, sender: directory.AgencyRecord, revocation: envelopes.ReceivedRevocation
    ) -> list[str]:
        """Purge a received referral on its sender's revocation and queue the confirmation."""
        return self.stores.incoming.purge(
            revocation.referral_id,
            RELAY_ACTOR,
            revocation,
            confirm=lambda names: self._confirmation(sender, revocation, names),
        )

    # --- the directory ---------------------------------------------------------------------

    def recipient(self, agency_id: str) -> directory.AgencyRecord:
        """The pinned record of an agency, syncing the directory once if it is not known."""
        record = directory_sync.load_cache(self._home).records.get(agency_id)
        if record is None:
            link = directory_sync.load_link(self._home)
            synced = directory_sync.sync(self._home, self._keyring.identity, link)
            record = synced.records.get(agency_id)
        if record is None:
            raise InvalidInput(
                f"no agency {agency_id!r} in the directory",
                hint="`tessera agency list` shows the agencies there are",
            )
        return record

    def agency_names(self) -> dict[str, str]:
        """Agency id → name, from the pinned directory."""
        cache = directory_sync.load_cache(self._home)
        return {agency_id: r.name for agency_id, r in cache.records.items()}

    # --- internals -------------------------------------------------------------------------

    def _receipt(self, consent: Consent) -> ReceiptBlob:
        link = directory_sync.load_link(self._home)
        return consent_mod.receipt_blob(
            self._keyring.identity, link.agency_id, dataclasses.replace(consent, revoked_at=None)
        )

    def _keyed_uuid(self, label: bytes, key: str) -> str:
        """An unguessable UUID that the same idempotency key always maps to (retries)."""
        digest = crypto.blind_index(crypto.derive_key(self._keyring.record_key, label), key)
        return str(uuid.UUID(hex=digest[:32], version=4))

    def _reply(
        self, sender: directory.AgencyRecord, referral_id: str, status: ReferralStatus
    ) -> OutgoingEnvelope:
        message_id = str(uuid.uuid4())
        sealed = envelopes.status_envelope(
            self._keyring.identity,
            directory_sync.load_link(self._home).agency_id,
            sender,
            referral_id,
            status,
            None,
            "",
            dt.datetime.now(dt.UTC),
            message_id,
        )
        return OutgoingEnvelope(sender.agency_id, message_id, sealed)

    def _confirmation(
        self,
        sender: directory.AgencyRecord,
        revocation: envelopes.ReceivedRevocation,
        names: Sequence[str],
    ) -> OutgoingEnvelope | None:
        message_id = str(uuid.uuid4())
        now = dt.datetime.now(dt.UTC)
        try:
            sealed = envelopes.purge_confirmation_envelope(
                self._keyring.identity,
                directory_sync.load_link(self._home).agency_id,
                sender,
                revocation.referral_id,
                revocation.consent_id,
                names,
                now,
                now,
                message_id,
            )
        except TesseraError as exc:  # must not raise: the purge happens anyway
            log.warning("relay.confirmation_failed", extra=log_fields(error=str(exc)[:200]))
            return None
        return OutgoingEnvelope(sender.agency_id, message_id, sealed)
