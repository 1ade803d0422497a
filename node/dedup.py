"""One survivor, one case: when a row of an imported file and a case are the same survivor, and
what an import does with each row (issue 14 item 4; docs/data-model.md, "One survivor, one case").

This module is the one place the matching rule is written in code. It is pure: no database, no
keys, no I/O. The store (``node.store.imports``) turns each record's identifiers into blind-index
digests, finds the candidate cases through the ``blind_index`` table (never by decrypting every
case), decrypts only those candidates, and carries out the plan made here.

The rule, in order:

1. A row whose ``tessera_case_id`` (the column every export carries) names a case of this node
   is that case. A row naming a survivor erased here is never imported again.
2. Otherwise a row and a case are the same survivor when they have the **same name** (first and
   second name, compared as the blind index compares them: case, accents' Unicode form and
   spacing do not matter) **and either**

   a. the same **birthdate**, **email** or **phone number** (mobile or home, either way round),
      and no *different* birthdates (two recorded birthdates that differ are two people); **or**
   b. the row holds **nothing new**: every value in it is already the case's (the same row
      imported again).

   A name alone is not enough (names repeat), and neither is an email or a phone alone: shelters
   and families share them, and with ``--on-duplicate update`` a false match would write one
   survivor's details into another's case. A row without a name matches only by its
   ``tessera_case_id``.
3. Rows of one file are matched against the rows above them in the same way, so a survivor
   entered twice in one file becomes one case.

Two cases of the node are "the same survivor" (what ``case erase`` reports) by 2a or 2b, either
way round.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from node.domain import DuplicatePolicy, MatchRule, RowAction, RowOutcome

#: The column of an export that names the case a row came from (a Tessera column, not HTCDS:
#: HTCDS v2.0 has no case identifier field).
CASE_ID_COLUMN = "tessera_case_id"

#: The field whose two different values make two people (rule 2a's veto).
BIRTHDATE = "prs_Birthdate"

# Strongest first: when a row matches a case in several ways, the report names the first.
_STRENGTH = {rule: rank for rank, rule in enumerate(MatchRule)}


@dataclass(frozen=True)
class Identity:
    """What matching compares of one record: keyed blind-index digests of its name, emails and
    phone numbers (``NodeStore`` computes them with the node's index key), and its birthdate
    (an ISO date, as validated). Held in memory only, for the length of one import."""

    name: str | None
    emails: frozenset[str] = frozenset()
    phones: frozenset[str] = frozenset()
    birthdate: str | None = None


@dataclass(frozen=True)
class IncomingRow:
    """One good row of an imported file. ``fields`` are the values to store (the case id column
    removed), ``case_id`` is that column's cell ("" if none)."""

    row: int
    fields: Mapping[str, str]
    case_id: str
    identity: Identity


@dataclass(frozen=True)
class KnownCase:
    """A case of the node the blind index (or a ``tessera_case_id`` cell) pointed at."""

    case_id: str
    version: int
    fields: Mapping[str, str]
    identity: Identity


def same_survivor(a: Identity, b: Identity) -> MatchRule | None:
    """Rule 2a: the same name and the same birthdate, email or phone, and no different
    birthdates. Symmetric. None when it does not hold."""
    if a.name is None or a.name != b.name:
        return None
    if a.birthdate and b.birthdate:
        if a.birthdate != b.birthdate:
            return None
        return MatchRule.NAME_AND_BIRTHDATE
    if a.emails & b.emails:
        return MatchRule.NAME_AND_EMAIL
    if a.phones & b.phones:
        return MatchRule.NAME_AND_PHONE
    return None


def adds_nothing(row: Mapping[str, str], case: Mapping[str, str]) -> bool:
    """Rule 2b's test: every value of ``row`` is already ``case``'s."""
    return all(case.get(name) == value for name, value in row.items())


def match(
    row: Identity, row_fields: Mapping[str, str], case: Identity, case_fields: Mapping[str, str]
) -> MatchRule | None:
    """Rule 2 for a row (or a case) against a case: how they match, or None."""
    rule = same_survivor(row, case)
    if rule is not None:
        return rule
    if row.name is not None and row.name == case.name and adds_nothing(row_fields, case_fields):
        return MatchRule.NAME_NOTHING_NEW
    return None


def strongest(rules: Iterable[MatchRule]) -> MatchRule:
    """The rule a report names when several held."""
    return min(rules, key=_STRENGTH.__getitem__)


# --- the plan of an import ------------------------------------------------------------------


@dataclass(eq=False)
class Target:
    """A case an import ends with: one the node has (``row`` 0) or one the import adds from
    ``row`` (``case_id`` empty until it is written). ``fields`` is the case as the import leaves
    it; ``changes`` the values an update must write to an existing case."""

    case_id: str
    row: int
    version: int
    fields: dict[str, str]
    records: list[tuple[Identity, Mapping[str, str]]]
    changes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    """What the import does with one row, in terms of targets (ids are known only after the
    new cases are written)."""

    row: int
    action: RowAction
    target: Target | None
    matched: tuple[Target, ...] = ()
    match: MatchRule | None = None
    changed: tuple[str, ...] = ()
    note: str = ""
    erased_id: str = ""


@dataclass(frozen=True)
class ImportPlan:
    """Every row's step, the cases to add (in row order) and the existing cases to update."""

    steps: tuple[Step, ...]
    added: tuple[Target, ...]
    updates: tuple[Target, ...]


class _Targets:
    """The cases an import can match a row to, found by name digest or by case id."""

    def __init__(self, known: Iterable[KnownCase]) -> None:
        self.by_id: dict[str, Target] = {}
        self._by_name: dict[str, list[Target]] = {}
        for case in known:
            target = Target(case.case_id, 0, case.version, dict(case.fields), [])
            self.by_id[case.case_id] = target
            self.remember(target, case.identity, case.fields)

    def remember(self, target: Target, identity: Identity, fields: Mapping[str, str]) -> None:
        target.records.append((identity, fields))
        if identity.name is not None:
            bucket = self._by_name.setdefault(identity.name, [])
            if not any(t is target for t in bucket):
                bucket.append(target)

    def matching(self, row: IncomingRow) -> list[tuple[Target, MatchRule]]:
        found = []
        born = row.identity.birthdate
        for target in self._by_name.get(row.identity.name or "", ()):
            recorded = target.fields.get(BIRTHDATE)
            if born and recorded and born != recorded:
                # Rule 2a's veto holds against the case as a whole, not only against each
                # record matched to it: a sparse row matched earlier cannot let it through.
                continue
            rules = [
                rule
                for identity, fields in target.records
                if (rule := match(row.identity, row.fields, identity, fields)) is not None
            ]
            if adds_nothing(row.fields, target.fields):
                rules.append(MatchRule.NAME_NOTHING_NEW)
            if rules:
                found.append((target, strongest(rules)))
        return found


def plan_import(
    rows: Sequence[IncomingRow],
    known: Iterable[KnownCase],
    erased: frozenset[str],
    policy: DuplicatePolicy,
) -> ImportPlan:
    """Decide, row by row in file order, what an import does (the module docstring's rule).

    ``known`` holds every case the blind index found for the rows' names and every case their
    ``tessera_case_id`` cells name; ``erased`` the named ids that were erased here.
    """
    targets = _Targets(known)
    steps: list[Step] = []
    added: list[Target] = []

    def add(row: IncomingRow) -> Target:
        target = Target("", row.row, 1, dict(row.fields), [])
        targets.remember(target, row.identity, row.fields)
        if row.case_id and row.case_id not in targets.by_id:
            # An id this node does not know (another node's export): later rows naming it
            # are still this row's survivor.
            targets.by_id[row.case_id] = target
        added.append(target)
        return target

    for row in rows:
        if row.case_id in erased:
            steps.append(
                Step(
                    row.row, RowAction.ERASED, None, match=MatchRule.CASE_ID, erased_id=row.case_id
                )
            )
            continue
        by_id = targets.by_id.get(row.case_id) if row.case_id else None
        found = [(by_id, MatchRule.CASE_ID)] if by_id is not None else targets.matching(row)
        if not found:
            steps.append(Step(row.row, RowAction.ADDED, add(row)))
            continue
        matched = tuple(target for target, _rule in found)
        rule = strongest(rule for _target, rule in found)
        if policy is DuplicatePolicy.NEW:
            target = add(row)
            steps.append(Step(row.row, RowAction.ADDED_DESPITE_MATCH, target, matched, rule))
            continue
        if len(found) > 1:
            if policy is DuplicatePolicy.SKIP:
                steps.append(Step(row.row, RowAction.SKIPPED, None, matched, rule))
            else:
                note = (
                    f"matches {len(found)} cases, so none was updated: update the right one "
                    "with `tessera case update`, or erase the extra ones"
                )
                steps.append(Step(row.row, RowAction.NOT_UPDATED, None, matched, rule, note=note))
            continue
        target = matched[0]
        targets.remember(target, row.identity, row.fields)
        if policy is DuplicatePolicy.SKIP:
            steps.append(Step(row.row, RowAction.SKIPPED, target, matched, rule))
            continue
        changed = {k: v for k, v in row.fields.items() if target.fields.get(k) != v}
        target.fields.update(changed)
        if target.row == 0:
            target.changes.update(changed)
        action = RowAction.UPDATED if changed else RowAction.UNCHANGED
        steps.append(Step(row.row, action, target, matched, rule, tuple(sorted(changed))))
    updates = tuple(t for t in targets.by_id.values() if t.row == 0 and t.changes)
    return ImportPlan(tuple(steps), tuple(added), updates)


def outcomes(plan: ImportPlan, failed: Mapping[Target, str] | None = None) -> list[RowOutcome]:
    """The report of a carried-out plan (every added target has its case id by now). ``failed``
    maps an update target that could not be written to why: its updated rows are reported as
    NOT_UPDATED with that note."""
    failed = failed or {}
    report = []
    for step in plan.steps:
        action, note = step.action, step.note
        if action is RowAction.UPDATED and step.target is not None and step.target in failed:
            action, note = RowAction.NOT_UPDATED, failed[step.target]
        report.append(
            RowOutcome(
                row=step.row,
                action=action,
                case_id=step.target.case_id if step.target is not None else step.erased_id,
                matched_cases=tuple(t.case_id for t in step.matched),
                matched_row=next((t.row for t in step.matched if t.row), 0),
                match=step.match,
                changed_fields=step.changed if action is RowAction.UPDATED else (),
                note=note,
            )
        )
    return report
