"""node.consent: the consent record, the send gate, minimisation, receipts and commitments.

DESIGN.md section 6. Real PyNaCl keys throughout (deterministic seeds keep the tests fast and
repeatable); every refusal is checked by its typed reason, not by matching message text alone.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from node.consent import (
    Consent,
    ConsentMethod,
    ConsentRefused,
    Refusal,
    VerifiedReceipt,
    check_covers,
    commitment,
    minimise,
    receipt_blob,
    verify_receipt,
)
from node.htcds.catalogue import DATA_CATEGORIES, FIELD_NAMES, fields_in
from node.htcds.synthetic import synthetic_records
from tessera import crypto, labels
from tessera.directory import AgencyRecord
from tessera.errors import BadSignature, InvalidInput, Refused
from tessera.needs import NeedCategory
from tessera.v1 import common_pb2 as common_pb
from tessera.v1 import consent_pb2 as consent_pb

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SENDER_ID = "shelter-north-01"
RECIPIENT_ID = "legal-aid-02"
OTHER_ID = "clinic-03"
SENDER = crypto.Identity.from_seed(bytes([1]) * 32)
RECIPIENT = crypto.Identity.from_seed(bytes([2]) * 32)
MALLORY = crypto.Identity.from_seed(bytes([3]) * 32)
CONSENT_ID = "6f1c2a9e-0d4b-4c55-9a8e-2b7d3f41a0c1"
PSEUDONYM = "psn-4b1f0c2e9d7a8b36"


def make_consent(**changes: object) -> Consent:
    values: dict[str, object] = {
        "consent_id": CONSENT_ID,
        "case_id": "case-0042",
        "recipient_agency_id": RECIPIENT_ID,
        "purpose": NeedCategory.IMMIGRATION,
        "categories": frozenset({"contact", "demographics"}),
        "method": ConsentMethod.VERBAL,
        "witnessed_by": "staff:Ana Ortiz",
        "granted_at": NOW - timedelta(days=1),
        "expires_at": NOW + timedelta(days=30),
        "revoked_at": None,
        "survivor_pseudonym": PSEUDONYM,
    }
    values.update(changes)
    return Consent(**values)  # type: ignore[arg-type]


def record(identity: crypto.Identity, agency_id: str, *, revoked: bool = False) -> AgencyRecord:
    return AgencyRecord(
        agency_id=agency_id,
        name=agency_id.title(),
        region="north",
        services=("immigration",),
        identity=identity.public,
        valid_from=NOW - timedelta(days=365),
        valid_until=None,
        revoked=revoked,
        sequence=1,
    )


def signed(
    identity: crypto.Identity, body: bytes, label: bytes = labels.LABEL_CONSENT_RECEIPT
) -> common_pb.SignedBlob:
    return common_pb.SignedBlob(
        body=body, signature=identity.sign(label, body), signer=identity.public.signing_key
    )


def parsed(blob: common_pb.SignedBlob) -> consent_pb.ConsentReceipt:
    receipt = consent_pb.ConsentReceipt()
    receipt.ParseFromString(blob.body)
    return receipt


# --- the consent record validates itself -------------------------------------------------------


def test_consent_accepts_codes_and_expands_categories() -> None:
    consent = make_consent(purpose="medical", method="written")
    assert consent.purpose is NeedCategory.MEDICAL
    assert consent.method is ConsentMethod.WRITTEN
    assert consent.fields == DATA_CATEGORIES["contact"] | DATA_CATEGORIES["demographics"]
    assert consent.active(NOW)
    assert not consent.active(consent.expires_at)


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"categories": frozenset({"contact", "medical_history"})}, "unknown data category"),
        ({"categories": frozenset()}, "at least one data category"),
        ({"categories": "contact"}, "set of data category names"),
        ({"expires_at": NOW - timedelta(days=2)}, "must be after granted_at"),
        ({"expires_at": NOW - timedelta(days=1)}, "never open-ended"),  # equal to granted_at
        ({"granted_at": datetime(2026, 3, 1, 12, 0)}, "timezone-aware"),
        ({"revoked_at": NOW - timedelta(days=2)}, "revoked_at is before granted_at"),
        ({"consent_id": ""}, "consent_id must be a UUID"),
        ({"consent_id": "consent-1"}, "consent_id must be a UUID"),
        ({"consent_id": CONSENT_ID.upper()}, "canonical form"),
        ({"case_id": ""}, "case_id must be"),
        ({"recipient_agency_id": " "}, "recipient_agency_id must be"),
        # A look-alike of legal-aid-02 (U+2010 HYPHEN): ids are ASCII, as in the directory.
        ({"recipient_agency_id": "legal\u2010aid-02"}, "recipient_agency_id must be"),
        ({"witnessed_by": ""}, "witnessed_by is required"),
        # A right-to-left override would make the name display as something else.
        ({"witnessed_by": "staff:\u202eAna Ortiz"}, "control or formatting characters"),
        ({"purpose": "housing"}, "unknown purpose"),
        ({"method": "telepathy"}, "unknown consent method"),
        ({"survivor_pseudonym": "Mirelka Dovanto"}, "never use a name"),
        ({"survivor_pseudonym": "short"}, "opaque random token"),
    ],
)
def test_consent_refuses_invalid_records(changes: dict[str, object], words: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        make_consent(**changes)
    assert words in str(caught.value)


def test_consent_is_frozen() -> None:
    consent = make_consent()
    with pytest.raises(dataclasses.FrozenInstanceError):
        consent.recipient_agency_id = OTHER_ID  # type: ignore[misc]


# --- check_covers: the gate of `tessera referral send` -----------------------------------------


def test_check_covers_passes_for_recipient_purpose_and_every_consented_field() -> None:
    consent = make_consent()
    check_covers(consent, RECIPIENT_ID, NeedCategory.IMMIGRATION, sorted(consent.fields), NOW)
    check_covers(consent, RECIPIENT_ID, "immigration", ["prs_Citizenship"], NOW)  # type: ignore[arg-type]
    check_covers(consent, RECIPIENT_ID, NeedCategory.IMMIGRATION, [], NOW)


def refused(
    consent: Consent,
    recipient: str = RECIPIENT_ID,
    purpose: NeedCategory = NeedCategory.IMMIGRATION,
    fields: tuple[str, ...] = ("prs_Gender",),
    *,
    now: datetime = NOW,
    note: str = "",
) -> ConsentRefused:
    with pytest.raises(ConsentRefused) as caught:
        check_covers(consent, recipient, purpose, fields, now, note=note)
    assert isinstance(caught.value, Refused)
    assert caught.value.hint  # every refusal says what to do
    return caught.value


def test_revoked_consent_is_refused() -> None:
    error = refused(make_consent(revoked_at=NOW - timedelta(hours=1)))
    assert error.reason is Refusal.REVOKED
    assert "was revoked" in error.message
    assert "tessera consent grant" in str(error.hint)


def test_expired_consent_is_refused_from_its_expiry_instant() -> None:
    consent = make_consent()
    error = refused(consent, now=consent.expires_at)
    assert error.reason is Refusal.EXPIRED
    assert "expired at" in error.message
    assert "later expiry" in str(error.hint)


def test_consent_not_yet_valid_is_refused() -> None:
    error = refused(make_consent(granted_at=NOW + timedelta(hours=1)))
    assert error.reason is Refusal.NOT_YET_VALID
    assert "valid only from" in error.message


def test_other_recipient_is_refused() -> None:
    error = refused(make_consent(), OTHER_ID)
    assert error.reason is Refusal.OTHER_RECIPIENT
    assert f"to agency {RECIPIENT_ID} only" in error.message
    assert f"--to {OTHER_ID}" in str(error.hint)


def test_other_purpose_is_refused() -> None:
    error = refused(make_consent(), RECIPIENT_ID, NeedCategory.SAFE_HOUSING)
    assert error.reason is Refusal.OTHER_PURPOSE
    assert "for purpose immigration, not safe_housing" in error.message
    assert "--purpose safe_housing" in str(error.hint)


def test_field_outside_the_consented_categories_is_refused_by_name_and_category() -> None:
    fields = ("prs_Gender", "prs_FirstName", "vic_TypeOfExploitation", "prs_Birthdate")
    error = refused(make_consent(), RECIPIENT_ID, NeedCategory.IMMIGRATION, fields)
    assert error.reason is Refusal.FIELD_NOT_COVERED
    assert error.fields == ("prs_FirstName", "vic_TypeOfExploitation", "prs_Birthdate")
    assert "prs_FirstName (category 'identity')" in error.message
    assert "vic_TypeOfExploitation (category 'exploitation')" in error.message
    assert "prs_Gender" not in error.message  # a covered field is not blamed
    hint = str(error.hint)
    assert "tessera consent grant --case case-0042 --to legal-aid-02" in hint
    assert "--categories contact,demographics,exploitation,identity" in hint


def test_a_name_that_is_no_htcds_field_is_invalid_input_with_a_suggestion() -> None:
    consent = make_consent()
    with pytest.raises(InvalidInput) as caught:
        check_covers(consent, RECIPIENT_ID, NeedCategory.IMMIGRATION, ["prs_First_Name"], NOW)
    assert "did you mean prs_FirstName" in str(caught.value)
    with pytest.raises(InvalidInput):
        check_covers(consent, RECIPIENT_ID, NeedCategory.IMMIGRATION, "prs_Gender", NOW)


def test_a_note_needs_the_notes_category() -> None:
    error = refused(make_consent(), note="Prefers a female lawyer.")
    assert error.reason is Refusal.NOTE_NOT_COVERED
    consent = make_consent(categories=frozenset({"contact", "notes"}))
    check_covers(consent, RECIPIENT_ID, NeedCategory.IMMIGRATION, [], NOW, note="Some text.")


def test_check_covers_needs_an_aware_now() -> None:
    with pytest.raises(InvalidInput):
        check_covers(
            make_consent(), RECIPIENT_ID, NeedCategory.IMMIGRATION, [], NOW.replace(tzinfo=None)
        )


# --- minimise: data minimisation in code --------------------------------------------------------


@pytest.mark.parametrize(
    "categories",
    [
        {"identity"},
        {"contact"},
        {"demographics"},
        {"exploitation"},
        {"case"},
        {"needs"},
        {"identity", "demographics"},
        {"contact", "exploitation", "notes"},
        set(DATA_CATEGORIES),
    ],
)
def test_minimise_keeps_only_consented_fields(categories: set[str]) -> None:
    consent = make_consent(categories=frozenset(categories))
    allowed = fields_in(categories)
    for case in synthetic_records(40, seed=7):
        case_with_extras = {**case, "tessera_case_id": "case-0042", "notes": "private"}
        kept = minimise(case_with_extras, consent)
        assert set(kept) <= allowed
        assert kept == {name: value for name, value in case.items() if name in allowed and value}
        order = [FIELD_NAMES.index(name) for name in kept]
        assert order == sorted(order)  # HTCDS column order
        dropped = set(case) - allowed
        assert not dropped & set(kept)


def test_minimise_drops_empty_values() -> None:
    consent = make_consent()
    assert minimise({"prs_Gender": "", "prs_Citizenship": "NG"}, consent) == {
        "prs_Citizenship": "NG"
    }


# --- receipts and commitments -------------------------------------------------------------------


def test_receipt_holds_the_consent_and_a_pseudonym_never_the_case() -> None:
    consent = make_consent(categories=frozenset({"identity", "notes"}))
    blob = receipt_blob(SENDER, SENDER_ID, consent)
    crypto.verify(SENDER.public, labels.LABEL_CONSENT_RECEIPT, blob.body, blob.signature)
    assert blob.signer == SENDER.public.signing_key
    receipt = parsed(blob)
    assert receipt.consent_id == CONSENT_ID
    assert receipt.sending_agency_id == SENDER_ID
    assert receipt.receiving_agency_id == RECIPIENT_ID
    assert receipt.purpose == common_pb.NEED_CATEGORY_IMMIGRATION
    assert list(receipt.data_categories) == sorted(DATA_CATEGORIES["identity"])
    assert receipt.method == consent_pb.CONSENT_METHOD_VERBAL
    assert receipt.witnessed_by == "staff:Ana Ortiz"
    assert receipt.survivor_pseudonym == PSEUDONYM
    assert receipt.granted_at.ToDatetime(tzinfo=UTC) == consent.granted_at
    assert receipt.expires_at.ToDatetime(tzinfo=UTC) == consent.expires_at
    assert b"case-0042" not in blob.body


def test_no_receipt_naming_the_sender_as_its_recipient() -> None:
    with pytest.raises(InvalidInput, match="sending agency as its recipient"):
        receipt_blob(SENDER, RECIPIENT_ID, make_consent())


def test_no_receipt_for_a_revoked_consent() -> None:
    with pytest.raises(ConsentRefused) as caught:
        receipt_blob(SENDER, SENDER_ID, make_consent(revoked_at=NOW))
    assert caught.value.reason is Refusal.REVOKED


def test_commitment_is_the_labelled_digest_of_the_receipt_body() -> None:
    blob = receipt_blob(SENDER, SENDER_ID, make_consent())
    value = commitment(blob)
    assert value == crypto.digest(labels.LABEL_CONSENT_COMMITMENT, blob.body)
    assert len(value) == 32
    assert commitment(receipt_blob(SENDER, SENDER_ID, make_consent())) == value  # deterministic
    verified = verify_receipt(blob, SENDER.public, SENDER_ID, RECIPIENT_ID, NOW)
    assert verified.commitment == value == commitment(verified)


@pytest.mark.parametrize(
    "changes",
    [
        {"consent_id": str(uuid.UUID(int=1))},
        {"recipient_agency_id": OTHER_ID},
        {"purpose": NeedCategory.LEGAL_CIVIL},
        {"categories": frozenset({"contact"})},
        {"method": ConsentMethod.ELECTRONIC},
        {"witnessed_by": "staff:Ben Okafor"},
        {"granted_at": NOW - timedelta(days=1, seconds=1)},
        {"expires_at": NOW + timedelta(days=30, seconds=1)},
        {"survivor_pseudonym": PSEUDONYM + "x"},
    ],
)
def test_commitment_changes_when_any_receipt_field_changes(changes: dict[str, object]) -> None:
    base = commitment(receipt_blob(SENDER, SENDER_ID, make_consent()))
    assert commitment(receipt_blob(SENDER, SENDER_ID, make_consent(**changes))) != base


def test_commitment_binds_the_sending_agency_but_not_the_case() -> None:
    base = commitment(receipt_blob(SENDER, SENDER_ID, make_consent()))
    assert commitment(receipt_blob(SENDER, "shelter-south-09", make_consent())) != base
    # The case id never leaves the node, so it cannot change what the broker sees.
    assert commitment(receipt_blob(SENDER, SENDER_ID, make_consent(case_id="case-9"))) == base


def test_verify_receipt_returns_the_verified_consent() -> None:
    consent = make_consent()
    blob = receipt_blob(SENDER, SENDER_ID, consent)
    for sender in (SENDER.public, record(SENDER, SENDER_ID)):
        verified = verify_receipt(
            blob, sender, SENDER_ID, RECIPIENT_ID, NOW, expected_purpose=NeedCategory.IMMIGRATION
        )
        assert verified.consent_id == CONSENT_ID
        assert verified.purpose is NeedCategory.IMMIGRATION
        assert verified.fields == tuple(sorted(consent.fields))
        assert verified.method is ConsentMethod.VERBAL
        assert verified.survivor_pseudonym == PSEUDONYM
        assert verified.covers("prs_MobilePhone")
        assert not verified.covers("prs_FirstName")
        assert verified.to_blob() == blob


def test_a_verified_receipt_cannot_be_made_by_hand() -> None:
    with pytest.raises(InvalidInput):
        VerifiedReceipt(
            consent_id=CONSENT_ID,
            sending_agency_id=SENDER_ID,
            receiving_agency_id=RECIPIENT_ID,
            purpose=NeedCategory.MEDICAL,
            fields=(),
            method=ConsentMethod.VERBAL,
            witnessed_by="x",
            granted_at=NOW,
            expires_at=NOW,
            survivor_pseudonym=PSEUDONYM,
            body=b"",
            signature=b"",
            signer=b"",
        )


def test_forged_receipt_signed_by_another_key_is_refused() -> None:
    forged = receipt_blob(MALLORY, SENDER_ID, make_consent())
    with pytest.raises(BadSignature, match="not by the key pinned"):
        verify_receipt(forged, SENDER.public, SENDER_ID, RECIPIENT_ID, NOW)
    # Claiming the pinned key as signer does not help: the signature is still Mallory's.
    forged.signer = SENDER.public.signing_key
    with pytest.raises(BadSignature, match="does not verify"):
        verify_receipt(forged, record(SENDER, SENDER_ID), SENDER_ID, RECIPIENT_ID, NOW)


def test_edited_receipt_body_is_refused() -> None:
    blob = receipt_blob(SENDER, SENDER_ID, make_consent())
    receipt = parsed(blob)
    receipt.data_categories.extend(sorted(DATA_CATEGORIES["identity"]))
    receipt.data_categories.sort()
    edited = common_pb.SignedBlob(
        body=receipt.SerializeToString(), signature=blob.signature, signer=blob.signer
    )
    with pytest.raises(BadSignature):
        verify_receipt(edited, SENDER.public, SENDER_ID, RECIPIENT_ID, NOW)
    flipped = bytearray(blob.body)
    flipped[-1] ^= 1
    edited.body = bytes(flipped)
    with pytest.raises(BadSignature):
        verify_receipt(edited, SENDER.public, SENDER_ID, RECIPIENT_ID, NOW)


def test_receipt_signed_under_another_label_is_refused() -> None:
    blob = receipt_blob(SENDER, SENDER_ID, make_consent())
    other = signed(SENDER, blob.body, labels.LABEL_KEY_ROTATION)
    with pytest.raises(BadSignature):
        verify_receipt(other, SENDER.public, SENDER_ID, RECIPIENT_ID, NOW)


def test_receipt_for_another_recipient_is_refused() -> None:
    blob = receipt_blob(SENDER, SENDER_ID, make_consent(recipient_agency_id=OTHER_ID))
    with pytest.raises(ConsentRefused) as caught:
        verify_receipt(blob, SENDER.public, SENDER_ID, RECIPIENT_ID, NOW)
    assert caught.value.reason is Refusal.OTHER_RECIPIENT
    assert OTHER_ID in caught.value.message


def test_receipt_naming_another_sender_is_refused() -> None:
    blob = receipt_blob(SENDER, OTHER_ID, make_consent())
    with pytest.raises(ConsentRefused) as caught:
        verify_receipt(blob, SENDER.public, SENDER_ID, RECIPIENT_ID, NOW)
    assert caught.value.reason is Refusal.OTHER_SENDER


def test_expired_receipt_is_refused() -> None:
    consent = make_consent()
    blob = receipt_blob(SENDER, SENDER_ID, consent)
    with pytest.raises(ConsentRefused) as caught:
        verify_receipt(blob, SENDER.public, SENDER_ID, RECIPIENT_ID, consent.expires_at)
    assert caught.value.reason is Refusal.EXPIRED


def test_receipt_from_the_future_is_refused_beyond_the_clock_skew() -> None:
    blob = receipt_blob(SENDER, SENDER_ID, make_consent(granted_at=NOW + timedelta(minutes=2)))
    verify_receipt(blob, SENDER.public, SENDER_ID, RECIPIENT_ID, NOW)  # within 5 minutes
    blob = receipt_blob(SENDER, SENDER_ID, make_consent(granted_at=NOW + timedelta(hours=1)))
    with pytest.raises(ConsentRefused) as caught:
        verify_receipt(blob, SENDER.public, SENDER_ID, RECIPIENT_ID, NOW)
    assert caught.value.reason is Refusal.NOT_YET_VALID


def test_receipt_for_another_purpose_is_refused() -> None:
    blob = receipt_blob(SENDER, SENDER_ID, make_consent())
    with pytest.raises(ConsentRefused) as caught:
        verify_receipt(
            blob, SENDER.public, SENDER_ID, RECIPIENT_ID, NOW, expected_purpose=NeedCategory.MEDICAL
        )
    assert caught.value.reason is Refusal.OTHER_PURPOSE


def test_receipt_of_a_revoked_agency_is_refused() -> None:
    blob = receipt_blob(SENDER, SENDER_ID, make_consent())
    with pytest.raises(Refused, match="revoked"):
        verify_receipt(blob, record(SENDER, SENDER_ID, revoked=True), SENDER_ID, RECIPIENT_ID, NOW)


def test_receipt_of_an_agency_whose_keys_lapsed_is_refused() -> None:
    blob = receipt_blob(SENDER, SENDER_ID, make_consent())
    lapsed = dataclasses.replace(record(SENDER, SENDER_ID), valid_until=NOW)
    with pytest.raises(Refused, match="keys expired"):
        verify_receipt(blob, lapsed, SENDER_ID, RECIPIENT_ID, NOW)


def test_receipt_checked_against_the_wrong_directory_record_is_refused() -> None:
    blob = receipt_blob(SENDER, SENDER_ID, make_consent())
    with pytest.raises(InvalidInput, match="not the sender"):
        verify_receipt(blob, record(SENDER, OTHER_ID), SENDER_ID, RECIPIENT_ID, NOW)


def _receipt_body(**changes: object) -> bytes:
    receipt = parsed(receipt_blob(SENDER, SENDER_ID, make_consent()))
    for name, value in changes.items():
        if name == "data_categories":
            del receipt.data_categories[:]
            receipt.data_categories.extend(value)  # type: ignore[arg-type]
        elif name in ("granted_at", "expires_at"):
            receipt.ClearField(name)  # type: ignore[arg-type]
        else:
            setattr(receipt, name, value)
    return receipt.SerializeToString()


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"\xff\xff", "not a ConsentReceipt"),
        (b"", "1 to 16384 bytes"),
        (b"\x00" * (16 * 1024 + 1), "1 to 16384 bytes"),  # refused before any work on it
        (_receipt_body(data_categories=["prs_Gender", "prs_Citizenship"]), "ascending"),
        (_receipt_body(data_categories=["prs_Gender", "prs_Gender"]), "ascending"),
        (_receipt_body(data_categories=["prs_*"]), "not HTCDS fields"),
        (_receipt_body(method=consent_pb.CONSENT_METHOD_UNSPECIFIED), "method"),
        (_receipt_body(purpose=common_pb.NEED_CATEGORY_UNSPECIFIED), "need category"),
        (_receipt_body(expires_at=None), "missing"),
        (_receipt_body(consent_id="1"), "UUID"),
        (_receipt_body(survivor_pseudonym="Mirelka Dovanto"), "pseudonym"),
        (_receipt_body(witnessed_by=""), "witnessed_by"),
    ],
)
def test_malformed_receipt_signed_by_the_sender_is_invalid_input(body: bytes, words: str) -> None:
    with pytest.raises(InvalidInput, match=words):
        verify_receipt(signed(SENDER, body), SENDER.public, SENDER_ID, RECIPIENT_ID, NOW)


def test_datetimes_in_other_time_zones_are_compared_as_instants() -> None:
    plus_two = timezone(timedelta(hours=2))
    consent = make_consent(expires_at=(NOW + timedelta(hours=1)).astimezone(plus_two))
    check_covers(consent, RECIPIENT_ID, NeedCategory.IMMIGRATION, [], NOW.astimezone(plus_two))
    blob = receipt_blob(SENDER, SENDER_ID, consent)
    verified = verify_receipt(blob, SENDER.public, SENDER_ID, RECIPIENT_ID, NOW)
    assert verified.expires_at == consent.expires_at


def test_docs_category_table_matches_the_code() -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "referrals.md").read_text("utf-8")
    table: dict[str, set[str]] = {}
    for line in text.splitlines():
        match = re.fullmatch(r"\| `([a-z]+)` \| (.*) \|", line)
        if match and match.group(1) in DATA_CATEGORIES:
            table[match.group(1)] = set(re.findall(r"`([a-z]+_[A-Za-z]+)`", match.group(2)))
    assert table == {name: set(members) for name, members in DATA_CATEGORIES.items()}
