"""Statistics rounds on a real broker over TLS, with enrolled agencies (DESIGN.md section 7).

Each agency builds its share exactly as a node must: verify the broker-signed Round, take every
participant's keys from its own pinned directory, add its counts and noise share, add its net
pairwise mask (tessera.dp.pair_masks with R = round_id/attempt), and submit the cells mod 2**64
naming digest(LABEL_ROUND, body). Attacks: a non-participant, a wrong digest, a wrong cell count,
a second different vector, a share for an abandoned attempt, an agency opening a round.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import pytest

from broker.serde import round_noise_of, spec_from_proto
from broker.stats import StatsClient, round_digest
from node import directory_sync
from tessera import crypto, dp, labels, rpc
from tessera.config import Limits
from tessera.errors import InvalidInput, Refused, TesseraError
from tessera.v1 import common_pb2 as common_pb
from tessera.v1 import stats_pb2 as stats_pb
from tessera.v1 import stats_pb2_grpc as stats_grpc
from tests.support import Agency, BackgroundBroker, enrol, make_broker

SMALL = dp.TableSpec(
    name="needs_small",
    dimensions=(("need_category", ("safe_housing", "medical")), ("need_status", ("unmet", "met"))),
    contribution_bound=1,
)
PERIOD = "2026-10"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BackgroundBroker]:
    running = BackgroundBroker(make_broker(tmp_path / "broker"))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def agencies(broker: BackgroundBroker, tmp_path: Path) -> list[Agency]:
    return [enrol(broker, tmp_path, name) for name in ("alder-house", "birch-clinic", "cedar-aid")]


def coordinator(broker: BackgroundBroker) -> StatsClient:
    return StatsClient(broker.settings.home)


def call(agency: Agency, method: str, request: object) -> object:
    channel = rpc.open_channel(
        agency.link.address, agency.link.certificate, agency.identity, Limits().max_message_bytes
    )
    try:
        return getattr(stats_grpc.StatsStub(channel), method)(request, timeout=10)
    finally:
        channel.close()


def verified_round(agency: Agency, blob: common_pb.SignedBlob) -> stats_pb.Round:
    """What a node does first: check the broker's signature on the Round."""
    crypto.verify(agency.link.broker_key, labels.LABEL_ROUND, blob.body, blob.signature)
    return stats_pb.Round.FromString(blob.body)


def build_share(
    agency: Agency,
    blob: common_pb.SignedBlob,
    counts: Sequence[int],
    *,
    noise: bool = True,
) -> stats_pb.SubmitShareRequest:
    """A node's share: counts + noise share + net pairwise mask, mod 2**64.

    ``counts`` are the table's cells; the histogram's bins (if the round has one) follow them, as
    zero counts here unless ``counts`` already carries them.
    """
    body = verified_round(agency, blob)
    spec = spec_from_proto(body.table)
    scales = round_noise_of(body, spec)
    counts = list(counts) + [0] * (scales.cells - len(counts))
    records = directory_sync.sync(agency.home, agency.identity, agency.link).records
    participants = [(a, records[a].identity) for a in body.participants]
    if not noise:
        values = list(counts)
    elif body.mode == stats_pb.ROUND_MODE_LOCAL_NOISE:
        noisy = dp.round_noise_share(scales, 1, dp.new_rng())
        return stats_pb.SubmitShareRequest(
            round_id=body.round_id,
            attempt=body.attempt,
            agency_id=agency.agency_id,
            round_digest=round_digest(blob.body),
            masked_cells=dp.mask_share([c + e for c, e in zip(counts, noisy, strict=True)]),
        )
    else:
        shares = dp.round_noise_share(scales, body.threshold, dp.new_rng())
        values = [c + e for c, e in zip(counts, shares, strict=True)]
    mask = dp.pair_masks(
        agency.identity,
        list(body.participants).index(agency.agency_id),
        participants,
        body.round_id,
        body.attempt,
        scales.cells,
    )
    return stats_pb.SubmitShareRequest(
        round_id=body.round_id,
        attempt=body.attempt,
        agency_id=agency.agency_id,
        round_digest=round_digest(blob.body),
        masked_cells=dp.mask_share(values, [mask]),
    )


def submit(agency: Agency, request: stats_pb.SubmitShareRequest) -> stats_pb.SubmitShareResponse:
    reply = call(agency, "SubmitShare", request)
    assert isinstance(reply, stats_pb.SubmitShareResponse)
    return reply


def refused(agency: Agency, method: str, request: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call(agency, method, request)
    code: grpc.StatusCode = caught.value.code()
    return code


def test_masked_shares_sum_to_the_exact_total_and_the_release_is_served_unchanged(
    broker: BackgroundBroker, agencies: list[Agency]
) -> None:
    with coordinator(broker) as client:
        blob = client.open_round("north", PERIOD, threshold=2, epsilon=1.0, idempotency_key="k1")
        again = client.open_round("north", PERIOD, threshold=2, epsilon=1.0, idempotency_key="k1")
    assert again.SerializeToString() == blob.SerializeToString()  # idempotent by key
    body = verified_round(agencies[0], blob)
    assert body.attempt == 1 and body.threshold == 2 and body.region == "north"
    assert list(body.participants) == sorted(a.agency_id for a in agencies)
    spec = spec_from_proto(body.table)
    assert spec == dp.default_needs_table()
    counts = [[(i * 7 + k) % 5 for i in range(spec.size)] for k in range(3)]
    # Zero noise: the masks alone must cancel exactly.
    shares = [build_share(a, blob, c, noise=False) for a, c in zip(agencies, counts, strict=True)]
    first = submit(agencies[0], shares[0])
    assert (first.submitted, first.expected, first.release_id) == (1, 3, "")
    assert submit(agencies[0], shares[0]).submitted == 1  # an identical retry
    different = stats_pb.SubmitShareRequest()
    different.CopyFrom(shares[0])
    different.masked_cells[0] = (different.masked_cells[0] + 1) % dp.MODULUS
    assert refused(agencies[0], "SubmitShare", different) == grpc.StatusCode.ALREADY_EXISTS
    listed = call(agencies[1], "ListRounds", stats_pb.ListRoundsRequest(participant="birch-clinic"))
    assert isinstance(listed, stats_pb.ListRoundsResponse)
    assert [r.round.body for r in listed.rounds] == [blob.body]
    assert list(listed.rounds[0].submitted) == ["alder-house"]
    assert submit(agencies[1], shares[1]).release_id == ""
    done = submit(agencies[2], shares[2])
    assert done.release_id and (done.submitted, done.expected) == (3, 3)
    assert submit(agencies[2], shares[2]).release_id == done.release_id  # retry after release

    got = [
        call(agencies[0], "GetRelease", stats_pb.GetReleaseRequest(release_id=done.release_id))
        for _ in range(2)
    ]
    by_round = call(agencies[1], "GetRelease", stats_pb.GetReleaseRequest(round_id=body.round_id))
    assert isinstance(by_round, stats_pb.GetReleaseResponse)
    raw = [g.SerializeToString() for g in got if isinstance(g, stats_pb.GetReleaseResponse)]
    assert raw[0] == raw[1] == by_round.SerializeToString()  # byte-identical every time
    signed = by_round.release
    crypto.verify(agencies[1].link.broker_key, labels.LABEL_RELEASE, signed.body, signed.signature)
    release = stats_pb.Release.FromString(signed.body)
    totals = [sum(column) for column in zip(*counts, strict=True)]
    assert [c.value for c in release.cells] == totals
    assert [tuple(c.coordinates) for c in release.cells] == spec.cells
    assert release.participants == 3 and release.attempt == 1
    assert release.round_digest == round_digest(blob.body)
    # ε = 1 is split: 0.8 for the table (bound 6: scale 6 / 0.8 = 7.5), 0.2 for the histogram
    # (sensitivity 1: scale 5); OpenDP's maps of both add up to the round's ε.
    assert body.bound_basis == "default" and spec.contribution_bound == dp.DEFAULT_BOUND
    assert body.histogram.bins == 18 and body.histogram.epsilon == pytest.approx(0.2)
    assert release.epsilon == pytest.approx(1.0)
    assert release.table_epsilon == pytest.approx(0.8)
    assert release.accuracy == dp.sum_accuracy(3, 2, 6 / 0.8, 0.05)
    assert all(c.upper - c.value == release.accuracy == c.value - c.lower for c in release.cells)
    assert "threshold 2" in release.mechanism
    # The histogram was all zeros (these shares carry none): nothing dropped, nothing suggested.
    assert [c.value for c in release.contributions] == [0] * 18
    assert release.contributions_accuracy == dp.sum_accuracy(3, 2, 5.0, 0.05)
    assert (release.dropped_fraction, release.suggested_bound) == (0.0, 0)
    with coordinator(broker) as client:
        status = client.round(body.round_id)
        listed_releases = client.stub.ListReleases(
            stats_pb.ListReleasesRequest(period=PERIOD), timeout=10
        )
    assert status.state == stats_pb.ROUND_STATE_RELEASED
    assert status.release_id == done.release_id
    assert [r.body for r in listed_releases.releases] == [signed.body]


def test_shares_that_do_not_fit_the_round_are_refused(
    broker: BackgroundBroker, agencies: list[Agency], tmp_path: Path
) -> None:
    outsider = enrol(broker, tmp_path, "dogwood-house")
    members = [a.agency_id for a in agencies]
    with coordinator(broker) as client:
        blob = client.open_round(
            "north", PERIOD, threshold=3, epsilon=0.5, participants=members, table=SMALL
        )
        for bad in (
            {"threshold": 1},
            {"threshold": 4},
            {"region": "south"},
            {"period": "2026-13"},
            {"epsilon": 0.0},
            {"participants": [*members, "nobody"]},
        ):
            args: dict[str, object] = {
                "region": "north",
                "period": PERIOD,
                "threshold": 2,
                "epsilon": 1.0,
                "participants": members,
            }
            args.update(bad)
            with pytest.raises(InvalidInput):
                client.open_round(**args)  # type: ignore[arg-type]
        with pytest.raises(InvalidInput):
            client.open_round("north", PERIOD, 2, 1.0, mode=stats_pb.ROUND_MODE_UNSPECIFIED)
        with pytest.raises(grpc.RpcError) as caught:  # a table without values
            client.stub.OpenRound(
                stats_pb.OpenRoundRequest(
                    table=stats_pb.TableSpec(name="t", contribution_bound=1),
                    region="north",
                    period=PERIOD,
                    threshold=2,
                    mode=stats_pb.ROUND_MODE_PRIVATE,
                    epsilon=1.0,
                ),
                timeout=10,
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert verified_round(agencies[0], blob).table.name == "needs_small"
    good = build_share(agencies[0], blob, [1, 2, 3, 4])
    opening = stats_pb.OpenRoundRequest(
        region="north", period=PERIOD, threshold=2, mode=stats_pb.ROUND_MODE_PRIVATE, epsilon=1.0
    )
    assert refused(agencies[0], "OpenRound", opening) == grpc.StatusCode.PERMISSION_DENIED
    as_outsider = stats_pb.SubmitShareRequest()
    as_outsider.CopyFrom(good)
    as_outsider.agency_id = outsider.agency_id
    assert refused(outsider, "SubmitShare", as_outsider) == grpc.StatusCode.PERMISSION_DENIED
    # An agency cannot submit in another's name.
    assert refused(agencies[1], "SubmitShare", good) == grpc.StatusCode.PERMISSION_DENIED
    wrong_digest = stats_pb.SubmitShareRequest()
    wrong_digest.CopyFrom(good)
    wrong_digest.round_digest = bytes(32)
    assert refused(agencies[0], "SubmitShare", wrong_digest) == grpc.StatusCode.INVALID_ARGUMENT
    short = stats_pb.SubmitShareRequest()
    short.CopyFrom(good)
    del short.masked_cells[-1]
    assert refused(agencies[0], "SubmitShare", short) == grpc.StatusCode.INVALID_ARGUMENT
    future = stats_pb.SubmitShareRequest()
    future.CopyFrom(good)
    future.attempt = 2
    assert refused(agencies[0], "SubmitShare", future) == grpc.StatusCode.FAILED_PRECONDITION
    assert submit(agencies[0], good).submitted == 1  # the well-formed share still counts


def test_a_restart_discards_the_old_attempt_and_opens_fresh_masks(
    broker: BackgroundBroker, agencies: list[Agency]
) -> None:
    alder, birch, cedar = agencies
    with coordinator(broker) as client:
        blob = client.open_round("north", PERIOD, threshold=2, epsilon=1.0, table=SMALL)
        round_id = verified_round(alder, blob).round_id
        old_share = build_share(alder, blob, [1, 1, 1, 1], noise=False)
        assert submit(alder, old_share).submitted == 1
        with pytest.raises(Refused):  # two participants would leave fewer than the threshold
            client.restart(round_id, 1, drop=["birch-clinic", "cedar-aid"])
        with pytest.raises(InvalidInput):
            client.restart(round_id, 1, drop=["nobody"])
        status = client.restart(round_id, 1, drop=["cedar-aid"], reason="cedar-aid is offline")
        with pytest.raises(Refused):  # the abandoned attempt cannot be restarted again
            client.restart(round_id, 1)
    assert status.state == stats_pb.ROUND_STATE_OPEN and list(status.submitted) == []
    second = verified_round(alder, status.round)
    assert second.attempt == 2 and list(second.participants) == ["alder-house", "birch-clinic"]
    assert round_digest(status.round.body) != round_digest(blob.body)
    assert refused(alder, "SubmitShare", old_share) == grpc.StatusCode.FAILED_PRECONDITION
    assert refused(cedar, "SubmitShare", old_share) == grpc.StatusCode.PERMISSION_DENIED
    fresh = build_share(alder, status.round, [1, 1, 1, 1], noise=False)
    assert list(fresh.masked_cells) != list(old_share.masked_cells)  # new R, new masks
    assert submit(alder, fresh).release_id == ""
    done = submit(birch, build_share(birch, status.round, [2, 0, 5, 0], noise=False))
    reply = call(birch, "GetRelease", stats_pb.GetReleaseRequest(release_id=done.release_id))
    assert isinstance(reply, stats_pb.GetReleaseResponse)
    release = stats_pb.Release.FromString(reply.release.body)
    assert [c.value for c in release.cells] == [3, 1, 6, 1]
    assert release.attempt == 2 and release.participants == 2


def test_a_round_on_postgresql_with_a_restart(postgres_url: str, tmp_path: Path) -> None:
    running = BackgroundBroker(make_broker(tmp_path / "broker", database_url=postgres_url))
    try:
        alder, birch, cedar = (
            enrol(running, tmp_path, name) for name in ("alder-house", "birch-clinic", "cedar-aid")
        )
        with coordinator(running) as client:
            blob = client.open_round("north", PERIOD, 2, 1.0, table=SMALL, idempotency_key="pg")
            assert client.open_round("north", PERIOD, 2, 1.0, idempotency_key="pg") == blob
            round_id = verified_round(alder, blob).round_id
            submit(cedar, build_share(cedar, blob, [9, 9, 9, 9]))
            status = client.restart(round_id, 1, drop=["cedar-aid"])
        submit(alder, build_share(alder, status.round, [1, 2, 3, 4], noise=False))
        done = submit(birch, build_share(birch, status.round, [1, 1, 1, 1], noise=False))
        with coordinator(running) as client:
            release = stats_pb.Release.FromString(client.release(round_id=round_id).body)
            assert (
                client.release(release_id=done.release_id).body
                == client.release(round_id=round_id).body
            )
        assert [c.value for c in release.cells] == [2, 3, 4, 5]
    finally:
        running.stop()


def test_local_noise_round_reports_the_local_mechanism(
    broker: BackgroundBroker, agencies: list[Agency]
) -> None:
    with coordinator(broker) as client:
        blob = client.open_round(
            "north", PERIOD, 2, 1.0, table=SMALL, mode=stats_pb.ROUND_MODE_LOCAL_NOISE
        )
    release_id = ""
    for agency in agencies:
        release_id = submit(agency, build_share(agency, blob, [10, 20, 30, 40])).release_id
    reply = call(agencies[0], "GetRelease", stats_pb.GetReleaseRequest(release_id=release_id))
    assert isinstance(reply, stats_pb.GetReleaseResponse)
    release = stats_pb.Release.FromString(reply.release.body)
    assert release.mode == stats_pb.ROUND_MODE_LOCAL_NOISE
    assert "local noise" in release.mechanism
    assert release.accuracy == dp.sum_accuracy(3, 1, 1 / 0.8, 0.05)
    for cell, truth in zip(release.cells, [30, 60, 90, 120], strict=True):
        assert abs(cell.value - truth) <= 4 * release.accuracy


def test_the_database_never_holds_one_agencys_table(
    broker: BackgroundBroker, agencies: list[Agency]
) -> None:
    planted = [7919, 104729, 7919, 104729]
    with coordinator(broker) as client:
        blob = client.open_round("north", PERIOD, 2, 1.0, table=SMALL)
    tables = [planted, [3, 5, 2, 8], [4, 1, 6, 2]]
    release_id = ""
    for agency, counts in zip(agencies, tables, strict=True):
        release_id = submit(agency, build_share(agency, blob, counts)).release_id
    assert release_id
    reply = call(agencies[0], "GetRelease", stats_pb.GetReleaseRequest(release_id=release_id))
    assert isinstance(reply, stats_pb.GetReleaseResponse)
    release = stats_pb.Release.FromString(reply.release.body)
    truth = [sum(column) for column in zip(*tables, strict=True)]
    for cell, value in zip(release.cells, truth, strict=True):
        assert abs(cell.value - value) <= 4 * release.accuracy
    database = broker.settings.home / "tessera.db"
    raw = b"".join(
        path.read_bytes()
        for path in (database, database.with_name("tessera.db-wal"))
        if path.exists()
    )
    assert raw
    for count in (7919, 104729):
        assert struct.pack("<Q", count) not in raw
        assert str(count).encode() not in raw


def test_store_refuses_cells_out_of_range() -> None:
    from broker.store.stats import pack_cells, unpack_cells

    assert unpack_cells(pack_cells([0, dp.MODULUS - 1])) == [0, dp.MODULUS - 1]
    for bad in ([-1], [dp.MODULUS]):
        with pytest.raises(TesseraError):
            pack_cells(bad)


def test_the_histogram_sizes_the_next_bound_and_the_threshold_defaults_to_the_ratio(
    broker: BackgroundBroker, agencies: list[Agency]
) -> None:
    """A release's histogram (here noiseless shares, so exact) gives the dropped share and the
    bound the next round of the table gets when the coordinator leaves the bound to the broker."""
    with coordinator(broker) as client:
        blob = client.open_round("north", PERIOD, 0, 1.0)  # threshold 0: the default
    body = verified_round(agencies[0], blob)
    assert body.threshold == dp.default_threshold(3) == 3
    spec = spec_from_proto(body.table)
    # Each agency: 100 survivors in 1 cell, 100 in 2, 60 in 8 (over the bound of 6).
    histogram = [100, 100, 0, 0, 0, 0, 0, 60] + [0] * 10
    table = [0] * spec.size
    release_id = ""
    for agency in agencies:
        share = build_share(agency, blob, table + histogram, noise=False)
        release_id = submit(agency, share).release_id
    reply = call(agencies[0], "GetRelease", stats_pb.GetReleaseRequest(release_id=release_id))
    assert isinstance(reply, stats_pb.GetReleaseResponse)
    release = stats_pb.Release.FromString(reply.release.body)
    assert [c.value for c in release.contributions] == [3 * h for h in histogram]
    # Bound 6 drops 2 of the 8 cells of 180 survivors: 360 of 300 + 600 + 1440 contributions.
    assert release.dropped_fraction == pytest.approx(360 / 2340)
    assert release.suggested_bound == 8
    with coordinator(broker) as client:
        sized = verified_round(agencies[0], client.open_round("north", "2026-11", 0, 1.0))
        asked = verified_round(
            agencies[0], client.open_round("north", "2026-11", 2, 1.0, table=SMALL)
        )
    assert sized.table.contribution_bound == 8
    assert sized.bound_basis == f"release:{release.release_id}"
    assert (asked.table.contribution_bound, asked.bound_basis) == (1, "requested")
    assert asked.histogram.bins == 2
