"""The small checks the referral core's pure modules share (``node.consent``,
``node.envelopes``): codes given as members or strings, canonical UUIDs, HTCDS field names in a
refusal, and whether the directory still trusts an agency's keys.

Pure like them: no database, no network, no clock (callers pass ``now``). Failures are the typed
errors of :mod:`tessera.errors`, naming fields, never survivor values.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Final, TypeVar

from node.htcds.catalogue import FIELD_CATEGORY, FIELD_NAMES
from tessera.directory import AgencyRecord
from tessera.errors import InvalidInput, Refused
from tessera.needs import NeedCategory

__all__ = [
    "FIELD_ORDER",
    "check_purpose",
    "check_trusted",
    "check_uuid",
    "field_list",
    "iso",
    "member",
]

#: Each HTCDS field's position in column order: receipts and envelopes list fields in it.
FIELD_ORDER: Final = {name: index for index, name in enumerate(FIELD_NAMES)}

_Code = TypeVar("_Code", bound=enum.StrEnum)


def member(kind: type[_Code], value: object, what: str) -> _Code:
    """``value`` as a member of ``kind``, given as the member or as its code (``"medical"``);
    InvalidInput naming ``what`` and listing the codes otherwise."""
    if isinstance(value, kind):
        return value
    if isinstance(value, str) and value in kind.__members__.values():
        return kind(value)
    raise InvalidInput(
        f"unknown {what} {value!r}",
        hint=f"one of: {', '.join(code.value for code in kind)}",
    )


def check_purpose(value: object) -> NeedCategory:
    """A referral's purpose: a need category, as the member or its code."""
    return member(NeedCategory, value, "purpose")


def field_list(names: Iterable[str]) -> str:
    """HTCDS field names with their categories, for a refusal: names only, never values."""
    return ", ".join(f"{name} (category {FIELD_CATEGORY[name]!r})" for name in names)


def check_uuid(value: object, name: str) -> str:
    """A canonical UUID string (lower-case, hyphenated), as consent.proto and referral.proto
    require for consent, referral and message ids."""
    try:
        canonical = str(uuid.UUID(value)) if isinstance(value, str) else None
    except ValueError:
        canonical = None
    if canonical is None or canonical != value:
        raise InvalidInput(
            f"{name} must be a UUID in canonical form (like 1b4e28ba-2fa1-11d2-883f-0016d3cca427)"
        )
    return value


def check_trusted(record: AgencyRecord, now: datetime, *, if_revoked: str, hint: str) -> None:
    """Refused unless the directory still trusts ``record``'s keys at ``now``: not revoked, and
    not past ``valid_until`` (DESIGN.md section 5). The one check behind every use of an agency's
    keys, to verify what it signed or to seal to it; ``if_revoked`` and ``hint`` say what that
    means for the caller."""
    if record.revoked:
        raise Refused(
            f"agency {record.agency_id} has been revoked from the directory; {if_revoked}",
            hint=hint,
        )
    if record.valid_until is not None and now >= record.valid_until:
        raise Refused(
            f"agency {record.agency_id}'s keys expired at {iso(record.valid_until)}",
            hint="sync the directory (the agency may have rotated its keys)",
        )


def iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
