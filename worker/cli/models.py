"""``shelver models``: the registry by hand — list, inspect, promote, roll back."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from shelver.catalog.db import get_engine
from shelver.training import registry
from shelver.worker.cli.terminal import UserError, console, fmt

app = typer.Typer(help="The model registry: list, inspect, promote, roll back.",
                  no_args_is_help=True)  # fmt: skip


@app.command("list")
def models_list(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Every registered model with its status and test figures."""
    with get_engine().connect() as conn:
        models = registry.list_models(conn)
    if as_json:
        print(json.dumps([model_json(m) for m in models], default=str, indent=2))
        return
    table = Table(title="models")
    for column in ("version", "status", "macro-F1 (test)", "threshold", "created", "promoted"):
        table.add_column(column)
    for m in models:
        table.add_row(
            m.version,
            m.status,
            fmt(m.metrics.get("test", {}).get("macro_f1")),
            fmt(m.threshold),
            f"{m.created_at:%Y-%m-%d %H:%M}",
            f"{m.promoted_at:%Y-%m-%d %H:%M}" if m.promoted_at else "",
        )
    console.print(table)


def model_json(m: registry.ModelRecord) -> dict[str, Any]:
    """What `models list --json` and `models show` print about a model: all but its bytes."""
    return {
        "version": m.version,
        "status": m.status,
        "sha256": m.sha256,
        "labels": m.labels,
        "encoders": m.encoders,
        "threshold": m.threshold,
        "metrics": m.metrics,
        "created_at": m.created_at,
        "promoted_at": m.promoted_at,
    }


@app.command("show")
def models_show(version: Annotated[str, typer.Argument(help="e.g. v3")]) -> None:
    """Everything recorded about one model, as JSON."""
    with get_engine().connect() as conn:
        try:
            record = registry.get(conn, version)
        except registry.RegistryError as exc:
            raise UserError(str(exc)) from exc
    print(json.dumps(model_json(record), default=str, indent=2))


@app.command("promote")
def models_promote(version: Annotated[str, typer.Argument(help="e.g. v3")]) -> None:
    """Make VERSION the champion by hand; workers switch to it within seconds."""
    with get_engine().begin() as conn:
        try:
            registry.promote(conn, version)
        except registry.RegistryError as exc:
            raise UserError(str(exc)) from exc
    console.print(f"{version} is the champion")


@app.command("rollback")
def models_rollback() -> None:
    """Put the previous champion back; the current one is marked rejected."""
    with get_engine().begin() as conn:
        try:
            restored, demoted = registry.rollback(conn)
        except registry.RegistryError as exc:
            raise UserError(str(exc)) from exc
    console.print(f"{restored.version} is the champion again ({demoted.version} rejected)")
