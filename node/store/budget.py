"""The node's privacy budget ledger (DESIGN.md section 7: "each node is the guardian of its own
privacy budget").

The cap is the node's configuration (``[stats] budget_cap``, the same for every period); one
row per period ("YYYY-MM") records the cap in force at its last charge, and one row per
contribution holds the round, the attempt, the table, ε and when it was charged.
:meth:`BudgetStore.charge` runs in ONE transaction with the audit entry: it locks the period,
refuses a charge that would take the period past its cap, refuses a second charge for the same
(round, attempt), and only then records the charge. The caller charges BEFORE it submits a
share, so every share the broker ever sees was counted; a restarted round's new attempt is a
new (round, attempt) and is charged again.

:class:`BudgetStore` is a companion of :class:`~node.store.cases.NodeStore`, like
``node.referrals`` (its unit of work): same engine, write lock, transaction and audit log.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Final

from sqlmodel import Session, col, select

from node.domain import BudgetCharge
from node.store.cases import NodeStore
from node.store.tables import (
    BudgetChargeRow,
    BudgetPeriodRow,
    as_utc,
    utcnow,
)
from node.store.transactions import serialised_writing
from tessera.errors import Conflict, InvalidInput, Refused

__all__ = ["DEFAULT_CAP", "STATS_ACTOR", "BudgetCharge", "BudgetPeriod", "BudgetStore"]

#: ε a period may spend unless configured otherwise.
DEFAULT_CAP: Final = 1.0
#: Who the audit log names for what the statistics worker does.
STATS_ACTOR: Final = "system:stats"
# Floating-point slack when comparing sums of ε with the cap (0.1 + 0.2 must fit a cap of 0.3).
_SLACK: Final = 1e-9
_PERIOD = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")


def check_period(period: str) -> str:
    """A period "YYYY-MM"; InvalidInput otherwise."""
    if not isinstance(period, str) or not _PERIOD.match(period):
        raise InvalidInput(f"{period!r} is not a period (expected YYYY-MM, for example 2026-10)")
    return period


def _check_epsilon(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InvalidInput(f"{name} must be a positive finite number")
    return float(value)


@dataclass(frozen=True)
class BudgetPeriod:
    """The ledger of one period."""

    period: str
    cap: float
    charges: tuple[BudgetCharge, ...]

    @property
    def spent(self) -> float:
        return math.fsum(c.epsilon for c in self.charges)

    @property
    def remaining(self) -> float:
        return max(0.0, self.cap - self.spent)


class BudgetStore:
    """The budget ledger beside a node's :class:`NodeStore`."""

    def __init__(self, node_store: NodeStore, default_cap: float = DEFAULT_CAP) -> None:
        self._store = node_store
        self._default_cap = _check_epsilon("the budget cap", default_cap)

    @property
    def default_cap(self) -> float:
        return self._default_cap

    def _writing(self) -> AbstractContextManager[Session]:
        return serialised_writing(
            self._store, "that charge conflicts with one the ledger already holds"
        )

    def _period_row(self, session: Session, period: str) -> BudgetPeriodRow:
        row = session.exec(
            select(BudgetPeriodRow).where(BudgetPeriodRow.period == period).with_for_update()
        ).first()
        if row is None:
            row = BudgetPeriodRow(period=period, cap=self._default_cap, created_at=utcnow())
            session.add(row)
            session.flush()
        return row

    def charge(
        self, actor: str, period: str, round_id: str, attempt: int, table: str, epsilon: float
    ) -> BudgetPeriod:
        """Charge ε for one (round, attempt) to the period, or refuse without changing anything.

        Refused (and nothing written) if the period's remaining budget is below ε, or if this
        (round, attempt) was already charged (a node never submits twice to one attempt).
        """
        period, epsilon = check_period(period), _check_epsilon("epsilon", epsilon)
        if not round_id or not isinstance(attempt, int) or attempt < 1:
            raise InvalidInput("a charge needs a round id and a positive attempt")
        with self._writing() as session:
            row = self._period_row(session, period)
            already = session.exec(
                select(BudgetChargeRow).where(
                    BudgetChargeRow.round_id == round_id, BudgetChargeRow.attempt == attempt
                )
            ).first()
            if already is not None:
                raise Conflict(f"round {round_id} attempt {attempt} was already charged")
            spent = math.fsum(
                session.exec(
                    select(BudgetChargeRow.epsilon).where(BudgetChargeRow.period == period)
                ).all()
            )
            cap = self._default_cap
            if spent + epsilon > cap + _SLACK:
                raise Refused(
                    f"the privacy budget of {period} would be exceeded: cap {cap:g}, spent"
                    f" {spent:g}, asked {epsilon:g}",
                    hint="an administrator may raise [stats] budget_cap in tessera.toml, or wait"
                    " for the next period",
                )
            row.cap = cap
            session.add(row)
            session.add(
                BudgetChargeRow(
                    period=period,
                    round_id=round_id,
                    attempt=attempt,
                    table_name=table,
                    epsilon=epsilon,
                    charged_at=utcnow(),
                )
            )
            # Also outside the database, before the commit: restoring an older backup must not
            # give spent budget back (a line for a charge whose commit then fails only makes
            # the ledger more conservative).
            self._store.core.append_ledger(
                f"budget-charge {period} {round_id} {attempt} {epsilon!r} {table or '-'}"
            )
            self._store.core.audit_log.append(
                session,
                actor,
                "budget.charged",
                None,
                {
                    "period": period,
                    "round_id": round_id,
                    "attempt": attempt,
                    "table": table,
                    "epsilon": epsilon,
                    "spent": spent + epsilon,
                    "cap": cap,
                },
            )
        return self.period(period)

    def reapply_ledger(self, actor: str, ledger: Iterable[tuple[str, str]]) -> int:
        """After a restore: record again every charge the ledger knows and the database lost.

        No cap is checked here: those contributions were made; forgetting them would let the node
        spend its budget twice. Returns how many charges were re-recorded.
        """
        count = 0
        with self._writing() as session:
            for kind, value in ledger:
                if kind != "budget-charge":
                    continue
                period, round_id, attempt, epsilon, table = value.split(" ", 4)
                exists = session.exec(
                    select(BudgetChargeRow).where(
                        BudgetChargeRow.round_id == round_id,
                        BudgetChargeRow.attempt == int(attempt),
                    )
                ).first()
                if exists is None:
                    self._period_row(session, period)
                    session.add(
                        BudgetChargeRow(
                            period=period,
                            round_id=round_id,
                            attempt=int(attempt),
                            table_name="" if table == "-" else table,
                            epsilon=float(epsilon),
                            charged_at=utcnow(),
                        )
                    )
                    count += 1
            if count:
                self._store.core.audit_log.append(
                    session, actor, "budget.charges_reapplied", None, {"charges": count}
                )
        return count

    def charged(self, round_id: str, attempt: int) -> bool:
        """Whether this (round, attempt) was charged (and so submitted, or being submitted)."""
        with self._store.core.reading() as session:
            return (
                session.exec(
                    select(BudgetChargeRow.id).where(
                        BudgetChargeRow.round_id == round_id, BudgetChargeRow.attempt == attempt
                    )
                ).first()
                is not None
            )

    def highest_attempt(self, round_id: str) -> int:
        """The highest attempt of a round charged so far (0 if none)."""
        with self._store.core.reading() as session:
            attempts = session.exec(
                select(BudgetChargeRow.attempt).where(BudgetChargeRow.round_id == round_id)
            ).all()
        return max(attempts, default=0)

    def period(self, period: str) -> BudgetPeriod:
        """One period's ledger under the configured cap (no charges if nothing was recorded)."""
        period = check_period(period)
        with self._store.core.reading() as session:
            charges = session.exec(
                select(BudgetChargeRow)
                .where(BudgetChargeRow.period == period)
                .order_by(col(BudgetChargeRow.charged_at), col(BudgetChargeRow.id))
            ).all()
        return BudgetPeriod(period, self._default_cap, tuple(_charge(c) for c in charges))

    def periods(self, include: str | None = None) -> list[BudgetPeriod]:
        """Every period with a ledger row, plus ``include`` (say the current one), oldest first."""
        with self._store.core.reading() as session:
            names = set(session.exec(select(BudgetPeriodRow.period)).all())
        if include:
            names.add(check_period(include))
        return [self.period(name) for name in sorted(names)]

    def remaining(self, period: str) -> float:
        return self.period(period).remaining

    def need_rows(self) -> list[tuple[str, str, str, dt.datetime]]:
        """(case id, category, status, updated_at) of every need: what a statistics table
        counts (codes and dates only, never a survivor field)."""
        # Needs are sealed under each survivor's data key: the store opens them (an altered or
        # moved need row fails the round, TamperedCiphertext, rather than miscount).
        return [
            (case_id, need.category.value, need.status.value, need.updated_at)
            for case_id, need in self._store.need_facts()
        ]


def _charge(row: BudgetChargeRow) -> BudgetCharge:
    return BudgetCharge(
        row.round_id, row.attempt, row.table_name, row.epsilon, as_utc(row.charged_at)
    )
