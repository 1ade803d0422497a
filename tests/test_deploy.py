"""deploy/ holds what it claims: this machine has no container engine, so the files are checked.

The compose file is parsed by a small strict reader of the YAML subset it is written in (block
mappings and lists, plain or quoted scalars, comments); anything outside that subset fails the test
rather than being guessed at. Every ``tessera`` command that deploy/ or docs/operations.md shows is
run with ``--help`` through the installed console script. The container entrypoint script is run
for real against temporary homes.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from node.keyring import open_keyring
from tessera import config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
ENTRYPOINT = DEPLOY / "docker-entrypoint.sh"
UNITS = {
    "node": DEPLOY / "systemd/tessera-node.service",
    "broker": DEPLOY / "systemd/tessera-broker.service",
}
OPERATIONS = ROOT / "docs/operations.md"
TESSERA = Path(sys.executable).parent / "tessera"
BROKER_PORT, NODE_PORT = 7440, 7441  # the defaults `broker init` / `node init` listen on
IMAGE = "tessera:0.1.0"
ENTRY = "tessera-entrypoint"
SECRET_NAMES = ("TESSERA_PASSPHRASE", "TESSERA_NEW_PASSPHRASE", "PGPASSWORD", "POSTGRES_PASSWORD")


# --- a strict reader for the YAML subset compose.yaml uses ----------------------------------


class YamlSubsetError(ValueError):
    pass


def _scalar(text: str, where: int) -> str:
    text = text.strip()
    if text[:1] in {'"', "'"}:
        if len(text) < 2 or text[-1] != text[0]:
            raise YamlSubsetError(f"line {where}: unterminated quoted scalar")
        return text[1:-1]
    if text[:1] in set("[]{}&*!|>%@`"):
        raise YamlSubsetError(f"line {where}: {text!r} is outside the supported subset")
    return text


def parse_yaml_subset(source: str) -> Any:
    lines: list[tuple[int, int, str]] = []
    for number, raw in enumerate(source.splitlines(), 1):
        if "\t" in raw:
            raise YamlSubsetError(f"line {number}: tab character")
        stripped = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if stripped.strip():
            lines.append((number, len(stripped) - len(stripped.lstrip()), stripped.strip()))
    position = 0

    def block(indent: int) -> Any:
        nonlocal position
        number, first_indent, first = lines[position]
        if first_indent != indent:
            raise YamlSubsetError(f"line {number}: unexpected indentation")
        if first.startswith("- ") or first == "-":
            items: list[Any] = []
            while position < len(lines) and lines[position][1] == indent:
                number, _, text = lines[position]
                if not text.startswith("- "):
                    raise YamlSubsetError(f"line {number}: mixed list and mapping")
                items.append(_scalar(text[2:], number))
                position += 1
            return items
        mapping: dict[str, Any] = {}
        while position < len(lines) and lines[position][1] == indent:
            number, _, text = lines[position]
            key, colon, rest = text.partition(":")
            if not colon or not key or key.startswith("- ") or (rest and not rest.startswith(" ")):
                raise YamlSubsetError(f"line {number}: expected `key: value`")
            if key in mapping:
                raise YamlSubsetError(f"line {number}: duplicate key {key!r}")
            position += 1
            if rest.strip():
                mapping[key] = _scalar(rest, number)
            elif position < len(lines) and lines[position][1] > indent:
                mapping[key] = block(lines[position][1])
            else:
                mapping[key] = None
        if position < len(lines) and lines[position][1] > indent:
            raise YamlSubsetError(f"line {lines[position][0]}: unexpected indentation")
        return mapping

    document = block(0)
    if position != len(lines):
        raise YamlSubsetError(f"line {lines[position][0]}: unexpected dedent")
    return document


def test_the_subset_reader_refuses_what_it_does_not_understand() -> None:
    assert parse_yaml_subset("a:\n  b: 'x y'\n  c:\n    - 1\n    - two\nd:\n") == {
        "a": {"b": "x y", "c": ["1", "two"]},
        "d": None,
    }
    for bad in (
        "a: [1, 2]\n",
        "a: &x 1\n",
        "a: 1\na: 2\n",
        "a:\n  - 1\n  b: 2\n",
        "a: 1\n  b: 2\n",
    ):
        with pytest.raises(YamlSubsetError):
            parse_yaml_subset(bad)


# --- compose --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = parse_yaml_subset(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


def test_every_service_is_postgres_or_built_from_the_dockerfile(compose: dict[str, Any]) -> None:
    services = compose["services"]
    builders = [s for s in services.values() if "build" in s]
    assert len(builders) == 1, "one service builds the image; the others reuse it by tag"
    build = builders[0]["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    for name, service in services.items():
        if name == "postgres":
            assert service["image"] == "postgres:15"
        else:
            assert service["image"] == IMAGE, name


def test_postgres_has_a_healthcheck_a_named_volume_and_a_file_password(
    compose: dict[str, Any],
) -> None:
    postgres = compose["services"]["postgres"]
    assert postgres["healthcheck"]["test"][0] == "CMD-SHELL"
    assert "pg_isready" in postgres["healthcheck"]["test"][1]
    volume = postgres["volumes"][0].split(":")[0]
    assert volume in compose["volumes"]
    assert postgres["environment"]["POSTGRES_PASSWORD_FILE"].startswith("/run/secrets/")


def test_broker_runs_on_postgresql_and_nodes_on_sqlite_volumes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    broker = services["broker"]
    assert broker["environment"]["TESSERA_DATABASE_URL"].startswith("postgresql://")
    assert "@postgres:" in broker["environment"]["TESSERA_DATABASE_URL"]
    assert broker["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert broker["command"] == ["broker", "serve"]
    nodes = [name for name, s in services.items() if s.get("command") == ["node", "serve"]]
    assert len(nodes) == 2
    for name in nodes:
        env = services[name]["environment"]
        assert "TESSERA_DATABASE_URL" not in env, "nodes keep SQLite in their home volume"
        assert env["TESSERA_PASSPHRASE_FILE"].startswith("/run/secrets/")
        home = services[name]["volumes"][0]
        assert home.endswith(":/var/lib/tessera/home")
        assert home.split(":")[0] in compose["volumes"]


def test_each_server_has_an_init_step_that_runs_once_first(compose: dict[str, Any]) -> None:
    services = compose["services"]
    servers = {n: s for n, s in services.items() if s.get("command", [])[-1:] == ["serve"]}
    assert set(servers) == {"broker", "node-a", "node-b"}
    for name, server in servers.items():
        init = services[f"{name}-init"]
        assert init["command"][:3] == ["init-once", server["command"][0], "init"]
        assert init["volumes"] == server["volumes"], "init writes the home the server reads"
        assert init["restart"] == "no"
        assert server["depends_on"][f"{name}-init"]["condition"] == (
            "service_completed_successfully"
        )


def test_published_ports_are_the_project_ports_on_loopback(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        for mapping in service.get("ports", []):
            host, published, target = mapping.split(":")
            assert host == "127.0.0.1", f"{name} publishes beyond loopback"
            assert published == target
            listen = [a for a in services[f"{name}-init"]["command"] if ":" in a and "//" not in a]
            assert listen[0].endswith(f":{target}")
    assert services["broker"]["ports"] == [f"127.0.0.1:{BROKER_PORT}:{BROKER_PORT}"]
    assert services["node-a"]["ports"] == [f"127.0.0.1:{NODE_PORT}:{NODE_PORT}"]
    for node in ("node-a", "node-b"):
        assert services[node]["environment"]["TESSERA_BROKER"] == f"broker:{BROKER_PORT}"


def test_secrets_come_from_files_that_are_not_in_the_repository(compose: dict[str, Any]) -> None:
    declared = compose["secrets"]
    for name, secret in declared.items():
        assert secret["file"].startswith("./secrets/"), name
    used = {s for service in compose["services"].values() for s in service.get("secrets", [])}
    assert used == set(declared)
    assert not (DEPLOY / "secrets").exists(), "secret files must never be committed"


# --- Dockerfile -----------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    found = []
    for line in joined.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def test_dockerfile_builds_an_unprivileged_image_of_this_project() -> None:
    steps = _instructions()
    assert steps[0] == ("FROM", "python:3.11-slim")
    users = [rest for word, rest in steps if word == "USER"]
    assert users, "the image must not run as root"
    assert users[-1].split(":")[0] not in {"root", "0"}
    last_user = max(i for i, (word, _) in enumerate(steps) if word == "USER")
    entry = max(i for i, (word, _) in enumerate(steps) if word == "ENTRYPOINT")
    assert last_user < entry
    runs = " ".join(rest for word, rest in steps if word == "RUN")
    assert "pip install ." in runs
    assert "useradd" in runs
    exposed = {int(p) for word, rest in steps if word == "EXPOSE" for p in rest.split()}
    assert {BROKER_PORT, NODE_PORT} <= exposed
    assert len(exposed) == 3, "the two gRPC ports and the metrics port"
    assert ("VOLUME", '["/var/lib/tessera/home"]') in steps
    assert ("ENTRYPOINT", '["tessera-entrypoint"]') in steps
    copied = {rest.split()[-2] for word, rest in steps if word == "COPY" and "--chmod" not in rest}
    for source in copied - {"pyproject.toml"}:
        assert (ROOT / source).exists(), source
    assert "deploy/docker-entrypoint.sh" in " ".join(rest for word, rest in steps)


def test_the_dockerignore_keeps_the_build_context_small() -> None:
    rules = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").split()
    assert rules[rules.index("*") :][0] == "*"
    for source in ("tessera/", "node/", "broker/", "cli/", "pyproject.toml"):
        assert f"!{source}" in rules


# --- the entrypoint, for real ---------------------------------------------------------------


def _entrypoint(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {
        "PATH": f"{TESSERA.parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "TESSERA_HOME": str(home),
        "TESSERA_ARGON2": "test-cheap",
        **env,
    }
    return subprocess.run(
        ["/bin/sh", str(ENTRYPOINT), *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_entrypoint_inits_once_with_the_passphrase_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "passphrase"
    secret.write_text("correct horse battery staple")
    home = tmp_path / "home"
    args = ("init-once", "node", "init", "--name", "Harbour Shelter", "--listen", "0.0.0.0:7441")
    first = _entrypoint(home, *args, TESSERA_PASSPHRASE_FILE=str(secret))
    assert first.returncode == 0, first.stderr
    settings = config.load(home, {})
    assert settings.name == "Harbour Shelter"
    assert open_keyring(home, "correct horse battery staple").identity is not None
    before = (home / config.CONFIG_FILE).read_bytes()

    again = _entrypoint(home, *args, TESSERA_PASSPHRASE_FILE=str(secret))
    assert again.returncode == 0, again.stderr
    assert "already initialised" in again.stdout
    assert (home / config.CONFIG_FILE).read_bytes() == before


def test_entrypoint_without_a_passphrase_fails_clearly(tmp_path: Path) -> None:
    done = _entrypoint(tmp_path / "home", "init-once", "node", "init", "--name", "X")
    assert done.returncode != 0
    assert "TESSERA_PASSPHRASE" in done.stderr
    assert "Traceback" not in done.stderr


def test_entrypoint_passes_other_commands_to_tessera(tmp_path: Path) -> None:
    done = _entrypoint(tmp_path, "broker", "serve", "--help")
    assert done.returncode == 0, done.stderr
    assert "Run the broker" in done.stdout


# --- systemd --------------------------------------------------------------------------------


def _unit(path: Path) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


@pytest.mark.parametrize("role", ["node", "broker"])
def test_units_are_hardened_and_serve_from_their_home(role: str) -> None:
    unit = _unit(UNITS[role])
    home = f"/var/lib/tessera/{role}"
    (exec_start,) = unit["ExecStart"]
    assert f"tessera --home {home} {role} serve" in exec_start
    assert unit["User"] == ["tessera"]
    assert unit["NoNewPrivileges"] == ["yes"]
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["ReadWritePaths"] == [home]
    assert unit["PrivateTmp"] == ["yes"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["Environment"][0] == f"TESSERA_HOME={home}"
    assert unit["CapabilityBoundingSet"] == [""]


def test_node_unit_reads_its_passphrase_from_a_systemd_credential() -> None:
    unit = _unit(UNITS["node"])
    (credential,) = unit["LoadCredential"]
    name, _, source = credential.partition(":")
    assert source.startswith("/etc/tessera/")
    assert f"$${{CREDENTIALS_DIRECTORY}}/{name}" in unit["ExecStart"][0]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not here")
def test_systemd_accepts_the_units() -> None:
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *map(str, UNITS.values())],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    complaints = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if line.strip() and "/opt/tessera/bin/tessera is not executable" not in line
    ]
    assert complaints == []


# --- no secrets; every command shown exists -------------------------------------------------


def _deploy_files() -> list[Path]:
    return [p for p in DEPLOY.rglob("*") if p.is_file()]


def test_no_deploy_file_holds_a_secret() -> None:
    assignment = re.compile(rf"\b({'|'.join(SECRET_NAMES)})\s*[=:]\s*(\S*)")
    for path in _deploy_files():
        for match in assignment.finditer(path.read_text(encoding="utf-8")):
            value = match.group(2).strip("\"'")
            assert value in {"", "..."} or value.startswith(("$", "`")), (
                f"{path.relative_to(ROOT)}: {match.group(0)!r} looks like a literal secret"
            )
        assert not re.search(r"postgresql://[^@\s/]*:[^@\s/]*@", path.read_text(encoding="utf-8"))


def _command_lines() -> list[tuple[str, list[str]]]:
    """Every `tessera ...` invocation in deploy/ and the docs' code blocks, as argument lists."""
    found: list[tuple[str, list[str]]] = []
    compose = parse_yaml_subset(COMPOSE.read_text(encoding="utf-8"))
    for name, service in compose["services"].items():
        command = service.get("command")
        if command:
            args = command[1:] if command[0] == "init-once" else command
            found.append((f"compose {name}", args))
    for role, path in UNITS.items():
        exec_start = _unit(path)["ExecStart"][0]
        after = exec_start.split("/opt/tessera/bin/tessera", 1)[1].rstrip("'")
        found.append((f"{role} unit", shlex.split(after)))
    in_block = False
    for line in OPERATIONS.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_block = not in_block
            continue
        words = line.split("#", 1)[0].split()
        if words[:2] == ["sudo", "-u"]:
            words = words[3:]
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
            words = words[1:]  # VAR=value prefixes
        if in_block and words[:1] == ["tessera"]:
            found.append(("docs/operations.md", shlex.split(" ".join(words[1:]))))
        elif in_block and words[:3] == ["docker", "compose", "exec"] and ENTRY in words:
            found.append(("docs/operations.md", words[words.index(ENTRY) + 1 :]))
    return found


def test_every_tessera_command_shown_exists() -> None:
    """Each shown invocation with its own options plus --help: unknown ones fail."""
    shown = _command_lines()
    sources = {source for source, _ in shown}
    assert {"compose broker", "compose node-a-init", "node unit", "broker unit"} <= sources
    assert "docs/operations.md" in sources
    seen: set[tuple[str, ...]] = set()
    for source, args in shown:
        if tuple(args) in seen:
            continue
        seen.add(tuple(args))
        done = subprocess.run(
            [str(TESSERA), *args, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "TESSERA_HOME": "/nonexistent"},
        )
        assert done.returncode == 0, f"{source}: `tessera {shlex.join(args)}`: {done.stderr}"
        assert "Usage:" in done.stdout
