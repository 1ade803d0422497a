"""The aftercare-needs vocabulary (shared/htcds/NEEDS.md; not part of HTCDS itself).

Shared by the node (which records needs), the statistics core (whose default table is needs by
category and status) and the coordinator's tools, so none of them imports another's model.
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = ["NEED_CATEGORIES", "NEED_STATUSES", "NeedCategory", "NeedStatus"]


class NeedCategory(enum.StrEnum):
    """What kind of aftercare a survivor needs, in NEEDS.md's order."""

    SAFE_HOUSING = "safe_housing"
    BASIC_NEEDS = "basic_needs"
    MEDICAL = "medical"
    MENTAL_HEALTH = "mental_health"
    SUBSTANCE_USE = "substance_use"
    LEGAL_CRIMINAL = "legal_criminal"
    LEGAL_CIVIL = "legal_civil"
    IMMIGRATION = "immigration"
    SAFETY_PLANNING = "safety_planning"
    EDUCATION = "education"
    EMPLOYMENT = "employment"
    FINANCIAL = "financial"
    LIFE_SKILLS = "life_skills"
    CHILDCARE = "childcare"
    FAMILY = "family"
    INTERPRETATION = "interpretation"
    CASE_MANAGEMENT = "case_management"
    PEER_SUPPORT = "peer_support"


class NeedStatus(enum.StrEnum):
    """Where a need stands; a need has one status at a time. Coordinators track ``unmet``."""

    IDENTIFIED = "identified"  # known, nothing arranged yet
    REFERRED = "referred"  # a referral is out
    IN_PROGRESS = "in_progress"  # a service has started
    MET = "met"
    UNMET = "unmet"  # could not be arranged: no capacity, not eligible, none available
    DECLINED = "declined"  # the survivor chose not to pursue it


NEED_CATEGORIES: Final[tuple[NeedCategory, ...]] = tuple(NeedCategory)
NEED_STATUSES: Final[tuple[NeedStatus, ...]] = tuple(NeedStatus)
