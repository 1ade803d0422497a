"""Synthetic HTCDS cases: valid, entirely fictional records for tests, benchmarks and the demo."""

from __future__ import annotations

import datetime as dt
import random
import unicodedata
from typing import Final

from node.htcds.catalogue import FIELD_BY_NAME, FIELD_NAMES, FieldSpec

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
