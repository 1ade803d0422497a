"""Backup and restore of a node (issue 4 item 7; DESIGN.md section 5).

A backup file is one consistent snapshot of every node table, encrypted as a whole under a key
derived from the node's record key, preceded by a clear header holding the node's keyring exactly
as it sits in the home (still wrapped by the key-encryption key). So a backup stays encrypted: it
opens only with the passphrase or key file that protected the node when it was taken.

Restoring never brings an erased survivor back, nor a removed staff credential: both are recorded
in the ledger (``ledger.log`` in the node's home, outside the database) as well as in the
database, and restore re-applies every erasure and removal it knows of, from the home's ledger and
from the backup itself, before the node serves again.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
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

from node import keyring as keyring_mod
from node.keyring import Keyring
from node.store.budget import BudgetStore
from node.store.cases import AUDIT_HEAD_FILE, LEDGER_FILE, NodeStore
from node.store.needs import seal_clear_rows
from node.store.referrals import ReferralStore
from node.store.tables import (
    AuditHeadRow,
    AuditRow,
    BlindIndexRow,
    BudgetChargeRow,
    BudgetPeriodRow,
    CaseRow,
    ConsentRow,
    ErasureRow,
    IncomingReferralRow,
    NeedRow,
    OutboxRow,
    OutgoingReferralRow,
    ProcessedMessageRow,
    ReferralEventRow,
    RequestKeyRow,
    StaffRow,
)
from tessera import crypto
from tessera.errors import ConfigError, InvalidInput, TamperedCiphertext
from tessera.files import atomic_write

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
)


@dataclass(frozen=True)
class BackupMade:
    """Where a backup went, how big it is, its digest and when its snapshot was taken."""

    path: Path
    size: int
    digest: bytes
    taken_at: dt.datetime


def _body_key(keyring: Keyring) -> crypto.DataKey:
    return crypto.derive_key(keyring.record_key, _LABEL_BACKUP)


def create_backup(store: NodeStore, home: Path, destination: Path, actor: str) -> BackupMade:
    """Write ``destination/tessera-backup-<time>.tbk`` atomically and audit it."""
    taken_at = dt.datetime.now(dt.UTC)
    snapshot = _snapshot(store.engine)
    header = {
        "format": "tessera-backup-v1",
        "taken_at": taken_at.isoformat(),
        "keyring": keyring_mod.export_document(home),
    }
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
        if current.get("identity_public") != header["keyring"].get("identity_public"):
            raise ConfigError(
                "this backup belongs to another node",
                hint="restore it into that node's home, or into an empty home",
            )
    else:
        keyring_mod.install_document(home, header["keyring"])
    with engine.begin() as conn:
        # What the database being replaced knows must survive too (say its ledger line was
        # lost to a crash between the commit and the ledger write).
        erasure, staff = _table(ErasureRow), _table(StaffRow)
        erased_now = set(conn.execute(select(erasure.c.case_id)).scalars())
        removed_now = set(
            conn.execute(
                select(staff.c.signing_key).where(staff.c.removed_at.is_not(None))
            ).scalars()
        )
        # Written before the tables are replaced: once they are, what they knew is only here.
        _write_pending(
            home,
            {
                "file": path.name,
                "taken_at": header["taken_at"],
                "erased": sorted(erased_now | {r["case_id"] for r in snapshot.get("erasure", [])}),
                "staff_removed": sorted(bytes(k).hex() for k in removed_now),
            },
        )
        for table in reversed(_TABLES):
            conn.execute(delete(_table(table)))
        for table in _TABLES:
            sa_table = _table(table)
            rows = [_decode_row(table, r) for r in snapshot.get(sa_table.name, [])]
            if table is NeedRow and rows and "ciphertext" not in rows[0]:
                rows = _seal_clear_needs(rows, snapshot, keyring)
            if rows:
                conn.execute(insert(sa_table), rows)
        if conn.dialect.name == "postgresql":
            _advance_sequences(conn)
    return _reapply(home, engine, keyring)


def _seal_clear_needs(
    rows: list[dict[str, Any]], snapshot: dict[str, Any], keyring: Keyring
) -> list[dict[str, Any]]:
    # A backup taken before need records were sealed (schema 0004) holds them in clear: seal
    # them under each survivor's key on the way in, as the upgrade did (node.store.needs).
    from node.store.cases import _key_context

    wrapped = {
        r["case_id"]: base64.b64decode(r["wrapped_key"]["b64"])
        for r in snapshot.get("case_record", [])
    }

    def data_key_of(case_id: str) -> crypto.DataKey:
        return crypto.unwrap_key(keyring.record_key, wrapped[case_id], _key_context(case_id))

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
    restore-pending file know of; then the restore is done and the file goes."""
    pending = _read_pending(home)
    # The restored chain is older than the head the node recorded: start that record afresh.
    (home / AUDIT_HEAD_FILE).unlink(missing_ok=True)
    store = NodeStore(engine, keyring, home)
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
    ReferralStore(store).reapply_ledger("system:restore", ledger)
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
        },
    )
    (home / RESTORE_PENDING_FILE).unlink()
    return reapplied


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
