"""The node's keyring: KEK from a passphrase or a key file, rotation, damage (DESIGN.md section 5).

Attacks and accidents: a wrong passphrase, a missing or wrong key file, a rotated passphrase, a
damaged ``keyring.json``, a crash in the middle of a rotation. Each must fail with a typed error a
person understands, and none may cost a single stored record.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest

from node.keyring import KEYRING_FILE, new_kek_spec, open_keyring, read_spec, rotate
from tessera import files
from tessera.config import Argon2Profile, KekSource
from tessera.errors import ConfigError, KeyFileError, WrongPassphrase
from tests.nodefixtures import (
    PASSPHRASE,
    Node,
    NodeFactory,
    db_url_fixture,  # noqa: F401  (fixture)
    nodes_fixture,  # noqa: F401  (fixture)
    synthetic_cases,
)

NEW_PASSPHRASE = "a different, longer passphrase for the new year"


def _records(node: Node) -> dict[str, list[tuple[Any, ...]]]:
    # Every column of every case row, the wrapped survivor keys among them; the keys once more
    # on their own, so the comparison below cannot pass without looking at them.
    wrapped = node.sql("SELECT case_id, wrapped_key FROM case_record ORDER BY case_id")
    assert wrapped and all(len(bytes(key)) > 32 for _case, key in wrapped)
    return {
        "case_record": node.table_rows()["case_record"],
        "wrapped_key": [(case_id, bytes(key)) for case_id, key in wrapped],
    }


def _read_all(node: Node, ids: list[str]) -> dict[str, dict[str, str]]:
    return {i: dict(node.store.get_case("admin", i).fields) for i in ids}


def test_a_wrong_passphrase_is_refused_in_plain_words(nodes: NodeFactory) -> None:
    node = nodes.make()
    before = (node.home / KEYRING_FILE).read_bytes()

    with pytest.raises(WrongPassphrase) as info:
        open_keyring(node.home, "correct horse battery stapler")
    assert "passphrase" in info.value.message
    assert "does not open" in info.value.message
    assert info.value.hint  # says what to check
    assert (node.home / KEYRING_FILE).read_bytes() == before
    # And a missing passphrase is a configuration problem, said as such.
    with pytest.raises(ConfigError, match="passphrase"):
        open_keyring(node.home, None)


def test_the_keyring_file_holds_no_key_in_clear(nodes: NodeFactory) -> None:
    node = nodes.make()
    text = (node.home / KEYRING_FILE).read_text()
    seed = node.keyring.identity.to_secret_bytes()
    raw_record_key = node.keyring.record_key._key
    for secret in (seed, raw_record_key):
        for form in (secret.hex(), base64.b64encode(secret).decode()):
            assert form not in text
    assert PASSPHRASE not in text
    assert (node.home / KEYRING_FILE).stat().st_mode & 0o077 == 0


def test_a_key_file_node_opens_with_its_key_file_alone(nodes: NodeFactory, tmp_path: Path) -> None:
    key_file = tmp_path / "secrets" / "node.key"
    key_file.parent.mkdir()
    node = nodes.make(passphrase=None, kek_source=KekSource.KEY_FILE, key_file=key_file)
    case = node.store.create_case("admin", synthetic_cases(1)[0])

    reopened = nodes.open(node.home, node.url, passphrase=None)
    assert reopened.store.get_case("admin", case.case_id).fields == case.fields
    assert read_spec(node.home).source is KekSource.KEY_FILE


def test_a_missing_key_file_is_a_key_file_error(nodes: NodeFactory, tmp_path: Path) -> None:
    key_file = tmp_path / "node.key"
    node = nodes.make(passphrase=None, kek_source=KekSource.KEY_FILE, key_file=key_file)
    key_file.rename(tmp_path / "elsewhere.key")

    with pytest.raises(KeyFileError) as info:
        open_keyring(node.home, None)
    assert str(key_file) in info.value.message
    assert info.value.hint


def test_another_key_file_does_not_open_the_node(nodes: NodeFactory, tmp_path: Path) -> None:
    key_file = tmp_path / "node.key"
    node = nodes.make(passphrase=None, kek_source=KekSource.KEY_FILE, key_file=key_file)
    key_file.unlink()
    new_kek_spec(KekSource.KEY_FILE, Argon2Profile.TEST_CHEAP, key_file)  # a fresh, valid key

    with pytest.raises(WrongPassphrase):
        open_keyring(node.home, None)


def test_rotation_refuses_the_old_passphrase_and_keeps_every_record(
    nodes: NodeFactory, db_url: str
) -> None:
    node = nodes.make(db_url)
    ids = node.store.create_cases("admin", synthetic_cases(10))
    fields = _read_all(node, ids)
    records = _records(node)

    spec = new_kek_spec(KekSource.PASSPHRASE, Argon2Profile.TEST_CHEAP, None)
    rotate(node.home, node.keyring, spec, NEW_PASSPHRASE)

    with pytest.raises(WrongPassphrase):
        open_keyring(node.home, PASSPHRASE)
    rotated = nodes.open(node.home, node.url, NEW_PASSPHRASE)
    assert _read_all(rotated, ids) == fields
    assert _records(rotated) == records  # no ciphertext, no wrapped survivor key re-written
    assert rotated.keyring.identity.public == node.keyring.identity.public
    assert rotated.store.verify_audit().ok


def test_rotation_from_a_passphrase_to_a_key_file(nodes: NodeFactory, tmp_path: Path) -> None:
    node = nodes.make()
    ids = node.store.create_cases("admin", synthetic_cases(3))
    fields = _read_all(node, ids)
    key_file = tmp_path / "rotated.key"

    rotate(
        node.home,
        node.keyring,
        new_kek_spec(KekSource.KEY_FILE, Argon2Profile.TEST_CHEAP, key_file),
        None,
    )

    assert read_spec(node.home).source is KekSource.KEY_FILE
    assert _read_all(nodes.open(node.home, node.url, passphrase=None), ids) == fields
    # The old passphrase is worth nothing now: without the key file the node stays shut.
    key_file.rename(tmp_path / "moved.key")
    with pytest.raises(KeyFileError):
        open_keyring(node.home, PASSPHRASE)


def _damage(document: dict[str, Any], how: str) -> str:
    if how == "truncated":
        return json.dumps(document)[:-40]
    if how == "not-json":
        return "\x00\x01 this is not json"
    if how == "empty":
        return ""
    if how == "a-list":
        return json.dumps([document])
    if how == "wrong-format":
        return json.dumps({**document, "format": "something-else"})
    if how == "no-salt":
        return json.dumps({k: v for k, v in document.items() if k != "salt"})
    if how == "bad-base64":
        return json.dumps({**document, "check": "***not base64***"})
    if how == "short-salt":
        return json.dumps({**document, "salt": base64.b64encode(b"short").decode()})
    if how == "opslimit-out-of-range":
        return json.dumps({**document, "opslimit": 0})
    if how == "opslimit-not-a-number":
        return json.dumps({**document, "opslimit": "many"})
    if how in ("identity-altered", "record-key-altered"):
        name = how.removesuffix("-altered").replace("-", "_")
        raw = bytearray(base64.b64decode(document[name]))
        raw[len(raw) // 2] ^= 0x01
        return json.dumps({**document, name: base64.b64encode(bytes(raw)).decode()})
    if how == "unknown-source":
        return json.dumps({**document, "kek_source": "smart-card"})
    raise AssertionError(how)


_SPEC_DAMAGE = {
    "truncated",
    "not-json",
    "empty",
    "a-list",
    "wrong-format",
    "no-salt",
    "short-salt",
    "opslimit-out-of-range",
    "opslimit-not-a-number",
    "unknown-source",
}


@pytest.mark.parametrize(
    "how",
    [
        "truncated",
        "not-json",
        "empty",
        "a-list",
        "wrong-format",
        "no-salt",
        "bad-base64",
        "short-salt",
        "opslimit-out-of-range",
        "opslimit-not-a-number",
        "unknown-source",
        "identity-altered",
        "record-key-altered",
    ],
)
def test_a_damaged_keyring_file_is_a_config_error(nodes: NodeFactory, how: str) -> None:
    node = nodes.make()
    path = node.home / KEYRING_FILE
    path.write_text(_damage(json.loads(path.read_text()), how))

    with pytest.raises(ConfigError) as info:
        open_keyring(node.home, PASSPHRASE)
    assert info.value.hint
    if how in _SPEC_DAMAGE:  # the check value and wrapped keys are not part of the KEK spec
        with pytest.raises(ConfigError):
            read_spec(node.home)


def test_a_half_written_keyring_left_by_a_crash_does_not_stop_the_node(
    nodes: NodeFactory,
) -> None:
    node = nodes.make()
    (case_id,) = node.store.create_cases("admin", synthetic_cases(1))
    path, tmp = node.home / KEYRING_FILE, (node.home / KEYRING_FILE).with_suffix(".tmp")
    old = path.read_bytes()
    spec = new_kek_spec(KekSource.PASSPHRASE, Argon2Profile.TEST_CHEAP, None)
    rotate(node.home, node.keyring, spec, NEW_PASSPHRASE)
    new = path.read_bytes()
    # Replay a crash during the write: the old keyring in place, half the new one beside it.
    path.write_bytes(old)
    tmp.write_bytes(new[: len(new) // 2])

    reopened = nodes.open(node.home, node.url, PASSPHRASE)
    assert reopened.store.get_case("admin", case_id).version == 1
    with pytest.raises(WrongPassphrase):
        open_keyring(node.home, NEW_PASSPHRASE)

    # Rotating again goes through despite the leftover, and leaves none behind.
    rotate(node.home, reopened.keyring, spec, NEW_PASSPHRASE)
    assert not tmp.exists()
    assert nodes.open(node.home, node.url, NEW_PASSPHRASE).store.get_case("admin", case_id)


def test_a_crash_at_the_rename_keeps_the_old_keyring(
    nodes: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = nodes.make()
    (case_id,) = node.store.create_cases("admin", synthetic_cases(1))
    path = node.home / KEYRING_FILE
    before = path.read_bytes()

    def power_cut(_src: object, _dst: object) -> None:
        raise OSError("power cut")

    # The process dies after writing and syncing the new keyring, before renaming it into place.
    monkeypatch.setattr(files.os, "replace", power_cut)
    spec = new_kek_spec(KekSource.PASSPHRASE, Argon2Profile.TEST_CHEAP, None)
    with pytest.raises(OSError, match="power cut"):
        rotate(node.home, node.keyring, spec, NEW_PASSPHRASE)
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert path.with_suffix(".tmp").exists()  # the new keyring, complete but never installed
    reopened = nodes.open(node.home, node.url, PASSPHRASE)
    assert reopened.store.get_case("admin", case_id).version == 1
    # Had the rename happened, the new passphrase would open it: the temporary file is whole.
    os.replace(path.with_suffix(".tmp"), path)
    assert nodes.open(node.home, node.url, NEW_PASSPHRASE).store.get_case("admin", case_id)


def test_threads_writing_one_file_at_once_take_turns(tmp_path: Path) -> None:
    """Found by the full suite: `node audit verify` saved the audit checkpoint while the escrow
    worker did; both used the one temporary file, and the second rename raised (internal error)."""
    import threading

    target = tmp_path / "audit-checkpoint"
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(50):
                files.atomic_write(target, f"{n}-{i}".encode())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert target.read_text().endswith("-49")
    assert not target.with_suffix(".tmp").exists()
