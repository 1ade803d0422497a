"""Credentials: a person's own key pair plus how to reach their server (issue 4 item 6).

Node staff and broker operators both hold one. The servers record the address they actually
bound in ``run/node.json`` in their home, so a credential in the same home finds them even when
they listen on a port chosen at start-up.

A credential lives in that person's own ``--home`` as ``credential.json`` (mode 0600) and never
leaves it: only its public key is registered with the node. ``node init`` writes the first
administrator's credential into the node's own home, so one person on one laptop has nothing more
to set up.

A staff credential's secret key is locked (issue 14 item 5): wrapped under a key-encryption key
from a passphrase (Argon2id, with its own salt) or a key file, exactly as the node's keyring is
(tessera.crypto.KeyEncryptionKey); the file holds in clear only the name, the node's address and
certificate, the public key, and what is needed to derive the key plus a check value that names a
wrong passphrase as such. The administrator's credential in a node's own home is locked the way
the node is: by the node's passphrase or key file. A credential written before locking existed
(format v1, secret in clear) still opens, marked unprotected, so the CLI can warn and offer
``tessera node credential protect``.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tessera import crypto, passphrases
from tessera.errors import (
    ConfigError,
    Conflict,
    InvalidInput,
    TamperedCiphertext,
    WrongPassphrase,
)
from tessera.files import atomic_write

CREDENTIAL_FILE = "credential.json"
RUN_FILE = Path("run") / "node.json"
_FORMAT_CLEAR = "tessera-staff-credential-v1"
_FORMAT = "tessera-staff-credential-v2"
_CONTEXT = b"tessera/v1/staff-credential/secret"

#: Gives the passphrase when a credential turns out to need one (a prompt, an environment value).
Unlock = Callable[[], str]


@dataclass(frozen=True)
class Credential:
    """A staff member's identity and their node's address and TLS certificate.

    ``protected`` is False only for a credential read from a file that holds its secret in clear.
    """

    name: str
    identity: crypto.Identity
    node_address: str
    node_certificate: bytes
    protected: bool = True

    def __repr__(self) -> str:
        return f"Credential(name={self.name!r}, node_address={self.node_address!r})"


@dataclass(frozen=True)
class PassphraseLock:
    """Lock a credential under Argon2id of ``passphrase`` (which must pass the policy)."""

    passphrase: str
    params: crypto.Argon2Params

    def __repr__(self) -> str:
        return "PassphraseLock(<redacted>)"


@dataclass(frozen=True)
class KeyFileLock:
    """Lock a credential under a key file (created, mode 0600, if missing)."""

    key_file: Path


Lock = PassphraseLock | KeyFileLock


def write(home: Path, credential: Credential, lock: Lock | None, *, replace: bool = False) -> Path:
    """Write ``home/credential.json`` with mode 0600, its secret locked by ``lock``.

    ``lock=None`` writes the secret in clear (the broker's operator and coordinator credentials,
    which are not staff credentials). Refuses to overwrite a credential unless ``replace``, which
    swaps the file atomically (re-locking a credential in place). A passphrase below the strength
    policy is refused (WeakPassphrase) before anything is written.
    """
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = home / CREDENTIAL_FILE
    document: dict[str, Any] = {
        "format": _FORMAT if lock is not None else _FORMAT_CLEAR,
        "name": credential.name,
        "node_address": credential.node_address,
        "node_certificate": credential.node_certificate.decode(),
    }
    if lock is None:
        document["secret"] = credential.identity.to_secret_bytes().hex()
    else:
        document.update(_locked_secret(credential, lock))
    content = json.dumps(document, indent=2).encode()
    if replace:
        atomic_write(path, content)
        return path
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(
            f"{path} already exists", hint="use another --home for another person"
        ) from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(content)
    return path


def _locked_secret(credential: Credential, lock: Lock) -> dict[str, Any]:
    part: dict[str, Any] = {
        "public_signing_key": credential.identity.public.signing_key.hex(),
    }
    if isinstance(lock, PassphraseLock):
        passphrases.require_strong(
            lock.passphrase, context=(credential.name,), what="credential passphrase"
        )
        salt = crypto.KeyEncryptionKey.new_salt()
        kek = crypto.KeyEncryptionKey.from_passphrase(lock.passphrase, salt, lock.params)
        part.update(
            lock="passphrase",
            salt=base64.b64encode(salt).decode(),
            opslimit=lock.params.opslimit,
            memlimit=lock.params.memlimit,
        )
    else:
        if not lock.key_file.exists():
            crypto.KeyEncryptionKey.write_key_file(lock.key_file)
        kek = crypto.KeyEncryptionKey.from_key_file(lock.key_file)
        part.update(lock="key-file", key_file=str(lock.key_file.resolve()))
    wrapped = kek.wrap_secret(credential.identity.to_secret_bytes(), _context(credential.name))
    part.update(
        check=base64.b64encode(kek.check_value()).decode(),
        secret=base64.b64encode(wrapped).decode(),
    )
    return part


def _context(name: str) -> bytes:
    # Binds the wrapped secret to this credential's holder: a secret pasted in from another
    # person's file fails to open here.
    return _CONTEXT + b"|" + name.encode()


def needs_passphrase(home: Path) -> bool:
    """Whether the credential in ``home`` is locked by a passphrase (False if there is none)."""
    try:
        document = json.loads((home / CREDENTIAL_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(document, dict) and document.get("lock") == "passphrase"


def read(home: Path, unlock: Unlock | None = None) -> Credential:
    """Load and unlock the credential in ``home``.

    A passphrase-locked one asks ``unlock()`` for its passphrase (ConfigError if there is no way
    to get one; WrongPassphrase if it does not open it); a key-file-locked one reads its key file.
    ConfigError saying how to get a credential if there is none.
    """
    path = home / CREDENTIAL_FILE
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(document, dict):
            raise ValueError("not a JSON object")
        if document.get("format") == _FORMAT_CLEAR:
            secret = bytes.fromhex(document["secret"])
            protected = False
        elif document.get("format") == _FORMAT:
            secret = _unlock(home, document, unlock)
            protected = True
        else:
            raise ValueError("unknown format")
        return Credential(
            name=str(document["name"]),
            identity=crypto.Identity.from_secret_bytes(secret),
            node_address=str(document["node_address"]),
            node_certificate=str(document["node_certificate"]).encode(),
            protected=protected,
        )
    except FileNotFoundError:
        raise ConfigError(
            f"no staff credential in {home}",
            hint="run `tessera node init` there, or ask your administrator for a credential "
            "(`tessera node staff add`) and pass its folder with --home",
        ) from None
    except (OSError, ValueError, KeyError, TypeError, InvalidInput) as exc:
        raise ConfigError(
            f"{path} is not a valid staff credential ({exc})",
            hint="ask your administrator for a new one",
        ) from None


def _unlock(home: Path, document: dict[str, Any], unlock: Unlock | None) -> bytes:
    if document["lock"] == "key-file":
        kek = crypto.KeyEncryptionKey.from_key_file(Path(document["key_file"]))
    elif document["lock"] == "passphrase":
        if unlock is None:
            raise ConfigError(
                f"the staff credential in {home} is protected by a passphrase and none was given",
                hint="set TESSERA_PASSPHRASE or run on a terminal",
            )
        params = crypto.Argon2Params(int(document["opslimit"]), int(document["memlimit"]))
        salt = base64.b64decode(document["salt"], validate=True)
        kek = crypto.KeyEncryptionKey.from_passphrase(unlock(), salt, params)
    else:
        raise ValueError(f"unknown lock {document['lock']!r}")
    try:
        kek.verify_check_value(base64.b64decode(document["check"], validate=True))
    except WrongPassphrase:
        raise WrongPassphrase(
            f"the passphrase does not open the staff credential in {home}",
            hint="check TESSERA_PASSPHRASE (the passphrase chosen for this credential)"
            if document["lock"] == "passphrase"
            else f"check the key file {document['key_file']}",
        ) from None
    try:
        secret = kek.unwrap_secret(
            base64.b64decode(document["secret"], validate=True), _context(str(document["name"]))
        )
    except TamperedCiphertext:
        raise TamperedCiphertext(
            f"the staff credential in {home} is damaged: its secret fails authentication",
            hint="ask your administrator for a new one",
        ) from None
    if crypto.Identity.from_secret_bytes(secret).public.signing_key.hex() != document.get(
        "public_signing_key"
    ):
        raise TamperedCiphertext(
            f"the staff credential in {home} names another key than it holds",
            hint="ask your administrator for a new one",
        )
    return secret


def resolve_address(home: Path, credential: Credential) -> str:
    """Where the node listens: the address a running node recorded in this home, else the
    credential's."""
    return recorded_address(home) or credential.node_address


def recorded_address(home: Path) -> str | None:
    """The address a server running from ``home`` recorded in its run file, if there is one."""
    run_file = home / RUN_FILE
    if run_file.exists():
        try:
            return str(json.loads(run_file.read_text())["address"])
        except (OSError, ValueError, KeyError):
            pass
    return None


def reachable_address(listen: str, port: int) -> str:
    """The address clients use for a server bound on ``listen`` that got ``port``."""
    host = listen.rsplit(":", 1)[0] or "127.0.0.1"
    wildcard = host in ("0.0.0.0", "[::]")  # noqa: S104 - recognising, not binding
    return f"{'127.0.0.1' if wildcard else host}:{port}"


def write_run_file(home: Path, address: str) -> None:
    """Record where a running server listens (removed again on a graceful stop)."""
    path = home / RUN_FILE
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text(json.dumps({"address": address, "pid": os.getpid()}))


# --- the run lock: is a node serving from this home? (issue 14 item 6) -----------------------

RUN_LOCK = Path("run") / "serve.lock"


class RunLock:
    """An flock on ``run/serve.lock`` in a home.

    A serving node holds it *shared* for as long as it runs (several replicas may); the kernel
    drops it when the process ends, however it ends, SIGKILL and power loss included, so unlike
    the run file it can never be stale. A restore takes it *exclusive*: it gets it only when no
    node serves, and while it holds it no node can start.
    """

    __slots__ = ("_fd", "stale_run_file")

    def __init__(self, fd: int, stale_run_file: bool = False) -> None:
        self._fd = fd
        #: A run file was left behind by a node that died without stopping (and was removed).
        self.stale_run_file = stale_run_file

    def release(self) -> None:
        """Let go of the lock (closing the file releases it)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _flock(home: Path, operation: int) -> int | None:
    path = home / RUN_LOCK
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Not inherited by child processes (PEP 446), so none of them can keep a dead node "alive".
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def hold_serving_lock(home: Path) -> RunLock:
    """Take the run lock exclusive, for a node about to serve from ``home``: one process serves a
    home at a time. Conflict while another node serves it or a restore runs."""
    fd = _flock(home, fcntl.LOCK_EX)
    if fd is None:
        pid = _recorded_pid(home / RUN_FILE)
        if pid is not None:
            raise Conflict(
                f"a node is already serving from {home} (pid {pid})",
                hint="one process serves a home; stop the other `tessera node serve` first",
            )
        raise Conflict(
            f"a restore is running in {home}, or another node is starting from it",
            hint="wait for `tessera node restore` to finish, then start the node",
        )
    return RunLock(fd)


def lock_stopped_home(home: Path) -> RunLock:
    """Take the run lock exclusive: proof that no node serves from ``home``, kept until released.

    Conflict (naming the pid the run file records) while a node serves. A run file left by a node
    that died without stopping is removed: its process is gone, whatever pid it names.
    """
    fd = _flock(home, fcntl.LOCK_EX)
    run_file = home / RUN_FILE
    if fd is None:
        pid = _recorded_pid(run_file)
        raise Conflict(
            f"a node is serving from {home}" + (f" (pid {pid})" if pid else ""),
            hint="stop `tessera node serve` first",
        )
    stale = run_file.exists()
    run_file.unlink(missing_ok=True)
    return RunLock(fd, stale_run_file=stale)


def _recorded_pid(run_file: Path) -> int | None:
    try:
        return int(json.loads(run_file.read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
