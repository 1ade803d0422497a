"""The broker's store for statistics rounds and releases (DESIGN.md section 7).

What it holds: each round's state and every attempt's broker-signed Round (exact bytes and
signature), the participants of each attempt, each participant's submitted cells only until the
attempt is summed or abandoned (then only a digest of them is kept, so an identical retry is
still recognised), and each broker-signed Release, exactly the bytes signed, forever. It never
holds a single agency's unmasked table: private-round shares are masked, local-noise shares are
noised, and both are dropped once summed.

Every check that decides whether a share counts (the attempt is still the current one and
open) is made again inside the write transaction that stores the share, under a lock on the
round's row, so a restart and a last share cannot both win, and a release is made exactly once.
Declines and cancellations are checked the same way: a decline lands only on the current attempt
of an open round from a participant that has not submitted to it, and a cancel and a last share
cannot both win either.
"""

from __future__ import annotations

import datetime as dt
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select
from sqlmodel.sql.expression import SelectOfScalar

from broker.store._base import StoreBase, check_count, check_id, check_time
from broker.store.tables import (
    REASON_CHARS,
    StatsAttemptRow,
    StatsDeclineRow,
    StatsParticipantRow,
    StatsReleaseRow,
    StatsRoundRow,
    StatsShareRow,
)
from tessera import crypto
from tessera.errors import Conflict, InvalidInput, NotFound, PermissionDenied, Refused

# Round states, as the numbers of tessera.v1.RoundState.
STATE_OPEN = 1
STATE_RELEASED = 2
STATE_ABANDONED = 3
_LABEL_SHARE_DIGEST = b"tessera/v1/broker/stats-share"
MAX_PAGE = 500


def pack_cells(cells: Sequence[int]) -> bytes:
    """Cells mod 2**64 as little-endian uint64s (InvalidInput outside [0, 2**64))."""
    try:
        return struct.pack(f"<{len(cells)}Q", *cells)
    except struct.error:
        raise InvalidInput("every cell must be an integer in [0, 2**64)") from None


def unpack_cells(raw: bytes) -> list[int]:
    """The inverse of :func:`pack_cells`."""
    return list(struct.unpack(f"<{len(raw) // 8}Q", raw))


def check_reason(reason: str, name: str = "reason") -> str:
    """A decline's or a cancellation's reason: one line of 1 to 300 printable characters (it is
    shown to coordinators as it is, so no control characters that could rewrite a terminal)."""
    if not isinstance(reason, str) or not reason.strip():
        raise InvalidInput(f"a {name} is required", hint="say why, in a few words")
    if len(reason) > REASON_CHARS:
        raise InvalidInput(
            f"a {name} is at most {REASON_CHARS} characters; this one has {len(reason)}"
        )
    if not reason.isprintable():
        raise InvalidInput(f"a {name} is one line of printable text (no control characters)")
    return reason


@dataclass(frozen=True)
class StoredDecline:
    """A participant's refusal of the current attempt."""

    agency_id: str
    reason: str
    declined_at: dt.datetime


@dataclass(frozen=True)
class StoredRound:
    """A round with its current attempt's signed bytes and progress."""

    round_id: str
    state: int
    attempt: int
    body: bytes
    signature: bytes
    deadline: dt.datetime
    participants: tuple[str, ...]
    submitted: tuple[str, ...]
    release_id: str | None
    attempt_timeout_seconds: int
    # Declines of the current attempt, ascending by agency id (byte order).
    declines: tuple[StoredDecline, ...] = ()
    # ABANDONED only: why a coordinator cancelled the round.
    cancel_reason: str | None = None


@dataclass(frozen=True)
class StoredRelease:
    """A signed release, exactly as stored."""

    release_id: str
    round_id: str
    body: bytes
    signature: bytes


@dataclass(frozen=True)
class SubmitResult:
    """The outcome of one share: progress, and the release if this share completed the round."""

    submitted: int
    expected: int
    release_id: str | None
    duplicate: bool


# Builds the release from the round and the participants' cells: (release_id, body, signature).
ReleaseMaker = Callable[[StoredRound, list[list[int]]], tuple[str, bytes, bytes]]


class StatsStore(StoreBase):
    """Rounds, attempts, participants, shares (until summed) and releases."""

    # --- rounds ---------------------------------------------------------------------------

    def open_round(
        self,
        *,
        round_id: str,
        idempotency_key: str | None,
        period: str,
        table_name: str,
        attempt_timeout_seconds: int,
        opened_at: dt.datetime,
        body: bytes,
        signature: bytes,
        deadline: dt.datetime,
        participants: Sequence[str],
    ) -> tuple[StoredRound, bool]:
        """Store a new round at attempt 1; (round, created). With an idempotency key already
        used, nothing is stored and the existing round is returned (created False)."""
        if idempotency_key is not None:
            existing = self.round_by_key(idempotency_key)
            if existing is not None:
                return existing, False
        try:
            with self._writing("store the round") as session:
                session.add(
                    StatsRoundRow(
                        round_id=round_id,
                        idempotency_key=idempotency_key,
                        period=period,
                        table_name=table_name,
                        state=STATE_OPEN,
                        attempt=1,
                        attempt_timeout_seconds=check_count(
                            attempt_timeout_seconds, "attempt_timeout_seconds", minimum=1
                        ),
                        opened_at=check_time(opened_at, "opened_at"),
                    )
                )
                self._add_attempt(session, round_id, 1, body, signature, deadline, participants)
        except IntegrityError:
            if idempotency_key is None:
                raise Conflict(f"round {round_id} already exists") from None
            existing = self.round_by_key(idempotency_key)  # a concurrent open with the same key
            if existing is None:
                raise
            return existing, False
        stored = self.round(round_id)
        if stored is None:  # pragma: no cover - just committed
            raise NotFound(f"no round {round_id}")
        return stored, True

    @staticmethod
    def _add_attempt(
        session: Session,
        round_id: str,
        attempt: int,
        body: bytes,
        signature: bytes,
        deadline: dt.datetime,
        participants: Sequence[str],
    ) -> None:
        session.add(
            StatsAttemptRow(
                round_id=round_id,
                attempt=attempt,
                body=body,
                signature=signature,
                deadline=check_time(deadline, "deadline"),
            )
        )
        for agency_id in participants:
            session.add(
                StatsParticipantRow(
                    round_id=round_id, attempt=attempt, agency_id=check_id(agency_id, "agency_id")
                )
            )

    def round_by_key(self, idempotency_key: str) -> StoredRound | None:
        """The round opened under this idempotency key (its current attempt), if any."""
        with self._reading("read the round") as session:
            row = session.exec(
                select(StatsRoundRow).where(StatsRoundRow.idempotency_key == idempotency_key)
            ).first()
            return self._stored(session, row) if row is not None else None

    def round(self, round_id: str) -> StoredRound | None:
        """One round and its current attempt, or None."""
        with self._reading("read the round") as session:
            row = session.exec(
                select(StatsRoundRow).where(StatsRoundRow.round_id == round_id)
            ).first()
            return self._stored(session, row) if row is not None else None

    def attempt_body(self, round_id: str, attempt: int) -> tuple[bytes, bytes] | None:
        """(body, signature) of one attempt's signed Round, or None."""
        with self._reading("read the round") as session:
            row = session.get(StatsAttemptRow, (round_id, attempt))
            return (bytes(row.body), bytes(row.signature)) if row is not None else None

    def list_rounds(
        self, *, state: int, participant: str, period: str, limit: int, before: int | None
    ) -> tuple[list[StoredRound], int | None]:
        """Rounds newest first, filtered (0 / "" mean any); (page, token for the next page)."""
        with self._reading("list rounds") as session:
            query = select(StatsRoundRow)
            if state:
                query = query.where(StatsRoundRow.state == state)
            if period:
                query = query.where(StatsRoundRow.period == period)
            if participant:
                listed = (
                    select(StatsParticipantRow.round_id)
                    .where(StatsParticipantRow.agency_id == participant)
                    .where(StatsParticipantRow.round_id == StatsRoundRow.round_id)
                    .where(StatsParticipantRow.attempt == StatsRoundRow.attempt)
                )
                query = query.where(listed.exists())
            rows, following = _newest_first(session, query, col(StatsRoundRow.seq), limit, before)
            return [self._stored(session, row) for row in rows], following

    @staticmethod
    def _stored(session: Session, row: StatsRoundRow) -> StoredRound:
        attempt = session.get(StatsAttemptRow, (row.round_id, row.attempt))
        if attempt is None:  # pragma: no cover - written in the same transaction as the round
            raise NotFound(f"round {row.round_id} has no attempt {row.attempt}")
        participants = session.exec(
            select(StatsParticipantRow.agency_id)
            .where(StatsParticipantRow.round_id == row.round_id)
            .where(StatsParticipantRow.attempt == row.attempt)
        ).all()
        submitted = session.exec(
            select(StatsShareRow.agency_id)
            .where(StatsShareRow.round_id == row.round_id)
            .where(StatsShareRow.attempt == row.attempt)
        ).all()
        declines = session.exec(
            select(StatsDeclineRow)
            .where(StatsDeclineRow.round_id == row.round_id)
            .where(StatsDeclineRow.attempt == row.attempt)
        ).all()
        return StoredRound(
            round_id=row.round_id,
            state=row.state,
            attempt=row.attempt,
            body=bytes(attempt.body),
            signature=bytes(attempt.signature),
            deadline=attempt.deadline,
            participants=tuple(sorted(participants, key=str.encode)),
            submitted=tuple(sorted(submitted, key=str.encode)),
            release_id=row.release_id,
            attempt_timeout_seconds=row.attempt_timeout_seconds,
            declines=tuple(
                StoredDecline(d.agency_id, d.reason, d.declined_at)
                for d in sorted(declines, key=lambda d: d.agency_id.encode())
            ),
            cancel_reason=row.cancel_reason,
        )

    def _locked_round(self, session: Session, round_id: str) -> StatsRoundRow:
        """The round's row, locked until the end of the transaction (SQLite: BEGIN IMMEDIATE)."""
        row = session.exec(
            select(StatsRoundRow).where(StatsRoundRow.round_id == round_id).with_for_update()
        ).first()
        if row is None:
            raise NotFound(f"no round {round_id!r}")
        return row

    # --- shares -----------------------------------------------------------------------------

    def submit_share(
        self,
        *,
        round_id: str,
        attempt: int,
        agency_id: str,
        cells: Sequence[int],
        now: dt.datetime,
        make_release: ReleaseMaker,
    ) -> SubmitResult:
        """Store one participant's cells for the current attempt; when it is the last one, sum
        them through ``make_release``, store the release, drop every share's cells, and mark
        the round RELEASED, all in one transaction."""
        packed = pack_cells(cells)
        share_digest = crypto.digest(_LABEL_SHARE_DIGEST, packed)
        with self._writing("store the share") as session:
            row = self._locked_round(session, round_id)
            existing = session.get(StatsShareRow, (round_id, attempt, agency_id))
            if existing is not None:
                if bytes(existing.digest) != share_digest:
                    raise Conflict(
                        f"agency {agency_id} already submitted different cells to attempt "
                        f"{attempt} of round {round_id}",
                        hint="a node submits once per attempt; wait for a restart",
                    )
                stored = self._stored(session, row)
                return SubmitResult(
                    len(stored.submitted), len(stored.participants), row.release_id, True
                )
            if attempt != row.attempt:
                raise Refused(
                    f"attempt {attempt} is not the current attempt ({row.attempt}) of round "
                    f"{round_id}",
                    hint="fetch the round again and submit to its current attempt",
                )
            if row.state != STATE_OPEN:
                raise Refused(f"round {round_id} is no longer open")
            session.add(
                StatsShareRow(
                    round_id=round_id,
                    attempt=attempt,
                    agency_id=agency_id,
                    digest=share_digest,
                    cells=packed,
                    submitted_at=check_time(now, "now"),
                )
            )
            # A participant that declined and then submitted after all has not declined.
            session.execute(
                delete(StatsDeclineRow)
                .where(col(StatsDeclineRow.round_id) == round_id)
                .where(col(StatsDeclineRow.attempt) == attempt)
                .where(col(StatsDeclineRow.agency_id) == agency_id)
            )
            session.flush()
            stored = self._stored(session, row)
            if len(stored.submitted) < len(stored.participants):
                return SubmitResult(len(stored.submitted), len(stored.participants), None, False)
            shares = session.exec(
                select(StatsShareRow)
                .where(StatsShareRow.round_id == round_id)
                .where(StatsShareRow.attempt == attempt)
            ).all()
            vectors = [unpack_cells(bytes(s.cells or b"")) for s in shares]
            release_id, body, signature = make_release(stored, vectors)
            session.add(
                StatsReleaseRow(
                    release_id=release_id,
                    round_id=round_id,
                    period=row.period,
                    table_name=row.table_name,
                    body=body,
                    signature=signature,
                    released_at=check_time(now, "now"),
                )
            )
            # The broker keeps only the sum: every share's cells go now, only digests remain.
            session.execute(
                update(StatsShareRow)
                .where(col(StatsShareRow.round_id) == round_id)
                .values(cells=None)
            )
            row.state = STATE_RELEASED
            row.release_id = release_id
            session.add(row)
            return SubmitResult(len(stored.submitted), len(stored.participants), release_id, False)

    # --- restarts ---------------------------------------------------------------------------

    def restart_round(
        self,
        *,
        round_id: str,
        attempt: int,
        reason: str,
        now: dt.datetime,
        body: bytes,
        signature: bytes,
        deadline: dt.datetime,
        participants: Sequence[str],
    ) -> StoredRound:
        """Abandon ``attempt`` (it must be the current, open one), discard its shares unread,
        and store attempt + 1 with its signed Round."""
        with self._writing("restart the round") as session:
            row = self._locked_round(session, round_id)
            if row.state != STATE_OPEN:
                raise Refused(f"round {round_id} is no longer open")
            if attempt != row.attempt:
                raise Refused(
                    f"attempt {attempt} is not the current attempt ({row.attempt}) of round "
                    f"{round_id}",
                    hint="someone restarted it already; fetch the round again",
                )
            old = session.get(StatsAttemptRow, (round_id, attempt))
            if old is not None:
                old.abandoned_at = check_time(now, "now")
                old.abandon_reason = reason[:500]
                session.add(old)
            session.execute(
                delete(StatsShareRow)
                .where(col(StatsShareRow.round_id) == round_id)
                .where(col(StatsShareRow.attempt) == attempt)
            )
            self._add_attempt(
                session, round_id, attempt + 1, body, signature, deadline, participants
            )
            row.attempt = attempt + 1
            session.add(row)
            session.flush()
            return self._stored(session, row)

    # --- declines and cancellation ------------------------------------------------------------

    def decline(
        self, *, round_id: str, attempt: int, agency_id: str, reason: str, now: dt.datetime
    ) -> StoredRound:
        """Record that ``agency_id`` will not submit to ``attempt`` (the current attempt of an open
        round, which lists it and has no share from it), and why. Repeating the same reason
        changes nothing (the first time is kept); a new reason replaces the old one."""
        check_reason(reason)
        check_time(now, "now")
        with self._writing("record the decline") as session:
            row = self._locked_round(session, round_id)
            if row.state != STATE_OPEN:
                raise Refused(f"round {round_id} is no longer open")
            if attempt != row.attempt:
                raise Refused(
                    f"attempt {attempt} is not the current attempt ({row.attempt}) of round "
                    f"{round_id}",
                    hint="fetch the round again; decline its current attempt if you must",
                )
            if session.get(StatsParticipantRow, (round_id, attempt, agency_id)) is None:
                raise PermissionDenied(
                    f"agency {agency_id} is not a participant of attempt {attempt} of round "
                    f"{round_id}"
                )
            if session.get(StatsShareRow, (round_id, attempt, agency_id)) is not None:
                raise Refused(
                    f"agency {agency_id} already submitted to attempt {attempt} of round "
                    f"{round_id}; a submitted share cannot be declined",
                    hint="the coordinator may restart the round without you",
                )
            existing = session.get(StatsDeclineRow, (round_id, attempt, agency_id))
            if existing is None:
                session.add(
                    StatsDeclineRow(
                        round_id=round_id,
                        attempt=attempt,
                        agency_id=agency_id,
                        reason=reason,
                        declined_at=check_time(now, "now"),
                    )
                )
            elif existing.reason != reason:
                existing.reason = reason
                existing.declined_at = check_time(now, "now")
                session.add(existing)
            session.flush()
            return self._stored(session, row)

    def cancel(self, *, round_id: str, reason: str, now: dt.datetime) -> StoredRound:
        """Give up an open round: ABANDONED, its current attempt abandoned, every share deleted
        unread, the reason kept. Cancelling an abandoned round again changes nothing (the first
        reason stays); a released round cannot be cancelled."""
        check_reason(reason)
        check_time(now, "now")
        with self._writing("cancel the round") as session:
            row = self._locked_round(session, round_id)
            if row.state == STATE_ABANDONED:
                return self._stored(session, row)
            if row.state != STATE_OPEN:
                raise Refused(
                    f"round {round_id} was released; a release is never withdrawn",
                    hint="open a new round if the release should be superseded",
                )
            current = session.get(StatsAttemptRow, (round_id, row.attempt))
            if current is not None:
                current.abandoned_at = check_time(now, "now")
                current.abandon_reason = f"cancelled: {reason}"
                session.add(current)
            session.execute(delete(StatsShareRow).where(col(StatsShareRow.round_id) == round_id))
            row.state = STATE_ABANDONED
            row.cancelled_at = check_time(now, "now")
            row.cancel_reason = reason
            session.add(row)
            session.flush()
            return self._stored(session, row)

    # --- releases ---------------------------------------------------------------------------

    def release(self, *, release_id: str = "", round_id: str = "") -> StoredRelease | None:
        """One stored release, by its id or by its round's id."""
        with self._reading("read the release") as session:
            query = select(StatsReleaseRow)
            if release_id:
                query = query.where(StatsReleaseRow.release_id == release_id)
            else:
                query = query.where(StatsReleaseRow.round_id == round_id)
            row = session.exec(query).first()
            return _release(row) if row is not None else None

    def list_releases(
        self, *, period: str, table: str, limit: int, before: int | None
    ) -> tuple[list[StoredRelease], int | None]:
        """Releases newest first, filtered ("" means any); (page, token for the next page)."""
        with self._reading("list releases") as session:
            query = select(StatsReleaseRow)
            if period:
                query = query.where(StatsReleaseRow.period == period)
            if table:
                query = query.where(StatsReleaseRow.table_name == table)
            rows, following = _newest_first(session, query, col(StatsReleaseRow.seq), limit, before)
            return [_release(r) for r in rows], following


def _release(row: StatsReleaseRow) -> StoredRelease:
    return StoredRelease(row.release_id, row.round_id, bytes(row.body), bytes(row.signature))


Row = TypeVar("Row", StatsRoundRow, StatsReleaseRow)


def _newest_first(
    session: Session, query: SelectOfScalar[Row], seq: Any, limit: int, before: int | None
) -> tuple[list[Row], int | None]:
    """One page of ``query``'s rows, newest (highest ``seq``) first, below the token ``before``;
    (rows, token for the next page, None on the last page). ``limit`` is kept within 1 to
    MAX_PAGE."""
    limit = max(1, min(limit, MAX_PAGE))
    if before is not None:
        query = query.where(seq < before)
    # One row more than the page: whether it exists says if another page follows.
    rows = list(session.exec(query.order_by(seq.desc()).limit(limit + 1)).all())
    following = rows[limit - 1].seq if len(rows) > limit else None
    return rows[:limit], following
