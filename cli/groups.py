"""The command groups the product has, each loaded from its own module.

A group whose module is not built yet is still listed, and says so plainly when called.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import typer

from tessera.errors import NotBuiltError


@dataclass(frozen=True)
class Group:
    """A top-level command group: its name, one-line help and the module that builds it."""

    name: str
    help: str
    module: str | None  # None: not built yet
    issue: str
    is_command: bool = False

    def attach(self, app: typer.Typer) -> None:
        """Add this group (or its not-built placeholder) to the root app."""
        if self.module is not None:
            built = importlib.import_module(self.module)
            if self.is_command:
                # The command's own docstring is its help (with its example); the root's listing
                # shows the docstring's first line.
                app.command(self.name)(built.command)
            else:
                app.add_typer(built.app, name=self.name, help=self.help)
            return
        message = f"`tessera {self.name}` is not built yet ({self.issue})"

        def placeholder() -> None:
            raise NotBuiltError(message, hint="see README.md for what works today")

        if self.is_command:
            app.command(self.name, help=f"{self.help} [not built yet]")(placeholder)
        else:
            sub = typer.Typer(help=f"{self.help} [not built yet]")
            sub.callback(invoke_without_command=True)(placeholder)
            app.add_typer(sub, name=self.name)


GROUPS: tuple[Group, ...] = (
    Group("node", "Run and administer an agency node.", "cli.node", "issue 4"),
    Group(
        "case", "Record survivors' cases and needs; import and export HTCDS.", "cli.case", "issue 4"
    ),
    Group(
        "agency",
        "Look up agencies in the directory; verify their fingerprints.",
        "cli.agency",
        "issue 5",
    ),
    Group("broker", "Run and administer the regional broker.", "cli.broker", "issue 5"),
    Group("consent", "Record, list and revoke a survivor's consent.", "cli.consent", "issue 6"),
    Group("referral", "Send, receive and answer consented referrals.", "cli.referral", "issue 6"),
    Group("stats", "Private statistics: budgets, rounds, releases.", "cli.stats", "issue 7"),
    Group("demo", "Run the whole system on this machine.", "cli.demo", "issue 8", is_command=True),
)
