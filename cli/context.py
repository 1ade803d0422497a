"""What every command gets from the root: the home directory and the environment.

``--home DIR`` (or ``TESSERA_HOME``) selects the node's or broker's directory, as ``GNUPGHOME``
does for gpg. Secrets never come from the command line: a passphrase comes from
``TESSERA_PASSPHRASE`` when set, else from a prompt on a terminal.
"""

from __future__ import annotations

import getpass
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import typer

from tessera.errors import ConfigError


@dataclass(frozen=True)
class CliContext:
    """Resolved once by the root callback and handed to every command through Typer's context."""

    home_option: Path | None
    environ: Mapping[str, str]

    @property
    def home(self) -> Path:
        """The selected home directory (``--home``, ``TESSERA_HOME`` or ``~/.tessera``)."""
        from tessera.config import resolve_home

        return resolve_home(self.home_option, self.environ)

    def passphrase(self, *, confirm: bool = False, purpose: str = "node passphrase") -> str:
        """``TESSERA_PASSPHRASE`` if set; else a hidden prompt; never a command-line argument."""
        value = self.environ.get("TESSERA_PASSPHRASE")
        if value:
            return value
        if not sys.stdin.isatty():
            raise ConfigError(
                f"a {purpose} is needed and there is no terminal to ask on",
                hint="set TESSERA_PASSPHRASE for non-interactive use",
            )
        first = getpass.getpass(f"{purpose}: ")
        if confirm and getpass.getpass(f"repeat {purpose}: ") != first:
            raise ConfigError("the two passphrases differ", hint="run the command again")
        if not first:
            raise ConfigError("an empty passphrase is not allowed", hint="choose a passphrase")
        return first


def get(ctx: typer.Context) -> CliContext:
    """The :class:`CliContext` the root callback stored (or a default one, for sub-app tests)."""
    root = ctx.find_root()
    obj = root.obj
    if isinstance(obj, CliContext):
        return obj
    return CliContext(home_option=None, environ=dict(os.environ))
