"""The encrypted case store against plain SQLModel tables of the same shape (issue 4).

Both sides store the same synthetic HTCDS records in SQLite files on the same disk, with the same
batched commits (500 cases per transaction) and the same rows: one case row, one lookup row per
identifier (the rows the blind index has: name, email, phone, home phone) and one need per case.
Both build ORM objects and let the session flush them. The plain side keeps each record's fields
as clear JSON with clear identifier columns; the encrypted side is
:class:`node.store.cases.NodeStore` (a data key per survivor, AEAD per record, keyed blind
indexes, an audit entry per batch). Reads fetch every case by id in batches, with its needs,
decrypting on the encrypted side. The import figure is the whole path of an HTCDS import (read +
validate a 10,000-row CSV, match every row to the node's cases, then store) against the plain
insert of the same rows (an import creates no needs, so neither side does there); the re-import
figure imports the same file again, every row a duplicate, against its first import.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from sqlalchemy import Column, Engine, LargeBinary, UniqueConstraint
from sqlmodel import Field, Session, SQLModel, col, select

from bench.common import Figure, best_of
from node.domain import DuplicatePolicy
from node.htcds.csv_format import write_csv
from node.htcds.report import validate_file
from node.htcds.synthetic import synthetic_records
from node.keyring import Keyring
from node.store import imports
from node.store.cases import NewCase, NodeStore
from node.store.database import open_database
from tessera import crypto
from tessera.db import make_engine
from tessera.needs import NEED_CATEGORIES, NEED_STATUSES, NeedCategory, NeedStatus

BATCH = 500
# The identifiers the store's blind index covers (node.store.cases._INDEXED), the same rows here.
_LOOKUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("name", ("prs_FirstName", "prs_SecondName")),
    ("email", ("prs_Email",)),
    ("phone", ("prs_MobilePhone",)),
    ("home_phone", ("prs_HomePhone",)),
)
# The needs of one case, as NewCase takes them.
CaseNeeds = tuple[tuple[NeedCategory, NeedStatus], ...]


class PlainCase(SQLModel, table=True):
    """Baseline: one case per row, fields as clear JSON (the columns of ``case_record``)."""

    __tablename__ = "bench_plain_case"
    case_id: str = Field(primary_key=True)
    version: int = 1
    state: str = Field(default="open", index=True)
    created_at: dt.datetime
    updated_at: dt.datetime = Field(index=True)
    payload: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class PlainIndex(SQLModel, table=True):
    """Baseline: clear identifiers for lookup, the same rows and keys the blind index has."""

    __tablename__ = "bench_plain_index"
    __table_args__ = (UniqueConstraint("case_id", "kind", "value"),)
    id: int | None = Field(default=None, primary_key=True)
    case_id: str = Field(foreign_key="bench_plain_case.case_id", index=True, ondelete="CASCADE")
    kind: str
    value: str = Field(index=True)


class PlainNeed(SQLModel, table=True):
    """Baseline: one aftercare need of a case, the columns and keys of ``need``."""

    __tablename__ = "bench_plain_need"
    __table_args__ = (UniqueConstraint("case_id", "category"),)
    id: int | None = Field(default=None, primary_key=True)
    case_id: str = Field(foreign_key="bench_plain_case.case_id", index=True, ondelete="CASCADE")
    category: str = Field(index=True)
    status: str = Field(index=True)
    identified_on: dt.date
    updated_at: dt.datetime


def _needs_for(count: int) -> list[CaseNeeds]:
    """One need per case, cycling through the categories and statuses (same on both sides)."""
    return [
        ((NEED_CATEGORIES[n % len(NEED_CATEGORIES)], NEED_STATUSES[n % len(NEED_STATUSES)]),)
        for n in range(count)
    ]


def _plain_insert(
    engine: Engine, records: Sequence[Mapping[str, str]], needs: Sequence[CaseNeeds]
) -> list[str]:
    ids = []
    for start in range(0, len(records), BATCH):
        batch = records[start : start + BATCH]
        with Session(engine) as session:
            now = dt.datetime.now(dt.UTC)
            batch_ids = []
            for record in batch:
                case_id = str(uuid.uuid4())
                batch_ids.append(case_id)
                session.add(
                    PlainCase(
                        case_id=case_id,
                        created_at=now,
                        updated_at=now,
                        payload=json.dumps(
                            {"fields": record, "notes": ""}, separators=(",", ":")
                        ).encode(),
                    )
                )
            session.flush()  # parent rows first: the lookups and needs reference them
            for case_id, record, case_needs in zip(
                batch_ids, batch, needs[start : start + BATCH], strict=True
            ):
                for kind, names in _LOOKUPS:
                    value = " ".join(record.get(n, "") for n in names).strip()
                    if value:
                        session.add(PlainIndex(case_id=case_id, kind=kind, value=value))
                for category, status in case_needs:
                    session.add(
                        PlainNeed(
                            case_id=case_id,
                            category=category.value,
                            status=status.value,
                            identified_on=now.date(),
                            updated_at=now,
                        )
                    )
            session.commit()
            ids.extend(batch_ids)
    return ids


def _plain_read(engine: Engine, ids: list[str]) -> int:
    count = 0
    for start in range(0, len(ids), BATCH):
        batch = ids[start : start + BATCH]
        with Session(engine) as session:
            needs: dict[str, list[PlainNeed]] = {}
            for need in session.exec(
                select(PlainNeed)
                .where(col(PlainNeed.case_id).in_(batch))
                .order_by(col(PlainNeed.category))
            ):
                needs.setdefault(need.case_id, []).append(need)
            for row in session.exec(select(PlainCase).where(col(PlainCase.case_id).in_(batch))):
                count += len(json.loads(row.payload)["fields"]) + len(needs.get(row.case_id, ()))
    return count


def _store_insert(
    store: NodeStore, records: Sequence[Mapping[str, str]], needs: Sequence[CaseNeeds]
) -> list[str]:
    ids = []
    for start in range(0, len(records), BATCH):
        ids += store.create_cases(
            "bench",
            [
                NewCase(fields=r, needs=n)
                for r, n in zip(
                    records[start : start + BATCH], needs[start : start + BATCH], strict=True
                )
            ],
        )
    return ids


def _store_read(store: NodeStore, ids: list[str]) -> int:
    count = 0
    for start in range(0, len(ids), BATCH):
        count += sum(
            len(c.fields) + len(c.needs) for c in store.read_cases(ids[start : start + BATCH])
        )
    return count


def run(cases: int = 5000, import_rows: int = 10_000, runs: int = 3) -> list[Figure]:
    """Insert and read throughput (cases/s) and the HTCDS import rate (rows/s)."""
    records = synthetic_records(cases, seed=42)
    needs = _needs_for(cases)
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        counter = iter(range(1000))

        def fresh_plain() -> Engine:
            engine = make_engine(f"sqlite:///{folder / f'plain{next(counter)}.db'}")
            tables = [PlainCase.__table__, PlainIndex.__table__, PlainNeed.__table__]  # type: ignore[attr-defined]
            SQLModel.metadata.create_all(engine, tables=tables)
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
            plain_ids = _plain_insert(plain_engine, records, needs)

        def store_insert() -> None:
            nonlocal store, store_ids
            store = fresh_store()
            store_ids = _store_insert(store, records, needs)

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

        import_records = synthetic_records(import_rows, seed=7)
        source = folder / "import.csv"
        write_csv(source, import_records)

        imported: list[NodeStore] = []

        def full_import() -> None:
            # The node's own path: validate, match every row (node.dedup), then store.
            target = fresh_store()
            report = validate_file(source)
            imports.import_cases(target, "bench", report.good, DuplicatePolicy.SKIP)
            imported.append(target)

        def re_import() -> None:
            # The same file again into the filled store: every row matched, nothing written.
            report = validate_file(source)
            outcome = imports.import_cases(imported[-1], "bench", report.good, DuplicatePolicy.SKIP)
            assert not outcome.case_ids

        def plain_only() -> None:
            _plain_insert(fresh_plain(), import_records, [()] * len(import_records))

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
        again_t = best_of(1, re_import)
        figures.append(
            Figure(
                "import",
                "the same CSV again (every row a duplicate, skipped)",
                import_rows / again_t,
                "its first import",
                import_rows / import_t,
                "rows/s",
            )
        )
    return figures
