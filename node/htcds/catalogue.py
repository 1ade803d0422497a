"""The HTCDS v2.0 field catalogue and the data categories a survivor's consent covers.

Case records follow the Human Trafficking Case Data Standard (HTCDS v2.0, by IOM, CC BY 4.0);
the field list ships as ``node/data/htcds_fields.csv`` and the country codes as
``node/data/iso3166_alpha2.txt``. ``DATA_CATEGORIES`` names the groups of fields that a
survivor's consent covers (DESIGN.md section 6). Aftercare needs are Tessera's own vocabulary
and live in :mod:`tessera.needs`.

docs/data-model.md describes the fields and the data categories.
"""

from __future__ import annotations

import csv
import enum
import io
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from types import MappingProxyType
from typing import Final

from tessera.errors import InvalidInput


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
