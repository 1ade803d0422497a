"""Creating a node's home: config, keyring, TLS certificate, database, first administrator.

``tessera node init`` calls :func:`init_node`; so do the demo and the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from node import keyring
from node.domain import StaffRole
from node.store.cases import NodeStore
from node.store.database import open_database
from tessera import config, credential, crypto, tls
from tessera.config import Argon2Profile, KekSource, Role, Settings
from tessera.errors import ConfigError


@dataclass(frozen=True)
class NodeInit:
    """What ``node init`` needs to know (defaults from :mod:`tessera.config`)."""

    home: Path
    name: str
    region: str
    admin_name: str = "admin"
    listen: str = config.NODE_LISTEN
    database_url: str = config.EMBEDDED_DATABASE
    broker: str = config.NO_BROKER
    kek_source: KekSource = config.DEFAULT_KEK_SOURCE
    key_file: Path | None = None
    argon2: Argon2Profile = config.DEFAULT_ARGON2


def init_node(spec: NodeInit, passphrase: str | None) -> Settings:
    """Create everything a node needs in ``spec.home``; refuses a home already in use."""
    home = spec.home
    if (home / config.CONFIG_FILE).exists():
        raise ConfigError(
            f"{home} already holds a Tessera configuration",
            hint="choose another --home, or use the node that is there",
        )
    if not spec.name.strip():
        raise ConfigError("the agency needs a name", hint="pass --name")
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    settings = Settings(
        home=home,
        role=Role.NODE,
        name=spec.name.strip(),
        region=spec.region.strip(),
        listen=spec.listen,
        database_url=spec.database_url,
        broker=spec.broker,
        kek_source=spec.kek_source,
        key_file=spec.key_file,
        argon2=spec.argon2,
    )
    kek_spec = keyring.new_kek_spec(spec.kek_source, spec.argon2, spec.key_file)
    ring = keyring.create(
        home, kek_spec, passphrase, context=(spec.name, spec.admin_name, spec.region)
    )
    tls.create_self_signed(settings.cert_path, settings.key_path, spec.name)
    engine = open_database(settings.effective_database_url, ring)
    try:
        admin = crypto.Identity.generate()
        NodeStore(engine, ring, home).add_staff(
            "system:init", spec.admin_name, StaffRole.ADMIN, admin.public.signing_key
        )
    finally:
        engine.dispose()
    # The first administrator's credential sits in the node's own home: it is locked the way
    # the node is, by the node's passphrase (with a salt of its own) or by its key file.
    lock: credential.Lock
    if spec.kek_source is KekSource.PASSPHRASE and passphrase:
        lock = credential.PassphraseLock(passphrase, keyring.argon2_params(spec.argon2))
    elif spec.key_file is not None:
        lock = credential.KeyFileLock(spec.key_file)
    else:
        raise ConfigError("no passphrase or key file to protect the node with", hint="see --help")
    credential.write(
        home,
        credential.Credential(
            name=spec.admin_name,
            identity=admin,
            node_address=spec.listen,
            node_certificate=settings.cert_path.read_bytes(),
        ),
        lock,
    )
    config.write(settings)  # last: a home with a config file is a finished one
    return settings
