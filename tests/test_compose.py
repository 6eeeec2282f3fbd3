"""docker-compose.yml names the services DESIGN.md lists, and each runs a real CLI command."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml
from celery.utils.nodenames import host_format
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
        "web", "prometheus", "grafana",
    }  # fmt: skip
    assert "healthcheck" in services["postgres"] and "healthcheck" in services["redis"]
    for name in ("dispatcher", "worker", "trainer", "beat", "web"):
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


def worker_services() -> dict[str, dict]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return {
        name: service
        for name, service in compose["services"].items()
        if service.get("command", [])[:2] == ["shelver", "worker"]
    }


def node_name_and_ping(service: dict) -> tuple[str, list[str]]:
    """The --name the service's worker takes, and its healthcheck as the shell receives it."""
    command = service["command"]
    assert "--name" in command, f"{command}: a worker pinged by name must be given that name"
    kind, script = service["healthcheck"]["test"]
    assert kind == "CMD-SHELL"
    # Compose turns $$ into a literal $, left for the container's shell to expand.
    return command[command.index("--name") + 1], shlex.split(script.replace("$$", "$"))


def test_each_worker_healthcheck_pings_the_name_its_worker_takes() -> None:
    services = worker_services()
    assert {"worker", "trainer"} <= set(services)
    for name, service in services.items():
        template, ping = node_name_and_ping(service)
        assert ping[:5] == ["celery", "-A", "shelver.worker.celery_app", "inspect", "ping"], name
        destination = ping[ping.index("-d") + 1]
        # In a container $HOSTNAME is the host name Celery puts in place of %h.
        container = "3f2a9c81d0e4"
        assert destination.replace("$HOSTNAME", container) == host_format(
            template, host=container
        ), f"{name}: the healthcheck pings {destination}, the worker is named {template}"
