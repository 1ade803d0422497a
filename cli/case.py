"""``tessera case``: record survivors' cases and needs; import and export HTCDS (issue 4).

Survivor data typed on a command line lands in shell history; prefer ``--from-json FILE`` (or
``-`` for standard input) for anything identifying.
"""

from __future__ import annotations

import enum
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from cli import context
from cli.output import FORMAT_OPTION, OutputFormat, render, render_one

app = typer.Typer(no_args_is_help=True)

FieldsOption = Annotated[
    list[str] | None,
    typer.Option("--field", help="NAME=VALUE with an HTCDS field name; repeat for more."),
]


def _parse_fields(pairs: list[str] | None, from_json: Path | None) -> dict[str, str]:
    from tessera.errors import InvalidInput

    fields: dict[str, str] = {}
    if from_json is not None:
        text = sys.stdin.read() if str(from_json) == "-" else from_json.read_text("utf-8")
        try:
            loaded = json.loads(text)
        except ValueError as exc:
            raise InvalidInput(f"{from_json} is not JSON: {exc}") from None
        if not isinstance(loaded, dict):
            raise InvalidInput(f"{from_json} must hold one JSON object of field: value")
        fields.update({str(k): str(v) for k, v in loaded.items()})
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep:
            raise InvalidInput(f"--field {pair!r} is not NAME=VALUE")
        fields[name.strip()] = value
    return fields


def _client(ctx: typer.Context) -> Any:
    return context.get(ctx).node_client()


def _show(case: dict[str, Any], fmt: OutputFormat) -> None:
    if fmt is OutputFormat.JSON:
        render_one(case, fmt)
        return
    record: dict[str, Any] = {
        "case_id": case["case_id"],
        "version": case["version"],
        "state": case["state"],
        **case["fields"],
        "needs": [f"{n['category']}={n['status']}" for n in case["needs"]],
        "notes": case["notes"],
        "updated_at": case["updated_at"],
    }
    render_one(record, fmt, title="case")


@app.command("create")
def create(
    ctx: typer.Context,
    field: FieldsOption = None,
    from_json: Annotated[
        Path | None, typer.Option(help="JSON object of HTCDS field: value ('-' = stdin).")
    ] = None,
    need: Annotated[
        list[str] | None, typer.Option(help="A need category known at intake; repeatable.")
    ] = None,
    notes: Annotated[str, typer.Option(help="Free-text notes (survivor data).")] = "",
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """Record a new case.

    \b
    Example:
      echo '{"prs_FirstName": "Mirelka"}' | tessera case create --from-json - --need safe_housing
    """
    from tessera.needs import NeedStatus

    fields = _parse_fields(field, from_json)
    needs = [(_category(n), NeedStatus.IDENTIFIED) for n in need or []]
    with _client(ctx) as client:
        case = client.create_case(fields, notes, needs)
    _show(case, fmt)


@app.command("show")
def show(ctx: typer.Context, case_id: str, fmt: OutputFormat = FORMAT_OPTION) -> None:
    """Show one case in full (the read is recorded in the audit log).

    \b
    Example:
      tessera case show 7c9e6679-7425-40de-944b-e07fc1f90ae7
    """
    with _client(ctx) as client:
        _show(client.get_case(case_id), fmt)


@app.command("update")
def update(
    ctx: typer.Context,
    case_id: str,
    field: FieldsOption = None,
    from_json: Annotated[Path | None, typer.Option(help="JSON object of fields to set.")] = None,
    clear: Annotated[list[str] | None, typer.Option(help="A field to remove; repeatable.")] = None,
    notes: Annotated[str | None, typer.Option(help="Replace the notes.")] = None,
    version: Annotated[
        int | None, typer.Option(help="The version you read; refused if it changed since.")
    ] = None,
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """Change fields of a case. Without --version, the current version is used.

    \b
    Example:
      tessera case update 7c9e6679-7425-40de-944b-e07fc1f90ae7 \\
        --field prs_Gender=Feminine --version 3
    """
    fields = _parse_fields(field, from_json)
    with _client(ctx) as client:
        expected = version if version is not None else client.get_case(case_id)["version"]
        _show(client.update_case(case_id, expected, fields, clear or [], notes), fmt)


@app.command("list")
def list_cases(
    ctx: typer.Context,
    state: Annotated[str | None, typer.Option(help="open or closed.")] = None,
    need: Annotated[str | None, typer.Option(help="Only cases with this need category.")] = None,
    need_status: Annotated[str | None, typer.Option(help="Only needs in this status.")] = None,
    names: Annotated[bool, typer.Option("--names", help="Show survivors' names.")] = False,
    limit: Annotated[int, typer.Option(help="At most this many cases.")] = 100,
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """List cases, most recently updated first (names only with --names).

    \b
    Example:
      tessera case list --state open --need safe_housing --need-status unmet
    """
    from tessera.needs import NeedStatus

    with _client(ctx) as client:
        cases = client.list_cases(
            state,
            _category(need) if need else None,
            NeedStatus(need_status) if need_status else None,
            names,
            limit,
        )
    rows = [
        {
            "case_id": c["case_id"],
            "name": c["name"],
            "state": c["state"],
            "version": c["version"],
            "needs": [f"{n['category']}={n['status']}" for n in c["needs"]],
            "updated_at": c["updated_at"],
        }
        for c in cases
    ]
    columns = ["case_id", *(["name"] if names else []), "state", "needs", "updated_at"]
    render(rows, fmt, columns=columns, title=f"{len(rows)} case(s)")


@app.command("find")
def find(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Option(help="First and second name, as recorded.")] = None,
    email: Annotated[str | None, typer.Option()] = None,
    phone: Annotated[str | None, typer.Option(help="Mobile phone number.")] = None,
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """Find cases by a survivor identifier (keyed blind index; exact match after normalising).

    \b
    Example:
      tessera case find --email mirelka.example@example.org
    """
    from tessera.errors import InvalidInput

    identifiers: dict[str, str] = {}
    if name:
        first, _sep, second = name.strip().partition(" ")
        identifiers = {"prs_FirstName": first, "prs_SecondName": second.strip()}
    elif email:
        identifiers = {"prs_Email": email}
    elif phone:
        identifiers = {"prs_MobilePhone": phone}
    else:
        raise InvalidInput("give --name, --email or --phone")
    with _client(ctx) as client:
        cases = client.find_cases(identifiers)
    render(
        [{"case_id": c["case_id"], "name": c["name"], "state": c["state"]} for c in cases],
        fmt,
        columns=["case_id", "name", "state"],
    )


@app.command("close")
def close(ctx: typer.Context, case_id: str) -> None:
    """Close a case; its data stays, encrypted, until erased.

    \b
    Example:
      tessera case close 7c9e6679-7425-40de-944b-e07fc1f90ae7
    """
    with _client(ctx) as client:
        client.close_case(case_id)
    typer.echo(f"Closed {case_id}.")


@app.command("erase")
def erase(
    ctx: typer.Context,
    case_id: str,
    reason: Annotated[str, typer.Option(help="Why, for the audit log (no survivor data).")] = "",
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Erase a survivor by destroying their data key (irreversible). Admin only.

    \b
    Example:
      tessera case erase 7c9e6679-7425-40de-944b-e07fc1f90ae7 --reason "survivor asked for erasure"
    """
    if not yes and not typer.confirm(f"Erase case {case_id} for ever?"):
        raise typer.Exit(1)
    with _client(ctx) as client:
        erased = client.erase_case(case_id, reason)
    typer.echo(f"Erased {case_id}: its data key is destroyed.")
    if erased["same_survivor"]:
        typer.echo(
            f"Other cases with the same identifiers: {', '.join(erased['same_survivor'])}; "
            "erase them too if they are the same survivor."
        )


@app.command("need")
def need(
    ctx: typer.Context,
    case_id: str,
    category: Annotated[str, typer.Argument(help="A need category (docs/data-model.md).")],
    status: Annotated[
        str, typer.Argument(help="identified, referred, in_progress, met, unmet or declined.")
    ] = "identified",
) -> None:
    """Add a need to a case or change its status.

    \b
    Example:
      tessera case need 7c9e6679-7425-40de-944b-e07fc1f90ae7 legal_civil referred
    """
    from tessera.errors import InvalidInput
    from tessera.needs import NeedStatus

    if status not in {s.value for s in NeedStatus}:
        raise InvalidInput(
            f"unknown need status {status!r}", hint=", ".join(s.value for s in NeedStatus)
        )
    with _client(ctx) as client:
        client.set_need(case_id, _category(category), NeedStatus(status))
    typer.echo(f"{case_id}: {category} is {status}.")


class OnDuplicate(enum.StrEnum):
    """``--on-duplicate``: node.domain.DuplicatePolicy, without importing it for ``--help``."""

    SKIP = "skip"
    UPDATE = "update"
    NEW = "new"


@app.command("import")
def import_cases(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="An HTCDS .csv or .xlsx file.")],
    skip_bad_rows: Annotated[
        bool, typer.Option("--skip-bad-rows", help="Import the good rows anyway.")
    ] = False,
    rejects: Annotated[
        Path | None, typer.Option(help="Write refused rows here (CSV) with their errors.")
    ] = None,
    on_duplicate: Annotated[
        OnDuplicate,
        typer.Option(
            "--on-duplicate",
            help="A row that is the same survivor as a case the node has (or as a row above "
            "it): skip it, update the case with its values, or add it as a new case anyway.",
        ),
    ] = OnDuplicate.SKIP,
    report: Annotated[
        Path | None,
        typer.Option(help="Write what was done with each row here (CSV; ids, no survivor data)."),
    ] = None,
) -> None:
    """Import cases from an HTCDS spreadsheet. By default a file with any bad row imports nothing.

    Each row is matched to the node's cases (by the tessera_case_id column of an export, else by
    name plus birthdate, email or phone) and to the rows above it; a match is skipped unless
    --on-duplicate says otherwise. Every row's outcome is printed.

    \b
    Example:
      tessera case import intake.xlsx --skip-bad-rows --rejects intake-rejects.csv
      tessera case import cases-export.csv --on-duplicate update
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from node.domain import DuplicatePolicy
    from tessera.errors import InvalidInput

    with (
        _client(ctx) as client,
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            transient=True,
            console=_stderr_console(),
        ) as bar,
    ):
        task = bar.add_task(f"checking {file.name}", total=None)

        def progress(checked: int, written: int, total: int) -> None:
            if written:
                bar.update(task, description="writing", completed=written, total=total or None)
            else:
                bar.update(task, completed=checked, total=total or None)

        result = client.import_cases(
            file, skip_bad_rows, progress, DuplicatePolicy(on_duplicate.value)
        )
    for row, field_name, reason in result["problems"][:50]:
        typer.echo(f"row {row}, {field_name or 'row'}: {reason}", err=True)
    if len(result["problems"]) > 50:
        typer.echo(f"... and {len(result['problems']) - 50} more problems", err=True)
    if rejects is not None and result["rejected"]:
        from node.htcds.report import validate_file, write_rejects

        validated = validate_file(file)
        write_rejects(rejects, validated.header, validated.rejects())
        typer.echo(f"Refused rows written to {rejects}", err=True)
    for outcome in result["rows"]:
        typer.echo(_row_line(outcome))
    if report is not None:
        _write_report(report, result["rows"])
        typer.echo(f"What was done with each row written to {report}", err=True)
    summary = f"Imported {result['imported']} case(s); {result['rejected']} row(s) refused."
    typer.echo(f"{summary} {_matched_summary(result['rows'])}".rstrip())
    if result["rejected"] and not skip_bad_rows:
        raise InvalidInput(
            f"{file.name} has {result['rejected']} bad row(s), so nothing was imported",
            hint="fix the rows listed above, or pass --skip-bad-rows (with --rejects FILE)",
        )


_MATCHED_BY = {
    "case_id": "same tessera_case_id",
    "name_and_birthdate": "same name and birthdate",
    "name_and_email": "same name and email",
    "name_and_phone": "same name and phone",
    "name_nothing_new": "same name, and nothing in the row is new",
}


_ROW_LINES = {
    "added": "added case {case}",
    "updated": "updated case {case} ({changed}; {why})",
    "unchanged": "unchanged: case {case} already holds every value ({why})",
    "skipped": "skipped: duplicate of {matched} ({why})",
    "added_despite_match": "added case {case}, new despite match with {matched} ({why})",
    "erased": "skipped: case {case} was erased here and is not imported again",
    "not_updated": "not updated: {note} ({matched}; {why})",
}


def _row_line(outcome: Any) -> str:
    """One line of an import's report: what was done with the row, and why."""
    matched = ", ".join(f"case {c}" for c in outcome.matched_cases)
    if outcome.matched_row:
        matched += f", added from row {outcome.matched_row}"
    text = _ROW_LINES[outcome.action.value].format(
        case=outcome.case_id,
        changed=", ".join(outcome.changed_fields),
        why=_MATCHED_BY.get(outcome.match.value if outcome.match else "", ""),
        matched=matched,
        note=outcome.note,
    )
    return f"row {outcome.row}: {text}"


def _matched_summary(rows: list[Any]) -> str:
    words = {
        "skipped": "skipped as duplicates",
        "updated": "updated a case",
        "unchanged": "matched a case that already held them",
        "added_despite_match": "added despite a match",
        "erased": "named erased cases",
        "not_updated": "not updated",
    }
    counts = {key: sum(1 for r in rows if r.action.value == key) for key in words}
    parts = [f"{n} {words[key]}" for key, n in counts.items() if n]
    return f"Rows matched: {', '.join(parts)}." if parts else ""


def _write_report(path: Path, rows: list[Any]) -> None:
    import csv
    import io

    from tessera.files import atomic_write

    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(
        [
            "row",
            "action",
            "case_id",
            "match",
            "matched_case_ids",
            "matched_row",
            "changed_fields",
            "note",
        ]
    )
    for o in rows:
        writer.writerow(
            [
                o.row,
                o.action.value,
                o.case_id,
                o.match.value if o.match else "",
                ";".join(o.matched_cases),
                o.matched_row or "",
                ";".join(o.changed_fields),
                o.note,
            ]
        )
    atomic_write(path, text.getvalue().encode("utf-8"))


@app.command("export")
def export_cases(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="Where to write: .csv or .xlsx.")],
    state: Annotated[str | None, typer.Option(help="Only open or closed cases.")] = None,
) -> None:
    """Export cases as an HTCDS spreadsheet (admin only; audited).

    \b
    Example:
      tessera case export open-cases.xlsx --state open
    """
    import os

    from tessera.errors import InvalidInput

    fmt = file.suffix.lower().lstrip(".")
    if fmt not in {"csv", "xlsx"}:
        raise InvalidInput("export to a .csv or .xlsx file")
    tmp = file.with_name(file.name + ".part")
    total = 0
    with _client(ctx) as client:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            for data, cases in client.export_cases(fmt, state):
                out.write(data)
                total = cases
    os.replace(tmp, file)
    typer.echo(f"Exported {total} case(s) to {file}")


@app.command("disclosures")
def disclosures(ctx: typer.Context, case_id: str, fmt: OutputFormat = FORMAT_OPTION) -> None:
    """Who received what about this survivor, and when (accounting of disclosures).

    \b
    Example:
      tessera case disclosures 7c9e6679-7425-40de-944b-e07fc1f90ae7
    """
    with _client(ctx) as client:
        rows = client.disclosures(case_id)
    render(
        rows,
        fmt,
        columns=["at", "event", "recipient", "purpose", "fields", "by"],
        title=f"disclosures for {case_id}",
    )


def _category(value: str) -> Any:
    from tessera.errors import InvalidInput
    from tessera.needs import NeedCategory

    try:
        return NeedCategory(value)
    except ValueError:
        raise InvalidInput(
            f"unknown need category {value!r}", hint=", ".join(c.value for c in NeedCategory)
        ) from None


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)
