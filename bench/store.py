"""The encrypted case store against plain SQLModel tables of the same shape (issue 4).

Both sides store the same synthetic HTCDS records in SQLite files on the same disk, with the same
batched commits: the plain side keeps each record's fields as clear JSON with clear identifier
columns; the encrypted side is :class:`node.store.cases.NodeStore` (a data key per survivor,
AEAD per record, keyed blind indexes, an audit entry per batch). Reads fetch every case by id in
batches, decrypting on the encrypted side. The import figure is the whole path of an HTCDS import
(read + validate a 10,000-row CSV, then store) against the plain insert of the same rows.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import tempfile
import uuid
from pathlib import Path

from sqlalchemy import Column, Engine, LargeBinary
from sqlmodel import Field, Session, SQLModel, col, select

from bench.common import Figure, best_of
from node import htcds
from node.keyring import Keyring
from node.store.cases import NewCase, NodeStore
from node.store.database import open_database
from tessera import crypto
from tessera.db import make_engine

BATCH = 500


class PlainCase(SQLModel, table=True):
    """Baseline: one case per row, fields as clear JSON."""

    __tablename__ = "bench_plain_case"
    case_id: str = Field(primary_key=True)
    version: int = 1
    state: str = "open"
    created_at: dt.datetime
    updated_at: dt.datetime = Field(index=True)
    payload: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class PlainIndex(SQLModel, table=True):
    """Baseline: clear identifiers for lookup, the same rows the blind index has."""

    __tablename__ = "bench_plain_index"
    id: int | None = Field(default=None, primary_key=True)
    case_id: str = Field(index=True)
    kind: str
    value: str = Field(index=True)


def _plain_insert(engine: Engine, records: list[dict[str, str]]) -> list[str]:
    ids = []
    for start in range(0, len(records), BATCH):
        with Session(engine) as session:
            now = dt.datetime.now(dt.UTC)
            batch_ids = []
            for record in records[start : start + BATCH]:
                case_id = str(uuid.uuid4())
                batch_ids.append(case_id)
                session.add(
                    PlainCase(
                        case_id=case_id,
                        created_at=now,
                        updated_at=now,
                        payload=json.dumps({"fields": record, "notes": ""}).encode(),
                    )
                )
            session.flush()
            for case_id, record in zip(batch_ids, records[start : start + BATCH], strict=True):
                for kind, name in (
                    ("name", "prs_FirstName"),
                    ("email", "prs_Email"),
                    ("phone", "prs_MobilePhone"),
                ):
                    if record.get(name):
                        session.add(PlainIndex(case_id=case_id, kind=kind, value=record[name]))
            session.commit()
            ids.extend(batch_ids)
    return ids


def _plain_read(engine: Engine, ids: list[str]) -> int:
    count = 0
    for start in range(0, len(ids), BATCH):
        with Session(engine) as session:
            for row in session.exec(
                select(PlainCase).where(col(PlainCase.case_id).in_(ids[start : start + BATCH]))
            ):
                count += len(json.loads(row.payload)["fields"])
    return count


def _store_insert(store: NodeStore, records: list[dict[str, str]]) -> list[str]:
    ids = []
    for start in range(0, len(records), BATCH):
        ids += store.create_cases(
            "bench", [NewCase(fields=r) for r in records[start : start + BATCH]]
        )
    return ids


def _store_read(store: NodeStore, ids: list[str]) -> int:
    count = 0
    for start in range(0, len(ids), BATCH):
        count += sum(len(c.fields) for c in store.read_cases(ids[start : start + BATCH]))
    return count


def run(cases: int = 5000, import_rows: int = 10_000, runs: int = 3) -> list[Figure]:
    """Insert and read throughput (cases/s) and the HTCDS import rate (rows/s)."""
    records = htcds.synthetic_records(cases, seed=42)
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        counter = iter(range(1000))

        def fresh_plain() -> Engine:
            engine = make_engine(f"sqlite:///{folder / f'plain{next(counter)}.db'}")
            SQLModel.metadata.create_all(engine, tables=[PlainCase.__table__, PlainIndex.__table__])  # type: ignore[attr-defined]
            return engine

        def fresh_store() -> NodeStore:
            engine = open_database(f"sqlite:///{folder / f'store{next(counter)}.db'}")
            return NodeStore(engine, Keyring(crypto.Identity.generate(), crypto.DataKey.generate()))

        plain_ids: list[str] = []
        store_ids: list[str] = []
        plain_engine = fresh_plain()
        store = fresh_store()

        def plain_insert() -> None:
            nonlocal plain_engine, plain_ids
            plain_engine = fresh_plain()
            plain_ids = _plain_insert(plain_engine, records)

        def store_insert() -> None:
            nonlocal store, store_ids
            store = fresh_store()
            store_ids = _store_insert(store, records)

        plain_t = best_of(runs, plain_insert)
        store_t = best_of(runs, store_insert)
        figures.append(
            Figure(
                "store",
                "encrypted insert",
                cases / store_t,
                "plain SQLModel insert",
                cases / plain_t,
                "cases/s",
                target=0.8,
            )
        )
        shuffled_plain = random.sample(plain_ids, len(plain_ids))
        shuffled_store = random.sample(store_ids, len(store_ids))
        plain_r = best_of(runs, lambda: _plain_read(plain_engine, shuffled_plain))
        store_r = best_of(runs, lambda: _store_read(store, shuffled_store))
        figures.append(
            Figure(
                "store",
                "encrypted read",
                cases / store_r,
                "plain SQLModel read",
                cases / plain_r,
                "cases/s",
                target=0.8,
            )
        )

        import_records = htcds.synthetic_records(import_rows, seed=7)
        source = folder / "import.csv"
        htcds.write_csv(source, import_records)

        def full_import() -> None:
            target = fresh_store()
            report = htcds.validate_file(source)
            target.create_cases(
                "bench", [NewCase(fields=v) for _n, v in report.good], action="cases.import"
            )

        def plain_only() -> None:
            _plain_insert(fresh_plain(), import_records)

        import_t = best_of(1, full_import)
        plain_import_t = best_of(1, plain_only)
        figures.append(
            Figure(
                "import",
                f"HTCDS CSV import, {import_rows:,} rows",
                import_rows / import_t,
                "plain insert of the same rows",
                import_rows / plain_import_t,
                "rows/s",
            )
        )
    return figures
