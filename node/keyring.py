"""The node's keyring: its identity and record key, wrapped by the key-encryption key (KEK).

DESIGN.md section 5. The keyring file (``keys/keyring.json`` in the node's home, never in the
database) holds, in clear, only what is needed to derive the KEK (Argon2id salt and cost, or the
fact that a key file is used) and a check value that names a wrong passphrase as such; the secrets
are one AEAD ciphertext under the KEK:

* the node's identity (Ed25519 signing + X25519 encryption keys), and
* the record key, which wraps each survivor's own data key (stored in the database) and from which
  the blind-index key is derived.

Two levels mean rotating the KEK rewrites this one file and re-encrypts no record (issue 4 item 7).

Rotating the agency's keys (``tessera node rotate-keys``, node.rotation) replaces the identity
and keeps the old ones, *retired*, in the same file: they sign nothing again, but they still open
what was sealed to them (envelopes in flight, escrowed tombstones, checkpoints) and verify the
audit entries they signed. While a rotation is under way the new identity waits in the file as
*pending* beside the current one, so a crash at any point leaves a keyring that knows both.
Every write of the file is atomic (temporary file, fsync, rename), so a crash leaves the old
keyring or the new one, never half of one.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tessera import crypto, labels, passphrases
from tessera.config import Argon2Profile, KekSource
from tessera.errors import (
    ConfigError,
    InvalidInput,
    KeyFileError,
    TamperedCiphertext,
    WrongPassphrase,
)
from tessera.files import atomic_write

KEYRING_FILE = Path("keys") / "keyring.json"
_FORMAT = "tessera-keyring-v1"
_CONTEXT = b"tessera/v1/node-keyring"
_RETIRED = _CONTEXT + b"/retired-identity"
_PENDING = _CONTEXT + b"/pending-identity"


def argon2_params(profile: Argon2Profile) -> crypto.Argon2Params:
    """The Argon2id cost for a profile; the cheap one exists only for the test suite."""
    if profile is Argon2Profile.TEST_CHEAP:
        return crypto.Argon2Params.TEST_CHEAP
    return crypto.Argon2Params.PRODUCTION


@dataclass(frozen=True)
class KekSpec:
    """How to obtain the KEK: a passphrase (with its salt and cost) or a key file."""

    source: KekSource
    salt: bytes = b""
    params: crypto.Argon2Params | None = None
    key_file: Path | None = None

    def derive(self, passphrase: str | None) -> crypto.KeyEncryptionKey:
        """The KEK itself. A passphrase is needed for passphrase specs (ConfigError if absent)."""
        if self.source is KekSource.KEY_FILE:
            if self.key_file is None:
                raise KeyFileError("the keyring names no key file", hint="set key_file in config")
            return crypto.KeyEncryptionKey.from_key_file(self.key_file)
        if passphrase is None or self.params is None:
            raise ConfigError(
                "this node is protected by a passphrase and none was given",
                hint="set TESSERA_PASSPHRASE or run on a terminal",
            )
        return crypto.KeyEncryptionKey.from_passphrase(passphrase, self.salt, self.params)


class Keyring:
    """The unwrapped secrets of a running node. Never printed, never stored in clear."""

    __slots__ = ("identity", "index_key", "pending", "record_key", "retired")

    def __init__(
        self,
        identity: crypto.Identity,
        record_key: crypto.DataKey,
        retired: Sequence[crypto.Identity] = (),
        pending: crypto.Identity | None = None,
    ) -> None:
        self.identity = identity
        # Earlier identities of this agency, newest first: they open and verify, never sign.
        self.retired = tuple(retired)
        # The identity a key rotation is moving to, until the broker has recorded it.
        self.pending = pending
        # Wraps and unwraps each survivor's data key (crypto.wrap_key / crypto.unwrap_key).
        self.record_key = record_key
        self.index_key = crypto.derive_key(record_key, labels.LABEL_BLIND_INDEX)

    @property
    def identities(self) -> tuple[crypto.Identity, ...]:
        """Every identity this node has had, current first: what may open or verify."""
        return (self.identity, *self.retired)

    def __repr__(self) -> str:
        return "Keyring(<redacted>)"


def new_kek_spec(source: KekSource, profile: Argon2Profile, key_file: Path | None) -> KekSpec:
    """A fresh spec for init or rotation: a new salt, or a key file (created if missing)."""
    if source is KekSource.KEY_FILE:
        if key_file is None:
            raise KeyFileError("a key file path is needed", hint="pass --key-file PATH")
        if not key_file.exists():
            crypto.KeyEncryptionKey.write_key_file(key_file)
        return KekSpec(source=source, key_file=key_file)
    return KekSpec(
        source=source, salt=crypto.KeyEncryptionKey.new_salt(), params=argon2_params(profile)
    )


def create(
    home: Path, spec: KekSpec, passphrase: str | None, context: Sequence[str] = ()
) -> Keyring:
    """Generate a node's identity and record key and write them wrapped under a new KEK.

    A passphrase must pass the strength policy (tessera.passphrases; ``context`` names words an
    attacker would try first, such as the agency's name): WeakPassphrase otherwise.
    """
    path = home / KEYRING_FILE
    if path.exists():
        raise ConfigError(f"{path} already exists", hint="this home is already a node")
    _require_strong(spec, passphrase, context)
    keyring = Keyring(crypto.Identity.generate(), crypto.DataKey.generate())
    _write(path, spec, spec.derive(passphrase), keyring)
    return keyring


def read_spec(home: Path) -> KekSpec:
    """The KEK spec stored in a home's keyring file (no secret needed to read it)."""
    document = _read(home / KEYRING_FILE)
    return _spec_from(document)


def open_keyring(home: Path, passphrase: str | None) -> Keyring:
    """Derive the KEK, check it (WrongPassphrase), and unwrap the keyring in ``home``."""
    return open_document(_read(home / KEYRING_FILE), passphrase)


def open_document(document: dict[str, Any], passphrase: str | None) -> Keyring:
    """Unwrap a keyring document (from the home or from a backup)."""
    if not isinstance(document, dict) or document.get("format") != _FORMAT:
        raise ConfigError("not a Tessera keyring", hint="restore keys/keyring.json from a backup")
    kek = _spec_from(document).derive(passphrase)
    kek.verify_check_value(_b64(document, "check"))
    try:
        identity_secret = kek.unwrap_secret(_b64(document, "identity"), _CONTEXT + b"/identity")
        record_key = kek.unwrap(_b64(document, "record_key"), _CONTEXT + b"/record-key")
        retired = [
            crypto.Identity.from_secret_bytes(kek.unwrap_secret(_unb64(w), _RETIRED))
            for w in _list(document, "retired")
        ]
        pending = (
            crypto.Identity.from_secret_bytes(
                kek.unwrap_secret(_b64(document, "pending"), _PENDING)
            )
            if document.get("pending")
            else None
        )
    except TamperedCiphertext:
        # The check value matched, so the KEK is right: the wrapped keys themselves are damaged.
        raise ConfigError(
            "the keyring is damaged: its wrapped keys fail authentication",
            hint="restore keys/keyring.json from a backup",
        ) from None
    return Keyring(crypto.Identity.from_secret_bytes(identity_secret), record_key, retired, pending)


def check_current_secret(home: Path, passphrase: str | None) -> None:
    """WrongPassphrase unless ``passphrase`` is the one protecting this node now (a node locked
    by a key file needs none: it reads its own key file)."""
    spec = read_spec(home)
    if spec.source is KekSource.PASSPHRASE and not passphrase:
        raise WrongPassphrase(
            "the node's current passphrase is needed to change it",
            hint="set TESSERA_PASSPHRASE to it, or run on a terminal",
        )
    spec.derive(passphrase).verify_check_value(_b64(_read(home / KEYRING_FILE), "check"))


def public_keys(document: dict[str, Any]) -> set[str]:
    """Every public identity a keyring document has had (current, retired), base64: a backup
    taken before a key rotation still belongs to this node."""
    return {str(document.get("identity_public", ""))} | {
        str(k) for k in _list(document, "retired_public")
    }


def begin_identity_change(
    home: Path, keyring: Keyring, new: crypto.Identity, passphrase: str | None
) -> Keyring:
    """Record ``new`` as the pending identity (the current one still signs)."""
    changed = Keyring(keyring.identity, keyring.record_key, keyring.retired, new)
    _rewrite(home, changed, passphrase)
    return changed


def complete_identity_change(home: Path, keyring: Keyring, passphrase: str | None) -> Keyring:
    """Make the pending identity current and retire the one before it."""
    if keyring.pending is None:
        raise ConfigError("no key rotation is under way")
    changed = Keyring(
        keyring.pending, keyring.record_key, (keyring.identity, *keyring.retired), None
    )
    _rewrite(home, changed, passphrase)
    return changed


def abandon_identity_change(home: Path, keyring: Keyring, passphrase: str | None) -> Keyring:
    """Forget a pending identity the broker never recorded."""
    changed = Keyring(keyring.identity, keyring.record_key, keyring.retired, None)
    _rewrite(home, changed, passphrase)
    return changed


def _rewrite(home: Path, keyring: Keyring, passphrase: str | None) -> None:
    # Same KEK, same spec: only the identities change. The KEK is checked before anything is
    # written, so a wrong passphrase never produces a keyring nobody can open.
    spec = read_spec(home)
    kek = spec.derive(passphrase)
    kek.verify_check_value(_b64(_read(home / KEYRING_FILE), "check"))
    _write(home / KEYRING_FILE, spec, kek, keyring)


def rotate(
    home: Path,
    keyring: Keyring,
    new_spec: KekSpec,
    new_passphrase: str | None,
    context: Sequence[str] = (),
) -> None:
    """Re-wrap the keyring under a new KEK. Records and survivor keys are untouched. A new
    passphrase must pass the strength policy, as at :func:`create`."""
    _require_strong(new_spec, new_passphrase, context)
    _write(home / KEYRING_FILE, new_spec, new_spec.derive(new_passphrase), keyring)


def export_document(home: Path) -> dict[str, Any]:
    """The keyring file's content (still wrapped), for inclusion in an encrypted backup."""
    return _read(home / KEYRING_FILE)


def install_document(home: Path, document: dict[str, Any]) -> None:
    """Write a keyring document taken from a backup, atomically."""
    _spec_from(document)  # validate before replacing anything
    atomic_write(home / KEYRING_FILE, json.dumps(document, indent=2).encode())


def _require_strong(spec: KekSpec, passphrase: str | None, context: Sequence[str]) -> None:
    if spec.source is KekSource.PASSPHRASE and passphrase:
        passphrases.require_strong(passphrase, context=context, what="node passphrase")


# --- file format ---------------------------------------------------------------------------


def _write(path: Path, spec: KekSpec, kek: crypto.KeyEncryptionKey, keyring: Keyring) -> None:
    identity = kek.wrap_secret(keyring.identity.to_secret_bytes(), _CONTEXT + b"/identity")
    record_key = kek.wrap(keyring.record_key, _CONTEXT + b"/record-key")
    document: dict[str, Any] = {
        "format": _FORMAT,
        # Public, so a backup can be matched to its node without any secret.
        "identity_public": base64.b64encode(keyring.identity.public.to_bytes()).decode(),
        "kek_source": spec.source.value,
        "check": base64.b64encode(kek.check_value()).decode(),
        "identity": base64.b64encode(identity).decode(),
        "record_key": base64.b64encode(record_key).decode(),
    }
    if keyring.retired:
        document["retired"] = [
            base64.b64encode(kek.wrap_secret(r.to_secret_bytes(), _RETIRED)).decode()
            for r in keyring.retired
        ]
        document["retired_public"] = [
            base64.b64encode(r.public.to_bytes()).decode() for r in keyring.retired
        ]
    if keyring.pending is not None:
        document["pending"] = base64.b64encode(
            kek.wrap_secret(keyring.pending.to_secret_bytes(), _PENDING)
        ).decode()
    if spec.source is KekSource.PASSPHRASE:
        assert spec.params is not None
        document["salt"] = base64.b64encode(spec.salt).decode()
        document["opslimit"] = spec.params.opslimit
        document["memlimit"] = spec.params.memlimit
    else:
        document["key_file"] = str(spec.key_file)
    atomic_write(path, json.dumps(document, indent=2).encode())


def _read(path: Path) -> dict[str, Any]:
    try:
        document: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"no keyring at {path}", hint="run `tessera node init` first") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot read keyring {path}: {exc}", hint="restore keys/keyring.json from a backup"
        ) from None
    if not isinstance(document, dict) or document.get("format") != _FORMAT:
        raise ConfigError(f"{path} is not a Tessera keyring", hint="restore it from a backup")
    return document


def _spec_from(document: dict[str, Any]) -> KekSpec:
    try:
        source = KekSource(document["kek_source"])
        if source is KekSource.KEY_FILE:
            return KekSpec(source=source, key_file=Path(document["key_file"]))
        params = crypto.Argon2Params(int(document["opslimit"]), int(document["memlimit"]))
        salt = _b64(document, "salt")
        if len(salt) != crypto.SALT_BYTES:
            raise ValueError(f"salt of {len(salt)} bytes")
        return KekSpec(source=source, salt=salt, params=params)
    except (KeyError, ValueError, TypeError, InvalidInput) as exc:
        raise ConfigError(
            f"the keyring is damaged ({exc})", hint="restore it from a backup"
        ) from None


def _list(document: dict[str, Any], key: str) -> list[str]:
    value = document.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"the keyring is damaged ({key})", hint="restore it from a backup")
    return value


def _unb64(value: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise ConfigError(
            "the keyring is damaged (retired)", hint="restore it from a backup"
        ) from None


def _b64(document: dict[str, Any], key: str) -> bytes:
    try:
        return base64.b64decode(document[key], validate=True)
    except (KeyError, ValueError, TypeError):
        raise ConfigError(
            f"the keyring is damaged ({key})", hint="restore it from a backup"
        ) from None
