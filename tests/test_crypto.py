"""Tests for the crypto core (DESIGN.md sections 5 and 7): real PyNaCl, no mocks.

Each property is attacked, not just exercised: flipped bits, swapped labels, moved ciphertexts,
replays, forwarded envelopes. Known answers are pinned, and where a derivation is specified the
test recomputes it independently (with :mod:`hashlib`'s BLAKE2b) so the spec and the code agree.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import stat
import struct
import threading
import unicodedata
from pathlib import Path

import nacl.bindings
import nacl.public
import nacl.signing
import pytest

from tessera import crypto
from tessera.crypto import (
    Argon2Params,
    DataKey,
    Identity,
    KeyEncryptionKey,
    PublicIdentity,
    RequestSignature,
)
from tessera.errors import (
    BadSignature,
    Exhausted,
    InvalidInput,
    KeyFileError,
    ReplayedRequest,
    RequestAuthError,
    StaleRequest,
    TamperedCiphertext,
    WrongPassphrase,
    WrongRecipient,
)
from tessera.labels import (
    LABEL_AUDIT,
    LABEL_BLIND_INDEX,
    LABEL_DIRECTORY_ENTRY,
    LABEL_ENVELOPE,
    LABEL_RELEASE,
    LABEL_STATUS,
)
from tessera.replay import ReplayGuard

KAT_SEED = bytes(range(32))
NOW = 1_750_000_000.0
METHOD = "/tessera.v1.Relay/Send"


def frame(*parts: bytes) -> bytes:
    """The documented encoding (docs/crypto.md), written out independently of the module."""
    return b"".join(len(p).to_bytes(8, "big") + p for p in parts)


def flip(data: bytes, index: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[index] ^= 1 << bit
    return bytes(out)


@pytest.fixture(scope="module")
def alice() -> Identity:
    return Identity.from_seed(b"a" * 32)


@pytest.fixture(scope="module")
def bob() -> Identity:
    return Identity.from_seed(b"b" * 32)


@pytest.fixture(scope="module")
def carol() -> Identity:
    return Identity.from_seed(b"c" * 32)


@pytest.fixture(scope="module")
def kek() -> KeyEncryptionKey:
    return KeyEncryptionKey.from_passphrase(
        "correct horse battery staple", b"s" * 16, Argon2Params.TEST_CHEAP
    )


# --- known answers --------------------------------------------------------------------------


def test_known_answer_public_keys_and_fingerprint() -> None:
    public = Identity.from_seed(KAT_SEED).public
    assert public.signing_key.hex() == (
        "d7396dca6b7c74591c0947a8d09eb232a0955481da44d9f1da7d835739d18d1f"
    )
    assert public.encryption_key.hex() == (
        "94eb3dcf3cb003fc228eded7a09c6a123df4fcea0fb2c126445725f53077fa3d"
    )
    assert public.fingerprint() == "AAVR-7KAH-AF7T-2OGG-A45L-WG3L-BNUR-I7AN"


def test_known_answer_signature() -> None:
    signature = Identity.from_seed(KAT_SEED).sign(LABEL_DIRECTORY_ENTRY, b"agency-a|region-1")
    assert signature.hex() == (
        "0d0e1935fdcdeb5694fdfb06165af0bc760b25faf254804e0e31a87a08247707"
        "407d47a52a01cb8b7713d04efe9d19da1ca95047570aae9e394da905320c7d04"
    )


def test_known_answer_digest() -> None:
    assert crypto.digest(LABEL_AUDIT, b"genesis").hex() == (
        "c15c1ae9ddd71eccbf2a08a15a02365edf20ef73588aa56e923143fd14ffcdda"
    )


def test_key_derivation_matches_documented_recipe() -> None:
    # Recompute the seed -> key derivation with hashlib's independent BLAKE2b.
    def kdf(label: bytes) -> bytes:
        return hashlib.blake2b(
            frame(label), digest_size=32, key=KAT_SEED, person=b"tessera:v1:kdf"
        ).digest()

    public = Identity.from_seed(KAT_SEED).public
    signing_seed = kdf(b"tessera/v1/seed/ed25519")
    x25519_secret = kdf(b"tessera/v1/seed/x25519")
    assert bytes(nacl.signing.SigningKey(signing_seed).verify_key) == public.signing_key
    assert nacl.bindings.crypto_scalarmult_base(x25519_secret) == public.encryption_key
    fingerprint = hashlib.blake2b(
        public.signing_key + public.encryption_key, digest_size=20, person=b"tessera:v1:fpr"
    ).digest()
    text = base64.b32encode(fingerprint).decode()
    assert public.fingerprint() == "-".join(text[i : i + 4] for i in range(0, 32, 4))


def test_signature_covers_framed_label_and_message() -> None:
    identity = Identity.from_seed(KAT_SEED)
    signature = identity.sign(LABEL_RELEASE, b"release-7")
    nacl.signing.VerifyKey(identity.public.signing_key).verify(
        frame(LABEL_RELEASE, b"release-7"), signature
    )


# --- identities -----------------------------------------------------------------------------


def test_public_identity_round_trip_and_validation(alice: Identity) -> None:
    assert PublicIdentity.from_bytes(alice.public.to_bytes()) == alice.public
    with pytest.raises(InvalidInput):
        PublicIdentity.from_bytes(alice.public.to_bytes()[:-1])
    with pytest.raises(InvalidInput):
        PublicIdentity(alice.public.signing_key, b"\x00" * 31)


def test_identity_secret_round_trip_and_generate(alice: Identity) -> None:
    assert Identity.from_secret_bytes(alice.to_secret_bytes()).public == alice.public
    assert Identity.generate().public != Identity.generate().public
    with pytest.raises(InvalidInput):
        Identity.from_seed(b"short")


def test_fingerprint_differs_per_identity_and_is_grouped(alice: Identity, bob: Identity) -> None:
    fingerprint = alice.public.fingerprint()
    assert fingerprint != bob.public.fingerprint()
    groups = fingerprint.split("-")
    assert len(groups) == 8
    assert all(len(g) == 4 and g.isalnum() and g == g.upper() for g in groups)


# --- signatures -----------------------------------------------------------------------------


def test_sign_verify(alice: Identity, bob: Identity) -> None:
    message = b"directory entry for agency A"
    signature = alice.sign(LABEL_DIRECTORY_ENTRY, message)
    crypto.verify(alice.public, LABEL_DIRECTORY_ENTRY, message, signature)
    crypto.verify(alice.public.signing_key, LABEL_DIRECTORY_ENTRY, message, signature)

    with pytest.raises(BadSignature):
        crypto.verify(bob.public, LABEL_DIRECTORY_ENTRY, message, signature)
    with pytest.raises(BadSignature):
        crypto.verify(alice.public, LABEL_DIRECTORY_ENTRY, flip(message, 3), signature)
    with pytest.raises(BadSignature):
        crypto.verify(alice.public, LABEL_DIRECTORY_ENTRY, message, flip(signature, 10))
    with pytest.raises(BadSignature):
        crypto.verify(alice.public, LABEL_RELEASE, message, signature)
    with pytest.raises(BadSignature):
        crypto.verify(alice.public, LABEL_DIRECTORY_ENTRY, message, signature[:-1])


def test_label_and_message_boundary_is_unambiguous(alice: Identity) -> None:
    # Without length prefixes, (b"tessera/x", b"y...") and (b"tessera/xy", b"...") would collide.
    signature = alice.sign(b"tessera/x", b"ymessage")
    with pytest.raises(BadSignature):
        crypto.verify(alice.public, b"tessera/xy", b"message", signature)


def test_labels_must_be_namespaced(alice: Identity) -> None:
    with pytest.raises(InvalidInput):
        alice.sign(b"envelope", b"m")
    with pytest.raises(InvalidInput):
        crypto.digest(b"", b"m")


# --- envelopes ------------------------------------------------------------------------------


def test_envelope_round_trip(alice: Identity, bob: Identity) -> None:
    payload = b"referral: housing; consented fields only"
    sealed = crypto.seal(alice, bob.public, LABEL_ENVELOPE, payload)
    assert payload not in sealed
    assert crypto.open_sealed(bob, alice.public, LABEL_ENVELOPE, sealed) == payload
    assert crypto.seal(alice, bob.public, LABEL_ENVELOPE, payload) != sealed


def test_envelope_wrong_recipient(alice: Identity, bob: Identity, carol: Identity) -> None:
    sealed = crypto.seal(alice, bob.public, LABEL_ENVELOPE, b"for bob")
    with pytest.raises(WrongRecipient):
        crypto.open_sealed(carol, alice.public, LABEL_ENVELOPE, sealed)


@pytest.mark.parametrize("index", [0, 31, 40, -1])
def test_envelope_altered_bytes(alice: Identity, bob: Identity, index: int) -> None:
    sealed = crypto.seal(alice, bob.public, LABEL_ENVELOPE, b"for bob")
    with pytest.raises(WrongRecipient):
        crypto.open_sealed(bob, alice.public, LABEL_ENVELOPE, flip(sealed, index))
    with pytest.raises(WrongRecipient):
        crypto.open_sealed(bob, alice.public, LABEL_ENVELOPE, sealed[:20])


def test_envelope_wrong_sender_or_label(alice: Identity, bob: Identity, carol: Identity) -> None:
    sealed = crypto.seal(alice, bob.public, LABEL_ENVELOPE, b"from alice")
    with pytest.raises(BadSignature):
        crypto.open_sealed(bob, carol.public, LABEL_ENVELOPE, sealed)
    with pytest.raises(BadSignature):
        crypto.open_sealed(bob, alice.public, LABEL_STATUS, sealed)


def test_envelope_surreptitious_forwarding(alice: Identity, bob: Identity, carol: Identity) -> None:
    # Bob opens Alice's envelope by hand and re-seals the very same signed bytes to Carol.
    sealed = crypto.seal(alice, bob.public, LABEL_ENVELOPE, b"for bob only")
    inner = nacl.public.SealedBox(
        nacl.public.PrivateKey(
            hashlib.blake2b(
                frame(b"tessera/v1/seed/x25519"),
                key=b"b" * 32,
                digest_size=32,
                person=b"tessera:v1:kdf",
            ).digest()
        )
    ).decrypt(sealed)
    forwarded = nacl.public.SealedBox(nacl.public.PublicKey(carol.public.encryption_key)).encrypt(
        inner
    )
    with pytest.raises(BadSignature):
        crypto.open_sealed(carol, alice.public, LABEL_ENVELOPE, forwarded)


def test_envelope_without_signature(alice: Identity, bob: Identity) -> None:
    naked = nacl.public.SealedBox(nacl.public.PublicKey(bob.public.encryption_key)).encrypt(b"x")
    with pytest.raises(BadSignature):
        crypto.open_sealed(bob, alice.public, LABEL_ENVELOPE, naked)


# --- data at rest ---------------------------------------------------------------------------


def test_aead_round_trip_and_fresh_nonces() -> None:
    key = DataKey.generate()
    ciphertext = crypto.encrypt(key, b"survivor record", b"case|row-1|v1")
    assert crypto.decrypt(key, ciphertext, b"case|row-1|v1") == b"survivor record"
    assert crypto.encrypt(key, b"survivor record", b"case|row-1|v1") != ciphertext
    assert crypto.decrypt(key, crypto.encrypt(key, b"", b"ad"), b"ad") == b""


@pytest.mark.parametrize("index", [0, 23, 24, -1])  # nonce, nonce end, body, tag
def test_aead_flipped_bit(index: int) -> None:
    key = DataKey.generate()
    ciphertext = crypto.encrypt(key, b"survivor record", b"case|row-1|v1")
    with pytest.raises(TamperedCiphertext):
        crypto.decrypt(key, flip(ciphertext, index, bit=7), b"case|row-1|v1")


def test_aead_binds_row_and_version() -> None:
    key = DataKey.generate()
    row1_v1 = crypto.encrypt(key, b"old", b"case|row-1|v1")
    with pytest.raises(TamperedCiphertext):  # moved to another row
        crypto.decrypt(key, row1_v1, b"case|row-2|v1")
    with pytest.raises(TamperedCiphertext):  # an old version presented as the current one
        crypto.decrypt(key, row1_v1, b"case|row-1|v2")
    with pytest.raises(TamperedCiphertext):  # another table
        crypto.decrypt(key, row1_v1, b"need|row-1|v1")


@pytest.mark.parametrize("length", [0, 1, 24, 39])
def test_aead_truncated(length: int) -> None:
    key = DataKey.generate()
    ciphertext = crypto.encrypt(key, b"survivor record", b"ad")
    with pytest.raises(TamperedCiphertext):
        crypto.decrypt(key, ciphertext[:length], b"ad")


def test_aead_wrong_key() -> None:
    ciphertext = crypto.encrypt(DataKey.generate(), b"survivor record", b"ad")
    with pytest.raises(TamperedCiphertext):
        crypto.decrypt(DataKey.generate(), ciphertext, b"ad")


def test_derive_key() -> None:
    master = DataKey.from_bytes(bytes(32))
    index_key = crypto.derive_key(master, LABEL_BLIND_INDEX)
    assert index_key == crypto.derive_key(master, LABEL_BLIND_INDEX)
    assert index_key != master
    assert index_key != crypto.derive_key(master, LABEL_BLIND_INDEX + b"/prs_id")
    assert index_key != crypto.derive_key(DataKey.generate(), LABEL_BLIND_INDEX)
    with pytest.raises(InvalidInput):
        DataKey.from_bytes(b"\x00" * 16)


# --- blind index ----------------------------------------------------------------------------


def test_blind_index_normalises() -> None:
    key = crypto.derive_key(DataKey.generate(), LABEL_BLIND_INDEX)
    variants = [
        "Ana María",
        "  ana   maría \n",
        "ANA MARÍA",
        unicodedata.normalize("NFD", "Ana María"),  # decomposed accent
        "\uff21\uff4e\uff41 \uff2d\uff41\uff52\u00ed\uff41",  # full-width letters (NFKC)
    ]
    indexes = {crypto.blind_index(key, v) for v in variants}
    assert len(indexes) == 1
    assert crypto.blind_index(key, "Ana Marie") not in indexes


def test_blind_index_is_keyed_and_hides_the_value() -> None:
    key_a, key_b = DataKey.generate(), DataKey.generate()
    value = "HTCDS-000123"
    index = crypto.blind_index(key_a, value)
    assert index != crypto.blind_index(key_b, value)
    assert len(index) == 64
    int(index, 16)
    for leak in (value.lower(), value.encode().hex(), "000123"):
        assert leak not in index.lower()
    with pytest.raises(InvalidInput):
        crypto.blind_index(key_a, "   ")


# --- key-encryption key ---------------------------------------------------------------------


def test_kek_from_passphrase_and_check_value(kek: KeyEncryptionKey) -> None:
    salt = b"s" * 16
    again = KeyEncryptionKey.from_passphrase(
        "correct horse battery staple", salt, Argon2Params.TEST_CHEAP
    )
    again.verify_check_value(kek.check_value())
    wrong = KeyEncryptionKey.from_passphrase("Tr0ub4dor&3", salt, Argon2Params.TEST_CHEAP)
    with pytest.raises(WrongPassphrase) as caught:
        wrong.verify_check_value(kek.check_value())
    assert "TESSERA_PASSPHRASE" in str(caught.value)
    other_salt = KeyEncryptionKey.from_passphrase(
        "correct horse battery staple", KeyEncryptionKey.new_salt(), Argon2Params.TEST_CHEAP
    )
    with pytest.raises(WrongPassphrase):
        other_salt.verify_check_value(kek.check_value())
    with pytest.raises(WrongPassphrase):
        kek.verify_check_value(b"")


def test_kek_passphrase_unicode_normalised() -> None:
    salt = b"n" * 16
    composed = KeyEncryptionKey.from_passphrase("café", salt, Argon2Params.TEST_CHEAP)
    decomposed = KeyEncryptionKey.from_passphrase(
        unicodedata.normalize("NFD", "café"), salt, Argon2Params.TEST_CHEAP
    )
    decomposed.verify_check_value(composed.check_value())


def test_kek_input_validation() -> None:
    with pytest.raises(InvalidInput):
        KeyEncryptionKey.from_passphrase("", b"s" * 16, Argon2Params.TEST_CHEAP)
    with pytest.raises(InvalidInput):
        KeyEncryptionKey.from_passphrase("pw", b"short", Argon2Params.TEST_CHEAP)
    with pytest.raises(InvalidInput):
        Argon2Params(opslimit=0, memlimit=Argon2Params.TEST_CHEAP.memlimit)


def test_wrap_unwrap(kek: KeyEncryptionKey) -> None:
    data_key = DataKey.generate()
    wrapped = kek.wrap(data_key, b"survivor|s-1")
    assert kek.unwrap(wrapped, b"survivor|s-1") == data_key
    assert kek.unwrap(kek.wrap(bytes(32), b"ctx"), b"ctx") == DataKey.from_bytes(bytes(32))
    with pytest.raises(TamperedCiphertext):
        kek.unwrap(wrapped, b"survivor|s-2")
    with pytest.raises(TamperedCiphertext):
        kek.unwrap(flip(wrapped, 30), b"survivor|s-1")
    other = KeyEncryptionKey.from_passphrase("other", b"s" * 16, Argon2Params.TEST_CHEAP)
    with pytest.raises(TamperedCiphertext):
        other.unwrap(wrapped, b"survivor|s-1")
    with pytest.raises(InvalidInput):
        kek.wrap(data_key, b"")


def test_wrap_secret_identity(kek: KeyEncryptionKey, alice: Identity) -> None:
    wrapped = kek.wrap_secret(alice.to_secret_bytes(), b"node-identity")
    restored = Identity.from_secret_bytes(kek.unwrap_secret(wrapped, b"node-identity"))
    assert restored.public == alice.public
    with pytest.raises(TamperedCiphertext):
        kek.unwrap_secret(wrapped, b"staff-identity")
    with pytest.raises(TamperedCiphertext):  # a wrapped secret is not a wrapped data key
        kek.unwrap(wrapped, b"node-identity")


def test_key_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    KeyEncryptionKey.write_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = KeyEncryptionKey.from_key_file(path)
    first.verify_check_value(KeyEncryptionKey.from_key_file(path).check_value())
    data_key = DataKey.generate()
    assert KeyEncryptionKey.from_key_file(path).unwrap(first.wrap(data_key, b"c"), b"c") == (
        data_key
    )


def test_key_file_refuses_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    KeyEncryptionKey.write_key_file(path)
    before = path.read_bytes()
    with pytest.raises(KeyFileError):
        KeyEncryptionKey.write_key_file(path)
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"tessera-kek-v1:" + b"ab" * 31,  # 31 bytes
        b"tessera-kek-v1:" + b"ab" * 33,  # 33 bytes
        b"ab" * 32,  # no header
        os.urandom(32),  # raw bytes
        b"tessera-kek-v1:" + b"AB" * 32,  # not the canonical lower-case form
        b"tessera-kek-v1:" + b"ab" * 32 + b"\n" * 2000,  # far too long
    ],
)
def test_key_file_malformed(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "kek"
    path.write_bytes(content)
    with pytest.raises(KeyFileError):
        KeyEncryptionKey.from_key_file(path)


def test_key_file_missing(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError):
        KeyEncryptionKey.from_key_file(tmp_path / "absent")
    with pytest.raises(KeyFileError):
        KeyEncryptionKey.write_key_file(tmp_path / "no-such-dir" / "kek")


@pytest.mark.slow
def test_kek_production_params() -> None:
    salt = KeyEncryptionKey.new_salt()
    kek = KeyEncryptionKey.from_passphrase("production passphrase", salt, Argon2Params.PRODUCTION)
    wrapped = kek.wrap(DataKey.generate(), b"survivor|s-1")
    again = KeyEncryptionKey.from_passphrase("production passphrase", salt, Argon2Params.PRODUCTION)
    again.verify_check_value(kek.check_value())
    again.unwrap(wrapped, b"survivor|s-1")


# --- request authentication -----------------------------------------------------------------


def test_request_valid_then_replayed(alice: Identity) -> None:
    guard = ReplayGuard()
    sig = crypto.sign_request(alice, METHOD, b"body", now=NOW)
    crypto.verify_request(alice.public, METHOD, b"body", sig, guard, now=NOW + 1)
    with pytest.raises(ReplayedRequest):
        crypto.verify_request(alice.public, METHOD, b"body", sig, guard, now=NOW + 2)
    # A second, freshly signed identical request is fine (new nonce).
    again = crypto.sign_request(alice, METHOD, b"body", now=NOW)
    crypto.verify_request(alice.public.signing_key, METHOD, b"body", again, guard, now=NOW)


@pytest.mark.parametrize("skew", [-301.0, 301.0, -1e6])
def test_request_stale(alice: Identity, skew: float) -> None:
    sig = crypto.sign_request(alice, METHOD, b"body", now=NOW)
    with pytest.raises(StaleRequest):
        crypto.verify_request(alice.public, METHOD, b"body", sig, ReplayGuard(), now=NOW + skew)
    crypto.verify_request(alice.public, METHOD, b"body", sig, ReplayGuard(), now=NOW + 299)


def test_request_tampering(alice: Identity, bob: Identity) -> None:
    guard = ReplayGuard()
    sig = crypto.sign_request(alice, METHOD, b"body", now=NOW)
    with pytest.raises(BadSignature):
        crypto.verify_request(alice.public, METHOD, b"bodY", sig, guard, now=NOW)
    with pytest.raises(BadSignature):
        crypto.verify_request(alice.public, "/tessera.v1.Relay/Ack", b"body", sig, guard, now=NOW)
    with pytest.raises(BadSignature):  # the key we checked with is not the named signer
        crypto.verify_request(bob.public, METHOD, b"body", sig, guard, now=NOW)
    swapped = dataclasses.replace(sig, signer=bob.public.signing_key)
    with pytest.raises(BadSignature):  # the named signer did not sign
        crypto.verify_request(bob.public, METHOD, b"body", swapped, guard, now=NOW)
    with pytest.raises(BadSignature):  # valid signature, but it names someone else
        crypto.verify_request(alice.public, METHOD, b"body", swapped, guard, now=NOW)
    moved = dataclasses.replace(sig, timestamp_ms=sig.timestamp_ms + 1000)
    with pytest.raises(BadSignature):  # the timestamp is signed
        crypto.verify_request(alice.public, METHOD, b"body", moved, guard, now=NOW)
    assert len(guard) == 0
    crypto.verify_request(alice.public, METHOD, b"body", sig, guard, now=NOW)


def test_forged_request_does_not_enter_replay_cache(alice: Identity) -> None:
    guard = ReplayGuard()
    genuine = crypto.sign_request(alice, METHOD, b"body", now=NOW)
    forged = dataclasses.replace(genuine, signature=bytes(64))
    with pytest.raises(BadSignature):
        crypto.verify_request(alice.public, METHOD, b"body", forged, guard, now=NOW)
    assert len(guard) == 0
    crypto.verify_request(alice.public, METHOD, b"body", genuine, guard, now=NOW)
    assert len(guard) == 1


def test_replay_guard_evicts_and_caps(alice: Identity) -> None:
    guard = ReplayGuard(window_seconds=10, max_entries=2)
    first = crypto.sign_request(alice, METHOD, b"1", now=NOW)
    guard.check(first, NOW)
    guard.check(crypto.sign_request(alice, METHOD, b"2", now=NOW), NOW)
    with pytest.raises(Exhausted):  # full of live nonces: refuse rather than forget one
        guard.check(crypto.sign_request(alice, METHOD, b"3", now=NOW), NOW)
    with pytest.raises(ReplayedRequest):  # still remembered at the window's edge
        guard.check(first, NOW + 10)
    guard.check(crypto.sign_request(alice, METHOD, b"4", now=NOW + 11), NOW + 11)
    assert len(guard) == 1


def test_replay_guard_is_thread_safe(alice: Identity) -> None:
    guard = ReplayGuard()
    sig = crypto.sign_request(alice, METHOD, b"body", now=NOW)
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def attempt() -> None:
        barrier.wait()
        try:
            guard.check(sig, NOW)
            outcomes.append("accepted")
        except ReplayedRequest:
            outcomes.append("replayed")

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["accepted"] + ["replayed"] * 7


def test_request_metadata_round_trip(alice: Identity) -> None:
    sig = crypto.sign_request(alice, METHOD, b"body", now=NOW)
    metadata = sig.to_metadata()
    assert {k for k, _ in metadata} == {
        "x-tessera-signer",
        "x-tessera-timestamp",
        "x-tessera-nonce",
        "x-tessera-signature",
    }
    assert all(v.isascii() for _, v in metadata)
    other = [("user-agent", "grpc-python"), *metadata]
    assert RequestSignature.from_metadata(other) == sig
    as_bytes = [(k, v.encode()) for k, v in metadata]
    assert RequestSignature.from_metadata(as_bytes) == sig


def _corrupt(metadata: list[tuple[str, str]], key: str, value: str | None) -> list[tuple[str, str]]:
    kept = [(k, v) for k, v in metadata if k != key]
    return kept if value is None else [*kept, (key, value)]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("x-tessera-signer", None),
        ("x-tessera-timestamp", None),
        ("x-tessera-nonce", None),
        ("x-tessera-signature", None),
        ("x-tessera-signer", "zz" * 32),
        ("x-tessera-signer", "ab" * 31),
        ("x-tessera-nonce", "AB" * 16),
        ("x-tessera-signature", "ab" * 63),
        ("x-tessera-timestamp", "1_750_000_000_000"),
        ("x-tessera-timestamp", "-5"),
        ("x-tessera-timestamp", "9" * 30),
        ("x-tessera-timestamp", "١٢٣"),  # non-ASCII digits
    ],
)
def test_request_metadata_malformed(alice: Identity, key: str, value: str | None) -> None:
    metadata = crypto.sign_request(alice, METHOD, b"body", now=NOW).to_metadata()
    with pytest.raises(RequestAuthError) as caught:
        RequestSignature.from_metadata(_corrupt(metadata, key, value))
    assert key in str(caught.value)


def test_request_metadata_duplicate(alice: Identity) -> None:
    metadata = crypto.sign_request(alice, METHOD, b"body", now=NOW).to_metadata()
    with pytest.raises(RequestAuthError):
        RequestSignature.from_metadata([*metadata, metadata[0]])


# --- pairwise masks -------------------------------------------------------------------------


def test_masks_are_symmetric_and_per_round(alice: Identity, bob: Identity) -> None:
    ab = crypto.pairwise_mask(alice, bob.public, b"round-1", 16)
    assert ab == crypto.pairwise_mask(bob, alice.public, b"round-1", 16)
    assert len(ab) == 16
    assert all(0 <= v < 2**64 for v in ab)
    assert ab != crypto.pairwise_mask(alice, bob.public, b"round-2", 16)
    assert crypto.pairwise_mask(alice, bob.public, b"round-1", 4) == ab[:4]


def test_masks_cancel_in_the_sum(alice: Identity, bob: Identity, carol: Identity) -> None:
    parties = sorted([alice, bob, carol], key=lambda p: p.public.encryption_key)
    counts = [[3, 0, 7], [1, 1, 1], [0, 5, 2]]
    cells = 3
    submissions = []
    for i, me in enumerate(parties):
        masked = list(counts[i])
        for j, peer in enumerate(parties):
            if i == j:
                continue
            mask = crypto.pairwise_mask(me, peer.public, b"round-9", cells)
            sign = 1 if i < j else -1  # section 7: i < j adds, j subtracts
            masked = [(m + sign * k) % 2**64 for m, k in zip(masked, mask, strict=True)]
        submissions.append(masked)
    assert submissions[0] != counts[0]
    total = [sum(column) % 2**64 for column in zip(*submissions, strict=True)]
    assert total == [4, 6, 10]


def test_mask_matches_section_7_recipe(alice: Identity, bob: Identity) -> None:
    x25519 = hashlib.blake2b(
        frame(b"tessera/v1/seed/x25519"), key=b"a" * 32, digest_size=32, person=b"tessera:v1:kdf"
    ).digest()
    shared = nacl.bindings.crypto_scalarmult(x25519, bob.public.encryption_key)
    salt = hashlib.blake2b(b"round-1", digest_size=16, person=b"tessera:v1:round").digest()
    low, high = sorted([alice.public.encryption_key, bob.public.encryption_key])
    pair_key = hashlib.blake2b(
        frame(b"tessera/v1/mask", low, high),
        digest_size=32,
        key=shared,
        salt=salt,
        person=b"tessera:v1:mask",
    ).digest()
    stream = nacl.bindings.randombytes_buf_deterministic(8 * 5, pair_key)
    expected = list(struct.unpack("<5Q", stream))
    assert crypto.pairwise_mask(alice, bob.public, b"round-1", 5) == expected


def test_mask_pairs_differ_and_inputs_checked(
    alice: Identity, bob: Identity, carol: Identity
) -> None:
    assert crypto.pairwise_mask(alice, bob.public, b"r", 4) != crypto.pairwise_mask(
        alice, carol.public, b"r", 4
    )
    with pytest.raises(InvalidInput):
        crypto.pairwise_mask(alice, alice.public, b"r", 4)
    with pytest.raises(InvalidInput):
        crypto.pairwise_mask(alice, bob.public, b"r", 0)
    with pytest.raises(InvalidInput):
        crypto.pairwise_mask(alice, bob.public, b"", 4)
    low_order = PublicIdentity(bob.public.signing_key, bytes(32))
    with pytest.raises(InvalidInput):
        crypto.pairwise_mask(alice, low_order, b"r", 4)


# --- secrets never print --------------------------------------------------------------------


def test_identity_repr_hides_secrets() -> None:
    identity = Identity.from_seed(KAT_SEED)
    secrets = [
        KAT_SEED.hex(),
        hashlib.blake2b(
            frame(b"tessera/v1/seed/ed25519"),
            key=KAT_SEED,
            digest_size=32,
            person=b"tessera:v1:kdf",
        ).hexdigest(),
        hashlib.blake2b(
            frame(b"tessera/v1/seed/x25519"), key=KAT_SEED, digest_size=32, person=b"tessera:v1:kdf"
        ).hexdigest(),
    ]
    for text in (repr(identity), str(identity), f"{identity}", repr([identity])):
        assert "redacted" in text
        for secret in secrets:
            assert secret not in text
            assert secret[:16] not in text


def test_data_key_and_kek_repr_hide_secrets(tmp_path: Path) -> None:
    raw = bytes(range(100, 132))
    key = DataKey.from_bytes(raw)
    assert repr(key) == str(key) == "DataKey(<redacted>)"
    assert raw.hex() not in repr(key)

    path = tmp_path / "kek"
    KeyEncryptionKey.write_key_file(path)
    kek = KeyEncryptionKey.from_key_file(path)
    file_hex = path.read_text().split(":")[1].strip()
    for text in (repr(kek), str(kek)):
        assert text == "KeyEncryptionKey(<redacted>)"
        assert file_hex not in text
        assert kek.check_value().hex() not in text


def test_wrap_key_under_data_key_binds_context_and_key() -> None:
    wrapping = crypto.DataKey.generate()
    survivor = crypto.DataKey.generate()
    wrapped = crypto.wrap_key(wrapping, survivor, b"survivor|case-1")
    assert crypto.unwrap_key(wrapping, wrapped, b"survivor|case-1") == survivor
    with pytest.raises(TamperedCiphertext):
        crypto.unwrap_key(wrapping, wrapped, b"survivor|case-2")
    with pytest.raises(TamperedCiphertext):
        crypto.unwrap_key(crypto.DataKey.generate(), wrapped, b"survivor|case-1")
    flipped = bytearray(wrapped)
    flipped[-1] ^= 1
    with pytest.raises(TamperedCiphertext):
        crypto.unwrap_key(wrapping, bytes(flipped), b"survivor|case-1")


def test_hashing_is_libsodiums_blake2b_byte_for_byte() -> None:
    # Stored values (blind indexes, need tags, record seals, the audit chain, derived keys) were
    # computed with libsodium's generichash: the standard library's BLAKE2b must agree exactly.
    import nacl.encoding
    import nacl.hash

    from tessera.crypto import _blake2b

    for data, size, key, salt, person in [
        (b"", 32, b"", b"", b"tessera-digest"),
        (b"abc" * 1000, 32, os.urandom(32), b"", b"tessera-mac"),
        (b"x", 16, os.urandom(64), os.urandom(16), b"p" * 16),
        (os.urandom(999), 64, b"", b"s", b""),
    ]:
        expected = nacl.hash.blake2b(
            data,
            digest_size=size,
            key=key,
            salt=salt,
            person=person,
            encoder=nacl.encoding.RawEncoder,
        )
        assert _blake2b(data, size=size, key=key, salt=salt, person=person) == expected
