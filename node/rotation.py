"""Rotating an agency's own keys: ``tessera node rotate-keys`` (issue 16; DESIGN.md section 5).

The node makes a new identity (Ed25519 + X25519), and the broker's directory records a ROTATE
statement signed by the old signing key, with a possession signature by the new one. Peers pin
the new keys when they next sync (tessera.directory: a rotation is accepted only if signed by the
key they had pinned). The old identity is kept in the keyring, retired: it signs nothing again,
but it still opens what was sealed to it (envelopes already on their way, escrowed tombstones,
checkpoints) and verifies the audit entries it signed. From the moment the broker records the
rotation it refuses the old key, so whoever holds a copy of it can no longer act as the agency.

It runs with the node stopped (like a restore), on the node's host, with the node's passphrase.
Order, so that a crash anywhere leaves a node that knows every key it may need:

1. the new identity is written into the keyring as *pending* (the old one still current);
2. the broker records the rotation;
3. the keyring makes the new identity current and retires the old one;
4. the node re-syncs its directory and records the rotation in its audit log.

A node whose keyring still holds a pending identity refuses to serve; running ``rotate-keys``
again finishes the rotation (the broker recorded it) or starts afresh (it did not).

When someone else rotated the agency's keys first (they stole a copy), nothing signed by the
old key is accepted any more, and the broker operator revokes the agency (a revoked id never comes
back). ``tessera node re-enrol CODE`` then enrols the same node under a new agency id with new
keys (the old ones retired), and deposits every erasure and staff removal it knows into the new
agency's escrow; partners verify the new fingerprint by phone (docs/operations.md).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path

from node import directory_sync, escrow
from node import keyring as keyring_mod
from node.keyring import Keyring
from node.store.cases import NodeStore
from node.store.database import open_database
from node.store.escrow import EscrowStore
from tessera import crypto, directory
from tessera.config import Settings
from tessera.errors import ConfigError, Conflict, Unauthenticated
from tessera.escrow import GENESIS_CHAIN
from tessera.logs import fields

log = logging.getLogger(__name__)
ACTOR = "system:rotate-keys"


@dataclass(frozen=True)
class Rotated:
    """The fingerprints before and after, and how many identities the node now keeps retired."""

    agency_id: str
    old_fingerprint: str
    new_fingerprint: str
    retired: int
    resumed: bool


def rotate_agency_keys(settings: Settings, passphrase: str | None) -> Rotated:
    """Rotate the enrolled node's keys (module docstring); the caller holds the home's lock."""
    home = settings.home
    keyring = keyring_mod.open_keyring(home, passphrase)
    link = directory_sync.load_link(home)
    if keyring.pending is not None:
        keyring, recorded = _settle_pending(home, keyring, link, passphrase)
        if recorded:
            return _finish(settings, keyring, link, passphrase, resumed=True)
    old = keyring.identity
    try:
        cache = directory_sync.sync(home, old, link)
    except Unauthenticated:
        raise _taken_over(link.agency_id) from None
    record = cache.records.get(link.agency_id)
    if record is None or record.identity.signing_key != old.public.signing_key:
        raise _taken_over(link.agency_id)
    new = crypto.Identity.generate()
    keyring = keyring_mod.begin_identity_change(home, keyring, new, passphrase)
    statement, possession = directory.rotate_statement(old, new, record, dt.datetime.now(dt.UTC))
    directory_sync.rotate_keys(link, old, statement, possession)
    keyring = keyring_mod.complete_identity_change(home, keyring, passphrase)
    return _finish(settings, keyring, link, passphrase, resumed=False)


def _taken_over(agency_id: str) -> Conflict:
    return Conflict(
        f"the broker no longer holds this node's key for {agency_id}: someone else may have "
        "rotated it with a stolen copy of the key, or the agency was revoked",
        hint="ask the broker operator to revoke the agency and issue a new enrolment code, then "
        "`tessera node re-enrol CODE` (docs/operations.md, 'A compromised agency key')",
    )


def re_enrol(settings: Settings, passphrase: str | None, code: str, services: list[str]) -> Rotated:
    """Enrol this (stopped) node under the new agency id in ``code``, with new keys; the old
    identity is retired and the new agency's escrow receives every erasure and removal the node
    knows (module docstring). ``services`` default to those the old agency listed."""
    home = settings.home
    keyring = keyring_mod.open_keyring(home, passphrase)
    old_link = directory_sync.load_link(home)
    if not services:
        record = directory_sync.load_cache(home).records.get(old_link.agency_id)
        services = list(record.services) if record is not None else []
    if keyring.pending is not None:
        keyring = keyring_mod.abandon_identity_change(home, keyring, passphrase)
    new = crypto.Identity.generate()
    keyring = keyring_mod.begin_identity_change(home, keyring, new, passphrase)
    link = directory_sync.enrol(home, new, code, settings.name, services)
    keyring = keyring_mod.complete_identity_change(home, keyring, passphrase)
    # The new agency's escrow starts empty: what the node confirmed of the old one says nothing
    # about it, and every erasure and removal goes into it again.
    escrow.forget_agency(home)
    engine = open_database(settings.effective_database_url, keyring)
    try:
        store = NodeStore(engine, keyring, home)
        escrow_store = EscrowStore(store)
        escrow_store.set_anchor(0, GENESIS_CHAIN, dt.datetime.now(dt.UTC))
        queued = escrow_store.requeue_all()
        old, fresh = keyring.retired[0].public.fingerprint(), new.public.fingerprint()
        store.audit(
            ACTOR,
            "keys.re_enrol",
            None,
            {
                "old_agency": old_link.agency_id,
                "new_agency": link.agency_id,
                "old_key": old,
                "new_key": fresh,
                "tombstones": queued,
            },
        )
    finally:
        engine.dispose()
    log.info("keys.re_enrolled", extra=fields(old=old_link.agency_id, new=link.agency_id))
    return Rotated(link.agency_id, old, fresh, len(keyring.retired), resumed=False)


def _settle_pending(
    home: Path, keyring: Keyring, link: directory_sync.BrokerLink, passphrase: str | None
) -> tuple[Keyring, bool]:
    """A rotation was interrupted: complete it if the broker recorded it (True), else forget
    it (False)."""
    assert keyring.pending is not None
    try:
        cache = directory_sync.sync(home, keyring.identity, link)
    except Unauthenticated:
        # The broker no longer knows the current key: it recorded the rotation.
        cache = directory_sync.sync(home, keyring.pending, link)
    record = cache.records.get(link.agency_id)
    key = record.identity.signing_key if record is not None else b""
    if key == keyring.pending.public.signing_key:
        log.info("keys.rotation_resumed", extra=fields(agency=link.agency_id))
        return keyring_mod.complete_identity_change(home, keyring, passphrase), True
    log.info("keys.rotation_abandoned", extra=fields(agency=link.agency_id))
    return keyring_mod.abandon_identity_change(home, keyring, passphrase), False


def _finish(
    settings: Settings,
    keyring: Keyring,
    link: directory_sync.BrokerLink,
    passphrase: str | None,
    *,
    resumed: bool,
) -> Rotated:
    directory_sync.sync(settings.home, keyring.identity, link)
    old = keyring.retired[0].public.fingerprint()
    new = keyring.identity.public.fingerprint()
    engine = open_database(settings.effective_database_url, keyring)
    try:
        NodeStore(engine, keyring, settings.home).audit(
            ACTOR, "keys.rotate", None, {"old_key": old, "new_key": new, "resumed": resumed}
        )
    finally:
        engine.dispose()
    log.info("keys.rotated", extra=fields(agency=link.agency_id, old=old, new=new))
    return Rotated(link.agency_id, old, new, len(keyring.retired), resumed)


def refuse_pending(keyring: Keyring) -> None:
    """ConfigError if a rotation was interrupted: the node does not serve half-rotated."""
    if keyring.pending is not None:
        raise ConfigError(
            "a key rotation of this node was interrupted",
            hint="run `tessera node rotate-keys` to finish it (the node must be stopped)",
        )
