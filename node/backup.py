"""Backup and restore of a node (issue 4 item 7; DESIGN.md section 5).

A backup file is one consistent snapshot of every node table, encrypted as a whole under a key
derived from the node's record key, preceded by a clear header holding the node's keyring exactly
as it sits in the home (still wrapped by the key-encryption key). So a backup stays encrypted: it
opens only with the passphrase or key file that protected the node when it was taken.

Restoring never brings an erased survivor back, nor a removed staff credential: both are recorded
in the ledger (``ledger.log`` in the node's home, outside the database), in the database, and, for
an enrolled node, as sealed tombstones in its escrow at the broker (node.escrow), which outlives
the home. A restore of an enrolled node first fetches the whole escrow and the latest audit
checkpoint (and restores nothing if the broker cannot be reached), then re-applies every erasure
and removal it knows of, from the escrow, the home's ledger and the backup itself.

A restore never rewinds the audit log (DESIGN.md section 6): the node keeps its current log,
unless the backup's log extends it (a node restored onto an empty or older database), and the
restore is one more entry. When the restored log is behind a head the node had recorded (the
broker's latest checkpoint, the head copied into the home), the restore entry says so, naming
that head, so `tessera node audit verify` knows the rewind was a restore and not tampering.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Integer,
    LargeBinary,
    Table,
    delete,
    func,
    insert,
    select,
    text,
)
from sqlmodel import SQLModel

from node import directory_sync, escrow
from node import keyring as keyring_mod
from node.keyring import Keyring
from node.referrals.stores import ReferralStores
from node.store.budget import BudgetStore
from node.store.cases import AUDIT_HEAD_FILE, LEDGER_FILE, NodeStore
from node.store.escrow import EscrowStore
from node.store.needs import seal_clear_rows
from node.store.tables import (
    AnchorRow,
    AuditHeadRow,
    AuditRow,
    BlindIndexRow,
    BudgetChargeRow,
    BudgetPeriodRow,
    CaseRow,
    ConsentRow,
    ErasureRow,
    EscrowOutboxRow,
    IncomingReferralRow,
    NeedRow,
    OutboxRow,
    OutgoingReferralRow,
    ProcessedMessageRow,
    RecordSealRow,
    ReferralEventRow,
    RequestKeyRow,
    StaffRow,
)
from node.tombstones import AuditPosition
from tessera import crypto
from tessera.errors import (
    ConfigError,
    InvalidInput,
    TamperedCiphertext,
    TesseraError,
    Unavailable,
    WrongPassphrase,
)
from tessera.escrow import EscrowHead
from tessera.files import atomic_write
from tessera.logs import fields

log = logging.getLogger(__name__)
_MAGIC = b"TESSERA-BACKUP-1\n"
RESTORE_PENDING_FILE = "restore-pending.json"
"""In the node's home while a restore has replaced the tables but not yet re-applied the
ledger; it names the erasures and staff removals that only the replaced tables knew."""
_LABEL_BACKUP = b"tessera/v1/backup"
# Parents before children, so inserts satisfy foreign keys (deletes go in reverse).
_TABLES: tuple[type[SQLModel], ...] = (
    CaseRow,
    BlindIndexRow,
    NeedRow,
    ErasureRow,
    StaffRow,
    RequestKeyRow,
    ConsentRow,
    OutgoingReferralRow,
    OutboxRow,
    IncomingReferralRow,
    ProcessedMessageRow,
    ReferralEventRow,
    BudgetPeriodRow,
    BudgetChargeRow,
    AuditRow,
    AuditHeadRow,
    EscrowOutboxRow,
    AnchorRow,
    RecordSealRow,
)
# Tables a restore does not simply replace: the audit log is kept unless the backup's extends it,
# and tombstones still waiting for the broker are kept besides the backup's.
_AUDIT_TABLES = (AuditRow, AuditHeadRow)


@dataclass(frozen=True)
class BackupMade:
    """Where a backup went, how big it is, its digest and when its snapshot was taken."""

    path: Path
    size: int
    digest: bytes
    taken_at: dt.datetime


def _body_key(keyring: Keyring) -> crypto.DataKey:
    return crypto.derive_key(keyring.record_key, _LABEL_BACKUP)


_MAX_DESTINATION = 1024


def backup_folder(root: Path, requested: str) -> Path:
    """The folder a Backup call asking for ``requested`` writes to: the backup root itself when
    empty, else a folder inside it (a relative name is taken under the root).

    Whatever resolves outside the root (an absolute path elsewhere, ``..``, a symlink leading
    out) is refused: a caller never makes the node create or write a directory its
    administrator did not configure.
    """
    root = root.resolve()
    if not requested:
        return root
    if len(requested) > _MAX_DESTINATION or "\x00" in requested:
        raise InvalidInput(f"a backup destination is a path of at most {_MAX_DESTINATION} bytes")
    asked = Path(requested)
    target = (asked if asked.is_absolute() else root / asked).resolve()
    if not target.is_relative_to(root):
        raise InvalidInput(
            f"backups go under the node's backup root {root}; {requested!r} is outside it",
            hint="name a folder inside it, or set backup_root in the node's tessera.toml",
        )
    return target


def create_backup(store: NodeStore, home: Path, destination: Path, actor: str) -> BackupMade:
    """Write ``destination/tessera-backup-<time>.tbk`` atomically and audit it."""
    taken_at = dt.datetime.now(dt.UTC)
    snapshot = _snapshot(store.engine)
    header: dict[str, Any] = {
        "format": "tessera-backup-v1",
        "taken_at": taken_at.isoformat(),
        "keyring": keyring_mod.export_document(home),
    }
    link = home / directory_sync.LINK_FILE
    if link.exists():
        # Public data (the broker's address, certificate and key, this agency's id): a node
        # rebuilt on a new machine from this file alone can reach its escrow.
        header["broker_link"] = json.loads(link.read_text("utf-8"))
    associated = b"tessera/v1|backup|" + taken_at.isoformat().encode()
    body = crypto.encrypt(_body_key(store.keyring), json.dumps(snapshot).encode(), associated)
    content = _MAGIC + json.dumps(header).encode() + b"\n" + body
    path = destination / f"tessera-backup-{taken_at.strftime('%Y%m%dT%H%M%S%fZ')}.tbk"
    try:
        destination.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(path, content)
    except (OSError, ValueError) as exc:  # not a folder, no permission, a NUL byte (issue 16)
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise InvalidInput(
            f"cannot write a backup into {str(destination)!r}: {why}",
            hint="name a folder the node's server can create or write to",
        ) from None
    digest = crypto.digest(_LABEL_BACKUP, content)
    store.audit(actor, "node.backup", None, {"file": path.name, "bytes": len(content)})
    return BackupMade(path=path, size=len(content), digest=digest, taken_at=taken_at)


def peek_keyring(path: Path) -> dict[str, Any]:
    """The (still wrapped) keyring document a backup carries, to know what secret it needs."""
    header, _body = _split(path)
    document: dict[str, Any] = header.get("keyring", {})
    return document


def _split(path: Path) -> tuple[dict[str, Any], bytes]:
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read backup {path}: {exc.strerror}") from None
    if not content.startswith(_MAGIC) or b"\n" not in content[len(_MAGIC) :]:
        raise InvalidInput(f"{path} is not a Tessera backup")
    header_line, body = content[len(_MAGIC) :].split(b"\n", 1)
    try:
        header: dict[str, Any] = json.loads(header_line)
    except ValueError:
        raise InvalidInput(f"{path}: the backup header is damaged") from None
    if not isinstance(header, dict):
        raise InvalidInput(f"{path}: the backup header is damaged")
    return header, body


def read_backup(
    path: Path, passphrase: str | None
) -> tuple[dict[str, Any], Keyring, dict[str, Any]]:
    """Open a backup: its header, the keyring it carries (unwrapped) and its snapshot."""
    header, body = _split(path)
    keyring = keyring_mod.open_document(header.get("keyring", {}), passphrase)
    associated = b"tessera/v1|backup|" + str(header.get("taken_at", "")).encode()
    try:
        plain = crypto.decrypt(_body_key(keyring), body, associated)
    except TamperedCiphertext:
        raise TamperedCiphertext(
            f"the backup {path.name} is damaged or was altered (it fails authentication)",
            hint="nothing was restored; use another copy of this backup",
        ) from None
    snapshot: dict[str, Any] = json.loads(plain)
    return header, keyring, snapshot


def restore_backup(home: Path, engine: Engine, path: Path, passphrase: str | None) -> int:
    """Replace the node's tables with the backup's, then re-apply every known erasure.

    Returns how many erased survivors the backup still held (and were erased again). The tables
    are replaced in one transaction (a failure leaves the database as it was); the erasures,
    staff removals, revocations and budget charges are re-applied right after it. Between the
    two, a restore-pending file in the home names what must be re-applied: a node killed there
    finishes the restore before it serves again (:func:`finish_interrupted_restore`).
    """
    header, keyring, snapshot = read_backup(path, passphrase)
    # A restore killed halfway first finishes: its note holds erasures the tables no longer do.
    finish_interrupted_restore(home, engine, keyring)
    if (home / keyring_mod.KEYRING_FILE).exists():
        current = keyring_mod.export_document(home)
        # The same node under any of its keys (a backup taken before a key rotation).
        if not keyring_mod.public_keys(current) & keyring_mod.public_keys(header["keyring"]):
            raise ConfigError(
                "this backup belongs to another node",
                hint="restore it into that node's home, or into an empty home",
            )
        if current.get("identity_public") != header["keyring"].get("identity_public"):
            # Taken before a key rotation: the home's keyring holds the keys the broker knows
            # now (and the old ones, retired); the record key is the same.
            keyring = _home_keyring(home, passphrase)
    else:
        keyring_mod.install_document(home, header["keyring"])
    if not (home / directory_sync.LINK_FILE).exists() and header.get("broker_link"):
        atomic_write(home / directory_sync.LINK_FILE, json.dumps(header["broker_link"]).encode())
    # The escrow first: if the broker cannot be reached, nothing has changed yet.
    client = escrow.client_for(home, keyring.identities)
    fetched = _fetch_escrow(home, client) if client is not None else None
    try:
        with engine.begin() as conn:
            pending = _replace_tables(conn, home, path, header, snapshot, keyring, fetched)
        reapplied = _reapply(home, engine, keyring)
        if client is not None and fetched is not None:
            _after_restore(engine, keyring, home, client, fetched[1])
        log.info("node.restored", extra=fields(file=path.name, audit_log=pending["audit_log"]))
        return reapplied
    finally:
        if client is not None:
            client.close()


def _home_keyring(home: Path, passphrase: str | None) -> Keyring:
    try:
        return keyring_mod.open_keyring(home, passphrase)
    except WrongPassphrase:
        raise ConfigError(
            "this backup was taken before the node's keys were rotated, and the node's "
            "passphrase has changed since",
            hint="restore a backup taken since the rotation (take one right after rotating keys)",
        ) from None


def _fetch_escrow(home: Path, client: escrow.EscrowClient) -> escrow.Fetched:
    try:
        return escrow.fetch(home, client)
    except Unavailable as exc:
        client.close()
        raise Unavailable(
            f"{exc.message}: a restore of an enrolled node first fetches its escrowed erasures "
            "and its latest audit checkpoint from the broker; nothing was restored",
            hint="retry when the broker is reachable (`tessera node status` on another node)",
        ) from None


def _replace_tables(
    conn: Connection,
    home: Path,
    path: Path,
    header: dict[str, Any],
    snapshot: dict[str, Any],
    keyring: Keyring,
    fetched: escrow.Fetched | None,
) -> dict[str, Any]:
    """Replace the tables with the backup's, in ``conn``'s transaction; the pending note."""
    # What the database being replaced knows must survive too (say its ledger line was lost to
    # a crash between the commit and the ledger write).
    erasure, staff = _table(ErasureRow), _table(StaffRow)
    erased_now = set(conn.execute(select(erasure.c.case_id)).scalars())
    removed_now = {
        bytes(k).hex()
        for k in conn.execute(
            select(staff.c.signing_key).where(staff.c.removed_at.is_not(None))
        ).scalars()
    }
    escrow_erased, escrow_removed = escrow.split(fetched[0]) if fetched else ([], [])
    keep_log, how = _keep_audit_log(conn, snapshot)
    # Heads the node recorded: if the restored log does not reach them, the restore says so.
    candidates = []
    checkpoint = fetched[2] if fetched else None
    if checkpoint is not None:
        candidates.append(
            {
                "what": checkpoint.describe(),
                "seq": checkpoint.seq,
                "hash": checkpoint.entry_hash.hex(),
            }
        )
    recorded = escrow.home_head(home)
    if recorded is not None:
        candidates.append(
            {
                "what": "the audit head recorded in the node's home",
                "seq": recorded.seq,
                "hash": recorded.entry_hash.hex(),
            }
        )
    pending = {
        "file": path.name,
        "taken_at": header["taken_at"],
        "erased": sorted(
            erased_now | {r["case_id"] for r in snapshot.get("erasure", [])} | set(escrow_erased)
        ),
        "staff_removed": sorted(removed_now | {k.hex() for k in escrow_removed}),
        "audit_log": how,
        "candidates": candidates,
    }
    # Written before the tables are replaced: once they are, what they knew is only here.
    _write_pending(home, pending)
    replaced = [t for t in _TABLES if not (keep_log and t in _AUDIT_TABLES)]
    for table in reversed(replaced):
        if table is not EscrowOutboxRow:
            conn.execute(delete(_table(table)))
    for table in replaced:
        sa_table = _table(table)
        rows = [_decode_row(table, r) for r in snapshot.get(sa_table.name, [])]
        if table is NeedRow and rows and "ciphertext" not in rows[0]:
            rows = _seal_clear_needs(rows, snapshot, keyring)
        if table is EscrowOutboxRow:
            queued = set(conn.execute(select(sa_table.c.tombstone_id)).scalars())
            rows = [r for r in rows if r["tombstone_id"] not in queued]
        if rows:
            conn.execute(insert(sa_table), rows)
    if conn.dialect.name == "postgresql":
        _advance_sequences(conn)
    return pending


def _keep_audit_log(conn: Connection, snapshot: dict[str, Any]) -> tuple[bool, str]:
    """Whether to keep the database's audit log (True) or take the backup's, and why.

    The node's log is kept unless the backup's extends it: entries made after the backup are
    never lost to a restore.
    """
    head_table, log_table = _table(AuditHeadRow), _table(AuditRow)
    current = conn.execute(select(head_table.c.seq, head_table.c.entry_hash)).first()
    if current is None or current.seq == 0:
        return False, "the backup's (this database had none)"
    theirs = {
        int(r["seq"]): base64.b64decode(r["entry_hash"]["b64"])
        for r in snapshot.get("audit_log", [])
    }
    if theirs.get(int(current.seq)) == bytes(current.entry_hash):
        return False, "the backup's (it extends this database's)"
    if theirs:
        last = max(theirs)
        ours = conn.execute(select(log_table.c.entry_hash).where(log_table.c.seq == last)).scalar()
        if ours is not None and bytes(ours) == theirs[last]:
            return True, "kept (it extends the backup's)"
    return True, "kept (the backup's log differs from it; the backup's entries stay in the file)"


def _after_restore(
    engine: Engine,
    keyring: Keyring,
    home: Path,
    client: escrow.EscrowClient,
    head: EscrowHead,
) -> None:
    """Record the escrow as applied and checkpoint the restored log at once (best effort: the
    node checkpoints at its next start anyway)."""
    escrow_store = EscrowStore(NodeStore(engine, keyring, home))
    escrow_store.set_anchor(head.size, head.chain, dt.datetime.now(dt.UTC))
    try:
        escrow.make_checkpoint(escrow_store, home, client)
    except TesseraError as exc:
        log.warning("restore.checkpoint_failed", extra=fields(error=str(exc)[:200]))


def _seal_clear_needs(
    rows: list[dict[str, Any]], snapshot: dict[str, Any], keyring: Keyring
) -> list[dict[str, Any]]:
    # A backup taken before need records were sealed (schema 0004) holds them in clear: seal
    # them under each survivor's key on the way in, as the upgrade did (node.store.needs).
    from node.store.records import survivor_key_context

    wrapped = {
        r["case_id"]: base64.b64decode(r["wrapped_key"]["b64"])
        for r in snapshot.get("case_record", [])
    }

    def data_key_of(case_id: str) -> crypto.DataKey:
        return crypto.unwrap_key(
            keyring.record_key, wrapped[case_id], survivor_key_context(case_id)
        )

    return seal_clear_rows(rows, data_key_of)


def finish_interrupted_restore(home: Path, engine: Engine, keyring: Keyring) -> int | None:
    """Finish a restore that was killed after replacing the tables (its restore-pending file is
    still in the home): re-apply what it had to, exactly as the restore would have. Returns how
    many erased survivors were erased again, or None when no restore was pending. Harmless when
    the killed restore never replaced the tables: everything it re-applies is already so."""
    if not (home / RESTORE_PENDING_FILE).exists():
        return None
    return _reapply(home, engine, keyring)


def _reapply(home: Path, engine: Engine, keyring: Keyring) -> int:
    """Re-apply every erasure, staff removal, revocation and budget charge the ledger and the
    restore-pending file know of, and record the restore; then it is done and the file goes."""
    pending = _read_pending(home)
    store = NodeStore(engine, keyring, home)
    escrow_store = EscrowStore(store)
    superseded = [
        c
        for c in pending.get("candidates", [])
        if not escrow_store.holds(AuditPosition(int(c["seq"]), bytes.fromhex(c["hash"])))
    ]
    # The restore entry names what the restored log went back behind; the copy of the head in
    # the home starts afresh from it.
    (home / AUDIT_HEAD_FILE).unlink(missing_ok=True)
    ledger = read_ledger(home)
    erased = {v for k, v in ledger if k == "erase"} | set(pending["erased"])
    reapplied = store.reapply_erasures("system:restore", sorted(erased))
    removed = store.reapply_staff_removals(
        "system:restore",
        sorted(
            {bytes.fromhex(v) for k, v in ledger if k == "staff-removed"}
            | {bytes.fromhex(v) for v in pending["staff_removed"]}
        ),
    )
    # Revoked consents and purged referrals stay revoked and purged, too.
    ReferralStores(store).reapply_ledger("system:restore", ledger)
    # Spent privacy budget stays spent (DESIGN.md section 7: every contribution is counted).
    BudgetStore(store).reapply_ledger("system:restore", ledger)
    store.audit(
        "system:restore",
        "node.restored",
        None,
        {
            "file": pending["file"],
            "taken_at": pending["taken_at"],
            "erasures": reapplied,
            "staff_removals": removed,
            "audit_log": pending.get("audit_log", ""),
            "superseded": superseded,
        },
    )
    (home / RESTORE_PENDING_FILE).unlink()
    return reapplied


def reapply_ledger(home: Path, store: NodeStore, actor: str = "system:ledger") -> int:
    """Re-apply the home's ledger to the database (every start does: an older database file
    copied in must not bring back what the ledger knows); how many survivors were erased again."""
    ledger = read_ledger(home)
    if not ledger:
        return 0
    erased = store.reapply_erasures(actor, sorted({v for k, v in ledger if k == "erase"}))
    store.reapply_staff_removals(
        actor, sorted({bytes.fromhex(v) for k, v in ledger if k == "staff-removed"})
    )
    ReferralStores(store).reapply_ledger(actor, ledger)
    BudgetStore(store).reapply_ledger(actor, ledger)
    return erased


def _write_pending(home: Path, pending: dict[str, Any]) -> None:
    atomic_write(home / RESTORE_PENDING_FILE, json.dumps(pending).encode())


def _read_pending(home: Path) -> dict[str, Any]:
    try:
        pending: dict[str, Any] = json.loads((home / RESTORE_PENDING_FILE).read_text("utf-8"))
        return pending
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot read {RESTORE_PENDING_FILE} ({exc}): a restore was interrupted",
            hint="run `tessera node restore` again with the same backup",
        ) from None


def read_ledger(home: Path) -> list[tuple[str, str]]:
    """The ledger outside the database: (kind, value) for every erasure and staff removal."""
    ledger = home / LEDGER_FILE
    if not ledger.exists():
        return []
    entries = []
    for line in ledger.read_text(encoding="utf-8").splitlines():
        kind, _sep, value = line.strip().partition(" ")
        if kind and value:
            entries.append((kind, value))
    return entries


def _advance_sequences(conn: Connection) -> None:
    # Rows came back with their ids, which a PostgreSQL sequence does not see: move each one
    # past the restored rows, or the next insert (a need, a blind index) collides with one.
    # SQLite needs nothing: it picks max(rowid) + 1.
    for model in _TABLES:
        table = _table(model)
        column, *others = table.primary_key.columns
        if others or not isinstance(column.type, Integer):
            continue
        sequence = func.pg_get_serial_sequence(table.name, column.name)
        following = func.coalesce(select(func.max(column)).scalar_subquery(), 0) + 1
        conn.execute(select(func.setval(sequence, following, False)))


def _table(model: type[SQLModel]) -> Table:
    table: Table = model.__table__  # type: ignore[attr-defined]
    return table


def _snapshot(engine: Engine) -> dict[str, list[dict[str, Any]]]:
    # One transaction sees one consistent state (SQLite: a WAL snapshot; PostgreSQL: REPEATABLE
    # READ), so the backup never mixes before and after of a concurrent write.
    snapshot: dict[str, list[dict[str, Any]]] = {}
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
        else:
            # The sqlite3 driver begins no transaction for a SELECT, so each table would be read
            # at a different moment; an explicit one holds a single WAL snapshot for them all.
            conn.exec_driver_sql("BEGIN")
        for table in _TABLES:
            sa_table = _table(table)
            snapshot[sa_table.name] = [
                _encode_row(dict(row._mapping)) for row in conn.execute(select(sa_table))
            ]
    return snapshot


def _encode_row(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, bytes):
            out[key] = {"b64": base64.b64encode(value).decode()}
        elif isinstance(value, (dt.datetime, dt.date)):
            out[key] = {"iso": value.isoformat(), "kind": type(value).__name__}
        else:
            out[key] = value
    return out


def _decode_row(table: type[SQLModel], row: dict[str, Any]) -> dict[str, Any]:
    columns = _table(table).columns
    out: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, dict) and "b64" in value:
            out[key] = base64.b64decode(value["b64"])
        elif isinstance(value, dict) and "iso" in value:
            parse = dt.date if value["kind"] == "date" else dt.datetime
            out[key] = parse.fromisoformat(value["iso"])
        else:
            out[key] = value
        if key in columns and isinstance(columns[key].type, LargeBinary) and out[key] is None:
            out[key] = b""
    return out
