"""Credential files and the passphrase policy, attacked as files (issue 14 item 5).

The command-line view is in tests/test_node_secrets_cli.py; here the file itself is edited: a
secret moved in from another person's credential, a check value or key swapped, a key file lock,
and the strength policy on its own and where the keyring applies it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from node import keyring
from tessera import credential, crypto, passphrases
from tessera.config import Argon2Profile, KekSource
from tessera.errors import (
    ConfigError,
    ErrorKind,
    KeyFileError,
    TamperedCiphertext,
    WeakPassphrase,
    WrongPassphrase,
)

STRONG = "ledger orchid tramline quiet"
CHEAP = crypto.Argon2Params.TEST_CHEAP


def _issue(home: Path, name: str, lock: credential.Lock) -> crypto.Identity:
    identity = crypto.Identity.generate()
    credential.write(
        home,
        credential.Credential(
            name=name, identity=identity, node_address="127.0.0.1:1", node_certificate=b"pem"
        ),
        lock,
    )
    return identity


def test_a_passphrase_lock_opens_with_its_passphrase_only(tmp_path: Path) -> None:
    identity = _issue(tmp_path, "Ana Ruiz", credential.PassphraseLock(STRONG, CHEAP))
    assert credential.needs_passphrase(tmp_path)
    held = credential.read(tmp_path, lambda: STRONG)
    assert held.protected and held.identity.public == identity.public
    with pytest.raises(WrongPassphrase) as wrong:
        credential.read(tmp_path, lambda: STRONG + "!")
    assert wrong.value.kind is ErrorKind.UNAUTHENTICATED
    with pytest.raises(ConfigError, match="protected by a passphrase"):
        credential.read(tmp_path)
    assert "<redacted>" in repr(credential.PassphraseLock(STRONG, CHEAP))
    assert STRONG not in repr(credential.PassphraseLock(STRONG, CHEAP))


def test_a_key_file_lock_needs_its_key_file(tmp_path: Path) -> None:
    key_file = tmp_path / "ana.key"
    home = tmp_path / "ana"
    identity = _issue(home, "Ana Ruiz", credential.KeyFileLock(key_file))
    assert key_file.stat().st_mode & 0o077 == 0
    assert not credential.needs_passphrase(home)
    assert credential.read(home).identity.public == identity.public
    key_file.rename(tmp_path / "elsewhere.key")
    with pytest.raises(KeyFileError):
        credential.read(home)


def test_a_secret_moved_in_from_another_credential_is_refused(tmp_path: Path) -> None:
    # Same passphrase, same salt pasted in too: only the binding to the holder's name is left.
    ana, ben = tmp_path / "ana", tmp_path / "ben"
    _issue(ana, "Ana Ruiz", credential.PassphraseLock(STRONG, CHEAP))
    _issue(ben, "Ben Okafor", credential.PassphraseLock(STRONG, CHEAP))
    ana_doc = json.loads((ana / credential.CREDENTIAL_FILE).read_text())
    ben_doc = json.loads((ben / credential.CREDENTIAL_FILE).read_text())
    for key in ("salt", "check", "secret", "public_signing_key"):
        ana_doc[key] = ben_doc[key]
    (ana / credential.CREDENTIAL_FILE).write_text(json.dumps(ana_doc))
    with pytest.raises(TamperedCiphertext, match="damaged"):
        credential.read(ana, lambda: STRONG)


def test_a_credential_naming_another_public_key_is_refused(tmp_path: Path) -> None:
    _issue(tmp_path, "Ana Ruiz", credential.PassphraseLock(STRONG, CHEAP))
    path = tmp_path / credential.CREDENTIAL_FILE
    document = json.loads(path.read_text())
    document["public_signing_key"] = crypto.Identity.generate().public.signing_key.hex()
    path.write_text(json.dumps(document))
    with pytest.raises(TamperedCiphertext, match="names another key"):
        credential.read(tmp_path, lambda: STRONG)


def test_relocking_replaces_the_file_and_keeps_the_identity(tmp_path: Path) -> None:
    identity = _issue(tmp_path, "Ana Ruiz", credential.PassphraseLock(STRONG, CHEAP))
    held = credential.read(tmp_path, lambda: STRONG)
    with pytest.raises(ConfigError, match="already exists"):
        credential.write(tmp_path, held, credential.PassphraseLock(STRONG, CHEAP))
    new = "cobalt meadow lantern seventeen"
    credential.write(tmp_path, held, credential.PassphraseLock(new, CHEAP), replace=True)
    assert credential.read(tmp_path, lambda: new).identity.public == identity.public
    with pytest.raises(WrongPassphrase):
        credential.read(tmp_path, lambda: STRONG)


@pytest.mark.parametrize(
    "weak", ["a", "password123", "hunter2hunter2", "Summer2024!", "Ana Ruiz 1990", "x" * 300]
)
def test_weak_passphrases_are_refused_with_advice(weak: str) -> None:
    with pytest.raises(WeakPassphrase) as refused:
        passphrases.require_strong(weak, context=("Ana Ruiz",))
    assert refused.value.kind is ErrorKind.INVALID_INPUT
    assert "too weak" in refused.value.message
    assert refused.value.hint


def test_an_empty_passphrase_is_refused_as_weak_not_a_crash() -> None:
    with pytest.raises(WeakPassphrase, match="empty") as refused:
        passphrases.require_strong("", context=("Ana Ruiz",))
    assert refused.value.kind is ErrorKind.INVALID_INPUT


def test_strong_passphrases_pass_long_ones_too() -> None:
    for strong in (STRONG, "a long test passphrase", "correct horse battery staple"):
        passphrases.require_strong(strong)
    passphrases.require_strong("violet quarry ember forty " * 20)  # 500 characters: fast


def test_a_weak_credential_passphrase_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(WeakPassphrase):
        _issue(tmp_path, "Ana Ruiz", credential.PassphraseLock("ana ruiz", CHEAP))
    assert not (tmp_path / credential.CREDENTIAL_FILE).exists()


def test_the_keyring_applies_the_policy_at_creation_and_rotation(tmp_path: Path) -> None:
    spec = keyring.new_kek_spec(KekSource.PASSPHRASE, Argon2Profile.TEST_CHEAP, None)
    with pytest.raises(WeakPassphrase):
        keyring.create(tmp_path, spec, "Harbour Shelter", context=("Harbour Shelter",))
    assert not (tmp_path / keyring.KEYRING_FILE).exists()
    ring = keyring.create(tmp_path, spec, STRONG, context=("Harbour Shelter",))
    before = (tmp_path / keyring.KEYRING_FILE).read_bytes()
    new_spec = keyring.new_kek_spec(KekSource.PASSPHRASE, Argon2Profile.TEST_CHEAP, None)
    with pytest.raises(WeakPassphrase):
        keyring.rotate(tmp_path, ring, new_spec, "shelter1")
    assert (tmp_path / keyring.KEYRING_FILE).read_bytes() == before
