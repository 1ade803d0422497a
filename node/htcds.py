"""HTCDS case data: the field catalogue, validation, and CSV/XLSX import and export.

Implements DESIGN.md section 2. Case records follow the Human Trafficking Case Data Standard
(HTCDS v2.0, by IOM, CC BY 4.0); the field list ships as ``node/data/htcds_fields.csv`` and the
country codes as ``node/data/iso3166_alpha2.txt``. Aftercare needs are Tessera's own vocabulary
(``NeedCategory``, ``NeedStatus``), and ``DATA_CATEGORIES`` names the groups of fields that a
survivor's consent covers (DESIGN.md section 6).

Everything here is pure: no database, no network. Files are read and written, nothing else.
Error reasons never carry the value of an identifying field (names, contact details, birthdate),
so a reject summary or a log line can never leak a survivor's details (STYLE.md habit 8).

Typical use::

    report = validate_file(Path("cases.xlsx"))
    if report.bad:
        write_rejects(Path("rejects.csv"), report.header, report.rejects())
    records = [values for _row, values in report.good]

docs/data-model.md describes the fields, the data categories and the quirks accepted.
"""

from __future__ import annotations

import csv
import datetime as dt
import difflib
import enum
import io
import os
import random
import re
import secrets
import unicodedata
import zipfile
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Final

from tessera.errors import InvalidInput, NotFound
from tessera.needs import NEED_CATEGORIES, NEED_STATUSES, NeedCategory, NeedStatus

if TYPE_CHECKING:
    from openpyxl.worksheet._write_only import WriteOnlyWorksheet

__all__ = [
    "ALIASES",
    "COUNTRY_CODES",
    "DATA_CATEGORIES",
    "FIELDS",
    "FIELD_BY_NAME",
    "FIELD_CATEGORY",
    "FIELD_NAMES",
    "IDENTIFYING_FIELDS",
    "MAX_FILE_BYTES",
    "MAX_ROWS",
    "MAX_TEXT_CHARS",
    "NEED_CATEGORIES",
    "NEED_STATUSES",
    "REPORT_COLUMNS",
    "TESSERA_PREFIX",
    "FieldError",
    "FieldKind",
    "FieldSpec",
    "NeedCategory",
    "NeedStatus",
    "SourceRow",
    "ValidationReport",
    "canonical_field",
    "count_rows",
    "fields_in",
    "read_table",
    "synthetic_records",
    "validate_file",
    "validate_record",
    "write_csv",
    "write_rejects",
    "write_xlsx",
]

# --- safety limits ---------------------------------------------------------------------------

#: Largest file ``read_table`` accepts. A CSV is decoded in memory (for exact error positions)
#: and ``validate_file`` keeps every good row, so the size must be bounded; 100 MB is far above
#: any agency's case spreadsheet (10,000 cases are about 4 MB).
MAX_FILE_BYTES: Final = 100 * 1024 * 1024

#: Most rows (empty ones included) ``read_table`` reads from one file. A small .xlsx can unzip
#: to millions of rows; this bounds the memory ``validate_file`` uses.
MAX_ROWS: Final = 1_000_000

#: Longest free-text value accepted in one field. HTCDS text fields are names, places and short
#: notes; this stops a pasted document from passing as a value.
MAX_TEXT_CHARS: Final = 10_000

#: Longest value of a code field shown back in an error. Longer text typed into a code column is
#: probably narrative (perhaps about the survivor), so it is hidden rather than quoted.
_MAX_EXCERPT: Final = 40

# --- the field catalogue ---------------------------------------------------------------------


class FieldKind(enum.StrEnum):
    """How a field's values are checked (the ``kind`` column of ``htcds_fields.csv``)."""

    TEXT = "text"
    DATE = "date"  # ISO 8601 calendar date, YYYY-MM-DD
    COUNTRY = "country"  # ISO 3166-1 alpha-2
    SINGLE = "single"  # one code from ``allowed``
    MULTI = "multi"  # one or more codes from ``allowed``, separated by ';'


@dataclass(frozen=True)
class FieldSpec:
    """One HTCDS field: its canonical name, kind and allowed codes.

    ``allowed`` is empty for text and date fields; for country fields it holds the ISO 3166-1
    alpha-2 codes. ``choices`` holds the same codes in the standard's own order, for messages
    and pickers.
    """

    name: str
    kind: FieldKind
    allowed: frozenset[str] = frozenset()
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        coded = self.kind in (FieldKind.SINGLE, FieldKind.MULTI, FieldKind.COUNTRY)
        if coded != bool(self.allowed) or frozenset(self.choices) != self.allowed:
            raise ValueError(f"HTCDS catalogue: inconsistent codes for {self.name}")


def _data_text(name: str) -> str:
    # importlib.resources rather than a path next to __file__, so the data also loads from a
    # wheel or zip install.
    return resources.files("node").joinpath("data").joinpath(name).read_text(encoding="utf-8")


def _load_countries() -> frozenset[str]:
    codes = [line.strip() for line in _data_text("iso3166_alpha2.txt").splitlines()]
    codes = [code for code in codes if code]
    if len(codes) != 249 or any(not re.fullmatch(r"[A-Z]{2}", code) for code in codes):
        raise ValueError("node/data/iso3166_alpha2.txt must list the 249 ISO 3166-1 codes")
    return frozenset(codes)


#: The 249 officially assigned ISO 3166-1 alpha-2 codes.
COUNTRY_CODES: Final[frozenset[str]] = _load_countries()
_COUNTRY_ORDER: Final = tuple(sorted(COUNTRY_CODES))


def _load_fields() -> tuple[FieldSpec, ...]:
    reader = csv.DictReader(io.StringIO(_data_text("htcds_fields.csv")))
    if reader.fieldnames != ["field", "kind", "values"]:
        raise ValueError("node/data/htcds_fields.csv must have the header field,kind,values")
    specs: list[FieldSpec] = []
    for line in reader:
        kind = FieldKind(line["kind"])
        if kind is FieldKind.COUNTRY:
            choices = _COUNTRY_ORDER
        else:
            choices = tuple(code for code in line["values"].split(";") if code)
        specs.append(FieldSpec(line["field"], kind, frozenset(choices), choices))
    if len({spec.name for spec in specs}) != len(specs):
        raise ValueError("node/data/htcds_fields.csv names a field twice")
    return tuple(specs)


#: Every HTCDS v2.0 field, in the published spreadsheet's column order.
FIELDS: Final[tuple[FieldSpec, ...]] = _load_fields()
#: Canonical field names (the spreadsheet's spellings), in column order.
FIELD_NAMES: Final[tuple[str, ...]] = tuple(spec.name for spec in FIELDS)
FIELD_BY_NAME: Final[Mapping[str, FieldSpec]] = MappingProxyType({s.name: s for s in FIELDS})

#: Other spellings found in the standard's own published files (shared/htcds/README.md), mapped
#: to the canonical spreadsheet spelling. The survey form and the spreadsheet disagree.
ALIASES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "vic_TraffickingStatusDecisionMakingOrg": "vic_TraffickinStatusDecisionMakingOrg",
        "prs_First_Name": "prs_FirstName",
        "prs_Second_Name": "prs_SecondName",
        "vic_Methods_of_Control": "vic_MethodsOfControl",
    }
)

#: Columns whose names start with this are Tessera's own (``tessera_case_id``, ...): exports
#: append them after the HTCDS columns, and imports pass them through unchecked.
TESSERA_PREFIX: Final = "tessera_"
#: Columns that ``write_rejects`` adds; an import ignores them, so a corrected rejects file can
#: be imported as it is.
REPORT_COLUMNS: Final[tuple[str, str]] = ("tessera_source_row", "tessera_errors")

# Header lookup: field names are matched without regard to case, since no two HTCDS names differ
# only in case and spreadsheets are often retyped by hand.
_NAME_LOOKUP: Final[dict[str, str]] = {
    **{name.casefold(): name for name in FIELD_NAMES},
    **{alias.casefold(): name for alias, name in ALIASES.items()},
}
if any(target not in FIELD_BY_NAME for target in ALIASES.values()):
    raise ValueError("an HTCDS alias names a field missing from the catalogue")


def canonical_field(name: str) -> str | None:
    """The canonical HTCDS field a column or key name means, or None if it means none.

    Accepts the canonical spelling, the aliases in ``ALIASES``, any letter case and surrounding
    spaces.
    """
    if name in FIELD_BY_NAME:
        return name
    return _NAME_LOOKUP.get(name.strip().casefold())


# --- data categories for consent (DESIGN.md section 6) ---------------------------------------

# The person fields are listed one by one, so a field added to the catalogue later fails the
# partition check below instead of landing silently in some category.
_IDENTITY: Final = (
    "prs_Salutation",
    "prs_FirstName",
    "prs_SecondName",
    "prs_Title",
    "prs_Birthdate",
)
_CONTACT: Final = (
    "prs_Email",
    "prs_HomePhone",
    "prs_MobilePhone",
    "prs_MailingStreet",
    "prs_MailingCity",
    "prs_MailingState",
    "prs_MailingPostalCode",
    "prs_MailingCountry",
)
_DEMOGRAPHICS: Final = ("prs_Gender", "prs_Citizenship")


def _build_categories() -> Mapping[str, frozenset[str]]:
    categories = {
        "identity": frozenset(_IDENTITY),
        "contact": frozenset(_CONTACT),
        "demographics": frozenset(_DEMOGRAPHICS),
        "exploitation": frozenset(n for n in FIELD_NAMES if n.startswith("vic_")),
        "case": frozenset(n for n in FIELD_NAMES if n.startswith(("cas_", "con_"))),
        # Tessera's own records, not HTCDS fields: need records and free-text case notes.
        "needs": frozenset[str](),
        "notes": frozenset[str](),
    }
    assigned = [name for members in categories.values() for name in members]
    if len(assigned) != len(set(assigned)) or set(assigned) != set(FIELD_NAMES):
        raise ValueError("DATA_CATEGORIES must place every HTCDS field in exactly one category")
    return MappingProxyType(categories)


#: Named groups of fields a consent can cover. Every HTCDS field is in exactly one group;
#: ``needs`` and ``notes`` hold no HTCDS field but stand for Tessera's need records and case notes.
DATA_CATEGORIES: Final[Mapping[str, frozenset[str]]] = _build_categories()
#: The data category of each HTCDS field.
FIELD_CATEGORY: Final[Mapping[str, str]] = MappingProxyType(
    {name: cat for cat, members in DATA_CATEGORIES.items() for name in members}
)
#: Fields whose values identify a person: their values never appear in an error.
IDENTIFYING_FIELDS: Final[frozenset[str]] = DATA_CATEGORIES["identity"] | DATA_CATEGORIES["contact"]


def fields_in(categories: Iterable[str]) -> frozenset[str]:
    """The HTCDS fields covered by the named data categories (for consent scoping).

    Raises ``InvalidInput`` for a name that is not a data category.
    """
    covered: set[str] = set()
    for category in categories:
        members = DATA_CATEGORIES.get(category)
        if members is None:
            known = ", ".join(DATA_CATEGORIES)
            raise InvalidInput(f"unknown data category {category!r}", hint=f"use one of {known}")
        covered |= members
    return frozenset(covered)


# --- aftercare needs (shared/htcds/NEEDS.md; not part of HTCDS) ------------------------------


# NeedCategory, NeedStatus and their orders live in tessera.needs (imported above), so the
# statistics core and the coordinator's tools share them without importing the node.

# --- validation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldError:
    """One problem with one field. ``reason`` is written for the person fixing the file.

    ``value_excerpt`` is the offending value when it is safe to show (a code field's short
    value); None when the field is identifying or the value too long to be a code.
    """

    field: str
    value_excerpt: str | None
    reason: str

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}" if self.field else self.reason


_DATE_SHAPE: Final = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_EXCEL_SERIAL: Final = re.compile(r"[0-9]{5}(\.0+)?")
# The characters XLSX (XML 1.0) cannot store; refusing them on import keeps every accepted
# record exportable. Tab, line feed and carriage return are allowed.
_CONTROL_CHARS: Final = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_EXCEL_ERRORS: Final = frozenset(
    {"#NULL!", "#DIV/0!", "#VALUE!", "#REF!", "#NAME?", "#NUM!", "#N/A"}
)
# Common near-misses for country codes that are not ISO 3166-1 codes.
_COUNTRY_HINTS: Final = {"UK": "GB", "EL": "GR"}


class _BadValueError(Exception):
    """Internal: a value failed its check. ``what`` completes "'value' is ..." for a person."""

    def __init__(
        self, what: str, hint: str = "", *, suggest: bool = False, shown_hint: str = ""
    ) -> None:
        super().__init__(what)
        self.what = what
        self.hint = hint  # says nothing about the value: shown even when the value is hidden
        self.suggest = suggest  # add a "did you mean" (only when the value is shown)
        self.shown_hint = shown_hint  # betrays the value: only when the value is shown


def _check_text(value: str) -> str:
    if len(value) > MAX_TEXT_CHARS:
        raise _BadValueError(f"longer than {MAX_TEXT_CHARS:,} characters ({len(value):,})")
    if _CONTROL_CHARS.search(value):
        raise _BadValueError(
            "text containing a control character", "; delete it and type the text again"
        )
    if "\r" in value:
        # One line-break convention, so a value reads back identically from CSV and XLSX.
        value = value.replace("\r\n", "\n").replace("\r", "\n")
    return value


def _check_date(value: str) -> str:
    # Strict ISO shape first: date.fromisoformat in Python 3.11 also takes "20260105" and week
    # dates, which HTCDS does not allow.
    if _DATE_SHAPE.fullmatch(value):
        try:
            dt.date.fromisoformat(value)
        except ValueError:
            pass
        else:
            return value
    hint = ""
    if _EXCEL_SERIAL.fullmatch(value):
        hint = "; it looks like an Excel date serial number: format the column as a date"
    raise _BadValueError("not a date (YYYY-MM-DD)", hint)


def _check_country(value: str) -> str:
    code = value.upper()
    if code in COUNTRY_CODES:
        return code
    better = _COUNTRY_HINTS.get(code)
    raise _BadValueError(
        "not an ISO 3166-1 alpha-2 country code", shown_hint=f" (use {better})" if better else ""
    )


def _code_lookup(spec: FieldSpec) -> dict[str, str]:
    # Codes match without regard to case ("feminine" is Feminine) and come out canonical.
    return {code.casefold(): code for code in spec.choices}


def _allowed_text(spec: FieldSpec) -> str:
    return "allowed: " + ", ".join(spec.choices)


def _make_single(spec: FieldSpec) -> Callable[[str], str]:
    lookup = _code_lookup(spec)
    allowed = _allowed_text(spec)

    def check(value: str) -> str:
        code = lookup.get(value.casefold())
        if code is None:
            hint = " (this field takes one value)" if ";" in value else ""
            raise _BadValueError(f"not an allowed value{hint}; {allowed}", suggest=True)
        return code

    return check


def _make_multi(spec: FieldSpec) -> Callable[[str], str]:
    lookup = _code_lookup(spec)
    allowed = _allowed_text(spec)

    def check(value: str) -> str:
        codes: list[str] = []
        unknown: list[str] = []
        for part in value.split(";"):
            item = part.strip()
            if not item:
                continue  # "A;B;" and "A;;B" are harmless slips
            code = lookup.get(item.casefold())
            if code is None:
                unknown.append(item)
            elif code not in codes:
                codes.append(code)
        if unknown:
            hint = " (separate several values with ';')" if "," in value else ""
            raise _BadValueError(f"not an allowed value{hint}; {allowed}", suggest=True)
        return ";".join(codes)

    return check


def _make_checker(spec: FieldSpec) -> Callable[[str], str]:
    if spec.kind is FieldKind.SINGLE:
        return _make_single(spec)
    if spec.kind is FieldKind.MULTI:
        return _make_multi(spec)
    if spec.kind is FieldKind.COUNTRY:
        return _check_country
    if spec.kind is FieldKind.DATE:
        return _check_date
    return _check_text


# Built once, so validating a row is a dict lookup and one call per field.
_CHECKERS: Final[dict[str, Callable[[str], str]]] = {s.name: _make_checker(s) for s in FIELDS}
_DATE_FIELDS: Final = frozenset(s.name for s in FIELDS if s.kind is FieldKind.DATE)


def _describe(name: str, value: str, problem: _BadValueError) -> FieldError:
    """Turn a failed check into a FieldError, hiding the value where it could identify someone."""
    spec = FIELD_BY_NAME[name]
    shown = [value]
    if spec.kind is FieldKind.MULTI:  # quote only the codes that are wrong
        lookup = _code_lookup(spec)
        shown = [p.strip() for p in value.split(";") if p.strip().casefold() not in lookup]
        shown = [p for p in shown if p] or [value]
    hidden = ""
    if name in IDENTIFYING_FIELDS:
        hidden = "identifying field"
    elif spec.kind is FieldKind.TEXT:
        # Free text is never quoted: only its length or characters can be wrong, and it may be
        # narrative about the survivor.
        hidden = "free text"
    elif any(len(part) > _MAX_EXCERPT for part in shown):
        # Long text typed into a code column is probably narrative, not a mistyped code.
        hidden = f"{max(len(part) for part in shown):,} characters, too long to be a code"
    if hidden:
        return FieldError(name, None, f"value hidden ({hidden}): {problem.what}{problem.hint}")
    what = problem.what
    if len(shown) > 1:
        what = what.replace("not an allowed value", "not allowed values", 1)
    if problem.suggest:
        # No guess for "A;B" or "A,B": the problem there is the separator, not the spelling.
        guessable = [part for part in shown if ";" not in part and "," not in part]
        close = [m for p in guessable for m in difflib.get_close_matches(p, spec.choices, n=1)]
        if close:
            head, sep, tail = what.partition("; allowed:")
            what = f"{head} (did you mean {', '.join(close)}?){sep}{tail}"
    quoted = ", ".join(f"'{part}'" for part in shown)
    verb = "are" if len(shown) > 1 else "is"
    reason = f"{quoted} {verb} {what}{problem.shown_hint}{problem.hint}"
    return FieldError(name, ";".join(shown), reason)


def validate_record(raw: Mapping[str, str]) -> tuple[dict[str, str], list[FieldError]]:
    """Check one record and normalise it; returns ``(values, errors)``.

    Keys may be canonical HTCDS names, aliases (``ALIASES``) or differ in case; the result uses
    canonical names in spreadsheet order, then any ``tessera_*`` keys, which pass through
    unchecked. Values are stripped and empty values dropped. Code values match without regard
    to case and come out in the standard's spelling; multi-select values come out joined by
    ``;`` without spaces; ``con_Consent`` comes out TRUE or FALSE; countries upper case.

    ``values`` is only meaningful when ``errors`` is empty. No error ever quotes the value of an
    identifying field (``IDENTIFYING_FIELDS``).
    """
    given: dict[str, tuple[str, str]] = {}
    extras: dict[str, str] = {}
    errors: list[FieldError] = []
    for key, original in raw.items():
        value = original.strip()
        name = key if key in _CHECKERS else canonical_field(key)
        if name is None:
            if key.startswith(TESSERA_PREFIX):
                if value:
                    extras[key] = value
            else:
                errors.append(FieldError(_clip(key), None, _unknown_field_reason(key)))
            continue
        if not value:
            continue
        previous = given.get(name)
        if previous is None:
            given[name] = (key, value)
        elif previous[1] != value:
            # Alias and canonical spelling both present: neither can be preferred safely.
            errors.append(
                FieldError(name, None, f"given twice, as '{previous[0]}' and '{key}', differently")
            )
    values: dict[str, str] = {}
    for name in FIELD_NAMES:  # spreadsheet order
        item = given.get(name)
        if item is None:
            continue
        value = item[1]
        if value[0] == "#" and value in _EXCEL_ERRORS:
            errors.append(
                FieldError(
                    name, value, f"'{value}' is an Excel error, not a value: fix the formula"
                )
            )
            continue
        try:
            values[name] = _CHECKERS[name](value)
        except _BadValueError as problem:
            errors.append(_describe(name, value, problem))
    values.update(extras)
    return values, errors


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_EXCERPT else text[:_MAX_EXCERPT] + "..."


def _unknown_field_reason(key: str) -> str:
    shown = _clip(key)
    close = difflib.get_close_matches(key, FIELD_NAMES, n=1, cutoff=0.75)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown field '{shown}'{hint}"


# --- reading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceRow:
    """One data row of a source file, before validation.

    ``number`` is the row number a person sees in the spreadsheet (the header is row 1).
    ``values`` maps each named column (canonical HTCDS name, or a ``tessera_*`` name) to the
    cell's text, ``""`` for an empty cell, in the file's column order.
    """

    number: int
    values: dict[str, str]


# Row 2 of the published v2.0 spreadsheet: human labels, not data. Compared as a set (case and
# spacing ignored), not by position: the published labels do not line up with the field names
# above them (the mailing-address columns are shifted), and agencies move columns around.
# fmt: off
_LABEL_TEXTS: Final = (
    "Case Owner", "Salutation", "First Name", "Second Name", "Consent", "Birthdate", "Gender",
    "Citizenship", "Title", "Email", "Home Phone", "Mobile Phone", "Mailing Street",
    "Mailing City", "Mailing State/Province", "Mailing Zip/Postal Code", "Mailing Country",
    "Trafficking Status", "Trafficking Status Decision Making Organization",
    "Method of Recruitment", "Location of Recruitment", "Methods of Control",
    "Type of Exploitation", "Forced Labour Industry", "Type of Sex Exploitation",
    "Location of Exploitation", "Status", "Referring Organisation", "Incoming Referral Date",
    "Referring Primary Case Worker", "Reason for Incoming Referral",
    "Incoming Referral Details", "Referred Organisation", "Referred Primary Case Worker",
    "Reason for Outgoing Referral", "Outgoing Referral Date", "Outgoing Referral Details",
    "Reason for Case Closure",
)
# fmt: on
_PUBLISHED_LABELS: Final = frozenset(" ".join(t.casefold().split()) for t in _LABEL_TEXTS)


def _is_label(text: str) -> bool:
    return " ".join(text.casefold().split()) in _PUBLISHED_LABELS


def _column_letter(index: int) -> str:
    """Spreadsheet column letter for a 0-based index (0 -> A, 26 -> AA)."""
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("A") + rest) + letters
    return letters


@dataclass(frozen=True)
class _Header:
    """What row 1 says about each column position."""

    names: tuple[str | None, ...]  # canonical or tessera_* name; None if the column is ignored
    unnamed: frozenset[int]  # positions with an empty header cell

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(name for name in self.names if name is not None)


# Unknown columns named in one error; the rest are counted (a message must stay readable and fit
# a gRPC status).
_SHOWN_UNKNOWN: Final = 10


def _parse_header(path: Path, cells: Sequence[str]) -> _Header:
    names: list[str | None] = []
    unnamed: set[int] = set()
    unknown: list[tuple[str, int]] = []
    first_seen: dict[str, tuple[str, int]] = {}
    duplicates: list[str] = []
    for index, cell in enumerate(cells):
        text = cell.strip()
        if not text:
            names.append(None)
            unnamed.add(index)
            continue
        if text in REPORT_COLUMNS:
            names.append(None)
            continue
        name = canonical_field(text)
        if name is None and text.startswith(TESSERA_PREFIX):
            name = text
        if name is None:
            unknown.append((text, index))
            names.append(None)
            continue
        if name in first_seen:
            other, where = first_seen[name]
            spelled = f"'{other}' and '{text}'" if other != text else f"'{text}'"
            duplicates.append(
                f"{name} appears twice, as {spelled} in columns "
                f"{_column_letter(where)} and {_column_letter(index)}"
            )
        first_seen[name] = (text, index)
        names.append(name)
    if not first_seen:
        # Without one recognised name, row 1 is not a header and may be survivor data, so its
        # cells are not repeated in the message.
        if not any(cell.strip() for cell in cells):
            raise InvalidInput(
                f"{path.name}: row 1 is empty; it must hold the HTCDS field names",
                hint="start from the published HTCDS spreadsheet or a Tessera export",
            )
        if any(_is_label(cell) for cell in cells):
            raise InvalidInput(
                f"{path.name}: row 1 holds human labels (like 'First Name'), not HTCDS field names",
                hint="put the field names (cas_CaseOwner, prs_FirstName, ...) in row 1; "
                "the published HTCDS spreadsheet has them there",
            )
        raise InvalidInput(
            f"{path.name}: row 1 has no HTCDS field names",
            hint="row 1 must name the columns (cas_CaseOwner, prs_FirstName, ...); "
            "start from the published HTCDS spreadsheet or a Tessera export",
        )
    if unknown:
        raise _unknown_columns(path, unknown)
    if duplicates:
        raise InvalidInput(
            f"{path.name}: " + "; ".join(duplicates),
            hint="keep one column per field and delete the other",
        )
    return _Header(tuple(names), frozenset(unnamed))


def _unknown_columns(path: Path, unknown: Sequence[tuple[str, int]]) -> InvalidInput:
    """The error for header cells that name no field: the first few, each with a guess."""
    suggestions = []
    for text, index in unknown[:_SHOWN_UNKNOWN]:
        close = difflib.get_close_matches(text, FIELD_NAMES, n=1, cutoff=0.75)
        guess = f", did you mean {close[0]}?" if close else ""
        suggestions.append(f"'{_clip(text)}' (column {_column_letter(index)}{guess})")
    if len(unknown) > _SHOWN_UNKNOWN:
        suggestions.append(f"and {len(unknown) - _SHOWN_UNKNOWN} more")
    return InvalidInput(
        f"{path.name}: row 1 has {len(unknown)} column(s) that are not HTCDS v2.0 fields: "
        + "; ".join(suggestions),
        hint="rename them to HTCDS field names (listed in docs/data-model.md) or delete "
        "them; columns for Tessera's own data start with 'tessera_'",
    )


def _data_rows(path: Path, header: _Header, rows: Iterator[Sequence[str]]) -> Iterator[SourceRow]:
    named = [(index, name) for index, name in enumerate(header.names) if name is not None]
    labels_seen: dict[int, str] = {}
    for number, cells in enumerate(rows, start=2):
        if number > MAX_ROWS:
            raise InvalidInput(
                f"{path.name} has more than {MAX_ROWS:,} rows",
                hint="split it into smaller files and import each",
            )
        values = {name: cells[index] if index < len(cells) else "" for index, name in named}
        filled = [text for text in values.values() if text and not text.isspace()]
        if number == 2 and filled and all(_is_label(text) for text in filled):
            # The published spreadsheet's row 2 holds human labels. A real case cannot consist
            # only of label texts (its codes and dates would not be labels), so a row 2 whose
            # every non-empty cell under a field name is a published label is skipped.
            labels_seen = {i: c.strip() for i, c in enumerate(cells) if i in header.unnamed}
            continue
        _check_unnamed_cells(path, header, number, cells, labels_seen)
        if filled:
            yield SourceRow(number, values)


def _check_unnamed_cells(
    path: Path, header: _Header, number: int, cells: Sequence[str], labels: Mapping[int, str]
) -> None:
    """Refuse a value under an empty header: dropping it could silently lose case data.

    Exception: the published spreadsheet numbers its rows (1, 2, 3, ...) in column A under an
    empty header; whole numbers there are ignored. Note that the published spreadsheet also has
    an unnamed column AJ labelled 'Reason for Outgoing Referral', which HTCDS v2.0 defines no
    field for; values typed there are refused with advice rather than dropped.
    """
    for index in header.unnamed:
        if index >= len(cells):
            continue
        text = cells[index].strip()
        if not text or (index == 0 and text.isdigit()):
            continue
        _refuse_unnamed(path, number, index, labels.get(index, ""))
    for index in range(len(header.names), len(cells)):
        if cells[index].strip():
            _refuse_unnamed(path, number, index, "")


def _refuse_unnamed(path: Path, number: int, index: int, label: str) -> None:
    letter = _column_letter(index)
    labelled = f" (labelled {label!r} in row 2)" if label else ""
    hint = "give the column an HTCDS field name in row 1, or delete it"
    if label.casefold() == "reason for outgoing referral":
        hint = (
            "HTCDS v2.0 has no field for this column: move its text into "
            "cas_OutgoingReferralDetails, or delete the column"
        )
    raise InvalidInput(
        f"{path.name}: column {letter}{labelled} has no field name in row 1, "
        f"but row {number} has a value in it",
        hint=hint,
    )


@contextmanager
def _open_rows(path: Path) -> Iterator[Iterator[Sequence[str]]]:
    """Open a CSV or XLSX file and yield an iterator over its rows as lists of cell texts."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".xlsx"):
        raise InvalidInput(
            f"{path.name}: Tessera reads HTCDS files as .csv or .xlsx, not {suffix or 'no suffix'}",
            hint="save the spreadsheet as Excel Workbook (.xlsx) or CSV UTF-8 (.csv)",
        )
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(4096)
    except FileNotFoundError:
        raise NotFound(f"{path} does not exist") from None
    except OSError as exc:
        raise InvalidInput(f"{path} cannot be read: {exc.strerror}") from None
    if size > MAX_FILE_BYTES:
        raise InvalidInput(
            f"{path.name} is {size / 1e6:.0f} MB; the limit is {MAX_FILE_BYTES / 1e6:.0f} MB",
            hint="split the file into smaller ones and import each",
        )
    if suffix == ".csv":
        yield _csv_rows(path, head)
    else:
        with _xlsx_rows(path, head) as rows:
            yield rows


def _not_a(path: Path, head: bytes, expected: str) -> InvalidInput:
    """An InvalidInput saying what the file seems to be, judged from its first bytes."""
    if head.startswith(b"PK\x03\x04"):
        seems, hint = (
            "a zip archive (an .xlsx workbook?)",
            "if it is an Excel workbook, rename it to .xlsx",
        )
    elif head.startswith(b"\xd0\xcf\x11\xe0"):
        seems, hint = "an old Excel 97-2003 (.xls) file", "open it in Excel and save it as .xlsx"
    elif head.startswith((b"\xff\xfe", b"\xfe\xff")):
        seems, hint = "UTF-16 'Unicode Text'", "save it from Excel as 'CSV UTF-8 (Comma delimited)'"
    elif head.startswith(b"%PDF"):
        seems, hint = "a PDF document", "export the cases as .xlsx or CSV UTF-8 instead"
    elif not head or b"\x00" not in head:
        seems, hint = "a text file", "if it holds comma-separated values, rename it to .csv"
    else:
        seems, hint = "a binary file of some other kind", "export the cases as .xlsx or CSV UTF-8"
    return InvalidInput(f"{path.name} is not {expected}: it seems to be {seems}", hint=hint)


def _csv_rows(path: Path, head: bytes) -> Iterator[Sequence[str]]:
    if head.startswith((b"PK\x03\x04", b"\xd0\xcf\x11\xe0", b"\xff\xfe", b"\xfe\xff", b"%PDF")):
        raise _not_a(path, head, "a CSV file")
    data = path.read_bytes()
    try:
        # Decoded whole (the size is bounded) so a bad byte is reported with its line number.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InvalidInput(
            f"{path.name} is not UTF-8 text (first bad byte on line {line}); it was probably "
            "saved in a legacy encoding such as Windows-1252",
            hint="in Excel use File > Save As > 'CSV UTF-8 (Comma delimited)'; in LibreOffice "
            "pick character set 'Unicode (UTF-8)'; or import the .xlsx workbook instead",
        ) from None
    if "\x00" in text:
        raise _not_a(path, head, "a CSV file")
    # Excel in many European locales saves "CSV" with ';' between cells. Field names contain
    # neither ',' nor ';' nor tabs, so the header line tells which separator the file uses.
    first_line = text[: text.find("\n")]
    delimiter = ","
    if "," not in first_line:
        delimiter = ";" if ";" in first_line else "\t" if "\t" in first_line else ","
    return _guard_csv(path, text, delimiter)


# A spreadsheet treats a cell starting with one of these as a formula (OWASP "CSV injection").
_FORMULA_STARTS: Final = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: str) -> str:
    """A value as written to a CSV Tessera exports: a leading formula character is neutralised
    with a single quote (OWASP), and so is a leading quote before one, so that
    :func:`csv_value` reads every value back unchanged."""
    if value.startswith(_FORMULA_STARTS) or (
        value.startswith("'") and value[1:].startswith((*_FORMULA_STARTS, "'"))
    ):
        return "'" + value
    return value


def csv_value(cell: str) -> str:
    """The value of a CSV cell as :func:`csv_cell` wrote it (only its own quote is removed)."""
    if cell.startswith("'") and cell[1:].startswith((*_FORMULA_STARTS, "'")):
        return cell[1:]
    return cell


def _guard_csv(path: Path, text: str, delimiter: str) -> Iterator[Sequence[str]]:
    # strict: a file that ends inside an open quote is refused, not read as one long cell.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        for row in reader:
            yield [csv_value(cell) for cell in row]
    except csv.Error as exc:
        raise InvalidInput(
            f"{path.name}: line {reader.line_num} is not valid CSV ({exc})",
            hint="check the quotes in that row, or import the .xlsx workbook instead",
        ) from None


def _cell_text(value: object) -> str:
    """The text of an openpyxl cell value, as a person would have typed it."""
    if value is None:
        text = ""
    elif isinstance(value, bool):  # Excel TRUE/FALSE cells
        text = "TRUE" if value else "FALSE"
    elif isinstance(value, dt.datetime):  # Excel date cells come back as midnight datetimes
        midnight = value.time() == dt.time() and value.tzinfo is None
        text = value.date().isoformat() if midnight else value.isoformat(sep=" ")
    elif isinstance(value, dt.date):
        text = value.isoformat()
    elif isinstance(value, float) and value.is_integer():
        text = str(int(value))  # a phone or postal code typed as a number: no ".0"
    else:
        text = str(value)
    return text


@contextmanager
def _xlsx_rows(path: Path, head: bytes) -> Iterator[Iterator[Sequence[str]]]:
    if not head.startswith(b"PK\x03\x04"):
        raise _not_a(path, head, "an Excel .xlsx workbook")
    from openpyxl import load_workbook

    # Opened here, not by openpyxl: a workbook it fails on half-way through opening would
    # otherwise keep its file open until garbage collection (found by fuzzing, issue 16).
    with path.open("rb") as handle:
        try:
            workbook = load_workbook(handle, read_only=True, data_only=True)
        except (
            Exception
        ) as exc:  # openpyxl raises many kinds (KeyError, BadZipFile, ParseError, ...)
            seems = "an OpenDocument spreadsheet (.ods)" if _is_ods(path) else "a zip archive"
            raise InvalidInput(
                f"{path.name} is not an Excel .xlsx workbook: it seems to be {seems} "
                f"({type(exc).__name__})",
                hint="open it in its spreadsheet program and save it as Excel Workbook (.xlsx)",
            ) from None
        try:
            if not workbook.worksheets:
                raise InvalidInput(f"{path.name} has no worksheet")
            sheet = workbook.worksheets[0]
            # Read-only mode trusts the size the file declares and stops there; some programs
            # write it wrongly, so it is dropped and every row present is read.
            sheet.reset_dimensions()
            rows = _guard_xlsx(path, sheet.iter_rows(values_only=True))
            try:
                yield rows
            finally:
                rows.close()  # release the sheet's zip member before the archive closes
        finally:
            workbook.close()


def _is_ods(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return b"opendocument.spreadsheet" in archive.read("mimetype")[:100]
    except Exception:  # only refines an error message
        return False


def _guard_xlsx(
    path: Path, rows: Iterator[tuple[object, ...]]
) -> Generator[Sequence[str], None, None]:
    number = 1
    try:
        for row in rows:
            yield [cell if type(cell) is str else _cell_text(cell) for cell in row]
            number += 1
    except Exception as exc:  # damaged sheet XML or zip member: any parser error means the same
        raise InvalidInput(
            f"{path.name} is damaged: row {number} of its first sheet cannot be read "
            f"({type(exc).__name__})",
            hint="open it in Excel or LibreOffice and save it again as .xlsx",
        ) from None


def read_table(path: Path) -> Iterator[SourceRow]:
    """Read the data rows of an HTCDS ``.csv`` or ``.xlsx`` file, without validating values.

    Row 1 must hold field names (canonical, alias or any case; ``tessera_*`` columns pass
    through; ``tessera_source_row``/``tessera_errors`` are ignored). Row 2 is skipped when it
    holds the published spreadsheet's human labels. Fully empty rows are skipped. For XLSX the
    first sheet is read, date cells become YYYY-MM-DD and TRUE/FALSE cells TRUE/FALSE.

    Raises ``InvalidInput`` for an unreadable file (naming what it seems to be), unknown or
    duplicate column names, or a value in a column without a name; ``NotFound`` if the file does
    not exist. Header problems are raised when iteration starts.
    """
    with _open_rows(path) as rows:
        header = _parse_header(path, next(iter(rows), []))
        yield from _data_rows(path, header, rows)


def count_rows(path: Path) -> int | None:
    """A cheap estimate of the data rows in a file, for a progress bar; None if unknown.

    Counts the lines of a CSV, and reads the size an XLSX file declares for its first sheet
    (without opening the workbook, which can cost a full pass over the sheet). Both may count
    the label row and empty rows, so the estimate is usually an upper bound. Never raises.
    """
    try:
        suffix = path.suffix.lower()
        if suffix == ".csv":
            lines = 0
            last = b"\n"
            with path.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    lines += chunk.count(b"\n")
                    last = chunk[-1:]
            lines += last != b"\n"
            return max(lines - 1, 0)
        if suffix == ".xlsx":
            declared = _xlsx_declared_rows(path)
            return None if declared is None else max(declared - 1, 0)
    except Exception:  # a progress estimate must never stop an import; read_table reports
        return None
    return None


_SHEET_REF: Final = re.compile(rb'<(?:\w+:)?sheet\b[^>]*?\br:id="([^"]+)"')
_DIMENSION: Final = re.compile(rb'<(?:\w+:)?dimension\s+ref="[A-Z]+[0-9]+:[A-Z]+([0-9]+)"')


def _xlsx_declared_rows(path: Path) -> int | None:
    """The last row number the first sheet declares in its ``<dimension>``, if it has one."""
    with zipfile.ZipFile(path) as archive:
        first = _SHEET_REF.search(archive.read("xl/workbook.xml"))
        if first is None:
            return None
        rels = archive.read("xl/_rels/workbook.xml.rels")
        target = re.search(rb'Id="' + re.escape(first.group(1)) + rb'"[^>]*?Target="([^"]+)"', rels)
        if target is None:
            target = re.search(
                rb'Target="([^"]+)"[^>]*?Id="' + re.escape(first.group(1)) + rb'"', rels
            )
        if target is None:
            return None
        name = target.group(1).decode()
        name = name.lstrip("/") if name.startswith("/") else f"xl/{name}"
        with archive.open(name) as sheet:
            head = sheet.read(4096)  # the dimension comes before any cell
    size = _DIMENSION.search(head)
    return int(size.group(1)) if size else None


@dataclass
class ValidationReport:
    """The outcome of checking a whole file.

    ``header`` lists the file's named columns (canonical names) in file order. ``good`` holds
    ``(row number, normalised values)`` of valid rows, ``bad`` ``(row number, errors)`` of
    invalid ones, and ``rejected`` the raw rows behind ``bad``, in the same order.
    """

    header: tuple[str, ...]
    good: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    bad: list[tuple[int, list[FieldError]]] = field(default_factory=list)
    rejected: list[SourceRow] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every row is valid."""
        return not self.bad

    @property
    def rows(self) -> int:
        """Data rows read (empty rows and the label row not counted)."""
        return len(self.good) + len(self.bad)

    def rejects(self) -> list[tuple[SourceRow, list[FieldError]]]:
        """The invalid rows with their errors, ready for ``write_rejects``."""
        return [(row, errors) for row, (_n, errors) in zip(self.rejected, self.bad, strict=True)]

    def error_lines(self, limit: int | None = None) -> list[str]:
        """One line per error, ``row 7, prs_Gender: ...``; safe to print or log."""
        lines = [f"row {n}, {error}" for n, errors in self.bad for error in errors]
        if limit is not None and len(lines) > limit:
            lines = [*lines[:limit], f"... and {len(lines) - limit} more"]
        return lines


def validate_file(path: Path, progress: Callable[[int], None] | None = None) -> ValidationReport:
    """Read and check every row of an HTCDS file (``read_table`` then ``validate_record``).

    ``progress``, if given, is called with the number of data rows checked so far after each
    row. Raises what ``read_table`` raises; row-level problems are reported, not raised.
    """
    with _open_rows(path) as rows:
        header = _parse_header(path, next(iter(rows), []))
        report = ValidationReport(header.columns)
        for count, row in enumerate(_data_rows(path, header, rows), start=1):
            values, errors = validate_record(row.values)
            if errors:
                report.bad.append((row.number, errors))
                report.rejected.append(row)
            else:
                report.good.append((row.number, values))
            if progress is not None:
                progress(count)
    return report


# --- writing ---------------------------------------------------------------------------------


@contextmanager
def _atomic_file(path: Path) -> Iterator[Path]:
    """A private temporary file beside ``path`` that replaces it only when fully written.

    Exports hold survivor data, so the file is created readable by its owner only (0600), and
    a crash never leaves a half-written export under the real name.
    """
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        raise InvalidInput(
            f"cannot write {path}: {exc.strerror}",
            hint="check that the folder exists and is writable",
        ) from None
    try:
        yield temp
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def _export_columns(extra_columns: Sequence[str]) -> tuple[str, ...]:
    for name in extra_columns:
        if not name.startswith(TESSERA_PREFIX) or name in REPORT_COLUMNS:
            raise ValueError(
                f"extra column {name!r} must start with {TESSERA_PREFIX!r} and not be one of "
                f"{REPORT_COLUMNS}, so that an import reads it back"
            )
    if len(set(extra_columns)) != len(extra_columns):
        raise ValueError("extra columns must be distinct")
    return (*FIELD_NAMES, *extra_columns)


def _ordered(
    record: Mapping[str, str], columns: tuple[str, ...], known: frozenset[str]
) -> list[str]:
    stray = [key for key in record if key not in known]
    if stray:
        # A programming error, not bad input: silently dropping a field would lose data.
        raise ValueError(f"record has keys outside the export columns: {sorted(stray)}")
    return [record.get(name, "") for name in columns]


def write_csv(
    path: Path, records: Iterable[Mapping[str, str]], extra_columns: Sequence[str] = ()
) -> int:
    """Write records as an HTCDS CSV file; returns the number of records written.

    Columns are every HTCDS field in spreadsheet order, then ``extra_columns`` (each must start
    with ``tessera_``). UTF-8 with a byte-order mark, so that Excel shows accented names right;
    ``read_table`` accepts it. A value a spreadsheet would run as a formula is neutralised
    (:func:`csv_cell`) and read back unchanged on import.
    """
    columns = _export_columns(extra_columns)
    known = frozenset(columns)
    count = 0
    with _atomic_file(path) as temp, temp.open("w", encoding="utf-8-sig", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(columns)
        for record in records:
            writer.writerow([csv_cell(v) for v in _ordered(record, columns, known)])
            count += 1
    return count


def write_xlsx(
    path: Path, records: Iterable[Mapping[str, str]], extra_columns: Sequence[str] = ()
) -> int:
    """Write records as an HTCDS Excel workbook (one sheet); returns the records written.

    Same columns as ``write_csv``. Date fields become Excel date cells (shown YYYY-MM-DD);
    everything else is stored as text, including values starting with '=' (never formulas).
    """
    from openpyxl import Workbook
    from openpyxl.cell.cell import WriteOnlyCell
    from openpyxl.utils.exceptions import IllegalCharacterError

    columns = _export_columns(extra_columns)
    known = frozenset(columns)
    dates = {i for i, name in enumerate(columns) if name in _DATE_FIELDS}
    workbook = Workbook(write_only=True)
    sheet: WriteOnlyWorksheet = workbook.create_sheet("HTCDS cases")
    sheet.append(list(columns))
    count = 0
    for count, record in enumerate(records, start=1):
        row: list[object] = [*_ordered(record, columns, known)]
        for index, value in enumerate(row):
            if not value:
                row[index] = None
            elif index in dates and isinstance(value, str) and _DATE_SHAPE.fullmatch(value):
                row[index] = _to_date(value)
            elif isinstance(value, str) and (value[0] == "=" or value in _EXCEL_ERRORS):
                # openpyxl would store these as a formula or an error cell; force text.
                cell = WriteOnlyCell(sheet, value=value)
                cell.data_type = "s"
                row[index] = cell
        try:
            sheet.append(row)
        except IllegalCharacterError:
            raise InvalidInput(
                f"record {count} has a control character that an .xlsx file cannot hold",
                hint="validate records before exporting them",
            ) from None
    with _atomic_file(path) as temp:
        workbook.save(str(temp))
    return count


def _to_date(value: str) -> dt.date | str:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        return value


def write_rejects(
    path: Path,
    header: Sequence[str],
    rows_with_errors: Iterable[tuple[SourceRow, Sequence[FieldError]]],
) -> int:
    """Write rejected rows, as read, to a CSV a person can correct and import again.

    Columns are ``header`` (use ``ValidationReport.header``), then ``tessera_source_row`` (the
    row number in the original file) and ``tessera_errors`` (``field: reason | field: reason``).
    An import ignores those two columns. Returns the number of rows written. The file holds
    survivor data as the source file did; it is created readable by its owner only.
    """
    columns = [name for name in header if name not in REPORT_COLUMNS]
    count = 0
    with _atomic_file(path) as temp, temp.open("w", encoding="utf-8-sig", newline="") as out:
        writer = csv.writer(out)
        writer.writerow([*columns, *REPORT_COLUMNS])
        for row, errors in rows_with_errors:
            cells = [row.values.get(name, "") for name in columns]
            report = [str(row.number), " | ".join(str(e) for e in errors)]
            writer.writerow([csv_cell(cell) for cell in [*cells, *report]])
            count += 1
    return count


# --- synthetic cases -------------------------------------------------------------------------

# Syllables for names that sound like no real person ("Mirelka Dovanto"): three or more are
# always joined, and a few carry accents so that exports exercise UTF-8.
# fmt: off
_SYLLABLES: Final = (
    "mi", "rel", "ka", "do", "van", "to", "zo", "quel", "bri", "tas", "nu", "vor", "sé", "lin",
    "thra", "om", "pel", "ud", "ké", "yas", "gro", "fen", "ilo", "xa", "bø", "dre", "sul", "wen",
)
_CITIZENSHIPS: Final = (
    "NG", "PH", "VN", "RO", "UA", "MX", "GT", "HN", "TH", "IN", "NP", "AL", "BG", "ET", "KH",
    "MM", "ID", "US", "GB", "MD",
)
# fmt: on
_ORG_KINDS: Final = ("Shelter", "Legal Aid", "Health Clinic", "Counselling Centre", "Outreach")
_INCOMING_REASONS: Final = (
    "Identified during a labour inspection",
    "Self-referred through the hotline",
    "Referred by an outreach team",
    "Identified at a border crossing",
    "Referred by a hospital social worker",
)
_CLOSURE_REASONS: Final = (
    "Services completed",
    "Survivor moved out of the area",
    "Survivor chose to end services",
    "Transferred to a partner agency",
)


# Weights for vic_TypeOfExploitation in catalogue order (ForcedLabour, SexualExploitation, ...).
_EXPLOITATION_WEIGHTS: Final = (40, 35, 5, 3, 4, 1, 1, 4, 1, 1, 5)


def _made_up_name(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(syllables)).capitalize()


def _ascii(text: str) -> str:
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").lower()


def _some(rng: random.Random, spec: FieldSpec, most: int) -> str:
    # ``choices`` (a tuple) rather than ``allowed`` (a set): set order varies between runs.
    return ";".join(rng.sample(spec.choices, rng.randint(1, most)))


def _day(rng: random.Random, start: dt.date, end: dt.date) -> dt.date:
    return start + dt.timedelta(days=rng.randrange((end - start).days + 1))


def synthetic_records(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` valid, entirely fictional HTCDS records, the same for the same ``seed``.

    For tests, benchmarks and the demo: made-up syllable names, emails at example.org, phone
    numbers in the fictional 555-01xx range, plausible codes for every code field, and dates
    that follow one another (born, referred in, referred out). Not for anything secret.
    """
    rng = random.Random(seed)  # noqa: S311 - reproducible test data, not secrets
    spec = FIELD_BY_NAME
    staff = [f"{_made_up_name(rng, 3)} {_made_up_name(rng, 3)}" for _ in range(8)]
    orgs = [f"{_made_up_name(rng, 3)} {rng.choice(_ORG_KINDS)}" for _ in range(12)]
    cities = [_made_up_name(rng, 3) for _ in range(30)]
    records: list[dict[str, str]] = []
    for number in range(1, n + 1):
        first, second = _made_up_name(rng, 3), _made_up_name(rng, rng.choice((3, 4)))
        gender = rng.choices(spec["prs_Gender"].choices, weights=(45, 40, 4, 3, 3, 5))[0]
        salutation = {"Feminine": "Ms", "Masculine": "Mr"}.get(gender, "Mx")
        status = rng.choices(spec["vic_TraffickingStatus"].choices, weights=(35, 55, 10))[0]
        exploitation = spec["vic_TypeOfExploitation"].choices
        types = rng.choices(exploitation, weights=_EXPLOITATION_WEIGHTS)
        if rng.random() < 0.2 and (other := rng.choice(exploitation)) not in types:
            types.append(other)
        referred_in = _day(rng, dt.date(2019, 1, 1), dt.date(2025, 6, 30))
        case_status = rng.choices(spec["cas_Status"].choices, weights=(50, 20, 20, 10))[0]
        record = {
            "cas_CaseOwner": rng.choice(staff),
            "prs_Salutation": salutation if rng.random() < 0.7 else "",
            "prs_FirstName": first,
            "prs_SecondName": second,
            "con_Consent": "TRUE" if rng.random() < 0.85 else "FALSE",
            "prs_Birthdate": _day(rng, dt.date(1962, 1, 1), dt.date(2008, 12, 31)).isoformat(),
            "prs_Gender": gender,
            "prs_Citizenship": rng.choice(_CITIZENSHIPS),
            "prs_Title": "",
            "prs_Email": f"{_ascii(first)}.{_ascii(second)}{number}@example.org",
            "prs_HomePhone": f"+1-202-555-01{rng.randrange(100):02d}" if rng.random() < 0.3 else "",
            "prs_MobilePhone": f"+1-202-555-01{rng.randrange(100):02d}",
            "prs_MailingCity": rng.choice(cities),
            "prs_MailingCountry": rng.choice(_CITIZENSHIPS),
            "prs_MailingState": "",
            "prs_MailingStreet": f"{rng.randint(1, 240)} {_made_up_name(rng, 3)} Street",
            "prs_MailingPostalCode": f"{rng.randrange(10000, 99999)}",
            "vic_TraffickingStatus": status,
            "vic_TraffickinStatusDecisionMakingOrg": rng.choice(
                spec["vic_TraffickinStatusDecisionMakingOrg"].choices
            ),
            "vic_MethodOfRecruitment": _some(rng, spec["vic_MethodOfRecruitment"], 2),
            "vic_LocationOfRecruitment": f"{rng.choice(cities)}, {rng.choice(_CITIZENSHIPS)}",
            "vic_MethodsOfControl": _some(rng, spec["vic_MethodsOfControl"], 4),
            "vic_TypeOfExploitation": ";".join(types),
            "vic_ForcedLabourIndustry": (
                _some(rng, spec["vic_ForcedLabourIndustry"], 1) if "ForcedLabour" in types else ""
            ),
            "vic_TypeOfSexExploitation": (
                _some(rng, spec["vic_TypeOfSexExploitation"], 2)
                if "SexualExploitation" in types
                else ""
            ),
            "vic_LocationOfExploitation": f"{rng.choice(cities)}, {rng.choice(_CITIZENSHIPS)}",
            "cas_Status": case_status,
            "cas_ReferringOrganisation": rng.choice(orgs),
            "cas_IncomingReferralDate": referred_in.isoformat(),
            "cas_ReferringPrimaryCaseWorker": f"{_made_up_name(rng, 3)} {_made_up_name(rng, 3)}",
            "cas_ReasonForIncomingReferral": rng.choice(_INCOMING_REASONS),
            "cas_IncomingReferralDetails": "Synthetic record for testing; no real person.",
        }
        if case_status == "ClosedReferred" or rng.random() < 0.25:
            record.update(
                cas_ReferredOrganisation=rng.choice(orgs),
                cas_ReferredPrimaryCaseWorker=f"{_made_up_name(rng, 3)} {_made_up_name(rng, 3)}",
                cas_OutgoingReferralDate=(
                    referred_in + dt.timedelta(days=rng.randint(3, 300))
                ).isoformat(),
                cas_OutgoingReferralDetails="Referred on for specialised services.",
            )
        if case_status in ("Closed", "ClosedReferred"):
            record["cas_ReasonForCaseClosure"] = rng.choice(_CLOSURE_REASONS)
        records.append({name: record[name] for name in FIELD_NAMES if record.get(name)})
    return records
