"""The steps of ``tessera demo`` (kept out of cli/demo.py so ``tessera --help`` stays fast)."""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

from rich.console import Console

from cli.context import CliContext
from node import htcds
from node.client import NodeClient
from node.domain import StaffRole
from node.server import start_node
from node.setup import NodeInit, init_node
from tessera import credential, crypto
from tessera.config import KekSource
from tessera.errors import ConfigError, PermissionDenied
from tessera.loop import LoopThread

MARKER = ".tessera-demo"
console = Console()


def step(text: str) -> None:
    """Say what the demo is about to do."""
    console.print(f"[bold cyan]▶[/] {text}")


def run_demo(directory: Path, cases: int, _cli: CliContext) -> None:
    """Run the demo in ``directory``; a second run resets it (only if the demo made it)."""
    started = time.perf_counter()
    _prepare(directory)
    home = directory / "harbour-shelter"
    key_file = directory / "harbour-shelter.key"

    step(
        "Creating the agency node 'Harbour Shelter': identity keys, key-encryption key "
        "(a key file, so the demo needs no passphrase), TLS certificate, SQLite database"
    )
    settings = init_node(
        NodeInit(
            home=home,
            name="Harbour Shelter",
            region="north",
            listen="127.0.0.1:0",
            kek_source=KekSource.KEY_FILE,
            key_file=key_file,
        ),
        None,
    )
    loop = LoopThread()
    running = loop.run(start_node(settings, None))
    try:
        step(f"Node serving TLS gRPC on {running.address} (health and reflection included)")
        with NodeClient(home) as admin:
            _walk_through(admin, home, directory, cases)
    finally:
        loop.run(running.stop(grace=0.5))
        loop.close()
    console.print(f"\n[bold green]Demo finished in {time.perf_counter() - started:.1f} s.[/]")
    console.print("Try it yourself (the node protects itself with the demo's key file):")
    console.print(f"  tessera --home {home} node serve &")
    console.print(f"  tessera --home {home} case list --names")
    console.print(f'  tessera --home {home} case find --name "<a name from the list>"')
    console.print(f"  tessera --home {directory / 'caseworker'} case list")
    console.print(f"  tessera --home {home} node audit verify")


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


def _walk_through(admin: NodeClient, home: Path, directory: Path, cases: int) -> None:
    records = htcds.synthetic_records(cases, seed=2026)
    spreadsheet = directory / "intake.xlsx"
    htcds.write_xlsx(spreadsheet, records)
    step(
        f"Importing {cases} synthetic HTCDS cases from {spreadsheet.name} "
        "(fictional people; each survivor gets a data key of their own)"
    )
    result = admin.import_cases(spreadsheet, False, lambda *_p: None)
    console.print(f"  imported {result['imported']} case(s)")
    spreadsheet.unlink()  # the demo leaves no plaintext survivor data outside the store

    step("Recording aftercare needs (codes only; they identify no one)")
    rng = random.Random(7)  # noqa: S311 - synthetic demo data, nothing secret
    categories = list(htcds.NeedCategory)
    statuses = list(htcds.NeedStatus)
    for case_id in result["case_ids"]:
        for category in rng.sample(categories, 2):
            admin.set_need(case_id, category, rng.choice(statuses))

    target = records[0]
    name = f"{target['prs_FirstName']} {target['prs_SecondName']}"
    step(f"Finding '{name}' through the keyed blind index (no plaintext is searched)")
    found = admin.find_cases(
        {"prs_FirstName": target["prs_FirstName"], "prs_SecondName": target["prs_SecondName"]}
    )
    console.print(f"  found case {found[0]['case_id']}")

    step("Checking the raw database file for survivors' names, e-mails and phones")
    raw = (home / "tessera.db").read_bytes() + _read(home / "tessera.db-wal")
    # Short or all-digit values (postal codes) can occur by chance inside timestamps; skip them.
    leaked = [
        v
        for r in records
        for k, v in r.items()
        if k in htcds.IDENTIFYING_FIELDS and len(v) > 4 and not v.isdigit() and v.encode() in raw
    ]
    console.print(f"  plaintext identifiers found on disk: {len(leaked)}")

    step("Issuing a caseworker credential; a caseworker may not export the whole store")
    identity = crypto.Identity.generate()
    admin.add_staff("Ana Ruiz", StaffRole.CASEWORKER, identity.public.signing_key)
    credential.write(
        directory / "caseworker",
        credential.Credential(
            name="Ana Ruiz",
            identity=identity,
            node_address=admin.address,
            node_certificate=(home / "tls" / "server.crt").read_bytes(),
        ),
    )
    with NodeClient(directory / "caseworker") as ana:
        try:
            list(ana.export_cases("csv", None))
        except PermissionDenied as refused:
            console.print(f"  refused, as it should be: {refused.message}")

    erased = result["case_ids"][-1]
    step(f"Erasing case {erased} by destroying its data key (crypto-shredding)")
    admin.erase_case(erased, "survivor asked")
    made = admin.backup(None)
    step(f"Encrypted backup written: {Path(made['path']).name} ({made['size']:,} bytes)")
    report = admin.verify_audit()
    step(
        f"Audit log verified: {report['entries']} signed, hash-chained entries, "
        f"intact={report['intact']}"
    )
    unmet = admin.list_cases(None, None, htcds.NeedStatus.UNMET, False, 1000)
    console.print(
        f"  cases with an unmet need at this agency: {len(unmet)} (the broker's "
        "private statistics will pool such counts across agencies; issue 7)"
    )


def _read(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""
