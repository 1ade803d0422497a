"""The crypto core of Tessera: the only module that touches raw keys and nonces.

Everything here is a thin, labelled layer over PyNaCl (libsodium); there are no home-made
primitives (DESIGN.md section 5). Functions are pure over bytes and raise the typed errors of
:mod:`tessera.errors`; only the key-file helpers do I/O.

- identities: Ed25519 signatures plus an X25519 key, with human-comparable fingerprints (section 5)
- envelopes: sign-then-seal between agencies; the broker sees only sealed bytes (section 5)
- data at rest: XChaCha20-Poly1305 with associated data binding table, row and version (section 5)
- key-encryption keys: Argon2id passphrase or key file; key wrapping; blind indexes (section 5)
- request authentication: signed method, body digest, timestamp, nonce; replay window (section 5)
- pairwise masks for private aggregation rounds, exactly the recipe of section 7

Every signature and every key derivation carries a domain-separation label, so bytes produced for
one purpose never verify or decrypt for another. docs/crypto.md is the reviewer's summary.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import struct
import time
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.pwhash
import nacl.signing
import nacl.utils

from tessera.errors import (
    BadSignature,
    InvalidInput,
    KeyFileError,
    RequestAuthError,
    TamperedCiphertext,
    WrongPassphrase,
    WrongRecipient,
)
from tessera.labels import LABEL_REQUEST

# --- labels (domain separation) -------------------------------------------------------------
# The public labels live in tessera.labels; these stay inside this module.
# Internal labels: never needed by callers.
_LABEL_SEED_SIGNING = b"tessera/v1/seed/ed25519"
_LABEL_SEED_ENCRYPTION = b"tessera/v1/seed/x25519"
_LABEL_AT_REST = b"tessera/v1/at-rest"
_LABEL_KEK_WRAP = b"tessera/v1/kek/wrap"
_LABEL_KEK_CHECK = b"tessera/v1/kek/check"
_LABEL_WRAP_DATA_KEY = b"tessera/v1/wrap/data-key"
_LABEL_WRAP_SECRET = b"tessera/v1/wrap/secret"
_LABEL_WRAP_UNDER_DATA_KEY = b"tessera/v1/wrap/under-data-key"
_LABEL_ENVELOPE_BINDING = b"tessera/v1/envelope/recipient"
_LABEL_REQUEST_BODY = b"tessera/v1/request/body"
_LABEL_MASK = b"tessera/v1/mask"

# BLAKE2b personalisation strings (at most 16 bytes each): a second, independent separation.
_PERSON_KDF = b"tessera:v1:kdf"
_PERSON_FINGERPRINT = b"tessera:v1:fpr"
_PERSON_DIGEST = b"tessera:v1:dgst"
_PERSON_BLIND_INDEX = b"tessera:v1:bidx"
_PERSON_MASK = b"tessera:v1:mask"
_PERSON_ROUND = b"tessera:v1:round"
_PERSON_MAC = b"tessera:v1:mac"

# --- sizes and limits ---------------------------------------------------------------------

KEY_BYTES = 32
SIGNATURE_BYTES = 64
REQUEST_NONCE_BYTES = 16
SALT_BYTES = nacl.pwhash.argon2id.SALTBYTES
MAX_LABEL_BYTES = 128
MAX_MASK_CELLS = 1 << 20
_NONCE_BYTES = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
_TAG_BYTES = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_ABYTES
_KEY_FILE_PREFIX = "tessera-kek-v1:"
_KEY_FILE_MAX_BYTES = 1024


# --- internal helpers ---------------------------------------------------------------------


def _frame(*parts: bytes) -> bytes:
    """Length-prefix each part, so no two different part lists encode to the same bytes."""
    return b"".join(len(part).to_bytes(8, "big") + part for part in parts)


def _check_label(label: bytes) -> bytes:
    if not isinstance(label, bytes) or not label.startswith(b"tessera/"):
        raise InvalidInput("a crypto label must be bytes starting with b'tessera/'")
    if len(label) > MAX_LABEL_BYTES:
        raise InvalidInput(f"a crypto label is at most {MAX_LABEL_BYTES} bytes")
    return label


def _check_len(name: str, value: bytes, size: int) -> bytes:
    if not isinstance(value, bytes) or len(value) != size:
        raise InvalidInput(f"{name} must be {size} bytes")
    return value


def _blake2b(
    data: bytes, *, size: int = 32, key: bytes = b"", salt: bytes = b"", person: bytes
) -> bytes:
    # The standard library's BLAKE2b: the same function as libsodium's generichash with salt
    # and personalisation (a test checks they agree byte for byte), without PyNaCl's per-call
    # argument checks, which cost more than hashing a record (blind indexes, seals, tags).
    return hashlib.blake2b(data, digest_size=size, key=key, salt=salt, person=person).digest()


def _kdf(key: bytes, label: bytes, size: int = KEY_BYTES) -> bytes:
    """Labelled subkey: BLAKE2b keyed with the parent key, over the framed label."""
    return _blake2b(_frame(_check_label(label)), size=size, key=key, person=_PERSON_KDF)


def _aead_encrypt(key: bytes, plaintext: bytes, label: bytes, associated_data: bytes) -> bytes:
    # A fresh random 192-bit nonce per message is safe for XChaCha20 (no counter to keep).
    nonce = nacl.utils.random(_NONCE_BYTES)
    aad = _frame(label, associated_data)
    box = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, aad, nonce, key)
    return nonce + box


def _aead_decrypt(key: bytes, ciphertext: bytes, label: bytes, associated_data: bytes) -> bytes:
    if not isinstance(ciphertext, bytes) or len(ciphertext) < _NONCE_BYTES + _TAG_BYTES:
        raise TamperedCiphertext("ciphertext is truncated")
    nonce, box = ciphertext[:_NONCE_BYTES], ciphertext[_NONCE_BYTES:]
    try:
        return nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
            box, _frame(label, associated_data), nonce, key
        )
    except nacl.exceptions.CryptoError:
        raise TamperedCiphertext(
            "ciphertext failed authentication (altered, moved to another row, rolled back, "
            "or wrong key)"
        ) from None


def _redacted(obj: object) -> str:
    return f"{type(obj).__name__}(<redacted>)"


# --- identities and signatures (DESIGN.md section 5) ----------------------------------------


@dataclass(frozen=True)
class PublicIdentity:
    """What others know of an agency, staff member or broker: two 32-byte public keys."""

    signing_key: bytes  # Ed25519 verify key
    encryption_key: bytes  # X25519 public key

    def __post_init__(self) -> None:
        _check_len("signing_key", self.signing_key, KEY_BYTES)
        _check_len("encryption_key", self.encryption_key, KEY_BYTES)

    def fingerprint(self) -> str:
        """Stable, human-comparable fingerprint for out-of-band checks (`tessera agency verify`).

        BLAKE2b-160, personalised, over both keys; base32 in eight groups of four characters.
        """
        raw = _blake2b(self.to_bytes(), size=20, person=_PERSON_FINGERPRINT)
        text = base64.b32encode(raw).decode("ascii")  # 20 bytes: 32 characters, no padding
        return "-".join(text[i : i + 4] for i in range(0, len(text), 4))

    def to_bytes(self) -> bytes:
        """The 64-byte wire form: signing key then encryption key."""
        return self.signing_key + self.encryption_key

    @classmethod
    def from_bytes(cls, data: bytes) -> PublicIdentity:
        """Parse :meth:`to_bytes` output; InvalidInput unless exactly 64 bytes."""
        _check_len("a public identity", data, 2 * KEY_BYTES)
        return cls(data[:KEY_BYTES], data[KEY_BYTES:])


class Identity:
    """A private key pair (Ed25519 + X25519) derived from one 32-byte seed. Never printed."""

    __slots__ = ("_encryption", "_public", "_seed", "_signing")

    def __init__(self, seed: bytes) -> None:
        _check_len("an identity seed", seed, KEY_BYTES)
        # Both keys come from one seed through labelled BLAKE2b, so a single secret is stored
        # and the two keys are independent (section 5: each node has both kinds of key).
        self._seed = seed
        self._signing = nacl.signing.SigningKey(_kdf(seed, _LABEL_SEED_SIGNING))
        self._encryption = nacl.public.PrivateKey(_kdf(seed, _LABEL_SEED_ENCRYPTION))
        self._public = PublicIdentity(
            bytes(self._signing.verify_key), bytes(self._encryption.public_key)
        )

    @classmethod
    def generate(cls) -> Identity:
        """A new identity from the operating system's CSPRNG."""
        return cls(nacl.utils.random(KEY_BYTES))

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """Deterministic identity from a 32-byte seed (known-answer tests, restore)."""
        return cls(seed)

    @classmethod
    def from_secret_bytes(cls, data: bytes) -> Identity:
        """Inverse of :meth:`to_secret_bytes`."""
        return cls(data)

    def to_secret_bytes(self) -> bytes:
        """The 32-byte seed, for wrapping with a key-encryption key. Never store it in clear."""
        return self._seed

    @property
    def public(self) -> PublicIdentity:
        """The public half."""
        return self._public

    def sign(self, label: bytes, message: bytes) -> bytes:
        """A 64-byte Ed25519 signature over the framed (label, message)."""
        return self._signing.sign(_frame(_check_label(label), message)).signature

    def __repr__(self) -> str:
        return f"Identity(<redacted>, fingerprint={self._public.fingerprint()})"

    __str__ = __repr__


def _verify_key(signer: PublicIdentity | bytes) -> bytes:
    if isinstance(signer, PublicIdentity):
        return signer.signing_key
    return _check_len("a verify key", signer, KEY_BYTES)


def verify(signer: PublicIdentity | bytes, label: bytes, message: bytes, signature: bytes) -> None:
    """Check a signature made by :meth:`Identity.sign`; BadSignature if it does not verify."""
    key = _verify_key(signer)
    signed = _frame(_check_label(label), message)
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        raise BadSignature("signature is malformed")
    try:
        nacl.signing.VerifyKey(key).verify(signed, signature)
    except nacl.exceptions.CryptoError:
        raise BadSignature("signature does not verify under this key and label") from None


# --- envelopes (DESIGN.md section 5) --------------------------------------------------------


def _envelope_message(recipient: PublicIdentity, payload: bytes) -> bytes:
    # The signature covers the recipient's keys, so a recipient cannot re-seal a signed payload
    # to a third party and pass it off as sent by the original signer (surreptitious forwarding).
    return _frame(_LABEL_ENVELOPE_BINDING, recipient.to_bytes(), payload)


def seal(sender: Identity, recipient: PublicIdentity, label: bytes, payload: bytes) -> bytes:
    """Sign ``payload`` as ``sender`` for ``recipient``, then seal it to the recipient's X25519 key.

    The sealed box is anonymous: the relay sees neither the signature nor the payload.
    """
    signature = sender.sign(label, _envelope_message(recipient, payload))
    box = nacl.public.SealedBox(nacl.public.PublicKey(recipient.encryption_key))
    return box.encrypt(signature + payload)


def open_sealed(
    recipient: Identity, expected_sender: PublicIdentity, label: bytes, sealed: bytes
) -> bytes:
    """Open an envelope made by :func:`seal` and return the payload.

    WrongRecipient if it was not sealed to ``recipient`` (or was altered); BadSignature if it was
    not signed by ``expected_sender`` for this recipient under ``label``.
    """
    _check_label(label)
    try:
        inner = nacl.public.SealedBox(recipient._encryption).decrypt(sealed)
    except (nacl.exceptions.CryptoError, TypeError):
        raise WrongRecipient("envelope does not open with this node's key") from None
    if len(inner) < SIGNATURE_BYTES:
        raise BadSignature("envelope carries no signature")
    signature, payload = inner[:SIGNATURE_BYTES], inner[SIGNATURE_BYTES:]
    verify(expected_sender, label, _envelope_message(recipient.public, payload), signature)
    return payload


# --- data at rest (DESIGN.md section 5) -----------------------------------------------------


class DataKey:
    """A 32-byte symmetric key (a survivor's data key, a node master key). Never printed."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        self._key = _check_len("a data key", key, KEY_BYTES)

    @classmethod
    def generate(cls) -> DataKey:
        """A fresh random key."""
        return cls(nacl.utils.random(KEY_BYTES))

    @classmethod
    def from_bytes(cls, key: bytes) -> DataKey:
        """Wrap 32 raw bytes (e.g. after unwrapping)."""
        return cls(key)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DataKey):
            return NotImplemented
        return nacl.bindings.sodium_memcmp(self._key, other._key)

    __hash__ = None  # type: ignore[assignment]  # keys are not dict keys

    def __repr__(self) -> str:
        return _redacted(self)

    __str__ = __repr__


def encrypt(key: DataKey, plaintext: bytes, associated_data: bytes) -> bytes:
    """XChaCha20-Poly1305 with a random 24-byte nonce prepended.

    ``associated_data`` must name the table, row and version (e.g. b"case|row-1|v3"), so a
    ciphertext cannot be moved to another row or rolled back to an older version.
    """
    return _aead_encrypt(key._key, plaintext, _LABEL_AT_REST, associated_data)


def decrypt(key: DataKey, ciphertext: bytes, associated_data: bytes) -> bytes:
    """Inverse of :func:`encrypt`; TamperedCiphertext on any failure."""
    return _aead_decrypt(key._key, ciphertext, _LABEL_AT_REST, associated_data)


def wrap_key(wrapping_key: DataKey, key: DataKey, context: bytes) -> bytes:
    """Encrypt ``key`` under ``wrapping_key`` (e.g. a survivor's data key under the node's record
    key); ``context`` such as b"survivor|<case id>" binds the result to its owner."""
    return _aead_encrypt(
        wrapping_key._key, key._key, _LABEL_WRAP_UNDER_DATA_KEY, _check_context(context)
    )


def unwrap_key(wrapping_key: DataKey, wrapped: bytes, context: bytes) -> DataKey:
    """Inverse of :func:`wrap_key`; TamperedCiphertext on wrong key, context or bytes."""
    raw = _aead_decrypt(
        wrapping_key._key, wrapped, _LABEL_WRAP_UNDER_DATA_KEY, _check_context(context)
    )
    return DataKey(raw)


def derive_key(parent: DataKey, label: bytes) -> DataKey:
    """A labelled subkey of ``parent`` (e.g. the blind-index key from a node master key)."""
    return DataKey(_kdf(parent._key, label))


def normalise_identifier(value: str) -> str:
    """NFKC, casefolded, whitespace collapsed: the form a blind index is computed over."""
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", value).casefold())
    return " ".join(folded.split())


def blind_index(key: DataKey, value: str) -> str:
    """Keyed BLAKE2b (hex) of a normalised identifier, for lookup without plaintext.

    Use a key from ``derive_key(master, LABEL_BLIND_INDEX)`` (optionally one per field).
    """
    normalised = normalise_identifier(value)
    if not normalised:
        raise InvalidInput("cannot index an empty identifier")
    mac = _blake2b(normalised.encode("utf-8"), key=key._key, person=_PERSON_BLIND_INDEX)
    return mac.hex()


# --- key-encryption key (DESIGN.md section 5) -----------------------------------------------


@dataclass(frozen=True)
class Argon2Params:
    """Argon2id cost. Store it next to the salt: changing it changes the key."""

    opslimit: int
    memlimit: int

    PRODUCTION: ClassVar[Argon2Params]
    TEST_CHEAP: ClassVar[Argon2Params]

    def __post_init__(self) -> None:
        a = nacl.pwhash.argon2id
        if not a.OPSLIMIT_MIN <= self.opslimit <= a.OPSLIMIT_MAX:
            raise InvalidInput("Argon2id opslimit out of range")
        if not a.MEMLIMIT_MIN <= self.memlimit <= a.MEMLIMIT_MAX:
            raise InvalidInput("Argon2id memlimit out of range")


Argon2Params.PRODUCTION = Argon2Params(
    nacl.pwhash.argon2id.OPSLIMIT_MODERATE, nacl.pwhash.argon2id.MEMLIMIT_MODERATE
)
Argon2Params.TEST_CHEAP = Argon2Params(
    nacl.pwhash.argon2id.OPSLIMIT_MIN, nacl.pwhash.argon2id.MEMLIMIT_MIN
)


class KeyEncryptionKey:
    """The node's key-encryption key: wraps data keys and identity secrets. Never printed.

    It comes from a passphrase (Argon2id) or a key file, never from the database. Wrapping and
    the check value use two independent labelled subkeys of it.
    """

    __slots__ = ("_check", "_wrap")

    def __init__(self, root: bytes) -> None:
        _check_len("a key-encryption key", root, KEY_BYTES)
        self._wrap = _kdf(root, _LABEL_KEK_WRAP)
        self._check = _kdf(root, _LABEL_KEK_CHECK)

    @classmethod
    def from_passphrase(
        cls, passphrase: str, salt: bytes, params: Argon2Params
    ) -> KeyEncryptionKey:
        """Argon2id over the NFC-normalised UTF-8 passphrase."""
        if not passphrase:
            raise InvalidInput("the passphrase is empty")
        _check_len("the salt", salt, SALT_BYTES)
        secret = unicodedata.normalize("NFC", passphrase).encode("utf-8")
        root = nacl.pwhash.argon2id.kdf(
            KEY_BYTES, secret, salt, opslimit=params.opslimit, memlimit=params.memlimit
        )
        return cls(root)

    @classmethod
    def from_key_file(cls, path: Path) -> KeyEncryptionKey:
        """Read a key file written by :meth:`write_key_file`; KeyFileError if it is not one."""
        try:
            with path.open("rb") as handle:
                raw = handle.read(_KEY_FILE_MAX_BYTES + 1)
        except OSError as exc:
            raise KeyFileError(
                f"cannot read key file {path}: {exc.strerror}",
                hint="check the path and permissions, or create one with the init command",
            ) from None
        text = raw.decode("ascii", errors="replace").strip()
        body = text.removeprefix(_KEY_FILE_PREFIX)
        if (
            len(raw) > _KEY_FILE_MAX_BYTES
            or body == text
            or re.fullmatch(r"[0-9a-f]{64}", body) is None
        ):
            raise KeyFileError(
                f"{path} is not a Tessera key file",
                hint=f"expected one line '{_KEY_FILE_PREFIX}' followed by 64 hex digits",
            )
        return cls(bytes.fromhex(body))

    @staticmethod
    def write_key_file(path: Path) -> None:
        """Create a new random key file with mode 0o600; refuses to overwrite an existing file."""
        line = (_KEY_FILE_PREFIX + nacl.utils.random(KEY_BYTES).hex() + "\n").encode("ascii")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise KeyFileError(
                f"refusing to overwrite existing key file {path}",
                hint="losing a key file loses every key it wraps; move it away yourself first",
            ) from None
        except OSError as exc:
            raise KeyFileError(f"cannot create key file {path}: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "wb") as handle:
                os.fchmod(handle.fileno(), 0o600)  # the umask may only narrow it; make it exact
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            path.unlink(missing_ok=True)  # never leave a half-written key file behind
            raise KeyFileError(f"cannot write key file {path}: {exc.strerror}") from None

    @staticmethod
    def new_salt() -> bytes:
        """A random Argon2id salt, stored next to the params and check value."""
        return nacl.utils.random(SALT_BYTES)

    def wrap(self, key: DataKey | bytes, context: bytes) -> bytes:
        """Encrypt a data key; ``context`` (e.g. b"survivor|<id>") becomes associated data."""
        raw = key._key if isinstance(key, DataKey) else _check_len("a data key", key, KEY_BYTES)
        return _aead_encrypt(self._wrap, raw, _LABEL_WRAP_DATA_KEY, _check_context(context))

    def unwrap(self, wrapped: bytes, context: bytes) -> DataKey:
        """Inverse of :meth:`wrap`; TamperedCiphertext on wrong key, context or bytes."""
        raw = _aead_decrypt(self._wrap, wrapped, _LABEL_WRAP_DATA_KEY, _check_context(context))
        return DataKey(raw)

    def wrap_secret(self, secret: bytes, context: bytes) -> bytes:
        """Encrypt arbitrary secret bytes (e.g. ``Identity.to_secret_bytes()``)."""
        return _aead_encrypt(self._wrap, secret, _LABEL_WRAP_SECRET, _check_context(context))

    def unwrap_secret(self, wrapped: bytes, context: bytes) -> bytes:
        """Inverse of :meth:`wrap_secret`; TamperedCiphertext on any failure."""
        return _aead_decrypt(self._wrap, wrapped, _LABEL_WRAP_SECRET, _check_context(context))

    def check_value(self) -> bytes:
        """32 bytes to store next to the salt, so a wrong passphrase is named as such."""
        return self._check

    def verify_check_value(self, check: bytes) -> None:
        """WrongPassphrase unless ``check`` came from this key's :meth:`check_value`."""
        if not isinstance(check, bytes) or not nacl.bindings.sodium_memcmp(check, self._check):
            raise WrongPassphrase(
                "the passphrase does not open this node's key",
                hint="check TESSERA_PASSPHRASE or the key file",
            )

    def __repr__(self) -> str:
        return _redacted(self)

    __str__ = __repr__


def _check_context(context: bytes) -> bytes:
    if not isinstance(context, bytes) or not context:
        raise InvalidInput("a wrapping context must be non-empty bytes")
    return context


# --- request authentication (DESIGN.md section 5) -------------------------------------------

_META_SIGNER = "x-tessera-signer"
_META_TIMESTAMP = "x-tessera-timestamp"
_META_NONCE = "x-tessera-nonce"
_META_SIGNATURE = "x-tessera-signature"
# Exact wire forms: lower-case hex of the right length; at most 18 digits keeps it under 2**63.
_META_FORMS = {
    _META_SIGNER: r"[0-9a-f]{64}",
    _META_TIMESTAMP: r"[0-9]{1,18}",
    _META_NONCE: r"[0-9a-f]{32}",
    _META_SIGNATURE: r"[0-9a-f]{128}",
}


@dataclass(frozen=True)
class RequestSignature:
    """The authentication a node attaches to every request: who, when, a nonce, the signature."""

    signer: bytes  # Ed25519 verify key
    timestamp_ms: int  # Unix time in milliseconds
    nonce: bytes
    signature: bytes

    def __post_init__(self) -> None:
        _check_len("signer", self.signer, KEY_BYTES)
        _check_len("nonce", self.nonce, REQUEST_NONCE_BYTES)
        _check_len("signature", self.signature, SIGNATURE_BYTES)
        if not isinstance(self.timestamp_ms, int) or not 0 <= self.timestamp_ms < 1 << 63:
            raise InvalidInput("timestamp_ms must be a non-negative 64-bit integer")

    def to_metadata(self) -> list[tuple[str, str]]:
        """gRPC metadata pairs (lower-case ASCII keys, hex / decimal values)."""
        return [
            (_META_SIGNER, self.signer.hex()),
            (_META_TIMESTAMP, str(self.timestamp_ms)),
            (_META_NONCE, self.nonce.hex()),
            (_META_SIGNATURE, self.signature.hex()),
        ]

    @classmethod
    def from_metadata(cls, metadata: Iterable[tuple[str, str | bytes]]) -> RequestSignature:
        """Parse :meth:`to_metadata` pairs; RequestAuthError if any is missing or malformed."""
        found: dict[str, str] = {}
        for key, value in metadata:
            if key in _META_FORMS:
                if key in found:
                    raise RequestAuthError(f"request metadata repeats {key}")
                found[key] = value if isinstance(value, str) else value.decode("ascii", "replace")
        for key, pattern in _META_FORMS.items():
            if key not in found:
                raise RequestAuthError(
                    f"request is not signed: {key} is missing",
                    hint="the client must sign every request with its node key",
                )
            if re.fullmatch(pattern, found[key], flags=re.ASCII) is None:
                raise RequestAuthError(f"request metadata {key} is malformed")
        return cls(
            bytes.fromhex(found[_META_SIGNER]),
            int(found[_META_TIMESTAMP]),
            bytes.fromhex(found[_META_NONCE]),
            bytes.fromhex(found[_META_SIGNATURE]),
        )


def _request_message(method: str, body: bytes, timestamp_ms: int, nonce: bytes) -> bytes:
    if not isinstance(method, str) or not method:
        raise InvalidInput("a request method name is required")
    body_digest = digest(_LABEL_REQUEST_BODY, body)
    return _frame(method.encode("utf-8"), body_digest, struct.pack(">Q", timestamp_ms), nonce)


def sign_request(
    identity: Identity, method: str, body: bytes, now: float | None = None
) -> RequestSignature:
    """Sign a request (full gRPC method name and serialised body) with a fresh nonce."""
    timestamp_ms = int((time.time() if now is None else now) * 1000)
    nonce = nacl.utils.random(REQUEST_NONCE_BYTES)
    message = _request_message(method, body, timestamp_ms, nonce)
    signature = identity.sign(LABEL_REQUEST, message)
    return RequestSignature(identity.public.signing_key, timestamp_ms, nonce, signature)


class NonceGuard(Protocol):
    """What :func:`verify_request` asks of a replay guard (tessera.replay.ReplayGuard)."""

    def check(self, sig: RequestSignature, now: float) -> None:
        """Raise unless ``sig`` is fresh and its nonce unseen; then remember it."""


def verify_request(
    signer: PublicIdentity | bytes,
    method: str,
    body: bytes,
    sig: RequestSignature,
    guard: NonceGuard,
    *,
    now: float | None = None,
) -> None:
    """Authenticate a request: signature first, then freshness and replay.

    The signature is checked before the replay guard so forged requests never enter its cache.
    """
    key = _verify_key(signer)
    if key != sig.signer:  # public values: no need for a constant-time comparison
        raise BadSignature("request names a different signer than the key it was checked with")
    message = _request_message(method, body, sig.timestamp_ms, sig.nonce)
    verify(key, LABEL_REQUEST, message, sig.signature)
    guard.check(sig, time.time() if now is None else now)


# --- pairwise masks for aggregation rounds (DESIGN.md section 7) ----------------------------


def pairwise_mask(own: Identity, peer: PublicIdentity, round_id: bytes, cells: int) -> list[int]:
    """The mask vector shared by ``own`` and ``peer`` for one round: ``cells`` values in [0, 2**64).

    Both sides compute the same vector. The caller applies the convention of section 7: of
    participants i < j, i adds the mask and j subtracts it, mod 2**64, so masks cancel in the sum.
    """
    if not isinstance(cells, int) or not 1 <= cells <= MAX_MASK_CELLS:
        raise InvalidInput(f"cells must be between 1 and {MAX_MASK_CELLS}")
    if not isinstance(round_id, bytes) or not round_id:
        raise InvalidInput("a round id is required")
    if peer.encryption_key == own.public.encryption_key:
        raise InvalidInput("a participant has no mask with itself")
    try:
        shared = nacl.bindings.crypto_scalarmult(bytes(own._encryption), peer.encryption_key)
    except nacl.exceptions.CryptoError:
        raise InvalidInput("peer encryption key is not usable (low-order point)") from None
    # Section 7 recipe: BLAKE2b keyed with the X25519 shared secret, personalised for masks,
    # salted with the round id (hashed to the 16-byte salt size). Both public keys, in sorted
    # order, are the input so the key is bound to this pair.
    salt = _blake2b(round_id, size=16, person=_PERSON_ROUND)
    low, high = sorted((own.public.encryption_key, peer.encryption_key))
    pair_key = _blake2b(_frame(_LABEL_MASK, low, high), key=shared, salt=salt, person=_PERSON_MASK)
    stream = nacl.bindings.randombytes_buf_deterministic(8 * cells, pair_key)
    return list(struct.unpack(f"<{cells}Q", stream))


# --- digests --------------------------------------------------------------------------------


def digest(label: bytes, data: bytes) -> bytes:
    """Labelled BLAKE2b-256 for commitments (consent commitment, audit hash chain)."""
    return _blake2b(_frame(_check_label(label), data), person=_PERSON_DIGEST)


def mac(key: DataKey, label: bytes, *parts: bytes) -> bytes:
    """Labelled keyed BLAKE2b-256 over the framed ``parts`` (a record's version seal).

    Use a key from ``derive_key(master, label)``; only its holder can make or check the tag.
    """
    return _blake2b(_frame(_check_label(label), *parts), key=key._key, person=_PERSON_MAC)


def mac_matches(key: DataKey, label: bytes, tag: bytes, *parts: bytes) -> bool:
    """Whether ``tag`` is :func:`mac` of ``parts``, compared in constant time."""
    expected = mac(key, label, *parts)
    return (
        isinstance(tag, bytes)
        and len(tag) == len(expected)
        and nacl.bindings.sodium_memcmp(tag, expected)
    )
