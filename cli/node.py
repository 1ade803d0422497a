"""``tessera node``: create, run and administer an agency node (issue 4)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cli import context
from cli.output import FORMAT_OPTION, OutputFormat, render, render_one

if TYPE_CHECKING:
    from tessera import credential as credential_mod

app = typer.Typer(no_args_is_help=True)
staff_app = typer.Typer(no_args_is_help=True, help="Manage who may use this node.")
audit_app = typer.Typer(no_args_is_help=True, help="Check and read the node's audit log.")
app.add_typer(staff_app, name="staff")
credential_app = typer.Typer(no_args_is_help=True, help="Look after your own staff credential.")
app.add_typer(audit_app, name="audit")
app.add_typer(credential_app, name="credential")


@app.command("init")
def init(
    ctx: typer.Context,
    name: Annotated[str, typer.Option(help="The agency's name, as other agencies will see it.")],
    region: Annotated[str, typer.Option(help="The region whose broker this node joins.")] = "",
    admin: Annotated[str, typer.Option(help="Name of the first administrator.")] = "admin",
    listen: Annotated[str, typer.Option(help="host:port to serve on (loopback by default).")] = (
        "127.0.0.1:7441"
    ),
    database_url: Annotated[
        str, typer.Option(help="PostgreSQL URL; default: SQLite file in the home.")
    ] = "",
    key_file: Annotated[
        Path | None,
        typer.Option(
            help="Protect the node with this key file (created if missing) instead of a passphrase."
        ),
    ] = None,
) -> None:
    """Create a node in --home: keys, key-encryption key, config, database, TLS, first admin.

    The passphrase comes from TESSERA_PASSPHRASE or a prompt, never from the command line.

    \b
    Example:
      TESSERA_HOME=~/shelter tessera node init --name "Harbour Shelter" --region north
    """
    from node.setup import NodeInit, init_node
    from tessera.config import Argon2Profile, KekSource

    cli = context.get(ctx)
    source = KekSource.KEY_FILE if key_file else KekSource.PASSPHRASE
    passphrase = None if key_file else cli.passphrase(confirm=True, purpose="new node passphrase")
    profile = Argon2Profile(cli.environ.get("TESSERA_ARGON2", Argon2Profile.PRODUCTION.value))
    settings = init_node(
        NodeInit(
            home=cli.home,
            name=name,
            region=region,
            admin_name=admin,
            listen=listen,
            database_url=database_url,
            kek_source=source,
            key_file=key_file.resolve() if key_file else None,
            argon2=profile,
        ),
        passphrase,
    )
    typer.echo(f"Node {settings.name!r} created in {settings.home}")
    typer.echo(f"Start it with: tessera --home {settings.home} node serve")


@app.command("serve")
def serve(ctx: typer.Context) -> None:
    """Run the node's gRPC server until interrupted (Ctrl-C or SIGTERM).

    \b
    Example:
      TESSERA_HOME=~/shelter tessera node serve
    """
    import asyncio

    from node.server import serve_until_signalled
    from tessera import config, logs
    from tessera.config import KekSource

    cli = context.get(ctx)
    settings = config.load(cli.home, cli.environ)
    logs.configure(settings.log_format)
    passphrase = cli.passphrase() if settings.kek_source is KekSource.PASSPHRASE else None
    asyncio.run(serve_until_signalled(settings, passphrase))


@app.command("enrol")
def enrol(
    ctx: typer.Context,
    code: Annotated[str, typer.Argument(help="The enrolment code from the broker operator.")],
    services: Annotated[
        list[str] | None, typer.Option("--service", help="A need category you serve; repeat.")
    ] = None,
) -> None:
    """Enrol this node with its regional broker (one-time code from `tessera broker enrol-token`).

    The broker's TLS certificate is accepted only if it matches the code; the node registers its
    public keys and pins the broker's signing key. Prints this node's fingerprint to compare.

    \b
    Example:
      tessera node enrol "$(cat enrol-code.txt)" --service safe_housing --service legal_civil
    """
    from node import directory_sync
    from node.keyring import open_keyring
    from tessera import config
    from tessera.config import KekSource

    cli = context.get(ctx)
    settings = config.load(cli.home, cli.environ)
    passphrase = cli.passphrase() if settings.kek_source is KekSource.PASSPHRASE else None
    keyring = open_keyring(settings.home, passphrase)
    link = directory_sync.enrol(
        settings.home, keyring.identity, code, settings.name, services or []
    )
    typer.echo(
        f"Enrolled as {link.agency_id} in region {link.region} with the broker at {link.address}."
    )
    typer.echo(f"This node's fingerprint: {keyring.identity.public.fingerprint()}")


@app.command("status")
def status(ctx: typer.Context, fmt: OutputFormat = FORMAT_OPTION) -> None:
    """Show who and where this node is, its key fingerprint and your role.

    \b
    Example:
      tessera node status --format json
    """
    with context.get(ctx).node_client() as client:
        render_one(client.status(), fmt, title="node")


@app.command("rotate-kek")
def rotate_kek(
    ctx: typer.Context,
    key_file: Annotated[Path | None, typer.Option(help="Switch to this new key file.")] = None,
) -> None:
    """Protect the node with a new passphrase (TESSERA_NEW_PASSPHRASE or prompt) or key file.

    Only the keyring is re-wrapped; no record is re-encrypted. Admin only. A new passphrase
    must be strong (zxcvbn's top score; exit 7 otherwise). Run in the node's own home, the
    administrator's credential there is re-locked with the new passphrase or key file too.

    \b
    Example:
      tessera node rotate-kek --key-file /media/usb/harbour-shelter.key
    """
    from node.keyring import KEYRING_FILE
    from tessera import credential, passphrases

    cli = context.get(ctx)
    new_pass = None
    if key_file is None:
        new_pass = cli.new_passphrase("new node passphrase")
    new_key_file = key_file.resolve() if key_file else None
    with cli.node_client() as client:
        held = client.credential
        if new_pass is not None:
            # As the credential re-lock below will check it: refused before anything changes.
            passphrases.require_strong(new_pass, context=(held.name,), what="node passphrase")
        current = _current_node_passphrase(cli)
        count = client.rotate_kek(new_pass, new_key_file, current)
    typer.echo(f"Key-encryption key replaced; {count} keys re-wrapped, no record re-encrypted.")
    if (cli.home / KEYRING_FILE).exists():
        # In the node's home the administrator's credential follows the node's KEK.
        credential.write(cli.home, held, _node_lock(cli, new_pass, new_key_file), replace=True)
        typer.echo(f"The credential in {cli.home} is now locked the same way.")


@app.command("rotate-keys")
def rotate_keys(ctx: typer.Context) -> None:
    """Replace this agency's signing and encryption keys; the old key signs the change.

    Run on the node's host with the node stopped (exit 9 while it serves) and its broker
    reachable. Peers pin the new keys at their next directory sync; the old keys are kept,
    retired, so referrals already on their way and everything the node sealed to itself still
    open. From now on the broker refuses the old key. Take a new backup afterwards.

    \b
    Example:
      tessera node rotate-keys
    """
    from node.rotation import rotate_agency_keys
    from tessera import config
    from tessera.config import KekSource
    from tessera.credential import lock_stopped_home

    cli = context.get(ctx)
    settings = config.load(cli.home, cli.environ)
    with lock_stopped_home(settings.home):
        passphrase = cli.passphrase() if settings.kek_source is KekSource.PASSPHRASE else None
        done = rotate_agency_keys(settings, passphrase)
    verb = "Finished the interrupted rotation" if done.resumed else "Rotated the keys"
    typer.echo(f"{verb} of {done.agency_id}.")
    typer.echo(f"  old fingerprint (retired): {done.old_fingerprint}")
    typer.echo(f"  new fingerprint:           {done.new_fingerprint}")
    typer.echo(
        "Tell each partner agency the new fingerprint by phone; they check it with "
        f"`tessera agency verify {done.agency_id} --fingerprint ...` after their next sync. "
        "Take a new backup now (`tessera node backup`): older ones carry the old keys."
    )


@app.command("re-enrol")
def re_enrol(
    ctx: typer.Context,
    code: Annotated[str, typer.Argument(help="A new enrolment code, for a new agency id.")],
    services: Annotated[
        list[str] | None,
        typer.Option("--service", help="A need category you serve; repeat (default: as before)."),
    ] = None,
) -> None:
    """Recover from a stolen agency key: enrol this node under a new agency id with new keys.

    For when the broker operator has revoked the agency (its key was taken over). Run with the
    node stopped. Cases, staff, referrals received and the audit log stay; every erasure and
    staff removal goes into the new agency's escrow. Partners verify the new fingerprint by
    phone (docs/operations.md, "A compromised agency key").

    \b
    Example:
      tessera node re-enrol "$(cat new-enrol-code.txt)"
    """
    from node.rotation import re_enrol as re_enrol_node
    from tessera import config
    from tessera.config import KekSource
    from tessera.credential import lock_stopped_home

    cli = context.get(ctx)
    settings = config.load(cli.home, cli.environ)
    with lock_stopped_home(settings.home):
        passphrase = cli.passphrase() if settings.kek_source is KekSource.PASSPHRASE else None
        done = re_enrol_node(settings, passphrase, code, services or [])
    typer.echo(f"Enrolled again as {done.agency_id}, with new keys.")
    typer.echo(f"  new fingerprint: {done.new_fingerprint}")
    typer.echo(
        "Call each partner agency: they check it with "
        f"`tessera agency verify {done.agency_id} --fingerprint ...`. "
        "Take a new backup now (`tessera node backup`)."
    )


def _current_node_passphrase(cli: context.CliContext) -> str | None:
    # The node checks it before re-locking: a stolen administrator credential is not enough.
    # In the node's own home it is the passphrase already given; elsewhere it is asked for.
    from node.keyring import KEYRING_FILE, read_spec
    from tessera.config import KekSource

    if (cli.home / KEYRING_FILE).exists():
        if read_spec(cli.home).source is not KekSource.PASSPHRASE:
            return None
        return cli.passphrase()
    import getpass
    import sys

    from tessera.errors import ConfigError

    # Here TESSERA_PASSPHRASE opens the administrator's own credential, not the node.
    given = cli.environ.get("TESSERA_NODE_PASSPHRASE")
    if given:
        return given
    if not sys.stdin.isatty():
        raise ConfigError(
            "the node's current passphrase is needed and there is no terminal to ask on",
            hint="set TESSERA_NODE_PASSPHRASE, or run the command in the node's own home",
        )
    return getpass.getpass("the node's current passphrase: ")


def _node_lock(
    cli: context.CliContext, passphrase: str | None, key_file: Path | None
) -> credential_mod.Lock:
    from node.keyring import argon2_params
    from tessera import credential
    from tessera.config import Argon2Profile

    if key_file is not None:
        return credential.KeyFileLock(key_file)
    assert passphrase is not None
    profile = Argon2Profile(cli.environ.get("TESSERA_ARGON2", Argon2Profile.PRODUCTION.value))
    return credential.PassphraseLock(passphrase, argon2_params(profile))


@app.command("backup")
def backup(
    ctx: typer.Context,
    destination: Annotated[
        Path | None,
        typer.Option(
            help="Folder on the node's host, inside its backup root (backup_root in its "
            "tessera.toml, default HOME/backups); a relative name is taken under the root."
        ),
    ] = None,
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """Write an encrypted backup of the node's store on the node's host. Admin only.

    \b
    Example:
      tessera node backup --destination nightly
    """
    with context.get(ctx).node_client() as client:
        made = client.backup(destination)
    render_one(made, fmt, title="backup")


@app.command("restore")
def restore(
    ctx: typer.Context,
    backup_file: Annotated[Path, typer.Argument(help="A .tbk file made by `node backup`.")],
) -> None:
    """Restore a backup into this (stopped) node; erasures made since are applied again.

    Needs the passphrase (or key file) that protected the node when the backup was taken. An
    enrolled node also needs its broker: the restore first fetches the node's escrowed erasures
    and audit checkpoint, and restores nothing if it cannot. The audit log is kept (the restore
    is one more entry in it).
    Refused (exit 9) while a node serves from this home; a run file left by a node that crashed
    is recognised as stale and removed.

    \b
    Example:
      tessera node restore /srv/backups/tessera-backup-20261020T020000000000Z.tbk
    """
    from node import backup as backup_mod
    from node import keyring as keyring_mod
    from node.store.database import open_database
    from tessera import config
    from tessera.credential import lock_stopped_home

    cli = context.get(ctx)
    settings = config.load(cli.home, cli.environ)
    # Held until the restore is done: no node serves now, and none can start halfway through.
    with lock_stopped_home(settings.home) as lock:
        if lock.stale_run_file:
            typer.echo("A run file left by a node that stopped without cleaning up was removed.")
        document = backup_mod.peek_keyring(backup_file)
        passphrase = cli.passphrase() if document.get("kek_source") == "passphrase" else None
        # The backup's keyring is this node's: it lets an upgrade seal what an older version
        # stored in clear (node.store.database).
        keyring = keyring_mod.open_document(document, passphrase)
        engine = open_database(settings.effective_database_url, keyring)
        try:
            again = backup_mod.restore_backup(settings.home, engine, backup_file, passphrase)
        finally:
            engine.dispose()
    typer.echo(f"Restored {backup_file.name}; {again} erased survivor(s) erased again.")


@staff_app.command("add")
def staff_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The person's name.")],
    out_home: Annotated[
        Path, typer.Option(help="Folder to create the person's credential in (their --home).")
    ],
    role: Annotated[str, typer.Option(help="admin or caseworker.")] = "caseworker",
    key_file: Annotated[
        Path | None,
        typer.Option(help="Lock the credential with this key file (created if missing)."),
    ] = None,
) -> None:
    """Issue a staff credential: a new key pair in OUT_HOME; only its public key goes to the node.

    Its secret key is locked by a passphrase, from TESSERA_NEW_PASSPHRASE or asked twice (let
    the person type it), or by a key file. The passphrase must be strong (exit 7 otherwise); the
    person then opens the credential with TESSERA_PASSPHRASE or at the prompt.

    \b
    Example:
      tessera node staff add "Ana Ruiz" --role caseworker --out-home /media/usb/ana
    """
    from node.domain import StaffRole
    from tessera import credential, crypto, passphrases
    from tessera.errors import InvalidInput

    if role not in {r.value for r in StaffRole}:
        raise InvalidInput(f"unknown role {role!r}", hint="admin or caseworker")
    cli = context.get(ctx)
    new_pass = None
    if key_file is None:
        new_pass = cli.new_passphrase(f"passphrase for {name}'s credential")
        # Checked here too, so a weak one leaves nothing registered at the node.
        passphrases.require_strong(new_pass, context=(name,), what="credential passphrase")
    lock = _node_lock(cli, new_pass, key_file.resolve() if key_file else None)
    identity = crypto.Identity.generate()
    with cli.node_client() as client:
        member = client.add_staff(name, StaffRole(role), identity.public.signing_key)
        address = client.address
        certificate = client.credential.node_certificate
    credential.write(
        out_home.resolve(),
        credential.Credential(
            name=name, identity=identity, node_address=address, node_certificate=certificate
        ),
        lock,
    )
    typer.echo(
        f"{member['name']} ({member['role']}) can now use the node with --home {out_home.resolve()}"
    )


@staff_app.command("remove")
def staff_remove(ctx: typer.Context, name: Annotated[str, typer.Argument()]) -> None:
    """Revoke a staff member's credential; it stops working at once.

    \b
    Example:
      tessera node staff remove "Ana Ruiz"
    """
    with context.get(ctx).node_client() as client:
        member = client.remove_staff(name)
    typer.echo(f"Removed {member['name']}.")


@staff_app.command("list")
def staff_list(
    ctx: typer.Context,
    removed: Annotated[bool, typer.Option("--removed", help="Include removed staff.")] = False,
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """List the node's staff.

    \b
    Example:
      tessera node staff list --removed
    """
    with context.get(ctx).node_client() as client:
        rows = client.list_staff(include_removed=removed)
    render(rows, fmt, columns=["name", "role", "added_at", "removed_at", "staff_id"])


@credential_app.command("protect")
def credential_protect(
    ctx: typer.Context,
    key_file: Annotated[
        Path | None,
        typer.Option(help="Lock it with this key file (created if missing) instead."),
    ] = None,
) -> None:
    """Lock the staff credential in --home with a new passphrase or a key file.

    Locks a credential that holds its secret key in clear, or changes the passphrase of one
    that is locked (its current passphrase from TESSERA_PASSPHRASE or a prompt; the new one from
    TESSERA_NEW_PASSPHRASE or asked twice). Works offline: the node is not contacted.

    \b
    Example:
      TESSERA_HOME=/media/usb/ana tessera node credential protect
    """
    from tessera import credential

    cli = context.get(ctx)
    held = credential.read(cli.home, cli.credential_passphrase)
    new_pass = None if key_file else cli.new_passphrase("new credential passphrase")
    lock = _node_lock(cli, new_pass, key_file.resolve() if key_file else None)
    credential.write(cli.home, held, lock, replace=True)
    typer.echo(f"The credential of {held.name} in {cli.home} is locked.")


@audit_app.command("verify")
def audit_verify(ctx: typer.Context, fmt: OutputFormat = FORMAT_OPTION) -> None:
    """Check every link and signature of the audit log; exit 11 if it was tampered with.

    \b
    Example:
      tessera node audit verify --format json
    """
    from tessera.errors import CryptoError

    with context.get(ctx).node_client() as client:
        report = client.verify_audit()
    render_one(report, fmt, title="audit log")
    if fmt is OutputFormat.TABLE:
        for note in report["notes"]:
            typer.echo(f"note: {note}", err=True)
    if not report["intact"]:
        raise CryptoError(
            "the audit log was tampered with",
            hint="see the problems above; restore from a backup and investigate",
        )


@audit_app.command("show")
def audit_show(
    ctx: typer.Context,
    case: Annotated[str, typer.Option("--case", help="Only entries about this case id.")] = "",
    actor: Annotated[
        str, typer.Option(help='Only entries by this actor: a staff name, or "system:restore".')
    ] = "",
    since: Annotated[
        str, typer.Option(help="Only entries from this moment: YYYY-MM-DD or an ISO time (UTC).")
    ] = "",
    action: Annotated[
        list[str] | None, typer.Option("--action", help="Only this action (case.read...); repeat.")
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many entries (0: all).")] = 0,
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """Show audit log entries, oldest first: who opened this case, and when. Admin only.

    Entries hold who acted, what they did, on which case and when, with counts and field names,
    never a survivor's data.

    \b
    Example:
      tessera node audit show --case 7c9e6679-7425-40de-944b-e07fc1f90ae7 --action case.read
    """
    import datetime as dt

    from tessera.errors import InvalidInput

    moment = None
    if since:
        try:
            moment = dt.datetime.fromisoformat(since)
        except ValueError:
            raise InvalidInput(f"{since!r} is not a date or time", hint="YYYY-MM-DD") from None
        moment = moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
    with context.get(ctx).node_client() as client:
        rows = client.audit_entries(case, actor, moment, action or [], limit)
    render(
        rows,
        fmt,
        columns=["seq", "at", "actor", "action", "case_id", "detail"],
        title="audit log",
    )
