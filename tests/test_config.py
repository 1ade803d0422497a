"""Settings load from the home's TOML file with environment overrides, and fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest

from tessera import config
from tessera.errors import ConfigError


def _write(home: Path, text: str) -> None:
    (home / config.CONFIG_FILE).write_text(text, encoding="utf-8")


def test_missing_home_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path, {})
    assert "tessera node init" in (info.value.hint or "")


def test_written_settings_load_back(tmp_path: Path) -> None:
    settings = config.Settings(
        home=tmp_path,
        role=config.Role.NODE,
        name="Harbour Shelter",
        region="north",
        argon2=config.Argon2Profile.TEST_CHEAP,
        key_file=tmp_path / "kek.key",
    )
    config.write(settings)
    loaded = config.load(tmp_path, {})
    assert loaded == settings
    assert loaded.effective_database_url == f"sqlite:///{tmp_path / config.SQLITE_FILE}"


def test_environment_overrides_file(tmp_path: Path) -> None:
    _write(tmp_path, '[tessera]\nrole = "broker"\nname = "b"\nlisten = "127.0.0.1:1"\n')
    loaded = config.load(
        tmp_path,
        {"TESSERA_LISTEN": "127.0.0.1:2", "TESSERA_DATABASE_URL": "postgresql://x@h/db"},
    )
    assert loaded.listen == "127.0.0.1:2"
    assert loaded.effective_database_url == "postgresql://x@h/db"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (
            '[tessera]\nrole = "node"\nname = "n"\nlisten_port = 3\n',
            "unknown setting(s) listen_port",
        ),
        ('[tessera]\nrole = "shelter"\nname = "n"\n', "shelter"),
        ('[tessera]\nname = "n"\n', "`role` and `name` are required"),
        ("[tessera\n", "cannot read"),
        ('[tessera]\nrole = "node"\nname = "n"\n[limits]\nmax_bytes = 1\n', "unknown limit"),
        (
            '[tessera]\nrole = "broker"\nname = "b"\n[limits]\nmax_send_batch = 50\n',
            "max_send_batch must be at least 100",
        ),
    ],
)
def test_bad_files_name_the_problem(tmp_path: Path, text: str, needle: str) -> None:
    _write(tmp_path, text)
    with pytest.raises(ConfigError, match=None) as info:
        config.load(tmp_path, {})
    assert needle in str(info.value)


def test_home_resolution_order(tmp_path: Path) -> None:
    assert config.resolve_home(tmp_path / "a", {"TESSERA_HOME": str(tmp_path / "b")}) == (
        tmp_path / "a"
    )
    assert config.resolve_home(None, {"TESSERA_HOME": str(tmp_path / "b")}) == tmp_path / "b"


def test_a_nodes_stats_policy_is_written_at_init_and_read_back(tmp_path: Path) -> None:
    settings = config.Settings(home=tmp_path, role=config.Role.NODE, name="Harbour Shelter")
    text = config.write(settings).read_text(encoding="utf-8")
    assert "[stats]" in text and "min_threshold = 2" in text and "budget_cap = 1.0" in text
    assert config.load(tmp_path, {}).stats == config.StatsPolicy()
    edited = text.replace("min_threshold = 2", "min_threshold = 4")
    edited = edited.replace("trusted_agencies = []", 'trusted_agencies = ["lantern-clinic"]')
    edited = edited.replace("budget_cap = 1.0", "budget_cap = 3")
    (tmp_path / config.CONFIG_FILE).write_text(edited, encoding="utf-8")
    policy = config.load(tmp_path, {}).stats
    assert policy == config.StatsPolicy(4, ("lantern-clinic",), 3.0)


@pytest.mark.parametrize(
    ("stats", "needle"),
    [
        ("min_threshold = 0", "min_threshold must be a positive integer"),
        ('trusted_agencies = "lantern-clinic"', "must be a list of agency ids"),
        ("budget_cap = -1", "budget_cap must be a positive number"),
        ("budget_cap = true", "budget_cap must be a positive number"),
        ("min_thresold = 3", "unknown [stats] setting(s) min_thresold"),
    ],
)
def test_a_bad_stats_policy_names_the_problem(tmp_path: Path, stats: str, needle: str) -> None:
    (tmp_path / config.CONFIG_FILE).write_text(
        f'[tessera]\nrole = "node"\nname = "n"\n\n[stats]\n{stats}\n', encoding="utf-8"
    )
    with pytest.raises(ConfigError) as caught:
        config.load(tmp_path, {})
    assert needle in caught.value.message
