"""``shelver serve``: the merchandisers' web application (review, audit, dashboard)."""

from __future__ import annotations

from typing import Annotated

import typer

from shelver.worker.cli.terminal import UserError, console


def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
) -> None:
    """Serve the review queue, audits, dashboard and registry in the browser."""
    try:
        from shelver.web.server import WebSetupError
        from shelver.web.server import serve as run
    except ImportError as exc:
        raise UserError(
            f"the web application needs the [web] extra ({exc.name} is missing): "
            "pip install 'shelver[web]'"
        ) from exc
    console.print(f"Shelver is at http://{host}:{port}/ (Ctrl-C stops it)")
    try:
        run(host, port)
    except WebSetupError as exc:
        raise UserError(str(exc)) from exc
