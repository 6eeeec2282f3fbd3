"""``shelver status``: what the catalog, the queue and the registry look like now."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from shelver.catalog.db import get_engine
from shelver.catalog.status import catalog_status
from shelver.worker.cli.terminal import console


def status(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Products by status, queue depth, age of the oldest pending row, and the champion model."""
    report = catalog_status(get_engine())
    if as_json:
        print(json.dumps(report, default=str, indent=2))
        return
    table = Table(title="products")
    table.add_column("status")
    table.add_column("count", justify="right")
    for name, count in report["products"].items():
        table.add_row(name, str(count))
    console.print(table)
    queue = report["queue"]
    age = queue["oldest_pending_age_s"]
    console.print(
        f"queue: {queue['depth']} rows ({queue['claimed']} claimed), oldest pending "
        + (f"{age:.1f} s old" if age is not None else "none")
    )
    for lane in queue["lanes"]:
        age = lane["oldest_age_s"]
        console.print(
            f"  {lane['lane']}: {lane['depth']} rows ({lane['ready']} ready, "
            f"{lane['claimed']} claimed, {lane['retrying']} retrying), oldest "
            + (f"{age:.1f} s old" if age is not None else "none")
        )
    console.print(f"workers alive: {report['workers_alive']}")
    for error in report["recent_errors"]:
        console.print(
            f"errors: {error['products']} {error['kind']} - {error['reason']} "
            f"(e.g. {error['example_sku']}: {error['example_error']})",
            markup=False,
        )
    refused = report["images_refused"]
    if refused["total"]:
        reasons = ", ".join(f"{reason} {n}" for reason, n in refused["by_reason"].items())
        console.print(
            f"images refused: {refused['total']} products were last classified without their "
            f"image ({reasons}); products.error says why for each"
        )
    champion = report["champion"]
    console.print(
        f"champion: {champion['version']} (macro-F1 {champion.get('macro_f1')})"
        if champion
        else "champion: none yet (run `shelver train`)"
    )
