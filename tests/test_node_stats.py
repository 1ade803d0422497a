"""The node's side of private statistics (DESIGN.md section 7; node.stats, node.store.budget).

The budget ledger refuses past its cap and counts every contribution (a restarted attempt
included, and never the same attempt twice); the local table bounds each survivor; a round is
refused unless the pinned broker signed it, it is for our region, lists us, its threshold is met
by agencies our administrator verified, and our budget allows its ε; a private share is masked,
and the masks of three nodes cancel in the sum. Databases are real (SQLite and PostgreSQL).
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest

from node import directory_sync, stats
from node.rounds import RoundTaker
from node.store.budget import BudgetStore
from node.store.cases import NewCase
from tessera import config, crypto, dp, labels
from tessera.config import StatsPolicy
from tessera.directory import AgencyRecord
from tessera.errors import Conflict, NotFound, Refused
from tessera.v1 import common_pb2 as common_pb
from tessera.v1 import stats_pb2 as stats_pb
from tests.nodefixtures import NodeFactory, db_url_fixture, nodes_fixture  # noqa: F401

NOW = dt.datetime(2026, 10, 15, 12, 0, tzinfo=dt.UTC)
PERIOD = "2026-10"
REGION = "test-region"
BROKER = crypto.Identity.generate()


def _record(agency_id: str, identity: crypto.Identity, revoked: bool = False) -> AgencyRecord:
    return AgencyRecord(
        agency_id=agency_id,
        name=agency_id.title(),
        region=REGION,
        services=("immigration",),
        identity=identity.public,
        valid_from=NOW - dt.timedelta(days=365),
        valid_until=None,
        revoked=revoked,
        sequence=1,
    )


class World:
    """Three agencies a < b < c, each with its link and a directory cache verifying the others."""

    def __init__(self) -> None:
        self.ids = ["agency-a", "agency-b", "agency-c"]
        self.identities = {agency: crypto.Identity.generate() for agency in self.ids}
        records = {agency: _record(agency, self.identities[agency]) for agency in self.ids}
        self.caches = {
            agency: directory_sync.DirectoryCache(
                records=dict(records), verified={a for a in self.ids if a != agency}
            )
            for agency in self.ids
        }
        self.links = {
            agency: directory_sync.BrokerLink(
                address="127.0.0.1:1",
                certificate=b"",
                broker_key=BROKER.public.signing_key,
                agency_id=agency,
                region=REGION,
            )
            for agency in self.ids
        }


def make_round(
    participants: list[str],
    *,
    mode: int = stats_pb.ROUND_MODE_PRIVATE,
    threshold: int = 2,
    epsilon: float = 0.5,
    region: str = REGION,
    attempt: int = 1,
    round_id: str | None = None,
    bound: int = 2,
    signer: crypto.Identity = BROKER,
) -> common_pb.SignedBlob:
    spec = dp.default_needs_table(bound)
    round_ = stats_pb.Round(
        round_id=round_id or str(uuid.uuid4()),
        attempt=attempt,
        table=stats.spec_to_pb(spec),
        region=region,
        period=PERIOD,
        participants=participants,
        threshold=threshold,
        mode=mode,  # type: ignore[arg-type]
        epsilon=epsilon,
    )
    body = round_.SerializeToString(deterministic=True)
    return common_pb.SignedBlob(
        body=body,
        signature=signer.sign(labels.LABEL_ROUND, body),
        signer=signer.public.signing_key,
    )


@pytest.fixture(name="world")
def world_fixture() -> World:
    return World()


# --- the budget ledger ----------------------------------------------------------------------


def test_budget_refuses_past_the_cap_and_counts_every_attempt(
    nodes: NodeFactory, db_url: str
) -> None:
    node = nodes.make(db_url)
    budget = BudgetStore(node.store, default_cap=1.0)
    round_id = str(uuid.uuid4())
    budget.charge("t", PERIOD, round_id, 1, "needs", 0.4)
    # The same attempt is never charged (so never submitted) twice.
    with pytest.raises(Conflict):
        budget.charge("t", PERIOD, round_id, 1, "needs", 0.4)
    # A restarted round's new attempt is a second noisy view: charged again.
    budget.charge("t", PERIOD, round_id, 2, "needs", 0.4)
    with pytest.raises(Refused, match="budget of 2026-10 would be exceeded"):
        budget.charge("t", PERIOD, str(uuid.uuid4()), 1, "needs", 0.4)
    ledger = budget.period(PERIOD)
    assert [(c.round_id, c.attempt) for c in ledger.charges] == [(round_id, 1), (round_id, 2)]
    assert ledger.spent == pytest.approx(0.8)
    assert ledger.remaining == pytest.approx(0.2)
    assert budget.charged(round_id, 2) and not budget.charged(round_id, 3)
    assert budget.highest_attempt(round_id) == 2
    # Exactly up to the cap is allowed; other periods have their own budget.
    budget.charge("t", PERIOD, str(uuid.uuid4()), 1, "needs", 0.2)
    assert budget.remaining(PERIOD) == pytest.approx(0.0)
    assert budget.remaining("2026-11") == 1.0
    # A cap raised in the node's configuration allows more; every charge is in the audit log.
    raised = BudgetStore(node.store, default_cap=1.5)
    assert raised.remaining(PERIOD) == pytest.approx(0.5)
    raised.charge("t", PERIOD, str(uuid.uuid4()), 1, "needs", 0.5)
    actions = [e.action for e in node.store.audit_entries()]
    assert actions.count("budget.charged") == 4
    assert node.store.verify_audit().ok
    assert [p.period for p in budget.periods(include="2026-12")] == [PERIOD, "2026-12"]


def race_charges(budgets: list[BudgetStore], period: str, epsilon: float) -> list[object]:
    """Each budget charges ``epsilon`` to ``period`` at the same instant (threads behind a
    barrier); what each got back: the period, or the error that refused it."""
    barrier = threading.Barrier(len(budgets))
    outcomes: list[object] = [None] * len(budgets)

    def charge(which: int) -> None:
        barrier.wait()
        try:
            outcomes[which] = budgets[which].charge(
                "t", period, str(uuid.uuid4()), 1, "needs", epsilon
            )
        except (Refused, Conflict) as exc:
            outcomes[which] = exc

    threads = [threading.Thread(target=charge, args=(i,)) for i in range(len(budgets))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return outcomes


def test_two_charges_racing_for_the_last_of_the_budget_never_overspend(
    nodes: NodeFactory, db_url: str
) -> None:
    # Two stores on one database (two processes of a node, or a retry racing the original)
    # charge 0.5 each at the same instant to a period that has 0.2 of its 1.0 spent: one wins,
    # one is refused, and the period never holds more than its cap. (The period exists before
    # the race, so only the ledger's own serialisation can stop the second charge.)
    node = nodes.make(db_url)
    budgets = [BudgetStore(store, default_cap=1.0) for store in (node.store, node.another_store())]
    for index in range(6):
        period = f"2027-{index + 1:02d}"
        budgets[0].charge("t", period, str(uuid.uuid4()), 1, "needs", 0.2)
        outcomes = race_charges(budgets, period, 0.5)
        refused = [o for o in outcomes if isinstance(o, Refused | Conflict)]
        assert len(refused) == 1, outcomes
        assert budgets[0].period(period).spent == pytest.approx(0.7)
        assert len(budgets[1].period(period).charges) == 2
    assert node.store.verify_audit().ok


# --- the local table ------------------------------------------------------------------------


def test_local_table_bounds_each_survivor_and_keeps_to_the_period() -> None:
    spec = dp.default_needs_table(contribution_bound=2)
    october = dt.datetime(2026, 10, 3, tzinfo=dt.UTC)
    november = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    needs = [
        stats.NeedFact("case-1", "medical", "unmet", october),
        stats.NeedFact("case-1", "safe_housing", "unmet", october),
        stats.NeedFact("case-1", "legal_civil", "met", october),  # third cell: over the bound
        stats.NeedFact("case-2", "medical", "unmet", october),
        stats.NeedFact("case-3", "medical", "unmet", november),  # another period
    ]
    rng = np.random.default_rng(3)
    counts = stats.local_table(needs, spec, PERIOD, rng)
    assert sum(counts) == 3  # case-1 counts in 2 cells at most, case-2 in 1
    assert counts[spec.index(("medical", "unmet"))] >= 1
    one = stats.local_table(needs, dp.default_needs_table(1), PERIOD, rng)
    assert sum(one) == 2
    # With the histogram: the table, then one bin per survivor (case-1 in 3 cells, case-2 in 1,
    # case-3 is another period), before bounding.
    vector = stats.local_table(needs, spec, PERIOD, rng, bins=18)
    assert len(vector) == spec.size + 18
    assert vector[spec.size :] == [1, 0, 1] + [0] * 15


def test_local_table_reads_the_node_store(nodes: NodeFactory) -> None:
    from tessera.needs import NeedCategory, NeedStatus

    node = nodes.make()
    node.store.create_case(
        "t",
        NewCase(
            {"prs_FirstName": "A"},
            needs=(
                (NeedCategory("medical"), NeedStatus("unmet")),
                (NeedCategory("safe_housing"), NeedStatus("unmet")),
            ),
        ),
    )
    rows = BudgetStore(node.store).need_rows()
    assert len(rows) == 2
    spec = dp.default_needs_table(1)
    period = stats.period_of(rows[0][3])
    counts = stats.local_table(
        [stats.NeedFact(*r) for r in rows], spec, period, np.random.default_rng(4)
    )
    assert sum(counts) == 1


# --- round checks ---------------------------------------------------------------------------


def _check(
    world: World,
    agency: str,
    blob: common_pb.SignedBlob,
    remaining: float = 1.0,
    policy: StatsPolicy | None = None,
) -> None:
    stats.check_round(blob, world.links[agency], world.caches[agency], remaining, NOW, policy)


def test_an_acceptable_round_is_accepted(world: World) -> None:
    blob = make_round(world.ids, threshold=3)
    accepted = stats.check_round(blob, world.links["agency-b"], world.caches["agency-b"], 1.0, NOW)
    assert accepted.digest == crypto.digest(labels.LABEL_ROUND, bytes(blob.body))
    assert accepted.spec.size == dp.default_needs_table().size


def test_round_checks_refuse_with_the_reason(world: World) -> None:
    blob = make_round(world.ids)
    # Signed by someone else than the pinned broker.
    with pytest.raises(Refused, match="not signed by the pinned broker key"):
        _check(world, "agency-a", make_round(world.ids, signer=crypto.Identity.generate()))
    # Altered after signing.
    altered = stats_pb.Round.FromString(blob.body)
    altered.epsilon = 0.01
    forged = common_pb.SignedBlob(
        body=altered.SerializeToString(), signature=blob.signature, signer=blob.signer
    )
    with pytest.raises(Refused, match="signature does not verify"):
        _check(world, "agency-a", forged)
    unsigned = common_pb.SignedBlob(body=blob.body, signer=blob.signer)
    with pytest.raises(Refused, match="signature does not verify"):
        _check(world, "agency-a", unsigned)
    with pytest.raises(Refused, match="region 'elsewhere', not ours"):
        _check(world, "agency-a", make_round(world.ids, region="elsewhere"))
    with pytest.raises(Refused, match="not a participant"):
        _check(world, "agency-a", make_round(["agency-b", "agency-c"]))
    with pytest.raises(Refused, match="ascending byte order"):
        _check(world, "agency-a", make_round(["agency-c", "agency-a", "agency-b"]))
    with pytest.raises(Refused, match=r"above the 0\.4 left"):
        _check(world, "agency-a", make_round(world.ids, epsilon=0.5), remaining=0.4)


def test_threshold_counts_only_verified_agencies(world: World) -> None:
    # agency-a verified only agency-b: it counts itself and b, so threshold 3 is refused.
    world.caches["agency-a"].verified = {"agency-b"}
    _check(world, "agency-a", make_round(world.ids, threshold=2))
    with pytest.raises(Refused, match="threshold 3 is above the 2 participants"):
        _check(world, "agency-a", make_round(world.ids, threshold=3))
    # A revoked agency does not count either, and cannot take part.
    world.caches["agency-a"].records["agency-b"] = _record(
        "agency-b", world.identities["agency-b"], revoked=True
    )
    with pytest.raises(Refused, match="threshold 2 is above the 1 participants"):
        _check(world, "agency-a", make_round(world.ids, threshold=2))


def test_the_nodes_own_minimum_threshold_wins_over_the_brokers(world: World) -> None:
    strict = StatsPolicy(min_threshold=3)
    _check(world, "agency-a", make_round(world.ids, threshold=3), policy=strict)
    with pytest.raises(Refused, match="threshold 2 is below this node's minimum 3"):
        _check(world, "agency-a", make_round(world.ids, threshold=2), policy=strict)
    # A local-noise round adds the full noise at every node: no threshold to defend.
    local = make_round(world.ids, threshold=2, mode=stats_pb.ROUND_MODE_LOCAL_NOISE)
    _check(world, "agency-a", local, policy=strict)


def test_trusted_agencies_in_the_configuration_count_toward_the_threshold(world: World) -> None:
    world.caches["agency-a"].verified = set()  # nobody verified by phone
    with pytest.raises(Refused, match="threshold 2 is above the 1 participants"):
        _check(world, "agency-a", make_round(world.ids, threshold=2))
    trusting = StatsPolicy(trusted_agencies=("agency-b", "agency-c"))
    _check(world, "agency-a", make_round(world.ids, threshold=3), policy=trusting)
    # Trust in the configuration does not outlive a revocation in the directory.
    world.caches["agency-a"].records["agency-c"] = _record(
        "agency-c", world.identities["agency-c"], revoked=True
    )
    with pytest.raises(Refused, match="threshold 3 is above the 2 participants"):
        _check(world, "agency-a", make_round(world.ids, threshold=3), policy=trusting)


def test_a_round_whose_histogram_does_not_fit_the_table_is_refused(world: World) -> None:
    blob = make_round(world.ids)
    body = stats_pb.Round.FromString(blob.body)
    for bins, epsilon, reason in ((5, 0.1, "has 5 bins"), (18, 0.5, "below the round's")):
        body.histogram.CopyFrom(stats_pb.ContributionHistogram(bins=bins, epsilon=epsilon))
        raw = body.SerializeToString()
        signed = common_pb.SignedBlob(
            body=raw, signature=BROKER.sign(labels.LABEL_ROUND, raw), signer=blob.signer
        )
        with pytest.raises(Refused, match=reason):
            _check(world, "agency-a", signed)


# --- shares ---------------------------------------------------------------------------------


def test_private_shares_are_masked_and_the_masks_cancel(world: World) -> None:
    blob = make_round(world.ids, threshold=2, epsilon=0.5)
    spec = dp.default_needs_table(2)
    counts = {
        agency: [int(x) for x in np.random.default_rng(i).integers(0, 20, spec.size)]
        for i, agency in enumerate(world.ids)
    }
    expected = [0] * spec.size
    shares = []
    scale = dp.scale_for(0.5, 2)
    for i, agency in enumerate(world.ids):
        accepted = stats.check_round(blob, world.links[agency], world.caches[agency], 1.0, NOW)
        share = stats.build_share(
            world.identities[agency],
            accepted,
            counts[agency],
            world.caches[agency],
            agency,
            np.random.default_rng(100 + i),
        )
        noise = dp.noise_share(spec.size, scale, 2, np.random.default_rng(100 + i))
        plain = [c + n for c, n in zip(counts[agency], noise, strict=True)]
        assert share != dp.mask_share(plain)  # masked: not the counts plus noise
        assert all(0 <= v < dp.MODULUS for v in share) and len(share) == spec.size
        expected = [e + p for e, p in zip(expected, plain, strict=True)]
        shares.append(share)
    assert dp.unmask_sum(shares) == expected


def test_local_noise_share_is_counts_plus_full_noise(world: World) -> None:
    blob = make_round(world.ids, mode=stats_pb.ROUND_MODE_LOCAL_NOISE, threshold=1)
    accepted = stats.check_round(blob, world.links["agency-a"], world.caches["agency-a"], 1, NOW)
    spec = accepted.spec
    counts = [3] * spec.size
    share = stats.build_share(
        world.identities["agency-a"],
        accepted,
        counts,
        world.caches["agency-a"],
        "agency-a",
        np.random.default_rng(5),
    )
    noise = dp.local_noise(spec.size, dp.scale_for(0.5, 2), np.random.default_rng(5))
    assert dp.unmask_sum([share]) == [3 + n for n in noise]


# --- the worker's check, charge, build ------------------------------------------------------


def _worker(nodes: NodeFactory, world: World, agency: str, tmp_path: Path) -> RoundTaker:
    node = nodes.make(name=agency)
    directory_sync.save_cache(node.home, world.caches[agency])
    return RoundTaker(
        node.store,
        node.keyring,
        node.home,
        world.links[agency],
        budget=BudgetStore(node.store, default_cap=1.0),
    )


def test_worker_charges_before_building_and_never_twice(
    nodes: NodeFactory, world: World, tmp_path: Path
) -> None:
    # The worker's identity must be the one in the others' directories.
    worker = _worker(nodes, world, "agency-a", tmp_path)
    world.identities["agency-a"] = worker._keyring.identity
    record = _record("agency-a", worker._keyring.identity)
    for agency in world.ids:
        world.caches[agency].records["agency-a"] = record
    directory_sync.save_cache(worker._home, world.caches["agency-a"])

    round_id = str(uuid.uuid4())
    first = make_round(world.ids, round_id=round_id, epsilon=0.6)
    prepared = worker.prepare(first)
    assert prepared is not None
    digest, cells = prepared
    assert digest == crypto.digest(labels.LABEL_ROUND, bytes(first.body))
    assert len(cells) == dp.default_needs_table().size
    # Charged already: never built again; until the broker took it, the very share kept.
    assert worker.prepare(first) == prepared
    worker._forget_share((round_id, 1))  # as once the broker accepted it
    assert worker.prepare(first) is None
    # The restarted attempt would be charged again, but 0.6 + 0.6 passes the cap.
    with pytest.raises(Refused, match=r"above the 0\.4 left"):
        worker.prepare(make_round(world.ids, round_id=round_id, attempt=2, epsilon=0.6))
    second = make_round(world.ids, round_id=round_id, attempt=2, epsilon=0.4)
    assert worker.prepare(second) is not None
    with pytest.raises(Refused, match="later than this one"):
        worker.prepare(make_round(world.ids, round_id=round_id, attempt=1, epsilon=0.1))
    ledger = worker.budget.period(PERIOD)
    assert [(c.attempt, c.epsilon) for c in ledger.charges] == [(1, 0.6), (2, 0.4)]


def test_a_worker_killed_after_charging_sends_the_kept_share_not_a_new_one(
    nodes: NodeFactory, world: World, tmp_path: Path
) -> None:
    """The crash suite's finding: a node SIGKILLed between its charge and the broker's answer
    came back, saw the attempt charged, and never submitted; the round stayed open and the
    budget was spent for nothing. Now the share is kept before the charge commits."""
    worker = _worker(nodes, world, "agency-a", tmp_path)
    world.identities["agency-a"] = worker._keyring.identity
    record = _record("agency-a", worker._keyring.identity)
    for agency in world.ids:
        world.caches[agency].records["agency-a"] = record
    directory_sync.save_cache(worker._home, world.caches["agency-a"])
    round_id = str(uuid.uuid4())
    blob = make_round(world.ids, round_id=round_id, epsilon=0.3)
    prepared = worker.prepare(blob)
    assert prepared is not None
    # The process dies here: its memory is gone, the charge and the kept share are not.
    again = RoundTaker(
        worker._store,
        worker._keyring,
        worker._home,
        world.links["agency-a"],
        budget=BudgetStore(worker._store, default_cap=1.0),
    )
    assert again.prepare(blob) == prepared
    assert [(c.attempt, c.epsilon) for c in again.budget.period(PERIOD).charges] == [(1, 0.3)]
    # A share the charge refused is never kept (nor ever sent).
    with pytest.raises(Refused):
        again.prepare(make_round(world.ids, round_id=str(uuid.uuid4()), epsilon=0.9))
    assert [p.name for p in (worker._home / "shares").iterdir()] == [f"{round_id}.1.json"]


def test_worker_audits_a_refused_round_once_with_the_reason(
    nodes: NodeFactory, world: World, tmp_path: Path
) -> None:
    import asyncio

    worker = _worker(nodes, world, "agency-a", tmp_path)
    status = stats_pb.RoundStatus(round=make_round(world.ids, region="elsewhere"))
    assert asyncio.run(worker.take_part(status)) is False
    assert asyncio.run(worker.take_part(status)) is False
    refused = worker._store.audit_entries(actions=("stats.round_refused",))
    assert len(refused) == 1
    assert "region 'elsewhere', not ours" in refused[0].detail["reason"]
    assert worker.budget.period(PERIOD).charges == ()


# --- what staff and coordinators see ----------------------------------------------------------


def test_budget_status_rpc_reports_the_ledger(nodes: NodeFactory) -> None:
    import asyncio

    from node.service import NodeServicer
    from tessera.v1 import node_pb2 as node_pb

    node = nodes.make()
    BudgetStore(node.store).charge("t", PERIOD, "r-1", 1, "needs", 0.25)
    # The administrator set the cap in the node's tessera.toml: it is what the ledger shows.
    home_toml = node.home / config.CONFIG_FILE
    home_toml.write_text(
        home_toml.read_text().replace("budget_cap = 1.0", "budget_cap = 2.5"), encoding="utf-8"
    )
    settings = config.load(node.home, {})
    assert settings.stats.budget_cap == 2.5
    servicer = NodeServicer(settings, node.store, node.keyring)
    reply = asyncio.run(
        servicer.BudgetStatus(node_pb.BudgetStatusRequest(), None)  # type: ignore[arg-type]
    )
    periods = {p.period: p for p in reply.periods}
    assert PERIOD in periods and stats.period_of(dt.datetime.now(dt.UTC)) in periods
    october = periods[PERIOD]
    assert (october.cap, october.spent, october.remaining) == (2.5, 0.25, 2.25)
    assert [(c.round_id, c.attempt, c.epsilon) for c in october.charges] == [("r-1", 1, 0.25)]


def test_release_rows_and_charts(tmp_path: Path) -> None:
    from cli.stats import png_chart, release_rows, terminal_chart

    spec = dp.default_needs_table(1)
    release = stats_pb.Release(table=stats.spec_to_pb(spec), region=REGION, period=PERIOD)
    for coordinates in spec.cells:
        # Negative noisy counts whose whole interval is below zero must chart too.
        value = 7 if coordinates == ("medical", "unmet") else -6
        release.cells.add(coordinates=coordinates, value=value, lower=value - 3, upper=value + 3)
    rows = release_rows(release)
    assert rows[spec.index(("medical", "unmet"))] == {
        "need_category": "medical",
        "need_status": "unmet",
        "value": 7,
        "lower": 4.0,
        "upper": 10.0,
    }
    text = terminal_chart(rows)
    assert "medical" in text and "[4, 10]" in text
    assert len(text.splitlines()) == len(spec.dimensions[0][1]) + 1  # and the clamping note
    png = tmp_path / "unmet.png"
    png_chart(rows, "unmet needs", png)
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert png.stat().st_size > 5000


# --- end to end: a real broker and three nodes with their workers -------------------------------


def test_an_operator_round_is_submitted_by_three_nodes_and_released(tmp_path: Path) -> None:
    import time

    from cli.stats import StatsClient
    from node.client import NodeClient
    from node.keyring import open_keyring
    from tessera.needs import NeedCategory, NeedStatus
    from tests.support import (
        PASSPHRASE,
        BackgroundBroker,
        BackgroundNode,
        enrolled_node,
        make_broker,
        unlock,
    )

    broker = BackgroundBroker(make_broker(tmp_path / "broker"))
    ids = ["node-a", "node-b", "node-c"]
    running: list[BackgroundNode] = []
    try:
        settings = [enrolled_node(broker, tmp_path, agency) for agency in ids]
        for s in settings:
            identity = open_keyring(s.home, PASSPHRASE).identity
            link = directory_sync.load_link(s.home)
            directory_sync.sync(s.home, identity, link)
            for other in ids:
                if other != s.home.name:
                    directory_sync.mark_verified(s.home, other)
        running = [BackgroundNode(s) for s in settings]
        for index, s in enumerate(settings):
            with NodeClient(s.home, unlock=unlock) as client:
                for _ in range(index + 1):  # node-a 1, node-b 2, node-c 3 unmet medical needs
                    client.create_case(
                        {"prs_FirstName": "X"}, "", [(NeedCategory.MEDICAL, NeedStatus.UNMET)]
                    )
        period = stats.period_of(dt.datetime.now(dt.UTC))
        spec = dp.default_needs_table(1)
        with StatsClient(broker.settings.home) as coordinator:
            opened = coordinator.open_round(spec, "", period, ids, 2, 1.0, local_noise=False)
            deadline = time.monotonic() + 40
            status = coordinator.round_status(opened["round_id"])
            while status["state"] != "released" and time.monotonic() < deadline:
                time.sleep(0.3)
                status = coordinator.round_status(opened["round_id"])
            assert status["state"] == "released", status
            assert status["submitted"] == ids
            releases = [r for r in coordinator.releases(period) if r.round_id == opened["round_id"]]
        assert len(releases) == 1
        release = releases[0]
        medical = release.cells[spec.index(("medical", "unmet"))]
        # The true total is 6: the masks cancelled (else the sum would be uniform mod 2^64) and
        # the noise (3 shares, threshold 2, scale 1: standard deviation about 1.7) is small.
        assert abs(medical.value - 6) <= 30
        assert medical.upper - medical.value == medical.value - medical.lower == release.accuracy
        assert release.participants == 3
        # The commands people use print the same release and ledger.
        from typer.testing import CliRunner

        from cli.main import app

        runner = CliRunner()
        broker_home = str(broker.settings.home)
        shown = runner.invoke(
            app, ["--home", broker_home, "stats", "show", "--period", period, "--format", "json"]
        )
        assert shown.exit_code == 0, shown.output
        cells = json.loads(shown.stdout)["cells"]
        assert cells[spec.index(("medical", "unmet"))]["value"] == medical.value
        charted = runner.invoke(app, ["--home", broker_home, "stats", "chart", "--period", period])
        assert charted.exit_code == 0 and "medical" in charted.output, charted.output
        missing = runner.invoke(
            app, ["--home", broker_home, "stats", "show", "--period", "2001-01"]
        )
        assert isinstance(missing.exception, NotFound)  # main() prints it with its hint
        assert "stats round open" in (missing.exception.hint or "")
        budget = runner.invoke(
            app,
            ["--home", str(settings[0].home), "stats", "budget", "--format", "json"],
            env={"TESSERA_PASSPHRASE": PASSPHRASE},  # opens the admin credential in the home
        )
        assert budget.exit_code == 0 and json.loads(budget.output)[-1]["spent"] == 1.0
        for s in settings:
            with NodeClient(s.home, unlock=unlock) as client:
                (ledger,) = client.budget(period)
            assert ledger.spent == 1.0 and ledger.remaining == 0.0
            assert [c.round_id for c in ledger.charges] == [opened["round_id"]]
    finally:
        for node in running:
            node.stop()
        broker.stop()


def test_restoring_an_older_backup_gives_no_spent_budget_back(
    nodes: NodeFactory, db_url: str
) -> None:
    from node.backup import create_backup, restore_backup
    from tests.nodefixtures import PASSPHRASE as NODE_PASSPHRASE

    node = nodes.make(db_url)
    made = create_backup(node.store, node.home, node.home / "backups", "admin")
    round_id = str(uuid.uuid4())
    BudgetStore(node.store, default_cap=1.0).charge("t", PERIOD, round_id, 1, "needs", 0.7)
    restore_backup(node.home, node.engine, made.path, NODE_PASSPHRASE)
    restored = BudgetStore(nodes.open(node.home, node.url).store, default_cap=1.0)
    assert restored.charged(round_id, 1)
    assert restored.remaining(PERIOD) == pytest.approx(0.3)
    with pytest.raises(Refused):
        restored.charge("t", PERIOD, str(uuid.uuid4()), 1, "needs", 0.5)
