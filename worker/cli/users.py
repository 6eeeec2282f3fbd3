"""``shelver users``: who may sign in to the web application."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from shelver.catalog.db import get_engine
from shelver.worker.cli.terminal import UserError, console

app = typer.Typer(help="Users of the web application.", no_args_is_help=True)


@app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="Sign-in name (letters, digits, _.@-).")],
    role: Annotated[str, typer.Option(help="reviewer: review and audit; admin: also promote "
                                           "and roll back models.")] = "reviewer",
) -> None:  # fmt: skip
    """Create a user. The password is asked for, or read from the first line of stdin when
    it is not a terminal; it is never an argument, so it stays out of shell history and ps."""
    try:
        from shelver.web.auth import UserError as BadUser
        from shelver.web.auth import add_user
    except ImportError as exc:
        raise UserError(
            f"users need the [web] extra ({exc.name} is missing): pip install 'shelver[web]'"
        ) from exc
    if sys.stdin.isatty():
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline().rstrip("\n")
    try:
        user = add_user(get_engine(), name, role, password)
    except BadUser as exc:
        raise UserError(str(exc)) from exc
    console.print(f"added {user.name} ({user.role})")
