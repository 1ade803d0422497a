"""Creating a broker's home: config, identity, TLS certificate, database, first operator."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from broker import identity as broker_identity
from broker.identity import BrokerRole, Operator
from broker.store.database import open_database
from tessera import config, credential, crypto, tls
from tessera.config import Role, Settings
from tessera.errors import ConfigError


@dataclass(frozen=True)
class BrokerInit:
    """What ``broker init`` needs to know (defaults from :mod:`tessera.config`)."""

    home: Path
    name: str
    region: str
    operator_name: str = "operator"
    listen: str = config.BROKER_LISTEN
    database_url: str = config.EMBEDDED_DATABASE


def init_broker(spec: BrokerInit) -> Settings:
    """Create everything a broker needs in ``spec.home``; refuses a home already in use."""
    home = spec.home
    if (home / config.CONFIG_FILE).exists():
        raise ConfigError(
            f"{home} already holds a Tessera configuration", hint="choose another --home"
        )
    if not spec.region.strip():
        raise ConfigError("a broker serves one region", hint="pass --region")
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    settings = Settings(
        home=home,
        role=Role.BROKER,
        name=spec.name,
        region=spec.region,
        listen=spec.listen,
        database_url=spec.database_url,
    )
    broker_identity.create_identity(home)
    tls.create_self_signed(settings.cert_path, settings.key_path, spec.name)
    open_database(settings.effective_database_url).dispose()
    operator = crypto.Identity.generate()
    broker_identity.add_operator(
        home,
        Operator(
            spec.operator_name,
            BrokerRole.OPERATOR,
            operator.public.signing_key,
            added_at=dt.datetime.now(dt.UTC).replace(microsecond=0),
        ),
    )
    credential.write(
        home,
        credential.Credential(
            name=spec.operator_name,
            identity=operator,
            node_address=spec.listen,
            node_certificate=settings.cert_path.read_bytes(),
        ),
        lock=None,  # the broker keeps no passphrase; its home is the operator's (issue 14)
    )
    config.write(settings)
    return settings
