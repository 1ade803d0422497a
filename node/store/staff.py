"""Staff credentials of a node (DESIGN.md section 6): who may act, with which role and key.

A removal takes effect at once, is queued as a tombstone for the broker's escrow in the same
transaction and appended to the node's ledger, so neither a restore of an older backup nor an
older copy of the node lets a removed key act again (node.escrow). Part of
:class:`~node.store.cases.NodeStore`, over its :class:`~node.store.core.StoreCore`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from sqlmodel import col, func, select

from node.domain import StaffMember, StaffRole
from node.store.core import StoreCore
from node.store.tables import StaffRow, as_utc, utcnow
from node.tombstones import TombstoneKind
from tessera.errors import Conflict, NotFound

__all__ = ["StaffRegister"]


class StaffRegister:
    """The staff half of the node's store (a base of NodeStore)."""

    core: StoreCore

    def add_staff(self, actor: str, name: str, role: StaffRole, signing_key: bytes) -> StaffMember:
        """Register a staff member's verify key with a role."""
        with self.core.writing() as session:
            if session.exec(select(StaffRow).where(StaffRow.signing_key == signing_key)).first():
                raise Conflict("that key already belongs to a staff member")
            if session.exec(
                select(StaffRow).where(StaffRow.name == name, col(StaffRow.removed_at).is_(None))
            ).first():
                raise Conflict(
                    f"an active staff member is already called {name!r}",
                    hint="choose another name or remove the old credential first",
                )
            row = StaffRow(
                staff_id=str(uuid.uuid4()), name=name, role=role.value, signing_key=signing_key
            )
            session.add(row)
            self.core.audit_log.append(
                session, actor, "staff.add", None, {"staff": name, "role": role.value}
            )
        return _staff(row)

    def remove_staff(self, actor: str, staff_id: str) -> StaffMember:
        """Revoke a staff credential at once; the last active administrator stays."""
        with self.core.writing() as session:
            row = session.get(StaffRow, staff_id)
            if row is None or row.removed_at is not None:
                raise NotFound(
                    f"no active staff member {staff_id!r}",
                    hint="`tessera node staff list` shows who there is",
                )
            if row.role == StaffRole.ADMIN.value:
                admins = session.exec(
                    select(func.count())
                    .select_from(StaffRow)
                    .where(
                        StaffRow.role == StaffRole.ADMIN.value, col(StaffRow.removed_at).is_(None)
                    )
                ).one()
                if admins <= 1:
                    raise Conflict(
                        "this is the node's last administrator",
                        hint="add another administrator first",
                    )
            row.removed_at = utcnow()
            session.add(row)
            self.core.queue_tombstone(session, TombstoneKind.STAFF_REMOVAL, row.signing_key.hex())
            self.core.audit_log.append(session, actor, "staff.remove", None, {"staff": row.name})
        if self.core.guard is not None:
            self.core.guard.note_removed(row.signing_key)
        self.core.append_ledger(f"staff-removed {row.signing_key.hex()}")
        return _staff(row)

    def reapply_staff_removals(
        self, actor: str, signing_keys: Iterable[bytes], queue: bool = True
    ) -> int:
        """Remove again every listed staff key still active (after a restore); with ``queue``,
        a removal this database did not know is queued for the escrow too."""
        count = 0
        with self.core.writing() as session:
            for key in signing_keys:
                if self.core.guard is not None:
                    self.core.guard.note_removed(key)
                row = session.exec(select(StaffRow).where(StaffRow.signing_key == key)).first()
                if row is not None and row.removed_at is None:
                    row.removed_at = utcnow()
                    session.add(row)
                    count += 1
                    if queue:
                        self.core.queue_tombstone(session, TombstoneKind.STAFF_REMOVAL, key.hex())
            if count:
                self.core.audit_log.append(
                    session, actor, "staff.removals_reapplied", None, {"staff": count}
                )
        return count

    def list_staff(self) -> list[StaffMember]:
        """All staff, including removed ones (with their removal time)."""
        with self.core.reading() as session:
            return [_staff(r) for r in session.exec(select(StaffRow).order_by(col(StaffRow.name)))]

    def staff_by_key(self, signing_key: bytes) -> StaffMember | None:
        """The staff member holding ``signing_key``, removed or not; None if unknown."""
        with self.core.reading() as session:
            row = session.exec(select(StaffRow).where(StaffRow.signing_key == signing_key)).first()
        return _staff(row) if row else None


def _staff(row: StaffRow) -> StaffMember:
    return StaffMember(
        staff_id=row.staff_id,
        name=row.name,
        role=StaffRole(row.role),
        signing_key=row.signing_key,
        added_at=as_utc(row.added_at),
        removed_at=as_utc(row.removed_at) if row.removed_at else None,
    )
