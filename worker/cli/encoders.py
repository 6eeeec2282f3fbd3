"""``shelver encoders``: build the ONNX encoders workers run."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from shelver.catalog.settings import get_settings
from shelver.worker.cli.terminal import UserError, console

app = typer.Typer(help="The text and image encoders workers run.", no_args_is_help=True)


@app.command("export")
def encoders_export(
    resnet: Annotated[
        bool, typer.Option("--resnet", help="Also export ResNet50 (needs Keras ImageNet weights).")
    ] = False,
) -> None:
    """Build the ONNX encoders from weights shipped in pip packages (needs the `export` extra)."""
    try:
        from shelver.training.encoder_export import describe, export_encoders
    except ImportError as exc:
        raise UserError(
            f"encoder export needs the export extra ({exc.name} is missing): "
            "pip install -e '.[export]'"
        ) from exc
    model_dir = get_settings().model_dir
    manifest = export_encoders(model_dir, include_resnet=resnet)
    table = Table(title=f"encoders in {model_dir}")
    for column in ("name", "kind", "dim", "identity"):
        table.add_column(column)
    for row in describe(manifest):
        table.add_row(row["name"], row["kind"], str(row["dim"]), row["identity"])
    console.print(table)
