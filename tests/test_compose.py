"""docker-compose.yml names the services DESIGN.md lists, and each runs a real CLI command."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.main import get_command

from shelver.worker.cli import app

ROOT = Path(__file__).resolve().parents[1]


def cli_commands() -> dict[str, set[str] | None]:
    """Top-level command -> its subcommands (None for a plain command)."""
    root = get_command(app)
    return {
        name: set(command.commands) if hasattr(command, "commands") else None
        for name, command in root.commands.items()
    }


def test_compose_has_every_service_with_health_checks_and_order() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {
        "postgres", "redis", "migrate", "encoders", "dispatcher", "worker", "trainer", "beat",
    }  # fmt: skip
    assert "healthcheck" in services["postgres"] and "healthcheck" in services["redis"]
    for name in ("dispatcher", "worker", "trainer", "beat"):
        needs = services[name]["depends_on"]
        assert needs["migrate"]["condition"] == "service_completed_successfully", name
        assert needs["postgres"]["condition"] == "service_healthy", name


def test_every_compose_command_exists_in_the_cli() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    known = cli_commands()
    for name, service in compose["services"].items():
        command = service.get("command")
        if not command or command[0] != "shelver":
            continue
        top = command[1]
        assert top in known, (name, command)
        if known[top] is not None:
            assert command[2] in known[top], (name, command)
