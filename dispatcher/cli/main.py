"""`dispatcher` entry point: the command group and the one place errors become messages."""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any

import click
from sqlalchemy.exc import InterfaceError, OperationalError

from dispatcher import __version__
from dispatcher.cli import audit as audit_commands
from dispatcher.cli import db as db_commands
from dispatcher.cli import inspect, operate, report
from dispatcher.cli import optout as optout_commands
from dispatcher.errors import DispatcherError, StorageError
from dispatcher.logs import first_line


class Group(click.Group):
    """A click group that turns operator errors into a message and exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DispatcherError as exc:
            click.echo(f"error: {exc}" if "\n" not in str(exc) else f"error:\n{exc}", err=True)
            sys.exit(exc.exit_code)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except (OperationalError, InterfaceError) as exc:
            # The database is locked, restarting or unreachable: not a bug, and nothing that
            # was recorded is lost; the command (or systemd, for the daemon) can try again.
            click.echo(f"error: database unavailable: {first_line(exc.orig or exc)}", err=True)
            sys.exit(StorageError.exit_code)
        except Exception as exc:  # a bug: one line for the operator, the trace only on request
            if os.environ.get("DISPATCHER_DEBUG"):
                traceback.print_exc()
            click.echo(
                f"internal error: {type(exc).__name__}: {exc} "
                "(a bug in dispatcher; set DISPATCHER_DEBUG=1 for details)",
                err=True,
            )
            sys.exit(1)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dispatcher")
def cli() -> None:
    """Bulk SMS and multi-channel publicity campaigns: check, plan, rehearse, run, review."""


for command in (*inspect.COMMANDS, *operate.COMMANDS):
    cli.add_command(command)
cli.add_command(db_commands.db)
cli.add_command(audit_commands.audit_group)
cli.add_command(report.report)
cli.add_command(optout_commands.optout)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="dispatcher")


if __name__ == "__main__":
    main()
