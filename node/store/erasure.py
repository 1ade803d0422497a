"""Erasure by crypto-shredding (DESIGN.md section 5; issue 14): destroying a survivor's data key
and every row about them, and recording that they were erased, in and outside the database.

Part of :class:`~node.store.cases.NodeStore`, over its :class:`~node.store.core.StoreCore`.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import delete
from sqlmodel import Session, col, select

from node.store.core import StoreCore
from node.store.records import find_case_row
from node.store.tables import BlindIndexRow, CaseRow, ErasureRow, NeedRow
from node.tombstones import TombstoneKind

__all__ = ["Erasures"]


class Erasures:
    """The erasure half of the node's store (a base of NodeStore)."""

    core: StoreCore

    def erase_case(self, actor: str, case_id: str) -> None:
        """Destroy the survivor's data key and every row about them; record the erasure.

        The erasure is also appended to the ledger (``ledger.log``) in the node's home, outside
        the database, so a restore of an older backup re-applies it (node.backup), and queued,
        in the same transaction, as a tombstone for the broker's escrow, so no older copy of the
        node brings the survivor back (node.escrow).
        """
        with self.core.writing() as session:
            find_case_row(session, case_id)
            self._delete_survivor(session, case_id)
            session.add(ErasureRow(case_id=case_id, erased_by=actor))
            self.core.queue_tombstone(session, TombstoneKind.ERASURE, case_id)
            self.core.audit_log.append(session, actor, "case.erase", case_id)
        if self.core.guard is not None:
            self.core.guard.note_erased(case_id)
        self.core.append_ledger(f"erase {case_id}")
        self.core.checkpoint()

    def reapply_erasures(self, actor: str, case_ids: Iterable[str], queue: bool = True) -> int:
        """Erase again every listed survivor still present (after a restore); returns how many.

        With ``queue``, an erasure this database did not know is also queued for the escrow
        (its tombstone id is derived from the case id, so the broker keeps one copy).
        """
        count = 0
        with self.core.writing() as session:
            for case_id in case_ids:
                if self.core.guard is not None:
                    self.core.guard.note_erased(case_id)
                present = session.get(CaseRow, case_id) is not None
                if present:
                    self._delete_survivor(session, case_id)
                    count += 1
                if session.get(ErasureRow, case_id) is None:
                    session.add(ErasureRow(case_id=case_id, erased_by=actor))
                    present = True
                if present and queue:
                    self.core.queue_tombstone(session, TombstoneKind.ERASURE, case_id)
            if count:
                self.core.audit_log.append(
                    session, actor, "erasures.reapplied", None, {"cases": count}
                )
        self.core.checkpoint()
        return count

    def erased_ids(self) -> list[str]:
        """Every survivor erased at this node, per the database."""
        with self.core.reading() as session:
            return list(session.exec(select(ErasureRow.case_id)))

    def _delete_survivor(self, session: Session, case_id: str) -> None:
        for table in (BlindIndexRow, NeedRow):
            session.exec(delete(table).where(col(table.case_id) == case_id))
        # The case row holds the wrapped data key: deleting it crypto-shreds the survivor.
        session.exec(delete(CaseRow).where(col(CaseRow.case_id) == case_id))
        self.core.seals.forget(session, [case_id])
