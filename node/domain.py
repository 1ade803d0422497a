"""Domain objects of an agency node: what the node's logic works with, between wire and storage.

Frozen dataclasses that check their invariants when built, so an invalid one never exists
(STYLE.md, after sigstore-python). Protobuf messages stay at the edge (``node.serde``); SQLModel
tables stay in ``node.store``.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from tessera.errors import InvalidInput
from tessera.needs import NeedCategory, NeedStatus


class StaffRole(enum.StrEnum):
    """What a staff member may do at their node (docs/access.md has the full matrix)."""

    ADMIN = "admin"
    CASEWORKER = "caseworker"


class CaseState(enum.StrEnum):
    """Whether the agency still works the case. Not an HTCDS field: Tessera's own metadata."""

    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True)
class Need:
    """One aftercare need on a case. Its category and status codes identify no one: clear."""

    category: NeedCategory
    status: NeedStatus
    identified_on: dt.date
    updated_at: dt.datetime


@dataclass(frozen=True)
class Case:
    """A survivor's case as the node's own staff see it, decrypted."""

    case_id: str
    version: int
    fields: Mapping[str, str]
    notes: str
    state: CaseState
    created_at: dt.datetime
    updated_at: dt.datetime
    needs: tuple[Need, ...] = ()

    def __post_init__(self) -> None:
        if self.version < 1:
            raise InvalidInput(f"case {self.case_id}: version must be at least 1")
        object.__setattr__(self, "fields", MappingProxyType(dict(self.fields)))


@dataclass(frozen=True)
class CaseSummary:
    """What ``case list`` shows: no survivor field beyond what the caller asked to see."""

    case_id: str
    version: int
    state: CaseState
    created_at: dt.datetime
    updated_at: dt.datetime
    needs: tuple[Need, ...] = ()
    display_name: str = ""


@dataclass(frozen=True)
class StaffMember:
    """A person allowed to call the node, identified by their Ed25519 verify key."""

    staff_id: str
    name: str
    role: StaffRole
    signing_key: bytes
    added_at: dt.datetime
    removed_at: dt.datetime | None = None

    @property
    def active(self) -> bool:
        """Removed staff are refused at once (issue 4: removal takes effect immediately)."""
        return self.removed_at is None


@dataclass(frozen=True)
class AuditEntry:
    """One entry of the node's hash-chained, signed audit log."""

    seq: int
    at: dt.datetime
    actor: str
    action: str
    case_id: str | None
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointRef:
    """A broker checkpoint of the node's audit log, opened: which entry it recorded, and when.

    ``source`` says where it was read: "broker", or "home" (the copy the node keeps in its home
    for when the broker cannot be reached)."""

    number: int
    seq: int
    entry_hash: bytes
    at: dt.datetime
    source: str

    def describe(self) -> str:
        """How a message names it."""
        return f"broker checkpoint #{self.number} of {self.at:%Y-%m-%d %H:%M:%S} UTC"


@dataclass(frozen=True)
class AuditReport:
    """Result of verifying the audit chain (and, given one, against a broker checkpoint)."""

    entries: int
    ok: bool
    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    checkpoint: CheckpointRef | None = None


@dataclass(frozen=True)
class RowError:
    """One problem with one field of one spreadsheet row."""

    row: int
    field: str
    reason: str


@dataclass(frozen=True)
class ImportProgress:
    """Progress of an import: rows checked so far, rows written so far, and the total if known."""

    checked: int
    written: int
    total: int | None


@dataclass(frozen=True)
class ImportResult:
    """Outcome of an import: how many cases were created and which rows were refused."""

    imported: int
    rejected: tuple[RowError, ...]
    case_ids: tuple[str, ...] = ()


class DuplicatePolicy(enum.StrEnum):
    """What an import does with a row that is the same survivor as a case it already has
    (``tessera case import --on-duplicate``; the rule is node.dedup's)."""

    SKIP = "skip"  # leave the case as it is (the default: a re-import adds nothing)
    UPDATE = "update"  # apply the row's values to the case, as `case update` would
    NEW = "new"  # add the row as a new case all the same


class MatchRule(enum.StrEnum):
    """Why a row was taken for the same survivor as a case (docs/data-model.md)."""

    CASE_ID = "case_id"  # its tessera_case_id names the case
    NAME_AND_BIRTHDATE = "name_and_birthdate"
    NAME_AND_EMAIL = "name_and_email"
    NAME_AND_PHONE = "name_and_phone"
    NAME_NOTHING_NEW = "name_nothing_new"  # same name, and the row adds nothing to the case


class RowAction(enum.StrEnum):
    """What an import did with one good row."""

    ADDED = "added"  # a new case; the row matched no case
    UPDATED = "updated"  # the matching case took the row's values (a new version)
    UNCHANGED = "unchanged"  # asked to update, but the case already held every value
    SKIPPED = "skipped"  # a duplicate, left alone
    ADDED_DESPITE_MATCH = "added_despite_match"  # --on-duplicate new
    ERASED = "erased"  # its tessera_case_id names a survivor erased here: never re-imported
    NOT_UPDATED = "not_updated"  # asked to update, but ambiguous or changed meanwhile (note)


@dataclass(frozen=True)
class RowOutcome:
    """What an import did with one row, for the report: ids, codes and row numbers only.

    ``case_id`` is the case the row now stands for: the one added, updated or matched (empty
    when it matched several). ``matched_cases`` lists every case it matched, ``matched_row`` the
    earlier row of the same file whose case it matched (0 if none), ``changed_fields`` the field
    names an update changed.
    """

    row: int
    action: RowAction
    case_id: str = ""
    matched_cases: tuple[str, ...] = ()
    matched_row: int = 0
    match: MatchRule | None = None
    changed_fields: tuple[str, ...] = ()
    note: str = ""

    def __post_init__(self) -> None:
        if (self.action is RowAction.ADDED) != (self.match is None):
            raise InvalidInput(f"row {self.row}: only an added row matched nothing")
