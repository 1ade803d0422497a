"""Consents at rest, on the sending side (DESIGN.md section 6, first bullet).

A consent row holds ids, codes, categories, the method, the witnessing staff principal, its
window and the survivor's pseudonym, never a survivor field. A revocation is never undone: it is
also appended to the node's ledger (``consent-revoked``), which a restore re-applies.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import TYPE_CHECKING, Final

from sqlmodel import Session, col, select

from node.consent import Consent, ConsentMethod
from node.referrals.model import check_key
from node.referrals.unit import UnitOfWork
from node.store.tables import ConsentRow, as_utc
from tessera import crypto
from tessera.errors import Conflict, InvalidInput, NotFound
from tessera.needs import NeedCategory
from tessera.timestamps import require_aware

if TYPE_CHECKING:
    from node.referrals.outgoing import Outbox

__all__ = ["LABEL_PSEUDONYM", "LEDGER_REVOKED", "ConsentStore", "consent_of", "consent_row"]

#: derive_key label of the key behind survivor pseudonyms (a subkey of the record key).
LABEL_PSEUDONYM: Final = b"tessera/v1/survivor-pseudonym"
#: The ledger line (node's home, outside the database) of a revocation.
LEDGER_REVOKED: Final = "consent-revoked"


class ConsentStore:
    """Survivors' consents: granted, read, revoked."""

    def __init__(self, uow: UnitOfWork, outbox: Outbox) -> None:
        self._uow = uow
        self._outbox = outbox
        self._pseudonym_key = crypto.derive_key(uow.node.keyring.record_key, LABEL_PSEUDONYM)

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
            check_key(recipient_agency_id, "recipient_agency_id")
            # Hex keeps agency ids that differ only in letter case apart (the index casefolds).
            value = f"{case_id}|{recipient_agency_id.encode().hex()}"
        return crypto.blind_index(self._pseudonym_key, value)

    def grant(self, actor: str, consent: Consent) -> Consent:
        """Record a survivor's consent for an existing, unerased case; audited ``consent.grant``.

        Recording the same consent again returns it unchanged (a retried request); the same id
        with other terms is a Conflict. A consent is recorded unrevoked.
        """
        if not isinstance(consent, Consent):
            raise InvalidInput("grant_consent needs a Consent")
        if consent.revoked_at is not None:
            raise InvalidInput("a consent is recorded unrevoked; revoke it afterwards")
        with self._uow.writing() as session:
            self._uow.node.case_row(session, consent.case_id)  # NotFound, also once erased
            existing = session.get(ConsentRow, consent.consent_id)
            if existing is not None:
                if consent_of(existing) != consent:
                    raise Conflict(
                        f"consent {consent.consent_id} is already recorded with other terms",
                        hint="a consent cannot be changed; record a new one",
                    )
                return consent_of(existing)
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
            self._uow.audit(
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
            return consent_of(row)

    def get(self, consent_id: str) -> Consent:
        """One consent; NotFound if the node has none with that id."""
        with self._uow.reading() as session:
            return consent_of(consent_row(session, consent_id))

    def of_case(self, case_id: str | None = None) -> list[Consent]:
        """Consents (of one case, if given), newest first."""
        with self._uow.reading() as session:
            query = select(ConsentRow).order_by(
                col(ConsentRow.granted_at).desc(), col(ConsentRow.consent_id)
            )
            if case_id is not None:
                query = query.where(ConsentRow.case_id == case_id)
            return [consent_of(row) for row in session.exec(query)]

    def revoke(self, actor: str, consent_id: str, now: dt.datetime) -> Consent:
        """Withdraw a consent (never undone); audited ``consent.revoke``. Referral envelopes
        under it still in the outbox are withdrawn before they leave. Revoking again changes
        nothing."""
        now = require_aware(now, "now")
        with self._uow.writing() as session:
            row = consent_row(session, consent_id, for_update=True)
            if row.revoked_at is None:
                row.revoked_at = max(now, as_utc(row.granted_at))
                session.add(row)
                withdrawn = self._outbox.withdraw(session, consent_id)
                self._uow.audit(
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
                self._uow.append_ledger(
                    f"{LEDGER_REVOKED} {consent_id} {as_utc(row.revoked_at).isoformat()}"
                )
            return consent_of(row)

    def reapply_revocation(self, session: Session, consent_id: str, when: dt.datetime) -> bool:
        """A ledger's revocation that a restored older backup undid, again; True if it was."""
        consent = session.get(ConsentRow, consent_id)
        if consent is None or consent.revoked_at is not None:
            return False
        consent.revoked_at = when
        session.add(consent)
        self._outbox.withdraw(session, consent_id)
        return True


def consent_row(session: Session, consent_id: str, for_update: bool = False) -> ConsentRow:
    """The row of a consent; NotFound if there is none."""
    row = session.get(ConsentRow, consent_id, with_for_update=for_update)
    if row is None:
        raise NotFound(
            f"no consent {consent_id}", hint="`tessera consent list` shows the consents there are"
        )
    return row


def consent_of(row: ConsentRow) -> Consent:
    """The domain consent of a row."""
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
