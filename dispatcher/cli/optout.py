"""`dispatcher optout`: the opt-out list (add, remove, list, import), every change audited."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import click
import phonenumbers
from rich.table import Table

from dispatcher import optouts
from dispatcher.addresses import InvalidAddress, mask_address, normalise_email, normalise_phone
from dispatcher.cli.common import config_argument, console, load, run
from dispatcher.config.loader import Config
from dispatcher.errors import OperatorError
from dispatcher.store.database import Database

ACTOR = "operator"
#: Bad lines of an import shown on the terminal; the rest are counted.
SHOWN_PROBLEMS = 20

region_option = click.option(
    "--region",
    default="CN",
    show_default=True,
    help="Country (ISO code) of numbers written without a country code.",
)


@click.group()
def optout() -> None:
    """The opt-out list: numbers that are never sent to.

    \b
    Arguments come in this order:
      dispatcher optout add CONFIG NUMBER...
      dispatcher optout remove CONFIG NUMBER...
      dispatcher optout list CONFIG [--unmasked] [--json]
      dispatcher optout import CONFIG FILE [--region CN]

    NUMBER may also be an e-mail address. STOP / 退订 replies and providers' "unsubscribed"
    answers add numbers by themselves. Addresses are shown masked unless --unmasked is given.
    """


def _normalise(numbers: Sequence[str], region: str) -> list[str]:
    _check_region(region)
    good, bad = [], []
    for raw in numbers:
        try:
            if "@" in raw:
                good.append(normalise_email(raw))
            else:
                good.append(normalise_phone(raw, region, mobile_only=False))
        except InvalidAddress as exc:
            bad.append(f"{mask_address(raw)}: {exc.reason}")
    if bad:
        raise OperatorError(
            "not a phone number or e-mail address, nothing changed:\n" + "\n".join(bad)
        )
    return good


def _check_region(region: str) -> None:
    if region.upper() not in phonenumbers.SUPPORTED_REGIONS:
        raise OperatorError(f"--region {region}: unknown region (use an ISO code such as CN)")


async def _open(cfg: Config) -> Database:
    db = Database.open(cfg.database_url)
    try:
        await db.upgrade()
    except BaseException:
        await db.close()
        raise
    return db


@optout.command()
@config_argument
@click.argument("numbers", nargs=-1, required=True)
@region_option
@click.option("--note", help="Why (kept with each number).")
def add(config: str, numbers: tuple[str, ...], region: str, note: str | None) -> None:
    """Add numbers to the opt-out list: dispatcher optout add CONFIG NUMBER..."""
    cfg = load(config)
    addresses = _normalise(numbers, region)

    async def _add() -> list[str]:
        db = await _open(cfg)
        try:
            async with db.engine.begin() as conn:
                return await optouts.add(
                    conn,
                    addresses,
                    source="operator",
                    actor=ACTOR,
                    now=datetime.now(UTC),
                    note=note,
                )
        finally:
            await db.close()

    added = run(_add())
    already = len(set(addresses)) - len(added)
    console().print(f"{len(added)} added to the opt-out list, {already} already on it")


@optout.command()
@config_argument
@click.argument("numbers", nargs=-1, required=True)
@region_option
def remove(config: str, numbers: tuple[str, ...], region: str) -> None:
    """Take numbers off the opt-out list: dispatcher optout remove CONFIG NUMBER..."""
    cfg = load(config)
    addresses = _normalise(numbers, region)

    async def _remove() -> list[str]:
        db = await _open(cfg)
        try:
            async with db.engine.begin() as conn:
                return await optouts.remove(
                    conn, addresses, source="operator", actor=ACTOR, now=datetime.now(UTC)
                )
        finally:
            await db.close()

    removed = run(_remove())
    missing = len(set(addresses)) - len(removed)
    console().print(f"{len(removed)} removed from the opt-out list, {missing} were not on it")


@optout.command("list")
@config_argument
@click.option("--unmasked", is_flag=True, help="Show whole numbers (they are personal data).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per number.")
def list_command(config: str, unmasked: bool, as_json: bool) -> None:
    """Show the opt-out list: dispatcher optout list CONFIG [--unmasked] [--json]"""
    cfg = load(config)

    async def _list() -> list[optouts.OptOutEntry]:
        db = await _open(cfg)
        items: list[optouts.OptOutEntry] = []
        try:
            async with db.engine.connect() as conn:
                async for entry in optouts.entries(conn, unmasked=unmasked):
                    if as_json:  # streamed: the list may be long
                        click.echo(json.dumps(_as_dict(entry), ensure_ascii=False))
                    else:
                        items.append(entry)
        finally:
            await db.close()
        return items

    items = run(_list())
    if as_json:
        return
    out = console()
    if not items:
        out.print("the opt-out list is empty")
        return
    table = Table(show_edge=False)
    for column in ("address", "source", "since (UTC)", "note"):
        table.add_column(column)
    for e in items:
        table.add_row(e.address, e.source, e.created_at.strftime("%Y-%m-%d %H:%M"), e.note or "")
    out.print(table)
    out.print(f"{len(items)} addresses on the opt-out list")


def _as_dict(entry: optouts.OptOutEntry) -> dict[str, str | None]:
    return {
        "address": entry.address,
        "source": entry.source,
        "created_at": entry.created_at.isoformat(),
        "note": entry.note,
    }


@optout.command("import")
@config_argument
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@region_option
def import_command(config: str, file: Path, region: str) -> None:
    """Add every number of a CSV or TXT file: dispatcher optout import CONFIG FILE [--region CN]

    One number per line, or a CSV whose phone column has a header such as phone, mobile or
    手机 (else the first column). Bad lines are reported with their line numbers and skipped.
    """
    cfg = load(config)
    _check_region(region)
    if not file.is_file():
        raise OperatorError(f"{file}: file not found")

    async def _import() -> optouts.ImportResult:
        db = await _open(cfg)
        try:
            return await optouts.import_file(
                db, file, region=region.upper(), actor=ACTOR, now=datetime.now(UTC)
            )
        finally:
            await db.close()

    result = run(_import())
    out = console()
    for problem in result.bad[:SHOWN_PROBLEMS]:
        out.print(f"skipped {problem}", markup=False)
    if len(result.bad) > SHOWN_PROBLEMS:
        out.print(f"… and {len(result.bad) - SHOWN_PROBLEMS} more bad lines")
    out.print(
        f"{file}: {result.added} added, {result.already} already listed, "
        f"{len(result.bad)} bad lines skipped",
        markup=False,
    )
