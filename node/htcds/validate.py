"""Checking and normalising one HTCDS record (DESIGN.md section 2).

Pure: no files, no database. Error reasons never carry the value of an identifying field
(names, contact details, birthdate), so a reject summary or a log line can never leak a
survivor's details (STYLE.md habit 8).
"""

from __future__ import annotations

import datetime as dt
import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from node.htcds.catalogue import (
    COUNTRY_CODES,
    FIELD_BY_NAME,
    FIELD_NAMES,
    FIELDS,
    IDENTIFYING_FIELDS,
    TESSERA_PREFIX,
    FieldKind,
    FieldSpec,
    canonical_field,
)

#: Longest free-text value accepted in one field. HTCDS text fields are names, places and short
#: notes; this stops a pasted document from passing as a value.
MAX_TEXT_CHARS: Final = 10_000

#: Longest value of a code field shown back in an error. Longer text typed into a code column is
#: probably narrative (perhaps about the survivor), so it is hidden rather than quoted.
_MAX_EXCERPT: Final = 40


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


#: The shape of an ISO date (the XLSX writer turns such values into date cells).
DATE_SHAPE: Final = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_EXCEL_SERIAL: Final = re.compile(r"[0-9]{5}(\.0+)?")
# The characters XLSX (XML 1.0) cannot store; refusing them on import keeps every accepted
# record exportable. Tab, line feed and carriage return are allowed.
_CONTROL_CHARS: Final = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
#: The texts of Excel's error values: refused on import, written as text on export.
EXCEL_ERRORS: Final = frozenset(
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
    if DATE_SHAPE.fullmatch(value):
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
#: The HTCDS fields holding dates.
DATE_FIELDS: Final = frozenset(s.name for s in FIELDS if s.kind is FieldKind.DATE)


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
                errors.append(FieldError(clip(key), None, _unknown_field_reason(key)))
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
        if value[0] == "#" and value in EXCEL_ERRORS:
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


def clip(text: str) -> str:
    """``text`` cut to a length fit to quote in an error."""
    return text if len(text) <= _MAX_EXCERPT else text[:_MAX_EXCERPT] + "..."


def _unknown_field_reason(key: str) -> str:
    shown = clip(key)
    close = difflib.get_close_matches(key, FIELD_NAMES, n=1, cutoff=0.75)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown field '{shown}'{hint}"
