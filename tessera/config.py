"""Typed settings for a node or a broker, built once and passed explicitly.

A home directory (``--home`` or ``TESSERA_HOME``, like ``GNUPGHOME``) holds ``tessera.toml``
plus the keys, certificates and SQLite database. Settings come from that file, then from environment
overrides. No other module reads the environment: the CLI hands ``os.environ`` to :func:`load`.

Environment overrides (each wins over the file):

=============================  ==========================================
``TESSERA_DATABASE_URL``       database URL (SQLite file or PostgreSQL)
``TESSERA_LISTEN``             ``host:port`` the server binds
``TESSERA_BROKER``             broker address a node talks to
``TESSERA_ARGON2``             ``production`` or ``test-cheap`` (tests only)
``TESSERA_LOG_FORMAT``         ``json`` or ``text``
=============================  ==========================================
"""

from __future__ import annotations

import dataclasses
import enum
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from tessera.errors import ConfigError

CONFIG_FILE = "tessera.toml"
SQLITE_FILE = "tessera.db"


class Role(enum.StrEnum):
    """What a home directory belongs to."""

    NODE = "node"
    BROKER = "broker"


class Argon2Profile(enum.StrEnum):
    """Argon2id cost profile. ``test-cheap`` exists only so the test suite runs fast."""

    PRODUCTION = "production"
    TEST_CHEAP = "test-cheap"


class KekSource(enum.StrEnum):
    """Where a node's key-encryption key comes from (DESIGN.md section 5)."""

    PASSPHRASE = "passphrase"  # noqa: S105 - a mode name, not a password
    KEY_FILE = "key-file"


# Defaults, each defined here once: Settings, node.setup.NodeInit, broker.setup.BrokerInit and
# the `init` commands take them from here.

#: The address a node serves on unless its `init` is told otherwise.
NODE_LISTEN: Final = "127.0.0.1:7441"
#: The address a broker serves on unless its `init` is told otherwise.
BROKER_LISTEN: Final = "127.0.0.1:7440"
#: A configuration that names no address: any free port on loopback.
ANY_LISTEN: Final = "127.0.0.1:0"
#: No database URL: the embedded SQLite file in the home (``Settings.effective_database_url``).
EMBEDDED_DATABASE: Final = ""
#: No broker address (a node may be created before it enrols).
NO_BROKER: Final = ""
#: A node's key-encryption key comes from its passphrase unless a key file is chosen.
DEFAULT_KEK_SOURCE: Final = KekSource.PASSPHRASE
#: Argon2id at full cost; only the test suite asks for less.
DEFAULT_ARGON2: Final = Argon2Profile.PRODUCTION

OUTBOX_BATCH = 100
"""Envelopes a node pushes in one Relay.SendBatch call, at most; every broker accepts that many."""


@dataclass(frozen=True)
class Limits:
    """Safety limits, named in one place rather than scattered as literals."""

    max_message_bytes: int = 64 * 1024 * 1024
    # The largest request a broker accepts (a node pushes at most 4 MiB of envelopes a call);
    # replies, such as a batch of deliveries, may be up to max_message_bytes.
    max_request_bytes: int = 16 * 1024 * 1024
    max_envelope_bytes: int = 1024 * 1024
    replay_window_seconds: int = 300
    rpc_deadline_seconds: float = 30.0
    envelope_retention_days: int = 30
    delivery_lease_seconds: float = 30.0
    sends_per_minute: int = 6000
    max_send_batch: int = 500  # envelopes in one Relay.SendBatch call, at least OUTBOX_BATCH

    def __post_init__(self) -> None:
        if self.max_send_batch < OUTBOX_BATCH:
            raise ValueError(
                f"max_send_batch must be at least {OUTBOX_BATCH} (nodes push that many envelopes "
                "in one call)"
            )


@dataclass(frozen=True)
class StatsPolicy:
    """A node's own rules for statistics rounds (``[stats]`` in tessera.toml): the node, not the
    broker, decides what it takes part in (DESIGN.md section 7; docs/privacy.md)."""

    # The least threshold of a private round this node submits to, whatever the broker asks.
    min_threshold: int = 2
    # Agencies that count toward a round's threshold besides those verified with `agency verify`.
    trusted_agencies: tuple[str, ...] = ()
    # ε this node may spend per period ("YYYY-MM"), over every round of that period.
    budget_cap: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.min_threshold, int) or self.min_threshold < 1:
            raise ValueError("stats.min_threshold must be a positive integer")
        if not all(isinstance(a, str) and a for a in self.trusted_agencies):
            raise ValueError("stats.trusted_agencies must be a list of agency ids")
        cap = self.budget_cap
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 0 < cap < 1e6:
            raise ValueError("stats.budget_cap must be a positive number")


@dataclass(frozen=True)
class Settings:
    """Everything a node or broker process needs to know, resolved against its home."""

    home: Path
    role: Role
    name: str
    region: str = ""
    listen: str = ANY_LISTEN
    database_url: str = EMBEDDED_DATABASE
    broker: str = NO_BROKER
    kek_source: KekSource = DEFAULT_KEK_SOURCE
    key_file: Path | None = None
    argon2: Argon2Profile = DEFAULT_ARGON2
    log_format: str = "auto"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    metrics_port: int = 0
    backup_root: Path | None = None
    limits: Limits = field(default_factory=Limits)
    stats: StatsPolicy = field(default_factory=StatsPolicy)

    @property
    def effective_database_url(self) -> str:
        """The configured URL, or the embedded SQLite file inside the home directory."""
        return self.database_url or f"sqlite:///{self.home / SQLITE_FILE}"

    @property
    def backups_path(self) -> Path:
        """The folder every backup the Backup call writes goes under (HOME/backups unless set)."""
        return self.backup_root or self.home / "backups"

    @property
    def cert_path(self) -> Path:
        """The TLS certificate this server presents (self-signed at init unless configured)."""
        return self.tls_cert or self.home / "tls" / "server.crt"

    @property
    def key_path(self) -> Path:
        """The private key matching :attr:`cert_path`."""
        return self.tls_key or self.home / "tls" / "server.key"


_ENV_OVERRIDES: dict[str, str] = {
    "TESSERA_DATABASE_URL": "database_url",
    "TESSERA_LISTEN": "listen",
    "TESSERA_BROKER": "broker",
    "TESSERA_ARGON2": "argon2",
    "TESSERA_LOG_FORMAT": "log_format",
}

_PATH_FIELDS = {"key_file", "tls_cert", "tls_key", "backup_root"}


def resolve_home(explicit: Path | None, environ: Mapping[str, str]) -> Path:
    """The home directory: ``--home`` if given, else ``TESSERA_HOME``, else ``~/.tessera``."""
    if explicit is not None:
        return explicit.expanduser().resolve()
    if environ.get("TESSERA_HOME"):
        return Path(environ["TESSERA_HOME"]).expanduser().resolve()
    return (Path.home() / ".tessera").resolve()


def load(home: Path, environ: Mapping[str, str]) -> Settings:
    """Read ``home/tessera.toml`` and apply environment overrides.

    Raises ConfigError naming the file and the bad key, so an administrator knows what to fix.
    """
    path = home / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(
            f"no Tessera configuration in {home}",
            hint="run `tessera node init` or `tessera broker init`, or pass --home / TESSERA_HOME",
        )
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}", hint="fix or restore the file") from exc
    values: dict[str, Any] = dict(raw.get("tessera", {}))
    limits_raw: dict[str, Any] = dict(raw.get("limits", {}))
    stats_raw: dict[str, Any] = dict(raw.get("stats", {}))
    for env_name, key in _ENV_OVERRIDES.items():
        if environ.get(env_name):
            values[key] = environ[env_name]
    return _build(home, path, values, limits_raw, stats_raw)


def _stats_policy(path: Path, raw: dict[str, Any]) -> StatsPolicy:
    known = {f.name for f in dataclasses.fields(StatsPolicy)}
    if set(raw) - known:
        bad = ", ".join(sorted(set(raw) - known))
        raise ConfigError(
            f"{path}: unknown [stats] setting(s) {bad}", hint="see docs/configuration.md"
        )
    if "trusted_agencies" in raw:
        if not isinstance(raw["trusted_agencies"], list):
            raise ConfigError(f"{path}: stats.trusted_agencies must be a list of agency ids")
        raw["trusted_agencies"] = tuple(raw["trusted_agencies"])
    cap = raw.get("budget_cap")
    if isinstance(cap, int) and not isinstance(cap, bool):
        raw["budget_cap"] = float(cap)
    try:
        return StatsPolicy(**raw)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}", hint="see docs/configuration.md") from exc


def _build(
    home: Path,
    path: Path,
    values: dict[str, Any],
    limits_raw: dict[str, Any],
    stats_raw: dict[str, Any] | None = None,
) -> Settings:
    policy = _stats_policy(path, dict(stats_raw or {}))
    known = {f.name for f in dataclasses.fields(Settings)} - {"home", "limits", "stats"}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(
            f"{path}: unknown setting(s) {', '.join(sorted(unknown))}",
            hint=f"known settings: {', '.join(sorted(known))}",
        )
    known_limits = {f.name for f in dataclasses.fields(Limits)}
    if set(limits_raw) - known_limits:
        bad = ", ".join(sorted(set(limits_raw) - known_limits))
        raise ConfigError(f"{path}: unknown limit(s) {bad}", hint="see docs/configuration.md")
    try:
        for key in _PATH_FIELDS & set(values):
            values[key] = (home / str(values[key])).resolve()
        if "role" not in values or "name" not in values:
            raise ConfigError(f"{path}: `role` and `name` are required", hint="re-run init")
        values["role"] = Role(values["role"])
        if "kek_source" in values:
            values["kek_source"] = KekSource(values["kek_source"])
        if "argon2" in values:
            values["argon2"] = Argon2Profile(values["argon2"])
        if "metrics_port" in values:
            values["metrics_port"] = int(values["metrics_port"])
        return Settings(home=home, limits=Limits(**limits_raw), stats=policy, **values)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: {exc}", hint="see docs/configuration.md") from exc


def write(settings: Settings) -> Path:
    """Write ``settings`` to ``home/tessera.toml`` (used by init); returns the path."""
    lines = [
        "# Tessera settings. Environment variables override these; see docs/configuration.md.",
        "[tessera]",
    ]
    for f in dataclasses.fields(Settings):
        if f.name in {"home", "limits", "stats"}:
            continue
        value = getattr(settings, f.name)
        if value is None or value == "":
            continue
        if isinstance(value, Path):
            value = str(value)
        lines.append(f"{f.name} = {_toml_value(value)}")
    if settings.role is Role.NODE:
        policy = settings.stats
        trusted = ", ".join(_toml_value(a) for a in policy.trusted_agencies)
        lines += [
            "",
            "# This node's own rules for statistics rounds (docs/privacy.md).",
            "[stats]",
            "# A private round whose threshold is below this is refused, whatever the broker asks.",
            f"min_threshold = {policy.min_threshold}",
            "# Agencies counted toward a round's threshold besides those verified out of band.",
            f"trusted_agencies = [{trusted}]",
            "# Privacy budget (epsilon) this node spends per month, over every round.",
            f"budget_cap = {policy.budget_cap!r}",
        ]
    path = settings.home / CONFIG_FILE
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
