"""The referral stores of one node, on one shared unit of work."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from node.consent import Consent
from node.referrals.consents import LEDGER_REVOKED, ConsentStore
from node.referrals.incoming import LEDGER_PURGED, IncomingStore
from node.referrals.model import OutgoingReferral
from node.referrals.outgoing import Outbox, OutgoingStore
from node.referrals.unit import UnitOfWork
from node.store.cases import NodeStore
from node.store.tables import as_utc, utcnow

__all__ = ["ReferralStores"]


class ReferralStores:
    """Consents, outgoing referrals with the outbox, and incoming referrals, beside a node's
    :class:`~node.store.cases.NodeStore` (its engine, keyring, write lock and audit log)."""

    def __init__(self, node_store: NodeStore) -> None:
        self.uow = UnitOfWork(node_store)
        self.outbox = Outbox(self.uow)
        self.consents = ConsentStore(self.uow, self.outbox)
        self.outgoing = OutgoingStore(self.uow, self.outbox)
        self.incoming = IncomingStore(self.uow, self.outbox)

    def revoke_consent(
        self, actor: str, consent_id: str, now: dt.datetime
    ) -> tuple[Consent, list[OutgoingReferral]]:
        """Withdraw a consent (``ConsentStore.revoke``) and, in the same transaction, list every
        referral sent under it not yet revoked: the caller sends each a Revocation
        (``OutgoingStore.record_revocation_sent``). Revoking again returns what is still to
        revoke."""
        with self.uow.writing():
            consent = self.consents.revoke(actor, consent_id, now)
            return consent, self.outgoing.to_revoke(consent_id)

    def reapply_ledger(self, actor: str, ledger: Iterable[tuple[str, str]]) -> int:
        """Re-apply every consent revocation and referral purge of the node's ledger (the
        ``(kind, value)`` pairs of ``node.backup.read_ledger``) that a restored older backup
        undid; returns how many. Call it after ``restore_backup``."""
        count = 0
        entries = list(ledger)
        with self.uow.writing() as session:
            now = utcnow()
            for kind, value in entries:
                if kind == LEDGER_PURGED:
                    count += self.incoming.reapply_purge(session, value, now)
                elif kind == LEDGER_REVOKED:
                    consent_id, _sep, when = value.partition(" ")
                    count += self.consents.reapply_revocation(
                        session, consent_id, _parse_time(when, now)
                    )
            if count:
                self.uow.audit(
                    session, actor, "referrals.ledger_reapplied", None, {"changes": count}
                )
            self.uow.checkpoint()
        return count


def _parse_time(value: str, default: dt.datetime) -> dt.datetime:
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return default
    return as_utc(parsed)
