"""The append-only log: the hash chain, the broker's log entries and signed heads, and a node's
verification of a head, an entry, an extension of its verified log and a consistency proof
(directory.proto header).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from tessera import crypto, labels
from tessera.crypto import Identity
from tessera.directory.fields import (
    DEFAULT_LIMITS,
    GENESIS_CHAIN,
    DirectoryLimits,
    check_agency_id,
    check_chain,
    check_key,
    parse_body,
    short_key,
    sign_blob,
)
from tessera.directory.model import (
    BadDirectoryData,
    DirectoryInconsistent,
    KeyChanged,
    VerifiedEntry,
    VerifiedHead,
)
from tessera.directory.rules import check_authority
from tessera.directory.statements import parse_statement
from tessera.errors import BadSignature, InvalidInput
from tessera.timestamps import to_datetime, to_timestamp
from tessera.v1 import common_pb2 as common_pb
from tessera.v1 import directory_pb2 as directory_pb

# --- the hash chain (directory.proto header) --------------------------------------------------


def leaf_hash(entry_body: bytes) -> bytes:
    """leaf(n) = digest("tessera/v1/directory-entry", b_n), b_n the LogEntry body bytes."""
    if not isinstance(entry_body, bytes):
        raise InvalidInput("a log entry body must be bytes")
    return crypto.digest(labels.LABEL_DIRECTORY_ENTRY, entry_body)


def next_chain(prev_chain: bytes, leaf: bytes) -> bytes:
    """chain(n) = digest("tessera/v1/directory-head", chain(n-1) || leaf(n))."""
    check_chain(prev_chain, "previous chain value")
    check_chain(leaf, "leaf hash")
    return crypto.digest(labels.LABEL_DIRECTORY_HEAD, prev_chain + leaf)


# --- broker side: appending entries, signing heads --------------------------------------------


def append(
    broker: Identity,
    prev_chain: bytes,
    sequence: int,
    statement: common_pb.SignedBlob,
    possession: bytes,
    now: datetime,
) -> tuple[common_pb.SignedBlob, bytes]:
    """Wrap a checked statement in LogEntry ``sequence`` and sign it; return it and chain(sequence).

    ``prev_chain`` is chain(sequence - 1) (:data:`GENESIS_CHAIN` for sequence 1). The statement is
    copied byte for byte; call :func:`check_statement` first. The new chain value is computed
    from the exact signed body (directory.proto header).
    """
    check_chain(prev_chain, "previous chain value")
    if not isinstance(sequence, int) or not 1 <= sequence < 1 << 63:
        raise InvalidInput("a log entry's sequence starts at 1")
    if not isinstance(statement, common_pb.SignedBlob) or not statement.body:
        raise InvalidInput("append needs the statement as a SignedBlob")
    if not isinstance(possession, bytes):
        raise InvalidInput("the possession signature must be bytes (empty if not a ROTATE)")
    entry = directory_pb.LogEntry(
        sequence=sequence, possession_signature=possession, previous_chain=prev_chain
    )
    entry.statement.CopyFrom(statement)
    entry.logged_at.CopyFrom(to_timestamp(now, "now"))
    body = entry.SerializeToString(deterministic=True)
    blob = sign_blob(broker, labels.LABEL_DIRECTORY_ENTRY, body)
    return blob, next_chain(prev_chain, leaf_hash(body))


def sign_head(
    broker: Identity, region: str, size: int, chain: bytes, now: datetime
) -> common_pb.SignedBlob:
    """The broker's signed LogHead: ``chain`` must be chain(``size``) (directory.proto header)."""
    check_chain(chain, "chain value")
    if not isinstance(size, int) or not 0 <= size < 1 << 63:
        raise InvalidInput("a log size is a non-negative integer")
    if size == 0 and chain != GENESIS_CHAIN:
        raise InvalidInput("the head of an empty log must carry chain(0), 32 zero bytes")
    head = directory_pb.LogHead(
        region=check_agency_id(region, "region", DEFAULT_LIMITS), size=size, chain=chain
    )
    head.signed_at.CopyFrom(to_timestamp(now, "now"))
    return sign_blob(
        broker, labels.LABEL_DIRECTORY_HEAD, head.SerializeToString(deterministic=True)
    )


# --- node side: verifying heads, entries and extensions ---------------------------------------


def verify_head(
    head_blob: common_pb.SignedBlob,
    broker_key: bytes,
    region: str,
    *,
    limits: DirectoryLimits = DEFAULT_LIMITS,
) -> VerifiedHead:
    """Verify a broker-signed LogHead against the pinned broker key and the node's region.

    BadDirectoryData if it is not signed by ``broker_key`` under tessera/v1/directory-head, is
    malformed, or names another region. Freshness is not judged here: a broker can always show
    an old head (a freeze); callers may compare ``signed_at`` with their clock.
    """
    broker_key = check_key(broker_key, "broker_key")
    region = check_agency_id(region, "region", limits)
    try:
        body = _verified_body(
            head_blob, "head", broker_key, labels.LABEL_DIRECTORY_HEAD, limits.max_head_bytes
        )
        head = directory_pb.LogHead()
        parse_body(head, body, "head")
        if head.region != region:
            raise InvalidInput(f"it is the head of region {head.region!r}, not {region!r}")
        chain = check_chain(head.chain, "head chain value")
        if head.size >= 1 << 63:
            raise InvalidInput("its size is out of range")
        if head.size == 0 and chain != GENESIS_CHAIN:
            raise InvalidInput("an empty log's head must carry chain(0), 32 zero bytes")
        if not head.HasField("signed_at"):
            raise InvalidInput("signed_at is missing")
        signed_at = to_datetime(head.signed_at, "signed_at")
    except (InvalidInput, BadSignature) as exc:
        raise BadDirectoryData(f"the directory head does not verify: {exc.message}") from exc
    return VerifiedHead(region=region, size=head.size, chain=chain, signed_at=signed_at)


def verify_entry(
    entry_blob: common_pb.SignedBlob,
    broker_key: bytes,
    region: str,
    *,
    limits: DirectoryLimits = DEFAULT_LIMITS,
) -> VerifiedEntry:
    """Verify one broker-signed LogEntry in isolation (e.g. from GetAgency).

    Checks the broker signature, the statement's signature and that its signer is the one its
    kind requires (ENROL: its own new key; ROTATE: the previous key it names, plus the new key's
    possession signature; REVOKE: the broker), and the region. It does not check the entry's
    place in the log: :func:`verify_extension` links it to a verified head, and
    :func:`apply_to_pins` checks it against the pinned keys. Raises BadDirectoryData.
    """
    return _verify_entry(
        entry_blob,
        check_key(broker_key, "broker_key"),
        check_agency_id(region, "region", limits),
        limits,
        None,
    )


def verify_extension(
    broker_key: bytes,
    region: str,
    known_size: int,
    known_chain: bytes,
    entries: Sequence[common_pb.SignedBlob],
    head_blob: common_pb.SignedBlob,
    *,
    limits: DirectoryLimits = DEFAULT_LIMITS,
) -> tuple[VerifiedHead, list[VerifiedEntry]]:
    """Verify that ``entries`` extend the node's verified log to the broker-signed ``head_blob``.

    ``known_size`` and ``known_chain`` are the size and chain value of the last head this node
    verified (0 and :data:`GENESIS_CHAIN` for a new node); ``entries`` must be the LogEntry blobs
    with sequences known_size+1 .. head size, in order (GetEntries, paged as needed). Following
    the directory.proto header, this checks the head (:func:`verify_head`); every entry on its own
    (:func:`verify_entry`); that sequences run on from known_size+1 without gaps; that each
    entry's previous_chain is the chain value recomputed so far (the first must equal
    ``known_chain``); and that the chain recomputed over the entries' exact bodies equals the
    head's chain at the head's size. The node then stores the returned head and calls
    :func:`apply_to_pins` with the returned entries; if anything raises, it keeps what it had.

    Raises:
      BadDirectoryData       the head or an entry does not verify (``sequence`` names which)
      DirectoryInconsistent  the head is smaller than ``known_size`` (truncated or rolled back);
                             the entries have gaps, repeats, a wrong order, or go past the head;
                             an entry does not link to the chain value before it; or the chain
                             does not recompute to the head's (a fork: history was rewritten)
      InvalidInput           fewer entries than the head commits to (fetch the rest first)
    """
    broker_key = check_key(broker_key, "broker_key")
    region = check_agency_id(region, "region", limits)
    known_size, known_chain = _check_known(known_size, known_chain)
    head = verify_head(head_blob, broker_key, region, limits=limits)
    _check_not_behind(head, known_size)
    expected_count = head.size - known_size
    if len(entries) > expected_count:
        raise DirectoryInconsistent(
            f"the broker sent {len(entries)} entries after sequence {known_size}, but its head "
            f"has size {head.size}: entries beyond the signed head",
            sequence=head.size + 1,
        )
    chain = known_chain
    verified: list[VerifiedEntry] = []
    for offset, blob in enumerate(entries):
        expected = known_size + 1 + offset
        entry = _verify_entry(blob, broker_key, region, limits, expected)
        if entry.sequence != expected:
            raise DirectoryInconsistent(
                f"expected log entry {expected} but the broker sent entry {entry.sequence}: "
                "entries are missing, repeated or out of order",
                sequence=expected,
            )
        if entry.previous_chain != chain:
            raise DirectoryInconsistent(
                f"log entry {expected} does not extend the log this node verified: its "
                f"previous chain value differs from chain({expected - 1}) (history rewritten)",
                sequence=expected,
            )
        chain = entry.chain
        verified.append(entry)
    if len(entries) < expected_count:
        last = known_size + len(entries)
        raise InvalidInput(
            f"the entries stop at sequence {last} but the head has size {head.size}",
            hint=f"fetch the remaining entries (GetEntries since={last}) and verify them together",
        )
    _check_chain_matches(chain, head)
    return head, verified


def verify_consistency(
    known_size: int,
    known_chain: bytes,
    leaf_hashes: Sequence[bytes],
    head: VerifiedHead,
) -> VerifiedHead:
    """Check that a verified head extends the node's known log, from leaf hashes (GetConsistency).

    ``leaf_hashes`` are leaf(n) for n = known_size+1 .. head.size; chain(head.size) is recomputed
    from the node's own ``known_chain`` (directory.proto header, GetConsistencyResponse) and must
    equal ``head.chain``. ``head`` comes from :func:`verify_head`. Returns ``head`` for storing.
    This proves the log was extended, not rewritten; it does not reveal the new entries, so pins
    stay as they are until the node fetches them (:func:`verify_extension`).

    Raises DirectoryInconsistent for a smaller head, a wrong number of leaf hashes, or a chain
    that does not recompute (fork); InvalidInput for a leaf hash of the wrong length.
    """
    known_size, known_chain = _check_known(known_size, known_chain)
    if not isinstance(head, VerifiedHead):
        raise InvalidInput("verify_consistency needs a head checked by verify_head")
    _check_not_behind(head, known_size)
    if len(leaf_hashes) != head.size - known_size:
        raise DirectoryInconsistent(
            f"the broker sent {len(leaf_hashes)} leaf hashes from size {known_size} to a head of "
            f"size {head.size}; exactly {head.size - known_size} are needed",
            sequence=known_size + 1,
        )
    chain = known_chain
    for leaf in leaf_hashes:
        chain = next_chain(chain, leaf)
    _check_chain_matches(chain, head)
    return head


# --- checking heads and entries ---------------------------------------------------------------


def _verify_entry(
    blob: common_pb.SignedBlob,
    broker_key: bytes,
    region: str,
    limits: DirectoryLimits,
    position: int | None,
) -> VerifiedEntry:
    sequence = position
    try:
        body = _verified_body(
            blob, "log entry", broker_key, labels.LABEL_DIRECTORY_ENTRY, limits.max_entry_bytes
        )
        entry = directory_pb.LogEntry()
        parse_body(entry, body, "log entry")
        if sequence is None:
            sequence = entry.sequence
        if not 1 <= entry.sequence < 1 << 63:
            raise InvalidInput("its sequence is out of range (sequences start at 1)")
        previous_chain = check_chain(entry.previous_chain, "previous_chain")
        if not entry.HasField("logged_at"):
            raise InvalidInput("logged_at is missing")
        logged_at = to_datetime(entry.logged_at, "logged_at")
        if not entry.HasField("statement"):
            raise InvalidInput("it carries no statement")
        statement = parse_statement(entry.statement, limits)
        if statement.region != region:
            raise InvalidInput(f"its statement is for region {statement.region!r}, not {region!r}")
        check_authority(statement, entry.statement.body, entry.possession_signature, broker_key)
    except (InvalidInput, BadSignature, KeyChanged) as exc:
        where = f"log entry {sequence}" if sequence is not None else "a log entry"
        raise BadDirectoryData(
            f"{where} does not verify: {exc.message}", sequence=sequence
        ) from exc
    leaf = leaf_hash(body)
    return VerifiedEntry(
        sequence=entry.sequence,
        statement=statement,
        logged_at=logged_at,
        previous_chain=previous_chain,
        leaf=leaf,
        chain=next_chain(previous_chain, leaf),
    )


def _verified_body(
    blob: common_pb.SignedBlob, what: str, broker_key: bytes, label: bytes, max_bytes: int
) -> bytes:
    """The body of a broker-signed blob, after checking it is the pinned broker's signature."""
    if not isinstance(blob, common_pb.SignedBlob):
        raise InvalidInput(f"a {what} must be a SignedBlob")
    if not blob.body or len(blob.body) > max_bytes:
        raise InvalidInput(f"its body must be 1 to {max_bytes} bytes")
    if blob.signer != broker_key:
        raise BadSignature(
            f"it is signed by key {short_key(blob.signer)}, not the pinned broker key "
            f"{short_key(broker_key)}"
        )
    try:
        crypto.verify(broker_key, label, blob.body, blob.signature)
    except BadSignature:
        raise BadSignature(f"the broker's signature on this {what} does not verify") from None
    return blob.body


def _check_not_behind(head: VerifiedHead, known_size: int) -> None:
    if head.size < known_size:
        raise DirectoryInconsistent(
            f"the broker's head has size {head.size}, smaller than the {known_size} entries this "
            "node already verified: the log was truncated or rolled back",
            sequence=head.size + 1,
        )


def _check_chain_matches(chain: bytes, head: VerifiedHead) -> None:
    if chain != head.chain:
        raise DirectoryInconsistent(
            f"chain({head.size}) recomputed from this node's verified log differs from the "
            "broker's signed head: the log has been rewritten (fork)",
            sequence=head.size,
        )


def _check_known(known_size: int, known_chain: bytes) -> tuple[int, bytes]:
    if not isinstance(known_size, int) or known_size < 0:
        raise InvalidInput("the known log size is a non-negative integer")
    check_chain(known_chain, "known chain value")
    if known_size == 0 and known_chain != GENESIS_CHAIN:
        raise InvalidInput("the chain value of an empty log is chain(0), 32 zero bytes")
    return known_size, known_chain
