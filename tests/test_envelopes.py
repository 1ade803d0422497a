"""node.envelopes: building, sealing and opening the four kinds of envelope, and attacks on them.

DESIGN.md sections 5 and 6, referral.proto. Real PyNaCl keys (fixed seeds): Alice's shelter refers
a survivor to Bob's legal aid; Mallory is a third enrolled agency. Attacks that the builders would
refuse are crafted by hand with tessera.crypto.seal, as a malicious node would.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest

from node.consent import (
    Consent,
    ConsentRefused,
    Refusal,
    commitment,
    minimise,
    receipt_blob,
)
from node.envelopes import (
    DeclineReason,
    EnvelopeKind,
    EnvelopeLimits,
    ReceivedPurgeConfirmation,
    ReceivedReferral,
    ReceivedRevocation,
    ReceivedStatus,
    ReferralStatus,
    label_for,
    open_envelope,
    purge_confirmation_envelope,
    referral_envelope,
    revocation_envelope,
    status_envelope,
)
from node.htcds.catalogue import DATA_CATEGORIES
from node.htcds.synthetic import synthetic_records
from tessera import crypto, labels
from tessera.directory import AgencyRecord
from tessera.errors import BadSignature, InvalidInput, Refused, WrongRecipient
from tessera.needs import NeedCategory
from tessera.v1 import common_pb2 as common_pb
from tessera.v1 import consent_pb2 as consent_pb
from tessera.v1 import referral_pb2 as referral_pb

# The consent record and directory record factories are test_consent's; its agencies are these.
from tests.test_consent import CONSENT_ID, NOW, make_consent, record
from tests.test_consent import OTHER_ID as MALLORY_ID
from tests.test_consent import RECIPIENT_ID as BOB_ID
from tests.test_consent import SENDER_ID as ALICE_ID

ALICE = crypto.Identity.from_seed(bytes([11]) * 32)
BOB = crypto.Identity.from_seed(bytes([12]) * 32)
MALLORY = crypto.Identity.from_seed(bytes([13]) * 32)
REFERRAL_ID = "5c3e1f0a-7b2d-4e9c-8f61-a4b2c3d4e5f6"
MESSAGE_ID = "9e8d7c6b-5a49-4838-a271-6f5e4d3c2b1a"
MESSAGE_2 = "1a2b3c4d-5e6f-4a8b-9c0d-e1f2a3b4c5d6"
CASE = synthetic_records(1, seed=3)[0]


ALICE_RECORD, BOB_RECORD, MALLORY_RECORD = (
    record(ALICE, ALICE_ID),
    record(BOB, BOB_ID),
    record(MALLORY, MALLORY_ID),
)


def consent(**changes: object) -> Consent:
    # Identity and demographics: names travel (so the tests can look for them), contact does not.
    return make_consent(**{"categories": frozenset({"identity", "demographics"}), **changes})


CONSENT = consent()
RECEIPT = receipt_blob(ALICE, ALICE_ID, CONSENT)
FIELDS = minimise(CASE, CONSENT)


def send_referral(**changes: object) -> bytes:
    args: dict[str, object] = {
        "sender": ALICE,
        "sender_id": ALICE_ID,
        "recipient": BOB_RECORD,
        "referral_id": REFERRAL_ID,
        "need": NeedCategory.IMMIGRATION,
        "fields": FIELDS,
        "note": "Needs an interpreter for the first meeting.",
        "receipt_blob": RECEIPT,
        "now": NOW,
        "message_id": MESSAGE_ID,
    }
    args.update(changes)
    return referral_envelope(**args)  # type: ignore[arg-type]


def bob_opens(sealed: bytes, sender: AgencyRecord = ALICE_RECORD, **kw: object) -> object:
    return open_envelope(BOB, BOB_ID, sender, sealed, NOW, **kw)  # type: ignore[arg-type]


def content(
    *,
    sender_id: str = ALICE_ID,
    recipient_id: str = BOB_ID,
    referral: referral_pb.Referral | None = None,
    status: referral_pb.StatusUpdate | None = None,
) -> referral_pb.EnvelopeContent:
    message = referral_pb.EnvelopeContent(
        message_id=MESSAGE_ID, sender_agency_id=sender_id, recipient_agency_id=recipient_id
    )
    message.created_at.FromDatetime(NOW)
    if referral is not None:
        message.referral.CopyFrom(referral)
    if status is not None:
        message.status_update.CopyFrom(status)
    return message


def referral_message(
    receipt: common_pb.SignedBlob = RECEIPT,
    fields: dict[str, str] | None = None,
    need: common_pb.NeedCategory.ValueType = common_pb.NEED_CATEGORY_IMMIGRATION,
) -> referral_pb.Referral:
    message = referral_pb.Referral(referral_id=REFERRAL_ID, need=need, consent_receipt=receipt)
    for name, value in (FIELDS if fields is None else fields).items():
        message.fields.add(name=name, value=value)
    message.sent_at.FromDatetime(NOW)
    return message


def hand_sealed(
    message: referral_pb.EnvelopeContent,
    label: bytes = labels.LABEL_ENVELOPE,
    signer: crypto.Identity = ALICE,
    to: crypto.Identity = BOB,
) -> bytes:
    return crypto.seal(signer, to.public, label, message.SerializeToString())


# --- round trips --------------------------------------------------------------------------------


def test_referral_round_trip() -> None:
    sealed = send_referral(sender_contact="ana.ortiz@shelter.example")
    for value in FIELDS.values():  # the broker sees ciphertext only
        assert len(value) < 8 or value.encode() not in sealed
    received = bob_opens(sealed, delivery_commitment=commitment(RECEIPT))
    assert isinstance(received, ReceivedReferral)
    assert received.kind is EnvelopeKind.REFERRAL
    assert received.message_id == MESSAGE_ID
    assert received.sender_agency_id == ALICE_ID
    assert received.referral_id == REFERRAL_ID
    assert received.need is NeedCategory.IMMIGRATION
    assert dict(received.fields) == FIELDS
    assert set(received.fields) <= CONSENT.fields
    assert received.note == "Needs an interpreter for the first meeting."
    assert received.sender_contact == "ana.ortiz@shelter.example"
    assert received.sent_at == received.created_at == NOW
    assert received.receipt.consent_id == CONSENT_ID
    assert received.receipt.survivor_pseudonym == CONSENT.survivor_pseudonym
    assert received.commitment == commitment(RECEIPT)
    assert CASE["prs_FirstName"] not in repr(received)  # survivor data stays out of logs


def test_received_results_are_frozen_and_read_only() -> None:
    received = bob_opens(send_referral())
    assert isinstance(received, ReceivedReferral)
    with pytest.raises(dataclasses.FrozenInstanceError):
        received.need = NeedCategory.MEDICAL  # type: ignore[misc]
    with pytest.raises(TypeError):
        received.fields["prs_FirstName"] = "someone else"  # type: ignore[index]


@pytest.mark.parametrize(
    ("status", "reason", "text"),
    [
        (ReferralStatus.DELIVERED, None, ""),
        (ReferralStatus.ACCEPTED, None, ""),
        (ReferralStatus.DECLINED, DeclineReason.NO_CAPACITY, ""),
        (ReferralStatus.DECLINED, DeclineReason.OTHER, "Only serving minors this year."),
        (ReferralStatus.COMPLETED, None, ""),
    ],
)
def test_status_round_trip(status: ReferralStatus, reason: DeclineReason | None, text: str) -> None:
    at = NOW - timedelta(minutes=3)
    sealed = status_envelope(
        BOB, BOB_ID, ALICE_RECORD, REFERRAL_ID, status, reason, text, NOW, MESSAGE_2, status_at=at
    )
    received = open_envelope(ALICE, ALICE_ID, BOB_RECORD, sealed, NOW, delivery_commitment=b"")
    assert received == ReceivedStatus(
        message_id=MESSAGE_2,
        sender_agency_id=BOB_ID,
        created_at=NOW,
        referral_id=REFERRAL_ID,
        status=status,
        decline_reason=reason,
        decline_text=text,
        status_at=at,
    )


def test_revocation_round_trip() -> None:
    revoked_at = NOW - timedelta(hours=2)
    sealed = revocation_envelope(
        ALICE, ALICE_ID, BOB_RECORD, REFERRAL_ID, CONSENT_ID, revoked_at, NOW, MESSAGE_2
    )
    received = bob_opens(sealed)
    assert received == ReceivedRevocation(
        message_id=MESSAGE_2,
        sender_agency_id=ALICE_ID,
        created_at=NOW,
        referral_id=REFERRAL_ID,
        consent_id=CONSENT_ID,
        revoked_at=revoked_at,
    )


def test_purge_confirmation_round_trip() -> None:
    purged = ["prs_Gender", "prs_FirstName", "prs_Citizenship"]
    sealed = purge_confirmation_envelope(
        BOB, BOB_ID, ALICE_RECORD, REFERRAL_ID, CONSENT_ID, purged, NOW, NOW, MESSAGE_2
    )
    received = open_envelope(ALICE, ALICE_ID, BOB_RECORD, sealed, NOW)
    assert isinstance(received, ReceivedPurgeConfirmation)
    assert received.purged_fields == tuple(sorted(purged))
    assert (received.referral_id, received.consent_id) == (REFERRAL_ID, CONSENT_ID)
    assert received.purged_at == NOW


def test_each_kind_is_sealed_under_the_label_the_contract_names() -> None:
    assert label_for(EnvelopeKind.REFERRAL) == labels.LABEL_ENVELOPE
    for kind in (
        EnvelopeKind.STATUS_UPDATE,
        EnvelopeKind.REVOCATION,
        EnvelopeKind.PURGE_CONFIRMATION,
    ):
        assert label_for(kind) == labels.LABEL_STATUS
    crypto.open_sealed(BOB, ALICE.public, labels.LABEL_ENVELOPE, send_referral())
    revocation = revocation_envelope(
        ALICE, ALICE_ID, BOB_RECORD, REFERRAL_ID, CONSENT_ID, NOW, NOW, MESSAGE_2
    )
    crypto.open_sealed(BOB, ALICE.public, labels.LABEL_STATUS, revocation)
    with pytest.raises(BadSignature):
        crypto.open_sealed(BOB, ALICE.public, labels.LABEL_ENVELOPE, revocation)


# --- the sender refuses to build what the receiver must refuse ----------------------------------


def test_builder_refuses_fields_outside_the_receipt() -> None:
    with pytest.raises(ConsentRefused) as caught:
        send_referral(fields={**FIELDS, "vic_TypeOfExploitation": CASE["vic_TypeOfExploitation"]})
    assert caught.value.reason is Refusal.FIELD_NOT_COVERED
    assert caught.value.fields == ("vic_TypeOfExploitation",)
    assert "vic_TypeOfExploitation (category 'exploitation')" in caught.value.message
    assert CASE["vic_TypeOfExploitation"] not in str(caught.value)  # names, never values


@pytest.mark.parametrize(
    ("changes", "error", "reason"),
    [
        ({"need": NeedCategory.MEDICAL}, ConsentRefused, Refusal.OTHER_PURPOSE),
        ({"recipient": MALLORY_RECORD}, ConsentRefused, Refusal.OTHER_RECIPIENT),
        ({"now": NOW + timedelta(days=31)}, ConsentRefused, Refusal.EXPIRED),
        ({"receipt_blob": receipt_blob(MALLORY, ALICE_ID, CONSENT)}, BadSignature, None),
        ({"recipient": record(BOB, BOB_ID, revoked=True)}, Refused, None),
        ({"message_id": "not-a-uuid"}, InvalidInput, None),
        ({"referral_id": ""}, InvalidInput, None),
        ({"fields": {"prs_First_Name": "x"}}, InvalidInput, None),
        ({"fields": {"prs_Gender": "x" * 10_001}}, InvalidInput, None),
        ({"now": NOW.replace(tzinfo=None)}, InvalidInput, None),
    ],
)
def test_builder_refuses_bad_referrals(
    changes: dict[str, object], error: type[Exception], reason: Refusal | None
) -> None:
    with pytest.raises(error) as caught:
        send_referral(**changes)
    if reason is not None:
        assert isinstance(caught.value, ConsentRefused)
        assert caught.value.reason is reason


def test_builder_refuses_a_recipient_the_directory_no_longer_trusts() -> None:
    # Sealing to keys past their valid_until would hand survivor data to whoever still holds them.
    lapsed = dataclasses.replace(BOB_RECORD, valid_until=NOW)
    with pytest.raises(Refused, match="keys expired"):
        send_referral(recipient=lapsed)
    with pytest.raises(InvalidInput, match="to itself"):
        send_referral(recipient=ALICE_RECORD)


def test_builder_refuses_an_envelope_over_the_size_limit() -> None:
    with pytest.raises(InvalidInput, match="a sealed envelope is at most 512"):
        send_referral(limits=EnvelopeLimits(max_sealed_bytes=512))


@pytest.mark.parametrize(
    ("status", "reason", "text", "words"),
    [
        (ReferralStatus.DECLINED, None, "", "needs a decline reason"),
        (ReferralStatus.DECLINED, DeclineReason.OTHER, " ", "needs a decline text"),
        (ReferralStatus.ACCEPTED, DeclineReason.NO_CAPACITY, "", "only a DECLINED status"),
        (ReferralStatus.COMPLETED, None, "why", "only a DECLINED status"),
        ("lost", None, "", "unknown referral status"),
    ],
)
def test_builder_refuses_inconsistent_statuses(
    status: ReferralStatus, reason: DeclineReason | None, text: str, words: str
) -> None:
    with pytest.raises(InvalidInput, match=words):
        status_envelope(
            BOB, BOB_ID, ALICE_RECORD, REFERRAL_ID, status, reason, text, NOW, MESSAGE_2
        )


# --- attacks on the receiving side --------------------------------------------------------------


def test_forged_receipt_signed_by_another_key_is_refused() -> None:
    forged = receipt_blob(MALLORY, ALICE_ID, CONSENT)
    sealed = hand_sealed(content(referral=referral_message(receipt=forged)))
    with pytest.raises(BadSignature, match="consent receipt"):
        bob_opens(sealed)


def test_receipt_for_another_recipient_is_refused() -> None:
    for_mallory = receipt_blob(ALICE, ALICE_ID, consent(recipient_agency_id=MALLORY_ID))
    sealed = hand_sealed(content(referral=referral_message(receipt=for_mallory)))
    with pytest.raises(ConsentRefused) as caught:
        bob_opens(sealed)
    assert caught.value.reason is Refusal.OTHER_RECIPIENT


def test_expired_receipt_is_refused() -> None:
    sealed = send_referral()  # valid when sent...
    later = CONSENT.expires_at + timedelta(seconds=1)
    with pytest.raises(ConsentRefused) as caught:  # ...but opened after the consent lapsed
        open_envelope(BOB, BOB_ID, ALICE_RECORD, sealed, later)
    assert caught.value.reason is Refusal.EXPIRED


def test_edited_receipt_body_is_refused() -> None:
    receipt = consent_pb.ConsentReceipt()
    receipt.ParseFromString(RECEIPT.body)
    receipt.data_categories.extend(sorted(DATA_CATEGORIES["exploitation"]))
    receipt.data_categories.sort()
    edited = common_pb.SignedBlob(
        body=receipt.SerializeToString(), signature=RECEIPT.signature, signer=RECEIPT.signer
    )
    smuggled = {**FIELDS, "vic_TypeOfExploitation": CASE["vic_TypeOfExploitation"]}
    sealed = hand_sealed(content(referral=referral_message(receipt=edited, fields=smuggled)))
    with pytest.raises(BadSignature, match="does not verify"):
        bob_opens(sealed)


def test_referral_smuggling_a_field_outside_the_receipt_is_refused() -> None:
    smuggled = {**FIELDS, "prs_MobilePhone": CASE["prs_MobilePhone"]}
    sealed = hand_sealed(content(referral=referral_message(fields=smuggled)))
    with pytest.raises(ConsentRefused) as caught:
        bob_opens(sealed)
    assert caught.value.reason is Refusal.FIELD_NOT_COVERED
    assert caught.value.fields == ("prs_MobilePhone",)
    assert "prs_MobilePhone (category 'contact')" in caught.value.message
    assert CASE["prs_MobilePhone"] not in str(caught.value)


def test_receipt_naming_another_sender_is_refused() -> None:
    # Mallory signs a receipt claiming Alice recorded the consent, and sends the referral herself.
    claimed = receipt_blob(MALLORY, ALICE_ID, consent())
    message = content(sender_id=MALLORY_ID, referral=referral_message(receipt=claimed))
    with pytest.raises(ConsentRefused) as caught:
        bob_opens(hand_sealed(message, signer=MALLORY), sender=MALLORY_RECORD)
    assert caught.value.reason is Refusal.OTHER_SENDER


def test_referral_for_another_need_than_the_receipt_is_refused() -> None:
    message = referral_message(need=common_pb.NEED_CATEGORY_LEGAL_CIVIL)
    with pytest.raises(ConsentRefused) as caught:
        bob_opens(hand_sealed(content(referral=message)))
    assert caught.value.reason is Refusal.OTHER_PURPOSE


def test_payload_edited_in_transit_is_refused() -> None:
    sealed = bytearray(send_referral())
    sealed[len(sealed) // 2] ^= 0x01
    with pytest.raises(WrongRecipient):
        bob_opens(bytes(sealed))
    with pytest.raises(WrongRecipient):
        bob_opens(bytes(sealed[:-1]))


def test_payload_edited_and_resealed_by_another_agency_is_refused() -> None:
    # Mallory cannot open Alice's envelope; the best she can do is seal an edited copy herself.
    edited = content(referral=referral_message())
    edited.referral.fields[0].value = "edited"
    with pytest.raises(BadSignature, match="not signed by shelter-north-01"):
        bob_opens(hand_sealed(edited, signer=MALLORY))


def test_envelope_sealed_to_someone_else_is_refused() -> None:
    sealed = send_referral(
        recipient=MALLORY_RECORD,
        receipt_blob=receipt_blob(ALICE, ALICE_ID, consent(recipient_agency_id=MALLORY_ID)),
    )
    with pytest.raises(WrongRecipient):
        bob_opens(sealed)


def test_content_naming_another_recipient_is_refused() -> None:
    sealed = hand_sealed(content(recipient_id=MALLORY_ID, referral=referral_message()))
    with pytest.raises(WrongRecipient, match="addressed to 'clinic-03'"):
        bob_opens(sealed)


def test_status_sealed_with_the_referral_label_is_refused() -> None:
    status = referral_pb.StatusUpdate(
        referral_id=REFERRAL_ID, status=referral_pb.REFERRAL_STATUS_ACCEPTED
    )
    status.status_at.FromDatetime(NOW)
    message = content(sender_id=BOB_ID, recipient_id=ALICE_ID, status=status)
    sealed = hand_sealed(message, label=labels.LABEL_ENVELOPE, signer=BOB, to=ALICE)
    with pytest.raises(BadSignature, match="kind/label mismatch"):
        open_envelope(ALICE, ALICE_ID, BOB_RECORD, sealed, NOW)
    # The same status under its own label opens.
    sealed = hand_sealed(message, label=labels.LABEL_STATUS, signer=BOB, to=ALICE)
    assert isinstance(open_envelope(ALICE, ALICE_ID, BOB_RECORD, sealed, NOW), ReceivedStatus)


def test_referral_sealed_with_the_status_label_is_refused() -> None:
    sealed = hand_sealed(content(referral=referral_message()), label=labels.LABEL_STATUS)
    with pytest.raises(BadSignature, match="kind/label mismatch"):
        bob_opens(sealed)


def test_content_whose_sender_differs_from_the_transport_sender_is_refused() -> None:
    # Alice signs, but the content claims Mallory wrote it.
    sealed = hand_sealed(content(sender_id=MALLORY_ID, referral=referral_message()))
    with pytest.raises(BadSignature, match="claims to come from 'clinic-03'"):
        bob_opens(sealed)
    # Mallory signs content claiming to be Alice; opened as from Alice, her key does not verify.
    status = revocation_envelope(
        MALLORY, ALICE_ID, BOB_RECORD, REFERRAL_ID, CONSENT_ID, NOW, NOW, MESSAGE_2
    )
    with pytest.raises(BadSignature):
        bob_opens(status)
    # Opened as from Mallory (the broker's transport sender), the content's sender id is wrong.
    with pytest.raises(BadSignature, match="claims to come from"):
        bob_opens(status, sender=MALLORY_RECORD)


def test_envelope_from_a_revoked_agency_is_refused() -> None:
    revoked = record(ALICE, ALICE_ID, revoked=True)
    with pytest.raises(Refused, match="revoked"):
        bob_opens(send_referral(), sender=revoked)
    revocation = revocation_envelope(
        ALICE, ALICE_ID, BOB_RECORD, REFERRAL_ID, CONSENT_ID, NOW, NOW, MESSAGE_2
    )
    with pytest.raises(Refused, match="revoked"):
        bob_opens(revocation, sender=revoked)
    lapsed = dataclasses.replace(ALICE_RECORD, valid_until=NOW - timedelta(seconds=1))
    with pytest.raises(Refused, match="expired"):
        bob_opens(revocation, sender=lapsed)
    with pytest.raises(Refused, match="expired"):
        bob_opens(send_referral(), sender=lapsed)


def test_delivery_commitment_must_match_the_receipt() -> None:
    other = receipt_blob(
        ALICE, ALICE_ID, consent(consent_id="00000000-0000-4000-8000-000000000001")
    )
    with pytest.raises(Refused, match="commitment"):
        bob_opens(send_referral(), delivery_commitment=commitment(other))
    with pytest.raises(Refused, match="commitment"):
        bob_opens(send_referral(), delivery_commitment=b"")
    revocation = revocation_envelope(
        ALICE, ALICE_ID, BOB_RECORD, REFERRAL_ID, CONSENT_ID, NOW, NOW, MESSAGE_2
    )
    with pytest.raises(InvalidInput, match="empty consent commitment"):
        bob_opens(revocation, delivery_commitment=commitment(RECEIPT))


def without_receipt() -> referral_pb.EnvelopeContent:
    message = content(referral=referral_message())
    message.referral.ClearField("consent_receipt")
    return message


def with_a_field_twice() -> referral_pb.EnvelopeContent:
    # A consented field repeated with a second value, hoping the receiver keeps the other one.
    message = content(referral=referral_message())
    message.referral.fields.add(name=message.referral.fields[0].name, value="someone else")
    return message


@pytest.mark.parametrize(
    ("message", "words"),
    [
        (content(), "no payload"),
        (without_receipt(), "carries no consent receipt"),
        (with_a_field_twice(), "given twice"),
        (
            content(referral=referral_message(fields={"prs_Gender": "x", "prs_FirstName": "A"})),
            "column order",
        ),
        (
            content(referral=referral_message(fields={"prs_Gender": "x", "prs_Gender ": "y"})),
            "not an HTCDS field",
        ),
    ],
)
def test_malformed_content_is_invalid_input(
    message: referral_pb.EnvelopeContent, words: str
) -> None:
    with pytest.raises(InvalidInput, match=words):
        bob_opens(hand_sealed(message))


def test_message_id_must_be_a_uuid() -> None:
    message = content(referral=referral_message())
    message.message_id = "1"
    with pytest.raises(InvalidInput, match="message_id"):
        bob_opens(hand_sealed(message))


def test_oversized_envelope_is_refused_before_decryption() -> None:
    with pytest.raises(InvalidInput, match="at most"):
        bob_opens(b"\x00" * (1024 * 1024 + 1))
