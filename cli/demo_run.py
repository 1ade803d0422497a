"""The steps of ``tessera demo`` (kept out of cli/demo.py so ``tessera --help`` stays fast).

A real region on loopback: a broker and three agency nodes (TLS gRPC, SQLite, each node's store
encrypted), enrolled with one-time codes, fingerprints verified, synthetic HTCDS cases imported,
one consented referral sent end to end and accepted, and one private statistics round whose
release is printed with its error bars. Every server exposes Prometheus metrics on loopback.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from broker.operator_client import OperatorClient
from broker.server import RunningBroker, start_broker
from broker.setup import BrokerInit, init_broker
from cli.context import CliContext
from node import directory_sync
from node.client import NodeClient
from node.domain import StaffRole
from node.htcds.catalogue import IDENTIFYING_FIELDS
from node.htcds.synthetic import synthetic_records
from node.htcds.xlsx_format import write_xlsx
from node.keyring import open_keyring
from node.server import RunningNode, start_node
from node.setup import NodeInit, init_node
from tessera import credential, crypto
from tessera.config import KekSource
from tessera.errors import ConfigError, PermissionDenied, Unavailable
from tessera.loop import LoopThread
from tessera.needs import NeedCategory, NeedStatus

MARKER = ".tessera-demo"
REGION = "north"
console = Console()


@dataclass(frozen=True)
class Agency:
    """One of the demo's agencies."""

    agency_id: str
    name: str
    services: tuple[str, ...]


AGENCIES = (
    Agency("harbour-shelter", "Harbour Shelter", ("safe_housing", "basic_needs")),
    Agency("lantern-clinic", "Lantern Clinic", ("medical", "mental_health")),
    Agency("beacon-legal", "Beacon Legal Aid", ("legal_criminal", "immigration")),
)


def step(text: str) -> None:
    """Say what the demo is about to do."""
    console.print(f"[bold cyan]▶[/] {text}")


def run_demo(directory: Path, cases: int, _cli: CliContext, keep_serving: bool = False) -> None:
    """Run the demo in ``directory``; a second run resets it (only if the demo made it).

    With ``keep_serving`` the broker and nodes stay up after the walk-through, until Ctrl-C, so
    a person can run commands against them and watch their metrics move.
    """
    started = time.perf_counter()
    _prepare(directory)
    loop = LoopThread()
    running: list[RunningBroker | RunningNode] = []
    try:
        broker_home = directory / "broker"
        step(f"Creating the regional broker for region '{REGION}' (signing key, TLS, SQLite)")
        broker_settings = init_broker(
            BrokerInit(home=broker_home, name="North broker", region=REGION, listen="127.0.0.1:0")
        )
        metrics: dict[str, int] = {"broker": _free_port()}
        broker = loop.run(
            start_broker(dataclasses.replace(broker_settings, metrics_port=metrics["broker"]))
        )
        running.append(broker)
        console.print(f"  broker serving on {broker.address}; it will only ever see ciphertext")
        homes: dict[str, Path] = {}
        for agency in AGENCIES:
            homes[agency.agency_id] = _make_agency(directory, broker_home, agency)
        for agency in AGENCIES:
            metrics[agency.agency_id] = _free_port()
            settings = dataclasses.replace(
                _settings(homes[agency.agency_id]), metrics_port=metrics[agency.agency_id]
            )
            running.append(loop.run(start_node(settings, None)))
        step("Nodes serving; each relays through the broker in the background")
        clients = {a.agency_id: NodeClient(homes[a.agency_id]) for a in AGENCIES}
        try:
            _verify_fingerprints(clients)
            _walk_through(clients, homes, directory, cases)
            _statistics_round(broker_home, directory, clients)
            console.print(
                "  metrics while the servers run: "
                + ", ".join(f"curl -s 127.0.0.1:{port}/metrics" for port in metrics.values())
            )
            if keep_serving:
                _serve_until_interrupted(homes, directory)
        finally:
            for client in clients.values():
                client.close()
    finally:
        for server in reversed(running):
            loop.run(server.stop(grace=0.5))
        loop.close()
    console.print(f"\n[bold green]Demo finished in {time.perf_counter() - started:.1f} s.[/]")
    _print_next_steps(directory, homes)


def _serve_until_interrupted(homes: dict[str, Path], directory: Path) -> None:
    console.print("\n[bold]The region keeps running; press Ctrl-C to stop it.[/] Try:")
    shelter = homes["harbour-shelter"]
    console.print(f"  tessera --home {shelter} referral list")
    console.print(f"  tessera --home {shelter} stats budget")
    console.print(
        f"  tessera --home {directory / 'broker'} stats show --period "
        f"{dt.datetime.now(dt.UTC):%Y-%m}"
    )
    console.print(f"  tessera --home {directory / 'broker'} stats dashboard   # in a browser")
    stop = threading.Event()
    # Ctrl-C (SIGINT) or a service manager's SIGTERM: stop the region gracefully either way.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_args: stop.set())
    stop.wait()
    console.print("stopping the broker and the nodes")


def _prepare(directory: Path) -> None:
    if directory.exists() and any(directory.iterdir()):
        if not (directory / MARKER).exists():
            raise ConfigError(
                f"{directory} exists and was not made by the demo",
                hint="choose an empty or new folder with --dir",
            )
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MARKER).write_text("made by `tessera demo`; reset on every run\n")


def _settings(home: Path) -> Any:
    from tessera import config

    return config.load(home, {})


def _make_agency(directory: Path, broker_home: Path, agency: Agency) -> Path:
    home = directory / agency.agency_id
    step(
        f"Creating agency node '{agency.name}' (keys, key-encryption key in a key file, TLS, "
        "encrypted SQLite store) and enrolling it with a one-time code"
    )
    init_node(
        NodeInit(
            home=home,
            name=agency.name,
            region=REGION,
            listen="127.0.0.1:0",
            kek_source=KekSource.KEY_FILE,
            key_file=directory / f"{agency.agency_id}.key",
        ),
        None,
    )
    with OperatorClient(broker_home) as operator:
        code = operator.enrolment_code(agency.agency_id, 1)
    identity = open_keyring(home, None).identity
    directory_sync.enrol(home, identity, code, agency.name, agency.services)
    console.print(f"  {agency.agency_id}: fingerprint {identity.public.fingerprint()}")
    return home


def _verify_fingerprints(clients: dict[str, NodeClient]) -> None:
    step("Administrators compare fingerprints out of band and mark each other verified")
    prints = {agency_id: client.status()["fingerprint"] for agency_id, client in clients.items()}
    for agency_id, client in clients.items():
        for other, fingerprint in prints.items():
            if other != agency_id:
                client.verify_agency(other, fingerprint)


def _walk_through(
    clients: dict[str, NodeClient], homes: dict[str, Path], directory: Path, cases: int
) -> None:
    shelter, clinic = clients["harbour-shelter"], clients["lantern-clinic"]
    imported: dict[str, list[str]] = {}
    records_by_agency: dict[str, list[dict[str, str]]] = {}
    for offset, (agency_id, client) in enumerate(clients.items()):
        records = synthetic_records(cases, seed=2026 + offset)
        records_by_agency[agency_id] = records
        spreadsheet = directory / f"{agency_id}-intake.xlsx"
        write_xlsx(spreadsheet, records)
        step(f"{agency_id}: importing {cases} synthetic HTCDS cases (fictional people)")
        imported[agency_id] = client.import_cases(spreadsheet, False, lambda *_p: None)["case_ids"]
        spreadsheet.unlink()  # the demo leaves no plaintext survivor data outside the stores
    _record_needs(clients, imported)

    target = records_by_agency["harbour-shelter"][0]
    case_id = shelter.find_cases(
        {"prs_FirstName": target["prs_FirstName"], "prs_SecondName": target["prs_SecondName"]}
    )[0]["case_id"]
    step(f"harbour-shelter: found case {case_id} through the keyed blind index")
    shelter.set_need(case_id, NeedCategory.MEDICAL, NeedStatus.IDENTIFIED)
    step(
        "The survivor consents, verbally, to share identity and contact details with "
        "Lantern Clinic for medical care; the caseworker records it"
    )
    consent = shelter.grant_consent(
        case_id,
        "lantern-clinic",
        NeedCategory.MEDICAL,
        ["identity", "contact"],
        dt.date.today() + dt.timedelta(days=30),
        "verbal",
    )
    step("Sending the referral: only consented fields, signed, sealed to the clinic's key")
    referral = shelter.send_referral(
        case_id, "lantern-clinic", NeedCategory.MEDICAL, consent_id=consent["consent_id"]
    )
    incoming = _wait_for(lambda: next(iter(clinic.inbox()), None), "the referral to arrive")
    shown = clinic.show_referral(incoming["referral_id"])
    console.print(
        f"  the clinic received {len(shown['fields'])} field(s): "
        f"{', '.join(sorted(shown['fields']))} (nothing else left the shelter)"
    )
    step("Lantern Clinic accepts; the status travels back end-to-end encrypted")
    clinic.answer_referral(incoming["referral_id"], "accept")
    _wait_for(
        lambda: next(
            (
                r
                for r in shelter.referrals("outgoing")
                if r["referral_id"] == referral["referral_id"] and r["state"] == "accepted"
            ),
            None,
        ),
        "the acceptance",
    )
    need = next(n for n in shelter.get_case(case_id)["needs"] if n["category"] == "medical")
    console.print(f"  at the shelter the medical need is now '{need['status']}'")
    disclosures = shelter.disclosures(case_id)
    console.print(
        f"  accounting of disclosures for the case: {len(disclosures)} entr"
        f"{'y' if len(disclosures) == 1 else 'ies'} (who received what, and when)"
    )

    _check_disk(homes, records_by_agency)
    _node_operations(clients, homes, directory, imported)


def _check_disk(homes: dict[str, Path], records_by_agency: dict[str, list[dict[str, str]]]) -> None:
    step("Checking every node's raw database file for survivors' names, e-mails and phones")
    raw = b"".join(
        _read(homes[a] / "tessera.db") + _read(homes[a] / "tessera.db-wal") for a in homes
    )
    everything = [r for records in records_by_agency.values() for r in records]
    # Short or all-digit values (postal codes) can occur by chance inside timestamps; skip them.
    leaked = [
        v
        for r in everything
        for k, v in r.items()
        if k in IDENTIFYING_FIELDS and len(v) > 4 and not v.isdigit() and v.encode() in raw
    ]
    console.print(f"  plaintext identifiers found on disk: {len(leaked)}")


def _node_operations(
    clients: dict[str, NodeClient],
    homes: dict[str, Path],
    directory: Path,
    imported: dict[str, list[str]],
) -> None:
    shelter = clients["harbour-shelter"]

    step("Issuing a caseworker credential; a caseworker may not export the whole store")
    identity = crypto.Identity.generate()
    shelter.add_staff("Ana Ruiz", StaffRole.CASEWORKER, identity.public.signing_key)
    credential.write(
        directory / "caseworker",
        credential.Credential(
            name="Ana Ruiz",
            identity=identity,
            node_address=shelter.address,
            node_certificate=(homes["harbour-shelter"] / "tls" / "server.crt").read_bytes(),
        ),
        credential.KeyFileLock(directory / "caseworker.key"),
    )
    with NodeClient(directory / "caseworker") as ana:
        try:
            list(ana.export_cases("csv", None))
        except PermissionDenied as refused:
            console.print(f"  refused, as it should be: {refused.message}")

    erased = imported["harbour-shelter"][-1]
    step(f"Erasing case {erased} by destroying its data key (crypto-shredding)")
    shelter.erase_case(erased, "survivor asked")
    made = shelter.backup(None)
    step(f"Encrypted backup written: {Path(made['path']).name} ({made['size']:,} bytes)")
    report = shelter.verify_audit()
    step(
        f"Audit log verified: {report['entries']} signed, hash-chained entries, "
        f"intact={report['intact']}"
    )
    unmet = sum(
        len(c.list_cases(None, None, NeedStatus.UNMET, False, 1000)) for c in clients.values()
    )
    console.print(
        f"  cases with an unmet need across the three agencies: {unmet} (each agency sees only "
        "its own; the region will see only a noisy total, next)"
    )


def _statistics_round(broker_home: Path, directory: Path, clients: dict[str, NodeClient]) -> None:
    from broker.stats import StatsClient
    from cli.stats import png_chart, release_rows, terminal_chart
    from tessera.v1 import stats_pb2 as stats_pb

    period = dt.datetime.now(dt.UTC).strftime("%Y-%m")
    step(
        f"The coordinator opens a private statistics round for {period}: each node adds a "
        "share of the noise, masks its table pairwise with every other node, and submits; "
        "the broker learns only the noisy total"
    )
    with StatsClient(broker_home) as stats:
        # Threshold 0 and no table: the broker's defaults (docs/privacy.md).
        blob = stats.open_round(
            REGION, period, threshold=0, epsilon=1.0, participants=[a.agency_id for a in AGENCIES]
        )
        opened = stats_pb.Round.FromString(blob.body)
        round_id = opened.round_id
        console.print(
            f"  threshold {opened.threshold} of {len(opened.participants)} agencies; each survivor"
            f" counts in at most {opened.table.contribution_bound} cells ({opened.bound_basis})"
        )
        _wait_for(lambda: stats.round(round_id).release_id, "the nodes' shares", timeout=60)
        release = stats_pb.Release.FromString(stats.release(round_id=round_id).body)
    console.print(
        f"  release {release.release_id}: ε = {release.epsilon:g} per period "
        f"(OpenDP's privacy map), {release.participants} agencies, each count "
        f"±{release.accuracy:g} at {1 - release.alpha:.0%}"
    )
    _compare_with_truth(release, clients)
    rows = release_rows(release)
    console.print("  unmet needs by category (noisy count, [95% interval]):")
    console.print(terminal_chart(rows), markup=False, highlight=False)
    chart = directory / f"unmet-needs-{period}.png"
    png_chart(rows, f"unmet needs, {REGION} {period}", chart)
    console.print(f"  chart written to {chart}")


def _compare_with_truth(release: Any, clients: dict[str, NodeClient]) -> None:
    """What only a demo can show: the release against the counts every node holds."""
    held: Counter[tuple[str, str]] = Counter()
    for client in clients.values():
        # Every need in the demo was recorded during this run, so in the release's period.
        for case in client.list_cases(None, None, None, False, 100_000):
            held.update((need["category"], need["status"]) for need in case["needs"])
    truth = [held[(c.coordinates[0], c.coordinates[1])] for c in release.cells]
    covered = sum(c.lower <= t <= c.upper for c, t in zip(release.cells, truth, strict=True))
    unmet = [
        (c, t) for c, t in zip(release.cells, truth, strict=True) if c.coordinates[1] == "unmet"
    ]
    console.print(
        f"  the nodes hold {sum(t for _, t in unmet)} unmet needs; the release's unmet cells add"
        f" up to {sum(c.value for c, _ in unmet)} (each cell ±{release.accuracy:g})"
    )
    console.print(
        f"  {covered} of {len(truth)} cells' 95% intervals contain the count the nodes hold"
        f" ({covered / len(truth):.0%}); the bound dropped an estimated"
        f" {release.dropped_fraction:.1%} of contributions"
    )


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _record_needs(clients: dict[str, NodeClient], imported: dict[str, list[str]]) -> None:
    step("Recording aftercare needs (codes only; they identify no one)")
    rng = random.Random(7)  # noqa: S311 - synthetic demo data, nothing secret
    categories = list(NeedCategory)
    statuses = list(NeedStatus)
    for agency_id, client in clients.items():
        for case_id in imported[agency_id]:
            # One to six needs a survivor, as agencies see them.
            for category in rng.sample(categories, rng.randint(1, 6)):
                client.set_need(case_id, category, rng.choice(statuses))


def _wait_for(probe: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.1)
    raise Unavailable(f"timed out waiting for {what}", hint="see the nodes' logs")


def _print_next_steps(directory: Path, homes: dict[str, Path]) -> None:
    console.print("Try it yourself (the nodes protect themselves with the demo's key files):")
    console.print(f"  tessera --home {directory / 'broker'} broker serve &")
    for home in homes.values():
        console.print(f"  tessera --home {home} node serve &")
    shelter = homes["harbour-shelter"]
    console.print(f"  tessera --home {shelter} case list --names")
    console.print(f"  tessera --home {shelter} referral list")
    console.print(f"  tessera --home {homes['lantern-clinic']} referral inbox --all")
    console.print(f"  tessera --home {shelter} agency list")
    console.print(f"  tessera --home {directory / 'caseworker'} case list")
    console.print(f"  tessera --home {shelter} node audit verify")


def _read(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""
