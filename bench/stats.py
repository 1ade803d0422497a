"""Statistics rounds at N = 10, 30, 100, 300 agencies against a plain unmasked sum (issue: stats).

One real broker (``tessera --home H broker serve`` in its own process, SQLite) and N simulated
agencies in this process. Every agency is a real identity enrolled through the Directory service
(an enrolment token issued with the operator's credential, then an ``Enrol`` RPC carrying its
self-signed ENROL statement) and submits over its own signed asyncio TLS channel, so the broker
authenticates, authorises and stores every share exactly as in production. For each N, in the
same run and against the same broker:

* **Plain** (the baseline): a LOCAL_NOISE round whose nodes submit their raw counts, without noise
  and without masks, through the same SubmitShare path; the cost of an unmasked sum.
* **Private**: a PRIVATE round (default needs table and bound, the broker's default threshold
  ``dp.default_threshold``, ε = 1: the table's cells get 0.8 of it); each node
  builds its share as docs/statistics.md says: verify the broker's signature on the round, parse
  it, counts + ``dp.noise_share``, net mask ``dp.pair_masks`` against the N - 1 other participants
  (their public identities), ``dp.mask_share``.
* **Local noise**: a LOCAL_NOISE round where each node adds the full discrete Laplace
  (``dp.local_noise``), to show how its error grows with N.

Per round: each node's CPU time to build its share (thread time around the synchronous build, which
includes the round's signature check in every mode), the client process's CPU per node over the
whole round (build, request signing, gRPC), the broker process's CPU (utime + stime from
/proc/<pid>/stat, before the OpenRound and after the GetRelease) and the round's wall time from
OpenRound to the release fetched with GetRelease. The growth exponent in N is the least-squares
slope of log(figure) against log(N). The error ratio compares the released totals with the true
totals (root mean square over the cells) against the central mechanism's standard deviation (the
discrete Laplace of the same scale), and the release's 95 % accuracy against OpenDP's central
accuracy; theory: √(N / t) for a private round, √N for local noise.

Each kind of round runs three times at each size, interleaved (plain, private, local noise, plain,
...) so drift in the machine hits every kind alike; each time figure is the best run's, each error
is pooled over every run's cells.

All nodes run in one process with a bounded number of submissions in flight, so their share builds
are serialised on one core (the GIL): the round wall time is that of N agencies sharing one
machine's core, which exaggerates it against N agencies each on its own machine.

``python -m bench stats`` runs all four sizes; ``TESSERA_BENCH_STATS_SIZES=10,30`` (or
``python -m bench.stats --quick``) runs fewer.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
import numpy as np

from bench.common import Figure
from bench.relay import ServerProcess, broker_process, make_broker_home
from broker.stats import round_noise_of
from node.stats import round_digest, spec_from_pb, spec_to_pb
from tessera import credential, crypto, directory, dp, labels, rpc
from tessera.config import Limits
from tessera.v1 import common_pb2 as common_pb
from tessera.v1 import directory_pb2 as directory_pb
from tessera.v1 import directory_pb2_grpc as directory_grpc
from tessera.v1 import stats_pb2 as stats_pb
from tessera.v1 import stats_pb2_grpc as stats_grpc

REGION = "north"
SIZES = (10, 30, 100, 300)
QUICK_SIZES = (10, 30)
EPSILON = 1.0
IN_FLIGHT = 16  # submissions in flight at once
ENROL_IN_FLIGHT = 8  # token issuance in flight; Enrol calls go one at a time
ENROL_RETRIES = 20
MAX_COUNT = 6  # synthetic counts per cell: 0..MAX_COUNT-1
MAX_MESSAGE = Limits().max_message_bytes
CALL_TIMEOUT = 120.0
RUNS = 3  # runs of each kind of round at each size

PLAIN, PRIVATE, LOCAL = "plain", "private", "local noise"


def _say(text: str) -> None:
    print(f"  stats: {text}", flush=True)


def _broker_cpu(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fit_exponent(sizes: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of log(value) against log(size): the growth exponent in size."""
    xs = [math.log(s) for s in sizes]
    ys = [math.log(v) for v in values]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread == 0:
        return float("nan")
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread


async def _drive(count: int, concurrency: int, call: Callable[[int], Awaitable[None]]) -> None:
    """Make ``count`` calls, at most ``concurrency`` in flight."""
    indexes = iter(range(count))

    async def worker() -> None:
        for index in indexes:  # shared iterator: each index is taken once
            await call(index)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))


# --- agencies -----------------------------------------------------------------------------------


@dataclass
class Node:
    """A simulated agency: its identity, enrolled id, signed channel and synthetic counts."""

    agency_id: str
    identity: crypto.Identity
    channel: grpc.aio.Channel | None = None
    stub: stats_grpc.StatsAsyncStub | None = None


async def enrol_all(address: str, cert: bytes, operator: crypto.Identity, count: int) -> list[Node]:
    """``count`` fresh identities enrolled for real: token from the operator, then Enrol."""
    nodes = [Node(f"agency-{i:03d}", crypto.Identity.generate()) for i in range(count)]
    operator_channel = rpc.open_aio_channel(address, cert, operator, MAX_MESSAGE)
    anonymous = rpc.open_aio_channel(address, cert, None, MAX_MESSAGE)
    try:
        as_operator = directory_grpc.DirectoryStub(operator_channel)
        as_node = directory_grpc.DirectoryStub(anonymous)

        async def enrol(index: int) -> None:
            node = nodes[index]
            expires = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
            request = directory_pb.IssueEnrolmentTokenRequest(agency_id=node.agency_id)
            request.expires_at.FromDatetime(expires)
            token = await as_operator.IssueEnrolmentToken(request, timeout=CALL_TIMEOUT)
            statement = directory.enrol_statement(
                node.identity,
                node.agency_id,
                f"Agency {index:03d}",
                REGION,
                ["safe_housing"],
                dt.datetime.now(dt.UTC),
            )
            async with appending:  # the broker appends directory entries one at a time
                for attempt in range(ENROL_RETRIES):
                    try:
                        await as_node.Enrol(
                            directory_pb.EnrolRequest(token=token.token, statement=statement),
                            timeout=CALL_TIMEOUT,
                        )
                        return
                    except grpc.aio.AioRpcError as exc:
                        busy = exc.code() == grpc.StatusCode.ALREADY_EXISTS
                        if not busy or attempt == ENROL_RETRIES - 1:
                            raise
                        await asyncio.sleep(0.05)

        appending = asyncio.Lock()
        await _drive(count, ENROL_IN_FLIGHT, enrol)
    finally:
        await operator_channel.close()
        await anonymous.close()
    return nodes


async def connect_all(nodes: Sequence[Node], address: str, cert: bytes) -> None:
    """Each node's own signed channel, connected (TLS) with one ListRounds call, as a polling node
    would; connections are reused for every round, as a running node's would be."""
    for node in nodes:
        node.channel = rpc.open_aio_channel(address, cert, node.identity, MAX_MESSAGE)
        node.stub = stats_grpc.StatsStub(node.channel)

    async def poll(index: int) -> None:
        node = nodes[index]
        assert node.stub is not None
        await node.stub.ListRounds(
            stats_pb.ListRoundsRequest(
                participant=node.agency_id, state=stats_pb.ROUND_STATE_OPEN, page_size=1
            ),
            timeout=CALL_TIMEOUT,
        )

    await _drive(len(nodes), IN_FLIGHT, poll)


# --- the node's share ---------------------------------------------------------------------------


def build_share(
    kind: str,
    blob: common_pb.SignedBlob,
    broker_key: bytes,
    own: Node,
    publics: dict[str, crypto.PublicIdentity],
    identities: dict[str, crypto.Identity],
    counts: Sequence[int],
) -> tuple[stats_pb.Round, bytes, list[int]]:
    """(round, round digest, cells) for one node, per docs/statistics.md "How a node builds its
    share"; ``PLAIN`` submits the raw counts, unnoised and unmasked (the baseline)."""
    body = bytes(blob.body)
    if bytes(blob.signer) != broker_key:
        raise RuntimeError("the round is not signed by the broker")
    crypto.verify(broker_key, labels.LABEL_ROUND, body, bytes(blob.signature))
    round_ = stats_pb.Round.FromString(body)
    spec = spec_from_pb(round_.table)
    digest = round_digest(body)
    scales = round_noise_of(round_, spec)
    # The histogram's bins follow the table's cells; the synthetic data has none to count.
    counts = list(counts) + [0] * (scales.cells - len(counts))
    if kind == PLAIN:
        return round_, digest, dp.mask_share(counts)
    rng = dp.new_rng()
    if kind == LOCAL:
        noise = dp.round_noise_share(scales, 1, rng)
        return round_, digest, dp.mask_share([c + n for c, n in zip(counts, noise, strict=True)])
    noise = dp.round_noise_share(scales, int(round_.threshold), rng)
    values = [c + n for c, n in zip(counts, noise, strict=True)]
    participants = list(round_.participants)
    position = participants.index(own.agency_id)
    # Every key from the node's own pinned directory (here: the enrolled identities), never from
    # the round.
    keyed = [(agency, publics[agency]) for agency in participants]
    mask = dp.pair_masks(
        identities[own.agency_id],
        position,
        keyed,
        round_.round_id,
        int(round_.attempt),
        scales.cells,
    )
    return round_, digest, dp.mask_share(values, [mask])


# --- one round ----------------------------------------------------------------------------------


@dataclass
class RoundResult:
    """What one round measured."""

    kind: str
    n: int
    threshold: int
    build_cpu: list[float]  # seconds, one per node
    client_cpu: float  # seconds of this process's CPU over the round
    broker_cpu: float  # seconds
    wall: float  # seconds, OpenRound to the release fetched
    released: list[int]
    truth: list[int]
    accuracy: float
    scale: float

    @property
    def build_median(self) -> float:
        """Median per-node build CPU in seconds."""
        return statistics.median(self.build_cpu)

    @property
    def client_per_node(self) -> float:
        """Client CPU per node in seconds (build, signing, gRPC)."""
        return self.client_cpu / self.n

    @property
    def rmse(self) -> float:
        """Root mean square of released - true over the cells."""
        return math.sqrt(
            statistics.fmean((r - t) ** 2 for r, t in zip(self.released, self.truth, strict=True))
        )


@dataclass
class Setup:
    """The running broker and everything rounds share."""

    broker: ServerProcess
    operator: stats_grpc.StatsAsyncStub
    broker_key: bytes
    nodes: list[Node]
    publics: dict[str, crypto.PublicIdentity]
    identities: dict[str, crypto.Identity]
    counts: dict[str, list[int]] = field(default_factory=dict)


async def run_round(setup: Setup, kind: str, n: int) -> RoundResult:
    """Open one round of ``kind`` with the first ``n`` agencies, submit every share, fetch the
    release; measured throughout."""
    nodes = setup.nodes[:n]
    mode = stats_pb.ROUND_MODE_PRIVATE if kind == PRIVATE else stats_pb.ROUND_MODE_LOCAL_NOISE
    period = dt.datetime.now(dt.UTC).strftime("%Y-%m")
    build_cpu = [0.0] * n
    broker_before = _broker_cpu(setup.broker.pid)
    client_before = time.process_time()
    started = time.perf_counter()
    opened = await setup.operator.OpenRound(
        stats_pb.OpenRoundRequest(
            region=REGION,
            period=period,
            participants=[node.agency_id for node in nodes],
            threshold=0,  # the broker's default for n participants (dp.default_threshold)
            mode=mode,
            epsilon=EPSILON,
            idempotency_key=str(uuid.uuid4()),
            # The default bound, asked for: every round compares at the same sensitivity (left to
            # the broker, a histogram bin that noise lifts would raise the next round's bound).
            table=spec_to_pb(dp.default_needs_table(dp.DEFAULT_BOUND)),
        ),
        timeout=CALL_TIMEOUT,
    )
    blob = opened.round
    opened_round = stats_pb.Round.FromString(bytes(blob.body))
    threshold = int(opened_round.threshold)
    release_ids: list[str] = []

    async def submit(index: int) -> None:
        node = nodes[index]
        assert node.stub is not None
        before = time.thread_time()
        round_, digest, cells = build_share(
            kind,
            blob,
            setup.broker_key,
            node,
            setup.publics,
            setup.identities,
            setup.counts[node.agency_id],
        )
        build_cpu[index] = time.thread_time() - before
        reply = await node.stub.SubmitShare(
            stats_pb.SubmitShareRequest(
                round_id=round_.round_id,
                attempt=round_.attempt,
                agency_id=node.agency_id,
                round_digest=digest,
                masked_cells=cells,
            ),
            timeout=CALL_TIMEOUT,
        )
        if reply.release_id:
            release_ids.append(reply.release_id)

    await _drive(n, IN_FLIGHT, submit)
    if not release_ids:
        raise RuntimeError(f"the {kind} round with {n} agencies was not released")
    got = await setup.operator.GetRelease(
        stats_pb.GetReleaseRequest(release_id=release_ids[0]), timeout=CALL_TIMEOUT
    )
    wall = time.perf_counter() - started
    client_cpu = time.process_time() - client_before
    broker_cpu = _broker_cpu(setup.broker.pid) - broker_before
    crypto.verify(
        setup.broker_key, labels.LABEL_RELEASE, bytes(got.release.body), got.release.signature
    )
    release = stats_pb.Release.FromString(bytes(got.release.body))
    truth = [
        sum(column) for column in zip(*(setup.counts[x.agency_id] for x in nodes), strict=True)
    ]
    released = [int(cell.value) for cell in release.cells]
    table_scale = round_noise_of(opened_round, spec_from_pb(opened_round.table)).table_scale
    return RoundResult(
        kind,
        n,
        threshold,
        build_cpu,
        client_cpu,
        broker_cpu,
        wall,
        released,
        truth,
        float(release.accuracy),
        table_scale,
    )


def _describe(result: RoundResult) -> str:
    return (
        f"N={result.n:>3} {result.kind:<11} wall {result.wall * 1000:8.1f} ms, broker CPU "
        f"{result.broker_cpu * 1000:6.0f} ms, per-node build CPU median "
        f"{result.build_median * 1e6:7.0f} µs (all builds {sum(result.build_cpu) * 1000:6.0f} "
        f"ms), client CPU per node {result.client_per_node * 1e6:6.0f} µs, "
        f"RMSE {result.rmse:5.2f}"
    )


# --- the benchmark ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    """One kind of round at one size over its runs: each time the best (least disturbed) run's,
    the error pooled over every run's cells."""

    n: int
    threshold: int
    scale: float
    build: float  # s, median per-node build CPU
    client_per_node: float  # s
    broker_cpu: float  # s per round
    wall: float  # s per round
    rmse: float  # pooled over every run's cells
    rmse_se: float  # its standard error, relative (delta method over the squared errors)
    accuracy: float
    cells: int  # how many cells the RMSE pools

    @classmethod
    def of(cls, runs: Sequence[RoundResult]) -> Summary:
        """The summary of ``runs`` (one kind, one size)."""
        errors = [
            (r - t) ** 2 for run in runs for r, t in zip(run.released, run.truth, strict=True)
        ]
        return cls(
            n=runs[0].n,
            threshold=runs[0].threshold,
            scale=runs[0].scale,
            build=min(run.build_median for run in runs),
            client_per_node=min(run.client_per_node for run in runs),
            broker_cpu=min(run.broker_cpu for run in runs),
            wall=min(run.wall for run in runs),
            rmse=math.sqrt(statistics.fmean(errors)),
            rmse_se=statistics.stdev(errors) / (2 * statistics.fmean(errors) * len(errors) ** 0.5)
            if len(errors) > 1 and any(errors)
            else 0.0,
            accuracy=runs[0].accuracy,
            cells=len(errors),
        )


@dataclass
class Measured:
    """Per size: every run of the plain, private and local-noise rounds."""

    sizes: list[int]
    runs: int
    rounds: dict[tuple[str, int], list[RoundResult]] = field(default_factory=dict)

    def summary(self, kind: str, n: int) -> Summary:
        """The summary of one kind of round at one size."""
        return Summary.of(self.rounds[(kind, n)])


async def _measure(folder: Path, sizes: Sequence[int], runs: int) -> Measured:
    home = make_broker_home(folder / "broker")
    broker = broker_process(home, "broker")
    nodes: list[Node] = []
    operator_channel: grpc.aio.Channel | None = None
    try:
        address = broker.start()
        _say(f"broker listening on {address} (pid {broker.pid}, SQLite)")
        cred = credential.read(home)
        cert = cred.node_certificate
        started = time.perf_counter()
        nodes = await enrol_all(address, cert, cred.identity, max(sizes))
        _say(
            f"{len(nodes)} agencies enrolled through the Directory service in "
            f"{time.perf_counter() - started:.1f} s"
        )
        started = time.perf_counter()
        await connect_all(nodes, address, cert)
        _say(f"{len(nodes)} signed channels connected in {time.perf_counter() - started:.1f} s")
        operator_channel = rpc.open_aio_channel(address, cert, cred.identity, MAX_MESSAGE)
        info = await directory_grpc.DirectoryStub(operator_channel).GetBrokerInfo(
            directory_pb.GetBrokerInfoRequest(), timeout=CALL_TIMEOUT
        )
        spec = dp.default_needs_table()
        synthetic = np.random.default_rng()
        setup = Setup(
            broker=broker,
            operator=stats_grpc.StatsStub(operator_channel),
            broker_key=bytes(info.signing_key),
            nodes=nodes,
            publics={node.agency_id: node.identity.public for node in nodes},
            identities={node.agency_id: node.identity for node in nodes},
            counts={
                node.agency_id: [int(c) for c in synthetic.integers(0, MAX_COUNT, spec.size)]
                for node in nodes
            },
        )
        _say(
            f"table {spec.name} ({spec.size} cells), ε = {EPSILON}, the default threshold "
            f"(⌈25N/36⌉: {', '.join(str(dp.default_threshold(n)) for n in sizes)}), "
            f"{IN_FLIGHT} submissions in flight, {os.cpu_count()} CPU cores shared by the "
            "broker and all simulated nodes"
        )
        await run_round(setup, PLAIN, min(sizes))  # warm-up: broker caches, code paths
        measured = Measured(list(sizes), runs)
        for n in sizes:
            for _ in range(runs):  # interleaved, so drift in the machine hits every kind alike
                for kind in (PLAIN, PRIVATE, LOCAL):
                    result = await run_round(setup, kind, n)
                    measured.rounds.setdefault((kind, n), []).append(result)
                    _say(_describe(result))
        return measured
    finally:
        for node in nodes:
            if node.channel is not None:
                with contextlib.suppress(Exception):
                    await node.channel.close()
        if operator_channel is not None:
            await operator_channel.close()
        broker.stop()


def _exponent_figures(m: Measured) -> list[Figure]:
    """Growth exponents in N: masked figures against the plain sum's (same run) or theory."""
    note = (
        "Growth exponent = least-squares slope of log(figure) against log(N) over the sizes run; "
        "value = that exponent; baseline = the plain sum's exponent in the same run, or the "
        "theoretical one; ratio = measured / baseline."
    )
    sizes = m.sizes

    def slope(kind: str, attribute: str) -> float:
        return fit_exponent(sizes, [getattr(m.summary(kind, n), attribute) for n in sizes])

    mask_only = fit_exponent(
        sizes, [m.summary(PRIVATE, n).build - m.summary(LOCAL, n).build for n in sizes]
    )
    rows = [
        ("per-node build CPU, masked", slope(PRIVATE, "build"), "theory N^1", 1.0),
        ("per-node pairwise-mask CPU", mask_only, "theory N^1", 1.0),
        ("round wall time, masked", slope(PRIVATE, "wall"), "plain sum", slope(PLAIN, "wall")),
        (
            "broker CPU per round, masked",
            slope(PRIVATE, "broker_cpu"),
            "plain sum",
            slope(PLAIN, "broker_cpu"),
        ),
        ("local-noise error", slope(LOCAL, "rmse"), "theory N^0.5", 0.5),
    ]
    _say(
        f"growth exponents in N: per-node build CPU plain {slope(PLAIN, 'build'):.3f}, local "
        f"noise {slope(LOCAL, 'build'):.3f}, masked {slope(PRIVATE, 'build'):.3f}; mask part "
        f"(masked - local-noise build) {mask_only:.3f}"
    )
    figures = []
    for label, value, baseline_name, baseline in rows:
        _say(f"growth exponent in N: {label} {value:.3f} ({baseline_name}: {baseline:.3f})")
        figures.append(
            Figure(
                "stats growth in N",
                f"{label}: N^{value:.2f}",
                value,
                baseline_name,
                baseline,
                "",
                note=note,
            )
        )
    return figures


def _cost_figures(m: Measured) -> list[Figure]:
    cores = os.cpu_count() or 1
    note = (
        f"Best of {m.runs} runs each. One broker process (SQLite) and all N simulated agencies "
        f"(one process: shares built one at a time under the GIL, {IN_FLIGHT} submissions in "
        f"flight) share {cores} CPU cores; baseline = the same agencies submitting raw counts "
        "(no noise, no masks) through the same SubmitShare path in the same run."
    )
    figures = []
    for n in m.sizes:
        plain, private = m.summary(PLAIN, n), m.summary(PRIVATE, n)
        rows = [
            ("per-node build CPU, masked", private.build * 1e6, plain.build * 1e6, "µs"),
            (
                "client CPU per node, masked",
                private.client_per_node * 1e6,
                plain.client_per_node * 1e6,
                "µs",
            ),
            (
                "broker CPU per round, masked",
                private.broker_cpu * 1e3,
                plain.broker_cpu * 1e3,
                "ms",
            ),
            ("round wall time, masked", private.wall * 1e3, plain.wall * 1e3, "ms"),
        ]
        for label, value, baseline, unit in rows:
            figures.append(
                Figure(
                    f"stats N={n}",
                    label,
                    value,
                    "plain share" if "node" in label else "plain sum",
                    baseline,
                    unit,
                    higher_is_better=False,
                    note=note,
                )
            )
        _say(
            f"N={n}: masked / plain: per-node build CPU {private.build / plain.build:.1f}x, client "
            f"CPU per node {private.client_per_node / plain.client_per_node:.1f}x, broker CPU "
            f"{private.broker_cpu / plain.broker_cpu:.2f}x, round wall "
            f"{private.wall / plain.wall:.2f}x; pairwise-mask CPU per peer "
            f"{(private.build - m.summary(LOCAL, n).build) / (n - 1) * 1e6:.0f} µs"
        )
    return figures


def _error_figures(m: Measured) -> list[Figure]:
    note = (
        "Error = root mean square over the released cells (pooled over every run) of released - "
        "true total; baseline = the central discrete Laplace's standard deviation at the same "
        "scale. Theory: √(N/t) for a private round, √N for local noise. Half-width = the "
        "release's 95 % interval against OpenDP's central_accuracy. Exact sd = √(variance of "
        "the sum of N shares of threshold t) from the formula tests/test_dp.py checks against "
        "samples. Target with default settings: at most "
        f"{dp.MAX_ERROR_RATIO}x central; the measured error carries sampling noise of a few %."
    )
    figures = []
    for n in m.sizes:
        private, local = m.summary(PRIVATE, n), m.summary(LOCAL, n)
        central_sd = math.sqrt(dp.noise_variance(1, 1, private.scale))
        central_accuracy = dp.central_accuracy(private.scale, 0.05)
        theory = math.sqrt(n / private.threshold)
        exact_sd = math.sqrt(dp.noise_variance(n, private.threshold, private.scale))
        ratio = private.rmse / central_sd
        _say(
            f"N={n}, t={private.threshold}: private error {private.rmse:.2f} = "
            f"{ratio:.2f}x central ± {2 * ratio * private.rmse_se:.2f} (2 standard errors; "
            f"exact √(N/t) = {theory:.3f}, {private.cells} cells); 95% half-width "
            f"{private.accuracy:g} vs central {central_accuracy:.2f}; local-noise error "
            f"{local.rmse:.2f} = {local.rmse / central_sd:.2f}x central (theory √N = "
            f"{math.sqrt(n):.2f}), half-width {local.accuracy:g}"
        )
        figures += [
            Figure(
                f"stats N={n}",
                "private noise sd (exact)",
                exact_sd,
                "central DP sd",
                central_sd,
                "count",
                note=note,
            ),
            Figure(
                f"stats N={n}",
                f"private error (theory {theory:.2f}x)",
                private.rmse,
                "central DP sd",
                central_sd,
                "count",
                note=note,
            ),
            Figure(
                f"stats N={n}",
                "private 95% half-width",
                private.accuracy,
                "central accuracy",
                central_accuracy,
                "count",
                note=note,
            ),
            Figure(
                f"stats N={n}",
                f"local-noise error (theory {math.sqrt(n):.2f}x)",
                local.rmse,
                "central DP sd",
                central_sd,
                "count",
                note=note,
            ),
        ]
    return figures


def _figures(m: Measured) -> list[Figure]:
    figures = _cost_figures(m)
    if len(m.sizes) >= 2:
        figures += _exponent_figures(m)
    return figures + _error_figures(m)


def sizes_from_env() -> tuple[int, ...]:
    """The sizes to run: ``TESSERA_BENCH_STATS_SIZES`` (comma-separated) or all four."""
    text = os.environ.get("TESSERA_BENCH_STATS_SIZES", "").strip()
    if not text:
        return SIZES
    sizes = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    if not sizes or min(sizes) < 2:
        raise ValueError("TESSERA_BENCH_STATS_SIZES needs sizes of at least 2")
    return sizes


def run(sizes: Sequence[int] | None = None, runs: int = RUNS) -> list[Figure]:
    """Private, plain and local-noise rounds for every size; figures against the plain sum."""
    chosen = list(sizes or sizes_from_env())
    with tempfile.TemporaryDirectory(prefix="tessera-bench-stats-") as tmp:
        measured = asyncio.run(_measure(Path(tmp), chosen, runs))
    return _figures(measured)


def _main(argv: list[str]) -> int:
    from bench.common import print_table

    if argv not in ([], ["--quick"]):
        print("usage: python -m bench.stats [--quick]")
        return 2
    print_table(run(QUICK_SIZES if argv else None))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
