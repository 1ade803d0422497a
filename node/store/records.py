"""A case record at rest (DESIGN.md section 5): the survivor's own data key, wrapped by the node's
record key into the case row, and their fields and notes as one AEAD ciphertext under it.

The associated data binds a ciphertext to its table, case and version, and the wrapping context
to its case, so a ciphertext (or a key) moved to another row, or an older one put back, fails to
open. ``node.store.needs`` seals need rows under the same data key.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from sqlmodel import Session, col, select

from node.domain import Need
from node.store.needs import open_need
from node.store.tables import CaseRow, ErasureRow, NeedRow
from tessera import crypto
from tessera.errors import Conflict, NotFound

__all__ = [
    "CASE_COLUMNS",
    "NEED_COLUMNS",
    "SealedRow",
    "check_version",
    "find_case_row",
    "open_needs",
    "open_record",
    "record_associated_data",
    "seal_record",
    "survivor_key_context",
    "unwrap_data_key",
    "wrap_data_key",
]


class SealedRow(Protocol):
    """What opening a case needs of its row: a CaseRow, or a row of CASE_COLUMNS."""

    case_id: str
    version: int
    ciphertext: bytes
    wrapped_key: bytes


# Plain column tuples for the hot read paths (exports, listings): nothing is written back.
CASE_COLUMNS = (
    col(CaseRow.case_id),
    col(CaseRow.version),
    col(CaseRow.state),
    col(CaseRow.created_at),
    col(CaseRow.updated_at),
    col(CaseRow.ciphertext),
    col(CaseRow.wrapped_key),
)
NEED_COLUMNS = (
    col(NeedRow.case_id),
    col(NeedRow.tag),
    col(NeedRow.ciphertext),
)


def record_associated_data(case_id: str, version: int) -> bytes:
    """Associated data of a case ciphertext: table, row and version (DESIGN.md section 5)."""
    return f"tessera/v1|case_record|{case_id}|{version}".encode()


def survivor_key_context(case_id: str) -> bytes:
    """The wrapping context of a survivor's data key: the case whose row holds it."""
    return f"tessera/v1|survivor_key|{case_id}".encode()


def wrap_data_key(record_key: crypto.DataKey, data_key: crypto.DataKey, case_id: str) -> bytes:
    """``data_key`` wrapped by the node's record key for the row of ``case_id``."""
    return crypto.wrap_key(record_key, data_key, survivor_key_context(case_id))


def unwrap_data_key(record_key: crypto.DataKey, row: SealedRow) -> crypto.DataKey:
    """The survivor's data key from their case row."""
    # The context names the row the key is read from: a key moved here from another case
    # (or a ciphertext and key moved together) fails to unwrap.
    return crypto.unwrap_key(record_key, row.wrapped_key, survivor_key_context(row.case_id))


def seal_record(
    data_key: crypto.DataKey,
    case_id: str,
    version: int,
    fields: Mapping[str, str],
    notes: str,
) -> bytes:
    """The ciphertext of version ``version`` of a case's fields and notes."""
    payload = json.dumps({"fields": dict(fields), "notes": notes}, separators=(",", ":"))
    return crypto.encrypt(data_key, payload.encode(), record_associated_data(case_id, version))


def open_record(data_key: crypto.DataKey, row: SealedRow) -> tuple[dict[str, str], str]:
    """A case row's fields and notes (TamperedCiphertext if the row was altered or moved)."""
    plain = crypto.decrypt(
        data_key, row.ciphertext, record_associated_data(row.case_id, row.version)
    )
    payload = json.loads(plain)
    return dict(payload["fields"]), str(payload["notes"])


def open_needs(rows: Iterable[Any], data_key: crypto.DataKey) -> tuple[Need, ...]:
    """Open need rows (all of one case) under its data key, in category order."""
    needs = [open_need(data_key, r.case_id, r.tag, r.ciphertext) for r in rows]
    return tuple(sorted(needs, key=lambda n: n.category.value))


def find_case_row(session: Session, case_id: str, for_update: bool = False) -> CaseRow:
    """The row of ``case_id``; NotFound naming an erasure when the survivor was erased."""
    query = select(CaseRow).where(CaseRow.case_id == case_id)
    if for_update:
        query = query.with_for_update()
    row = session.exec(query).first()
    if row is None:
        erased = session.get(ErasureRow, case_id) is not None
        raise NotFound(
            f"case {case_id} was erased" if erased else f"no case {case_id}",
            hint=None if erased else "`tessera case list` shows the cases there are",
        )
    return row


def check_version(row: CaseRow, expected_version: int) -> None:
    """Conflict unless ``row`` is still at the version the caller last saw."""
    if row.version != expected_version:
        raise Conflict(
            f"case {row.case_id} is at version {row.version}, not {expected_version}",
            hint="someone changed it first; show it again and reapply your change",
        )
