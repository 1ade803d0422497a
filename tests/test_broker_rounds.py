"""Declining and cancelling statistics rounds (DESIGN.md section 7, docs/statistics.md).

Over the wire, against a real broker on loopback with enrolled agencies signing their own
requests (the fixtures and share builder of tests/test_broker_stats.py): a participant declines
with a reason and the coordinator sees it; a decline in another's name, from an outsider, from a
coordinator, for an old attempt or after submitting is refused with its own status; a restart
without the decliner starts clean and completes; a cancelled round is abandoned with its reason,
its shares gone from the database, and refuses every later share; a released round cannot be
cancelled. The store's own checks run on SQLite and PostgreSQL, including a cancel racing the
last share. Then the coordinator's commands (``tessera stats round status/restart/cancel/list``)
end to end.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import Engine
from sqlmodel import Session, select
from typer.testing import CliRunner, Result

from broker.store.database import open_database
from broker.store.stats import (
    STATE_ABANDONED,
    STATE_OPEN,
    STATE_RELEASED,
    StatsStore,
    StoredRound,
)
from broker.store.tables import StatsAttemptRow, StatsDeclineRow, StatsRoundRow, StatsShareRow
from cli import stats_rounds
from cli.main import app
from tessera.errors import InvalidInput, NotFound, PermissionDenied, Refused
from tessera.timestamps import to_datetime
from tessera.v1 import stats_pb2 as stats_pb
from tests import test_broker_stats, test_broker_store
from tests.support import Agency, BackgroundBroker, enrol, make_broker
from tests.test_broker_stats import (
    PERIOD,
    SMALL,
    build_share,
    call,
    coordinator,
    refused,
    submit,
    verified_round,
)
from tests.test_broker_store import in_parallel
from tests.test_node_cli import tessera

T0 = dt.datetime(2026, 10, 1, 9, 0, tzinfo=dt.UTC)

# The running broker and its three enrolled agencies, as tests/test_broker_stats.py makes them.
broker = test_broker_stats.broker
agencies = test_broker_stats.agencies
# A SQLite file, then a fresh PostgreSQL database, as tests/test_broker_store.py makes them.
db_url = test_broker_store.db_url


def decline(agency: Agency, round_id: str, attempt: int, reason: str, **as_: str) -> Any:
    request = stats_pb.DeclineRoundRequest(
        round_id=round_id,
        attempt=attempt,
        agency_id=as_.get("agency_id", agency.agency_id),
        reason=reason,
    )
    return call(agency, "DeclineRound", request)


def declined(agency: Agency, round_id: str, attempt: int, reason: str, **as_: str) -> Any:
    """The status code a decline is refused with."""
    request = stats_pb.DeclineRoundRequest(
        round_id=round_id,
        attempt=attempt,
        agency_id=as_.get("agency_id", agency.agency_id),
        reason=reason,
    )
    return refused(agency, "DeclineRound", request)


def open_small(running: BackgroundBroker, threshold: int = 2) -> tuple[str, Any]:
    """Open a round of SMALL for every agency; (round id, its signed attempt 1)."""
    with coordinator(running) as client:
        blob = client.open_round("north", PERIOD, threshold=threshold, epsilon=1.0, table=SMALL)
    return stats_pb.Round.FromString(blob.body).round_id, blob


def shares_in_database(running: BackgroundBroker, round_id: str) -> list[StatsShareRow]:
    engine = open_database(running.settings.effective_database_url)
    try:
        with Session(engine) as session:
            return list(
                session.exec(select(StatsShareRow).where(StatsShareRow.round_id == round_id)).all()
            )
    finally:
        engine.dispose()


def round_row(running: BackgroundBroker, round_id: str) -> tuple[StatsRoundRow, StatsAttemptRow]:
    engine = open_database(running.settings.effective_database_url)
    try:
        with Session(engine) as session:
            row = session.exec(
                select(StatsRoundRow).where(StatsRoundRow.round_id == round_id)
            ).one()
            attempt = session.get(StatsAttemptRow, (round_id, row.attempt))
            assert attempt is not None
            return row, attempt
    finally:
        engine.dispose()


# --- over the wire ------------------------------------------------------------------------------


def test_a_participant_declines_with_a_reason_and_the_coordinator_sees_it(
    broker: BackgroundBroker, agencies: list[Agency], tmp_path: Path
) -> None:
    alder, birch, cedar = agencies
    round_id, blob = open_small(broker)
    before = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    reply = decline(cedar, round_id, 1, "budget for 2026-10 is spent")
    assert isinstance(reply, stats_pb.DeclineRoundResponse)
    assert [(d.agency_id, d.reason) for d in reply.round.declines] == [
        ("cedar-aid", "budget for 2026-10 is spent")
    ]
    with coordinator(broker) as client:
        status = client.round(round_id)
    assert status.state == stats_pb.ROUND_STATE_OPEN and status.cancel_reason == ""
    (seen,) = status.declines
    first_time = to_datetime(seen.declined_at)
    assert (seen.agency_id, seen.reason) == ("cedar-aid", "budget for 2026-10 is spent")
    assert before <= first_time <= dt.datetime.now(dt.UTC)
    # The same decline again changes nothing (its time stays); a new reason replaces the old.
    again = decline(cedar, round_id, 1, "budget for 2026-10 is spent")
    assert to_datetime(again.round.declines[0].declined_at) == first_time
    decline(birch, round_id, 1, "an unverified participant")
    changed = decline(cedar, round_id, 1, "threshold below our minimum of 3")
    assert [(d.agency_id, d.reason) for d in changed.round.declines] == [
        ("birch-clinic", "an unverified participant"),  # ascending by agency id
        ("cedar-aid", "threshold below our minimum of 3"),
    ]
    listed = call(alder, "ListRounds", stats_pb.ListRoundsRequest(participant="alder-house"))
    assert isinstance(listed, stats_pb.ListRoundsResponse)
    assert [d.agency_id for d in listed.rounds[0].declines] == ["birch-clinic", "cedar-aid"]

    # Only the agency itself, only a participant, only with a reason that fits.
    forged = declined(alder, round_id, 1, "not really", agency_id="cedar-aid")
    assert forged == grpc.StatusCode.PERMISSION_DENIED
    outsider = enrol(broker, tmp_path, "dogwood-house")
    assert declined(outsider, round_id, 1, "not ours") == grpc.StatusCode.PERMISSION_DENIED
    with coordinator(broker) as client, pytest.raises(PermissionDenied):
        client.decline(round_id, 1, "alder-house", "a coordinator cannot speak for an agency")
    assert declined(alder, round_id, 2, "a future attempt") == grpc.StatusCode.FAILED_PRECONDITION
    assert declined(alder, str(uuid.uuid4()), 1, "no such round") == grpc.StatusCode.NOT_FOUND
    for bad in ("", "   ", "x" * 301, "two\nlines", "escape \x1b[2J"):
        assert declined(alder, round_id, 1, bad) == grpc.StatusCode.INVALID_ARGUMENT, bad
    assert decline(alder, round_id, 1, "y" * 300).round.declines[0].reason == "y" * 300

    # A participant that declined may still submit: its decline goes. One that submitted cannot
    # decline any more.
    assert submit(birch, build_share(birch, blob, [1, 0, 0, 0], noise=False)).submitted == 1
    with coordinator(broker) as client:
        status = client.round(round_id)
    assert list(status.submitted) == ["birch-clinic"]
    assert [d.agency_id for d in status.declines] == ["alder-house", "cedar-aid"]
    assert declined(birch, round_id, 1, "changed our mind") == grpc.StatusCode.FAILED_PRECONDITION


def test_a_restart_without_the_decliner_starts_with_no_declines_and_completes(
    broker: BackgroundBroker, agencies: list[Agency]
) -> None:
    alder, birch, cedar = agencies
    round_id, blob = open_small(broker)
    submit(alder, build_share(alder, blob, [5, 5, 5, 5], noise=False))
    decline(cedar, round_id, 1, "budget for 2026-10 is spent")
    decline(birch, round_id, 1, "waiting for our administrator")
    with coordinator(broker) as client:
        restarted = client.restart(round_id, 1, drop=["cedar-aid"], reason="cedar-aid declined")
    assert restarted.state == stats_pb.ROUND_STATE_OPEN
    assert list(restarted.declines) == [] and list(restarted.submitted) == []
    second = verified_round(alder, restarted.round)
    assert second.attempt == 2 and list(second.participants) == ["alder-house", "birch-clinic"]
    # Attempt 1 is gone for declines as for shares; cedar is no participant of attempt 2.
    assert declined(birch, round_id, 1, "late") == grpc.StatusCode.FAILED_PRECONDITION
    assert declined(cedar, round_id, 2, "still spent") == grpc.StatusCode.PERMISSION_DENIED
    assert submit(alder, build_share(alder, restarted.round, [1, 2, 3, 4], noise=False))
    done = submit(birch, build_share(birch, restarted.round, [1, 1, 1, 1], noise=False))
    assert done.release_id and (done.submitted, done.expected) == (2, 2)
    with coordinator(broker) as client:
        status = client.round(round_id)
        release = stats_pb.Release.FromString(client.release(round_id=round_id).body)
    assert status.state == stats_pb.ROUND_STATE_RELEASED and list(status.declines) == []
    assert [c.value for c in release.cells] == [2, 3, 4, 5]
    assert release.attempt == 2 and release.participants == 2
    # A released round takes no declines.
    assert declined(alder, round_id, 2, "too late") == grpc.StatusCode.FAILED_PRECONDITION


def test_cancel_abandons_the_round_deletes_its_shares_and_refuses_later_ones(
    broker: BackgroundBroker, agencies: list[Agency]
) -> None:
    alder, birch, cedar = agencies
    round_id, blob = open_small(broker)
    alder_share = build_share(alder, blob, [7, 7, 7, 7])
    submit(alder, alder_share)
    decline(cedar, round_id, 1, "budget for 2026-10 is spent")
    (stored,) = shares_in_database(broker, round_id)
    assert stored.agency_id == "alder-house" and stored.cells  # held until summed or abandoned
    opening = stats_pb.CancelRoundRequest(round_id=round_id, reason="an agency cancels")
    assert refused(alder, "CancelRound", opening) == grpc.StatusCode.PERMISSION_DENIED
    with coordinator(broker) as client:
        with pytest.raises(InvalidInput):
            client.cancel(round_id, "")
        with pytest.raises(NotFound):
            client.cancel(str(uuid.uuid4()), "no such round")
        status = client.cancel(round_id, "too few agencies can take part this month")
        assert client.round(round_id) == status
        again = client.cancel(round_id, "a second reason")  # idempotent: the first reason stays
        abandoned = client.rounds(state=stats_pb.ROUND_STATE_ABANDONED)
        still_open = client.rounds(state=stats_pb.ROUND_STATE_OPEN)
        with pytest.raises(Refused):
            client.restart(round_id, 1, reason="after a cancel")
    assert status.state == stats_pb.ROUND_STATE_ABANDONED
    assert status.cancel_reason == "too few agencies can take part this month"
    assert list(status.submitted) == [] and status.release_id == ""
    assert [d.agency_id for d in status.declines] == ["cedar-aid"]  # why it was given up
    assert again == status
    assert [verified_round(alder, r.round).round_id for r in abandoned] == [round_id]
    assert still_open == []
    assert shares_in_database(broker, round_id) == []  # deleted unread
    row, attempt = round_row(broker, round_id)
    assert (row.state, row.cancel_reason, row.release_id) == (
        STATE_ABANDONED,
        "too few agencies can take part this month",
        None,
    )
    assert row.cancelled_at is not None and attempt.abandoned_at is not None
    # Nothing is taken any more: not a new share, not the deleted one again, not a decline.
    birch_share = build_share(birch, blob, [1, 1, 1, 1])
    assert refused(birch, "SubmitShare", birch_share) == grpc.StatusCode.FAILED_PRECONDITION
    assert refused(alder, "SubmitShare", alder_share) == grpc.StatusCode.FAILED_PRECONDITION
    assert declined(birch, round_id, 1, "after the cancel") == grpc.StatusCode.FAILED_PRECONDITION
    assert shares_in_database(broker, round_id) == []
    with pytest.raises(grpc.RpcError) as caught:
        call(alder, "GetRelease", stats_pb.GetReleaseRequest(round_id=round_id))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_released_round_cannot_be_cancelled(
    broker: BackgroundBroker, agencies: list[Agency]
) -> None:
    round_id, blob = open_small(broker)
    release_id = ""
    for agency in agencies:
        release_id = submit(agency, build_share(agency, blob, [1, 2, 3, 4])).release_id
    with coordinator(broker) as client:
        served = client.release(round_id=round_id)
        with pytest.raises(Refused):
            client.cancel(round_id, "changed our mind")
        status = client.round(round_id)
        assert client.release(round_id=round_id) == served  # still served, unchanged
    assert status.state == stats_pb.ROUND_STATE_RELEASED and status.release_id == release_id
    assert status.cancel_reason == ""


def test_decline_restart_and_cancel_on_postgresql(postgres_url: str, tmp_path: Path) -> None:
    running = BackgroundBroker(make_broker(tmp_path / "broker", database_url=postgres_url))
    try:
        alder, birch, cedar = (
            enrol(running, tmp_path, name) for name in ("alder-house", "birch-clinic", "cedar-aid")
        )
        round_id, blob = open_small(running)
        submit(alder, build_share(alder, blob, [3, 3, 3, 3]))
        decline(cedar, round_id, 1, "budget for 2026-10 is spent")
        assert declined(alder, round_id, 1, "after submitting") == (
            grpc.StatusCode.FAILED_PRECONDITION
        )
        with coordinator(running) as client:
            assert [d.agency_id for d in client.round(round_id).declines] == ["cedar-aid"]
            restarted = client.restart(round_id, 1, drop=["cedar-aid"])
            assert list(restarted.declines) == []
            submit(birch, build_share(birch, restarted.round, [1, 1, 1, 1]))
            assert len(shares_in_database(running, round_id)) == 1
            status = client.cancel(round_id, "the coordinator gave up")
        assert status.state == stats_pb.ROUND_STATE_ABANDONED
        assert status.cancel_reason == "the coordinator gave up"
        assert shares_in_database(running, round_id) == []
        late = build_share(alder, restarted.round, [1, 1, 1, 1])
        assert refused(alder, "SubmitShare", late) == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        running.stop()


# --- the store, on SQLite and PostgreSQL --------------------------------------------------------


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    made = open_database(db_url)
    try:
        yield made
    finally:
        made.dispose()


def stored_round(store: StatsStore, participants: tuple[str, ...] = ("a", "b", "c")) -> str:
    round_id = str(uuid.uuid4())
    store.open_round(
        round_id=round_id,
        idempotency_key=None,
        period=PERIOD,
        table_name="t",
        attempt_timeout_seconds=3600,
        opened_at=T0,
        body=b"round " + round_id.encode(),
        signature=b"signature",
        deadline=T0 + dt.timedelta(hours=1),
        participants=participants,
    )
    return round_id


def share(store: StatsStore, round_id: str, attempt: int, agency_id: str) -> Any:
    return store.submit_share(
        round_id=round_id,
        attempt=attempt,
        agency_id=agency_id,
        cells=[1, 2, 3],
        now=T0,
        make_release=lambda _r, _v: (str(uuid.uuid4()), b"release", b"signature"),
    )


def restart(store: StatsStore, round_id: str, attempt: int, participants: tuple[str, ...]) -> Any:
    return store.restart_round(
        round_id=round_id,
        attempt=attempt,
        reason="restart",
        now=T0,
        body=b"attempt " + str(attempt + 1).encode(),
        signature=b"signature",
        deadline=T0 + dt.timedelta(hours=2),
        participants=participants,
    )


def test_store_declines_per_attempt_and_checks_each_one(engine: Engine) -> None:
    store = StatsStore(engine)
    round_id = stored_round(store)
    got = store.decline(round_id=round_id, attempt=1, agency_id="c", reason="spent", now=T0)
    later = T0 + dt.timedelta(minutes=5)
    same = store.decline(round_id=round_id, attempt=1, agency_id="c", reason="spent", now=later)
    assert [(d.agency_id, d.reason, d.declined_at) for d in got.declines] == [("c", "spent", T0)]
    assert same.declines == got.declines  # the first time is kept
    new = store.decline(round_id=round_id, attempt=1, agency_id="c", reason="other", now=later)
    assert [(d.reason, d.declined_at) for d in new.declines] == [("other", later)]
    with pytest.raises(PermissionDenied):
        store.decline(round_id=round_id, attempt=1, agency_id="z", reason="not listed", now=T0)
    with pytest.raises(Refused):
        store.decline(round_id=round_id, attempt=2, agency_id="a", reason="no attempt 2", now=T0)
    with pytest.raises(NotFound):
        store.decline(round_id="nope", attempt=1, agency_id="a", reason="no round", now=T0)
    for bad in ("", "x" * 301, "tab\there"):
        with pytest.raises(InvalidInput):
            store.decline(round_id=round_id, attempt=1, agency_id="a", reason=bad, now=T0)
    share(store, round_id, 1, "a")
    with pytest.raises(Refused):  # submitted: too late to decline
        store.decline(round_id=round_id, attempt=1, agency_id="a", reason="late", now=T0)
    store.decline(round_id=round_id, attempt=1, agency_id="b", reason="unsure", now=T0)
    share(store, round_id, 1, "b")  # submitting after all takes the decline back
    status = store.round(round_id)
    assert status is not None
    assert [d.agency_id for d in status.declines] == ["c"]
    # A restart's new attempt starts without declines, even from the agencies it keeps.
    second = restart(store, round_id, 1, ("b", "c"))
    assert second.attempt == 2 and second.declines == () and second.submitted == ()
    with pytest.raises(Refused):  # the old attempt is closed to declines
        store.decline(round_id=round_id, attempt=1, agency_id="c", reason="late", now=T0)
    with pytest.raises(PermissionDenied):  # dropped: no longer a participant
        store.decline(round_id=round_id, attempt=2, agency_id="a", reason="gone", now=T0)
    with Session(engine) as session:
        kept = session.exec(
            select(StatsDeclineRow).where(StatsDeclineRow.round_id == round_id)
        ).all()
    assert [(d.attempt, d.agency_id) for d in kept] == [(1, "c")]  # history of attempt 1


def test_store_cancels_once_and_never_a_released_round(engine: Engine) -> None:
    store = StatsStore(engine)
    round_id = stored_round(store)
    share(store, round_id, 1, "a")
    store.decline(round_id=round_id, attempt=1, agency_id="c", reason="spent", now=T0)
    cancelled = store.cancel(round_id=round_id, reason="gave up", now=T0)
    assert (cancelled.state, cancelled.cancel_reason, cancelled.submitted) == (
        STATE_ABANDONED,
        "gave up",
        (),
    )
    assert [d.agency_id for d in cancelled.declines] == ["c"]
    assert store.cancel(round_id=round_id, reason="again", now=T0) == cancelled
    with Session(engine) as session:
        assert session.exec(select(StatsShareRow)).all() == []
    for late in (
        lambda: share(store, round_id, 1, "b"),
        lambda: share(store, round_id, 1, "a"),
        lambda: store.decline(round_id=round_id, attempt=1, agency_id="b", reason="x", now=T0),
        lambda: restart(store, round_id, 1, ("a", "b")),
    ):
        with pytest.raises(Refused):
            late()
    released = stored_round(store, ("a", "b"))
    share(store, released, 1, "a")
    assert share(store, released, 1, "b").release_id
    with pytest.raises(Refused):
        store.cancel(round_id=released, reason="too late", now=T0)
    status = store.round(released)
    assert status is not None and (status.state, status.cancel_reason) == (STATE_RELEASED, None)
    with pytest.raises(InvalidInput):
        store.cancel(round_id=stored_round(store), reason="x" * 301, now=T0)
    with pytest.raises(NotFound):
        store.cancel(round_id="nope", reason="no round", now=T0)


def test_a_cancel_racing_the_last_share_has_one_winner(engine: Engine, db_url: str) -> None:
    """The cancel and the share that completes the round both check the round's state under its
    row lock: either the release is made and the cancel refused, or the round is abandoned and
    the share refused; never a release of a cancelled round."""
    stores = [StatsStore(engine), StatsStore(open_database(db_url))]
    try:
        outcomes = set()
        for _ in range(8):
            round_id = stored_round(stores[0], ("a", "b"))
            share(stores[0], round_id, 1, "a")
            work = [
                lambda r=round_id: share(stores[0], r, 1, "b"),
                lambda r=round_id: stores[1].cancel(round_id=r, reason="race", now=T0),
            ]
            results = in_parallel(2, lambda i, w=work: w[i]())
            refusals = [r for r in results if isinstance(r, Refused)]
            assert len(refusals) == 1, results
            final = stores[0].round(round_id)
            assert isinstance(final, StoredRound)
            if isinstance(results[0], Refused):
                assert final.state == STATE_ABANDONED and final.release_id is None
            else:
                assert final.state == STATE_RELEASED and final.cancel_reason is None
            outcomes.add(final.state)
        assert outcomes <= {STATE_ABANDONED, STATE_RELEASED}
    finally:
        stores[1].engine.dispose()


def test_a_decline_racing_its_own_share_has_one_winner(engine: Engine, db_url: str) -> None:
    stores = [StatsStore(engine), StatsStore(open_database(db_url))]
    try:
        for _ in range(8):
            round_id = stored_round(stores[0], ("a", "b", "c"))
            work = [
                lambda r=round_id: share(stores[0], r, 1, "a"),
                lambda r=round_id: stores[1].decline(
                    round_id=r, attempt=1, agency_id="a", reason="race", now=T0
                ),
            ]
            results = in_parallel(2, lambda i, w=work: w[i]())
            assert not any(
                isinstance(r, BaseException) and not isinstance(r, Refused) for r in results
            )
            final = stores[0].round(round_id)
            assert final is not None and final.state == STATE_OPEN
            # Whichever came second: a share takes the decline back, a decline after a share is
            # refused. Never both a share and a decline from "a".
            assert final.submitted == ("a",) and final.declines == ()
    finally:
        stores[1].engine.dispose()


# --- the coordinator's commands -----------------------------------------------------------------


def run(running: BackgroundBroker, *args: str, stdin: str | None = None) -> Result:
    home = str(running.settings.home)
    return CliRunner().invoke(
        app, ["--home", home, "stats", "round", *args], input=stdin, env={"COLUMNS": "200"}
    )


def ok(result: Result) -> Result:
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def as_json(result: Result) -> Any:
    return json.loads(ok(result).stdout)


def test_the_state_names_are_the_wire_numbers() -> None:
    for state, number in stats_rounds.STATE_NUMBERS.items():
        assert stats_pb.RoundState.Value(f"ROUND_STATE_{state.name}") == number


def test_participants_to_drop() -> None:
    status = {
        "participants": ["a", "b", "c", "d"],
        "submitted": ["a"],
        "declines": [{"agency_id": "c", "reason": "r", "declined_at": "t"}],
    }
    drop = stats_rounds.participants_to_drop
    assert drop(status, [], declined=False, missing=False) == []
    assert drop(status, ["d"], declined=True, missing=False) == ["c", "d"]
    assert drop(status, [], declined=False, missing=True) == ["b", "c", "d"]
    assert drop(status, ["c"], declined=True, missing=True) == ["b", "c", "d"]


def test_round_commands_end_to_end(broker: BackgroundBroker, agencies: list[Agency]) -> None:
    alder, _birch, cedar = agencies
    round_id, blob = open_small(broker)
    submit(alder, build_share(alder, blob, [2, 2, 2, 2], noise=False))
    # A reason is another party's text: shown as it is, never as terminal markup.
    decline(cedar, round_id, 1, "[/bold] budget for 2026-10 is spent")

    status = as_json(run(broker, "status", round_id, "--format", "json"))
    assert (status["state"], status["attempt"], status["submitted"]) == ("open", 1, ["alder-house"])
    assert [(d["agency_id"], d["reason"]) for d in status["declines"]] == [
        ("cedar-aid", "[/bold] budget for 2026-10 is spent")
    ]
    assert dt.datetime.fromisoformat(status["declines"][0]["declined_at"]).tzinfo is not None
    table = ok(run(broker, "status", round_id)).stdout
    assert "[/bold] budget for 2026-10 is spent" in table and "cedar-aid" in table
    assert "cancel_reason" not in table  # only once cancelled
    csv_out = ok(run(broker, "status", round_id, "--format", "csv")).stdout
    assert "declined by cedar-aid" in csv_out

    listed = as_json(run(broker, "list", "--state", "open", "--format", "json"))
    assert [r["round_id"] for r in listed] == [round_id]
    assert as_json(run(broker, "list", "--state", "released", "--format", "json")) == []
    assert as_json(run(broker, "list", "--period", "2026-09", "--format", "json")) == []
    assert round_id in ok(run(broker, "list")).stdout
    bad_period = run(broker, "list", "--period", "2026-13")
    assert isinstance(bad_period.exception, InvalidInput), bad_period.output

    # Restart without the decliner: attempt 2 with alder and birch, no declines, no shares.
    restarted = as_json(
        run(
            broker,
            "restart",
            round_id,
            "--drop-declined",
            "--reason",
            "cedar-aid declined",
            "-f",
            "json",
        )
    )
    assert restarted["attempt"] == 2
    assert restarted["participants"] == ["alder-house", "birch-clinic"]
    assert restarted["declines"] == [] and restarted["submitted"] == []
    with coordinator(broker) as client:
        second = client.round(round_id).round
    submit(alder, build_share(alder, second, [1, 1, 1, 1], noise=False))
    # --drop-missing would leave alder alone, below the threshold: refused (exit code 8).
    too_few = run(broker, "restart", round_id, "--drop-missing")
    assert isinstance(too_few.exception, Refused), too_few.output
    exit_code = tessera(
        broker.settings.home, "stats", "round", "restart", round_id, "--drop-missing"
    )
    assert exit_code.returncode == 8 and "what to do:" in exit_code.stderr
    unknown = run(broker, "restart", round_id, "--drop", "nobody")
    assert isinstance(unknown.exception, InvalidInput), unknown.output
    # Restarting with everyone who is left: attempt 3, alder must submit again.
    third = as_json(run(broker, "restart", round_id, "-f", "json"))
    assert third["attempt"] == 3 and third["submitted"] == []

    # Cancel asks first; without --yes and no answer nothing happens.
    aborted = run(broker, "cancel", round_id, "--reason", "never mind", stdin="n\n")
    assert aborted.exit_code == 1
    assert as_json(run(broker, "status", round_id, "-f", "json"))["state"] == "open"
    missing_reason = run(broker, "cancel", round_id, "--yes")
    assert missing_reason.exit_code == 2  # --reason is required
    cancelled = as_json(
        run(broker, "cancel", round_id, "--reason", "too few agencies", "--yes", "-f", "json")
    )
    assert (cancelled["state"], cancelled["cancel_reason"]) == ("abandoned", "too few agencies")
    shown = ok(run(broker, "status", round_id)).stdout
    assert "abandoned" in shown and "too few agencies" in shown
    assert [
        r["round_id"] for r in as_json(run(broker, "list", "--state", "abandoned", "-f", "json"))
    ] == [round_id]
    listed_csv = ok(run(broker, "list", "--format", "csv")).stdout.splitlines()
    assert listed_csv[0].split(",") == [
        "round_id",
        "attempt",
        "state",
        "period",
        "table",
        "submitted",
        "declined",
        "release_id",
        "cancel_reason",
    ]
    assert listed_csv[1].startswith(f"{round_id},3,abandoned,{PERIOD},needs_small,0/2,")
    assert shares_in_database(broker, round_id) == []
    # A released round: the CLI says so and exits 8.
    released_id, released_blob = open_small(broker)
    for agency in agencies:
        submit(agency, build_share(agency, released_blob, [1, 1, 1, 1]))
    late = tessera(
        broker.settings.home, "stats", "round", "cancel", released_id, "--reason", "late", "--yes"
    )
    assert late.returncode == 8 and "never withdrawn" in late.stderr
