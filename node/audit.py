"""The node's audit log as a hash chain signed by the node (DESIGN.md section 6; issue 4).

Pure functions over bytes and domain objects; ``node.store`` does the I/O. Each entry's hash is
``digest(LABEL_AUDIT, prev_hash || canonical entry)``, and the node signs that hash with its
Ed25519 identity. Verification walks the chain in sequence order, so an edited entry (hash
mismatch), a dropped one (sequence gap or broken link), a reordered pair (broken link) or a forged
one (bad signature) is named with its sequence number. The chain's head lives in a row every append
locks; dropping the newest entries together with the head is caught by comparing the head against
the copy the node keeps in its home directory (``audit-head``), written after each commit.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from node.domain import AuditReport
from tessera import crypto, labels
from tessera.errors import BadSignature

GENESIS_HASH = bytes(32)


@dataclass(frozen=True)
class SealedEntry:
    """An audit entry as stored: its canonical content plus its links and signature."""

    seq: int
    at: dt.datetime
    actor: str
    action: str
    case_id: str | None
    detail_json: str
    prev_hash: bytes
    entry_hash: bytes
    signature: bytes


def canonical_detail(detail: Mapping[str, Any]) -> str:
    """Detail as canonical JSON (sorted keys, no spaces) so its hash is reproducible."""
    return json.dumps(detail, sort_keys=True, separators=(",", ":"), default=str)


def _content(
    seq: int, at: dt.datetime, actor: str, action: str, case_id: str | None, detail_json: str
) -> bytes:
    # Timestamps are hashed in a fixed UTC form so a database round trip cannot change them.
    at_utc = at.astimezone(dt.UTC) if at.tzinfo else at.replace(tzinfo=dt.UTC)
    record = [seq, at_utc.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), actor, action, case_id, detail_json]
    return json.dumps(record, separators=(",", ":")).encode()


def seal_entry(
    identity: crypto.Identity,
    prev_hash: bytes,
    seq: int,
    at: dt.datetime,
    actor: str,
    action: str,
    case_id: str | None,
    detail: Mapping[str, Any],
) -> SealedEntry:
    """Chain a new entry onto ``prev_hash`` and sign it with the node's identity."""
    detail_json = canonical_detail(detail)
    entry_hash = crypto.digest(
        labels.LABEL_AUDIT, prev_hash + _content(seq, at, actor, action, case_id, detail_json)
    )
    return SealedEntry(
        seq=seq,
        at=at,
        actor=actor,
        action=action,
        case_id=case_id,
        detail_json=detail_json,
        prev_hash=prev_hash,
        entry_hash=entry_hash,
        signature=identity.sign(labels.LABEL_AUDIT, entry_hash),
    )


def _signed_by_any(
    signers: Sequence[crypto.PublicIdentity], entry_hash: bytes, signature: bytes
) -> bool:
    # The node's current key or one it had before a key rotation (node.keyring).
    for signer in signers:
        try:
            crypto.verify(signer, labels.LABEL_AUDIT, entry_hash, signature)
            return True
        except BadSignature:
            continue
    return False


def verify_chain(
    entries: Iterable[SealedEntry],
    signers: Sequence[crypto.PublicIdentity],
    head: tuple[int, bytes] | None = None,
) -> AuditReport:
    """Check every link, hash and signature; compare the end of the chain with ``head``.

    Returns a report naming each problem by sequence number rather than stopping at the first,
    so an administrator sees the extent of any tampering.
    """
    problems: list[str] = []
    expected_seq = 1
    prev_hash = GENESIS_HASH
    count = 0
    for entry in entries:
        count += 1
        if entry.seq != expected_seq:
            problems.append(f"entry {expected_seq} is missing (next present is {entry.seq})")
        if entry.prev_hash != prev_hash:
            problems.append(f"entry {entry.seq} does not link to the entry before it")
        content = _content(
            entry.seq, entry.at, entry.actor, entry.action, entry.case_id, entry.detail_json
        )
        recomputed = crypto.digest(labels.LABEL_AUDIT, entry.prev_hash + content)
        if recomputed != entry.entry_hash:
            problems.append(f"entry {entry.seq} was edited (its hash does not match its content)")
        if not _signed_by_any(signers, entry.entry_hash, entry.signature):
            problems.append(f"entry {entry.seq} is not signed by this node")
        prev_hash = entry.entry_hash
        expected_seq = entry.seq + 1
    if head is not None:
        head_seq, head_hash = head
        if count and (expected_seq - 1, prev_hash) != (head_seq, head_hash):
            problems.append(
                f"the chain ends at entry {expected_seq - 1} but the recorded head is entry "
                f"{head_seq}: entries were dropped or the head was altered"
            )
        elif not count and head_seq:
            problems.append(f"the log is empty but the recorded head is entry {head_seq}")
    return AuditReport(entries=count, ok=not problems, problems=tuple(problems))
